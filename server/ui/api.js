// Calls to tracehead's JSON API with the auditor's key.
//
// URLs are relative to the page (<prefix>/ui/), so the page works under TRACEHEAD_ROOT_PATH and
// behind a gateway that adds or strips a prefix.

const KEY_STORAGE = "tracehead.apiKey";

export function apiUrl(path, params = {}) {
  const url = new URL(`../${path}`, document.baseURI);
  for (const [name, value] of Object.entries(params)) {
    if (Array.isArray(value)) value.forEach((item) => url.searchParams.append(name, item));
    else if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  return url;
}

// The key lives in sessionStorage: this tab only, gone when it closes.
export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function storeKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An error response of the API: its status and the message of its error body. */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code;
    }
  } catch {
    // Not the API's error body (a proxy's error page, for example), so the status line must do.
  }
  return new ApiError(response.status, message, code);
}

async function send(path, params) {
  const key = storedKey();
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  let response;
  try {
    response = await fetch(apiUrl(path, params), { headers, cache: "no-store" });
  } catch (error) {
    throw new ApiError(0, `the server could not be reached (${error.message}); check that tracehead runs`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** GET a JSON resource of the API, e.g. getJson("v1/judgments", {flagged: "true"}). */
export async function getJson(path, params = {}) {
  return (await send(path, params)).json();
}

/** GET a file of the API (an export) and hand it to the browser as a download; return its name. */
export async function download(path, params, fallbackName) {
  const response = await send(path, params);
  const disposition = response.headers.get("Content-Disposition") || "";
  const name = (/filename="([^"]+)"/.exec(disposition) || [])[1] || fallbackName;
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  // The browser has taken the blob once the click's task ends.
  setTimeout(() => URL.revokeObjectURL(url), 0);
  return name;
}
