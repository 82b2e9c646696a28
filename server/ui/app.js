// The page's entry: the API key, navigation between the list and a judgment, and error display.
//
// Everything the page shows comes from the JSON API. The URL's query contains the view and the
// filters, so a view can be reloaded or shared, and the key never goes into the URL.

import { ApiError, forgetKey, storeKey, storedKey } from "./api.js";
import { renderJudgment } from "./judgment.js";
import { renderList } from "./list.js";

const main = document.getElementById("main");
const view = document.getElementById("view");
const notice = document.getElementById("notice");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");

const app = {
  /** Go to a URL of the page (a query string such as "?judgment=..."), keeping history. */
  navigate(url, state = null) {
    history.pushState(state, "", url);
    render({ focus: true });
  },
  /** Show an error the way every view does: the key form on 401, the API's message otherwise. */
  fail(error) {
    if (error instanceof ApiError && error.status === 401) {
      askForKey(error.message);
    } else if (error instanceof ApiError && error.status === 403) {
      showNotice(`${error.message}. Use a key with that scope.`);
      askForKey("This key may not read the audit store.", false);
    } else {
      showNotice(error instanceof ApiError ? error.message : `The page failed: ${error.message}`);
      if (!(error instanceof ApiError)) console.error(error);
    }
  },
  notify: showNotice,
};

function showNotice(message) {
  notice.replaceChildren();
  if (message) notice.append(Object.assign(document.createElement("p"), { textContent: message }));
}

function askForKey(reason, focus = true) {
  document.getElementById("key-reason").textContent = reason;
  keyForm.hidden = false;
  keyInput.value = "";
  if (focus) keyInput.focus();
}

function showKeyStatus() {
  const key = storedKey();
  document.getElementById("key-status").hidden = !key;
  document.getElementById("key-label").textContent = key ? `Key ${key.slice(0, 7)}… in this tab` : "";
}

let renders = 0;

async function render({ focus = false } = {}) {
  const current = ++renders;
  main.setAttribute("aria-busy", "true");
  showNotice("");
  showKeyStatus();
  keyForm.hidden = true;
  // Each render fills its own container, so a slow response for a view already left changes nothing.
  const container = document.createElement("div");
  view.replaceChildren(container);
  const params = new URLSearchParams(location.search);
  try {
    if (params.get("judgment")) await renderJudgment(container, params, app);
    else await renderList(container, params, app);
  } catch (error) {
    if (current === renders) app.fail(error);
  } finally {
    if (current === renders) main.setAttribute("aria-busy", "false");
  }
  if (focus && current === renders) container.querySelector("h1")?.focus();
}

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) return;
  storeKey(key);
  render({ focus: true });
});

document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  render();
});

// Links marked data-nav change the view without reloading the page.
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-nav]");
  if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  event.preventDefault();
  app.navigate(link.getAttribute("href"));
});

window.addEventListener("popstate", () => render({ focus: true }));

render();
