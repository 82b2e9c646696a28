// Building DOM nodes. Text always goes in as text nodes, never as HTML, so stored prompts and outputs
// cannot inject markup.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(element, attributes, children) {
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.setAttribute("class", value);
    else if (name === "text") element.textContent = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** Create an HTML element: h("p", {class: "note"}, "text", h("code", {}, "x")). */
export function h(tag, attributes = {}, ...children) {
  return fill(document.createElement(tag), attributes, children);
}

/** Create an SVG element, as h does. */
export function s(tag, attributes = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attributes, children);
}

/**
 * Create a table cell with its column's name in data-label, which narrow screens show beside the value.
 * The value is one element, so that the stacked layout keeps it on one line.
 */
export function cell(label, attributes, ...value) {
  return h("td", { ...attributes, "data-label": label }, h("span", { class: "cell-value" }, ...value));
}

/** Format a score as the page prints it everywhere: three decimals. */
export function score(value) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(3);
}

/** Format a stored time (ISO 8601 with Z) as "2026-12-05 03:01:28Z": UTC to the second. */
export function utc(value) {
  if (!value) return "–";
  return value.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z");
}

/** Format a token's text with its spaces and line breaks made visible. */
export function tokenText(text) {
  if (text === null || text === undefined) return "∅";
  if (text === "") return "∅";
  // A token of spaces alone would show as nothing.
  if (/^ +$/.test(text)) return "␣".repeat(text.length);
  return text.replace(/\n/g, "↵\n").replace(/\t/g, "⇥");
}

/** Format a token's text on one line, quoted, for labels and tooltips. */
export function tokenLabel(text) {
  if (text === null || text === undefined) return "(withheld)";
  return JSON.stringify(text);
}
