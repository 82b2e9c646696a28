// The judgment list: the auditor filters, cursor paging and export.
//
// The filters are the query parameters of GET /v1/judgments under the same names, and they live
// in the page's URL. The cursors of earlier pages live in the history entry, so "Previous" and the
// browser's Back both return to them.

import { download, getJson } from "./api.js";
import { css, scoreRgb } from "./colors.js";
import { cell, h, score, utc } from "./dom.js";

// Filter parameters, as GET /v1/judgments names them.
export const FILTERS = ["since", "until", "model", "heads", "constraint", "min_score", "max_score", "passed",
  "flagged", "kind", "status", "q", "order", "limit"];
// Filters that apply to one constraint's verdict, so they need `constraint`.
const VERDICT_FILTERS = ["min_score", "max_score", "passed"];
const PAGE_SIZES = ["10", "20", "50", "100"];

let knownConstraints = null;

/** Pick the filter parameters out of a URL query, without paging or view parameters. */
export function filterParams(params) {
  const filters = {};
  for (const name of FILTERS) {
    if (params.get(name)) filters[name] = params.get(name);
  }
  return filters;
}

async function constraintNames(page) {
  // The served heads' constraints, in their order, as the newest judgment lists them.
  if (knownConstraints === null) {
    const first = page.data[0] || (await getJson("v1/judgments", { limit: 1, fields: "judgment" })).data[0];
    if (first) knownConstraints = Object.keys(first.judgment.constraints);
  }
  return knownConstraints || [];
}

export async function renderList(container, params, app) {
  const filters = filterParams(params);
  const cursor = params.get("cursor");
  const page = await getJson("v1/judgments", { ...filters, cursor });
  const constraints = await constraintNames(page);
  const earlier = (history.state && history.state.earlier) || [];

  container.append(
    h("h1", { tabindex: "-1" }, "Judgments"),
    filterForm(filters, constraints, app),
    exportBar(filters, app),
    resultsTable(page.data, constraints, params),
    pager(page, params, earlier, app),
  );
}

// Filters

function field(label, input, hint) {
  const hintId = hint ? `${input.id}-hint` : null;
  if (hintId) input.setAttribute("aria-describedby", hintId);
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input,
    hint ? h("span", { class: "hint", id: hintId }, hint) : null);
}

function select(id, name, options, value) {
  return h("select", { id, name }, options.map(([optionValue, label]) =>
    h("option", { value: optionValue, selected: optionValue === (value || "") }, label)));
}

// A datetime-local value has no zone, so the page reads and writes it as UTC.
function toInputTime(value) {
  return value ? value.replace(/Z$|\+00:00$/, "").replace(/\.\d+$/, "").slice(0, 19) : "";
}

function fromInputTime(value) {
  return value ? `${value.length === 16 ? `${value}:00` : value}Z` : "";
}

function filterForm(filters, constraints, app) {
  const constraintSelect = select("f-constraint", "constraint",
    [["", "any"], ...constraints.map((name) => [name, name])], filters.constraint);
  const verdictInputs = [
    h("input", { id: "f-min", name: "min_score", type: "number", min: 0, max: 1, step: "any", inputmode: "decimal",
      value: filters.min_score || "" }),
    h("input", { id: "f-max", name: "max_score", type: "number", min: 0, max: 1, step: "any", inputmode: "decimal",
      value: filters.max_score || "" }),
    h("input", { id: "f-failed", name: "passed", type: "checkbox", value: "false",
      checked: filters.passed === "false" }),
  ];
  const needsConstraint = () => {
    for (const input of verdictInputs) input.disabled = !constraintSelect.value;
  };
  constraintSelect.addEventListener("change", needsConstraint);
  needsConstraint();

  const hint = "Applies to the chosen constraint's final score.";
  const form = h("form", { id: "filters", class: "panel filters", "aria-labelledby": "filters-title" },
    h("h2", { id: "filters-title" }, "Filters"),
    h("div", { class: "fields" },
      field("Since (UTC)", h("input", { id: "f-since", name: "since", type: "datetime-local", step: 1,
        value: toInputTime(filters.since) })),
      field("Until (UTC)", h("input", { id: "f-until", name: "until", type: "datetime-local", step: 1,
        value: toInputTime(filters.until) })),
      field("Model", h("input", { id: "f-model", name: "model", type: "text", value: filters.model || "",
        spellcheck: "false" }), "Exact name."),
      field("Heads", h("input", { id: "f-heads", name: "heads", type: "text", value: filters.heads || "",
        spellcheck: "false" }), "Exact name."),
      field("Constraint", constraintSelect),
      field("Min score", verdictInputs[0], hint),
      field("Max score", verdictInputs[1], hint),
      h("div", { class: "field checkbox" }, verdictInputs[2],
        h("label", { for: "f-failed" }, "Failed only"),
        h("span", { class: "hint", id: "f-failed-hint" }, "The chosen constraint failed.")),
      field("Flagged", select("f-flagged", "flagged",
        [["", "any"], ["true", "flagged"], ["false", "not flagged"]], filters.flagged)),
      field("Kind", select("f-kind", "kind",
        [["", "any"], ["generation", "generation"], ["score", "score"]], filters.kind)),
      field("Status", select("f-status", "status", [["", "any"], ["completed", "completed"],
        ["started", "started"], ["cancelled", "cancelled"], ["failed", "failed"]], filters.status)),
      field("Text search", h("input", { id: "f-q", name: "q", type: "search", value: filters.q || "" }),
        "Output or prompt, any case."),
      field("Order", select("f-order", "order", [["", "newest first"], ["oldest", "oldest first"]],
        filters.order)),
      field("Per page", select("f-limit", "limit", PAGE_SIZES.map((size) => [size === "20" ? "" : size, size]),
        filters.limit)),
    ),
    h("div", { class: "actions" },
      h("button", { type: "submit" }, "Apply filters"),
      h("button", { type: "button", id: "reset", onclick: () => app.navigate("./") }, "Reset")),
  );
  verdictInputs[2].setAttribute("aria-describedby", "f-failed-hint");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    app.navigate(`?${formQuery(form)}`);
  });
  return form;
}

function formQuery(form) {
  const query = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    const text = String(value).trim();
    if (!text) continue;
    query.set(name, name === "since" || name === "until" ? fromInputTime(text) : text);
  }
  // Disabled inputs are left out of FormData already; without a constraint none applies.
  if (!query.get("constraint")) VERDICT_FILTERS.forEach((name) => query.delete(name));
  return query.toString();
}

// Export

function exportBar(filters, app) {
  const status = h("span", { class: "export-status", role: "status" });
  const withTrace = h("input", { id: "export-trace", type: "checkbox" });
  const exportAs = async (format) => {
    const { limit, ...exported } = filters;
    status.textContent = `Exporting ${format.toUpperCase()}…`;
    try {
      const params = { ...exported, format, include_trace: format === "jsonl" && withTrace.checked ? "true" : "" };
      const name = await download("v1/judgments/export", params, `judgments.${format}`);
      status.textContent = `Saved ${name}: every judgment that matches the filters, on all pages.`;
    } catch (error) {
      status.textContent = "";
      app.fail(error);
    }
  };
  return h("section", { class: "panel export", "aria-labelledby": "export-title" },
    h("h2", { id: "export-title" }, "Export"),
    h("div", { class: "inline" },
      h("button", { type: "button", id: "export-jsonl", onclick: () => exportAs("jsonl") }, "Download JSONL"),
      h("button", { type: "button", id: "export-csv", onclick: () => exportAs("csv") }, "Download CSV"),
      h("span", { class: "checkbox" }, withTrace, h("label", { for: "export-trace" }, "with traces (JSONL only)"))),
    status);
}

// Results

function verdictCell(verdict, name) {
  if (!verdict) return cell(name, {}, "–");
  const swatch = h("span", { class: "swatch", "aria-hidden": "true" });
  swatch.style.backgroundColor = css(scoreRgb(verdict.score));
  return cell(name, { class: verdict.passed ? "passed" : "failed", dataset: { constraint: name } },
    swatch, score(verdict.score), " ", h("span", { class: "verdict-word" }, verdict.passed ? "passed" : "failed"));
}

function resultsTable(items, constraints, params) {
  const region = h("section", { class: "results", "aria-labelledby": "results-title" },
    h("h2", { id: "results-title" }, "Results"));
  if (items.length === 0) {
    region.append(h("p", { id: "no-results" }, "No judgment matches these filters."));
    return region;
  }
  const linkQuery = new URLSearchParams(params);
  const rows = items.map((item) => {
    linkQuery.set("judgment", item.id);
    return h("tr", { dataset: { id: item.id } },
      cell("Created (UTC)", {}, h("a", { href: `?${linkQuery}`, "data-nav": true,
        "aria-label": `Judgment of ${utc(item.created_at)}, ${item.id}` }, utc(item.created_at))),
      cell("Kind", {}, item.kind, item.status === "completed" ? null : ` (${item.status})`),
      cell("Model", {}, item.model, h("br"), h("span", { class: "muted" }, item.heads)),
      cell("Text", { class: "text-cell" }, item.text ? item.text.slice(0, 160) : h("em", {}, "(empty)")),
      constraints.map((name) => verdictCell(item.judgment.constraints[name], name)),
      cell("Flagged", { class: item.flagged ? "failed" : "" }, item.flagged ? "flagged" : "no"));
  });
  region.append(h("table", { id: "results", class: "stacking" },
    h("caption", { class: "visually-hidden" }, "Judgments that match the filters, one per row"),
    h("thead", {}, h("tr", {}, ["Created (UTC)", "Kind", "Model", "Text", ...constraints, "Flagged"]
      .map((name) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows)));
  return region;
}

function pager(page, params, earlier, app) {
  const go = (cursor, stack) => {
    const query = new URLSearchParams(params);
    if (cursor) query.set("cursor", cursor);
    else query.delete("cursor");
    app.navigate(`?${query}`, { earlier: stack });
  };
  const current = params.get("cursor");
  const previous = h("button", { type: "button", id: "prev", disabled: !current,
    onclick: () => go(earlier.length ? earlier[earlier.length - 1] : null, earlier.slice(0, -1)) }, "Previous page");
  const next = h("button", { type: "button", id: "next", disabled: !page.next_cursor,
    onclick: () => go(page.next_cursor, [...earlier, current]) }, "Next page");
  // A reloaded page keeps its cursor but may have lost the earlier ones.
  let label = "A later page";
  if (!current) {
    label = "Page 1";
  } else if (earlier.length) {
    label = `Page ${earlier.length + 1}`;
  }
  return h("nav", { class: "pager", "aria-label": "Pages" }, previous,
    h("span", { id: "page-label" }, `${label} · ${page.data.length} shown`), next);
}
