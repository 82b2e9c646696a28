// The token heatmap: one focusable span per token of the prompt and the output, coloured by one
// constraint's score, with a tooltip that shows the numbers on hover and on focus.
//
// The tokens form one listbox: Tab reaches it once, the arrow keys (and Home, End) move between
// tokens, Enter or Space selects one.

import { css, scoreRgb, textOn } from "./colors.js";
import { h, score, tokenLabel, tokenText } from "./dom.js";

const tooltip = document.getElementById("tooltip");

export class TokenStream {
  /**
   * trace: the judgment's trace; onSelect(position): called when the reader selects a token.
   * describe(token): the lines of the tooltip of a token.
   */
  constructor(trace, { onSelect, describe }) {
    this.tokens = [...trace.prompt_tokens, ...trace.output_tokens];
    this.describe = describe;
    this.onSelect = onSelect;
    this.spans = new Map();
    this.order = [];
    this.indexOf = new Map(this.tokens.map((token, index) => [token.position, index]));
    this.focusable = null;
    this.element = h("div", { id: "tokens", class: "token-streams", role: "listbox", "aria-label": "Tokens" },
      this.group("prompt", "Prompt", trace.prompt_tokens),
      this.group("output", "Output", trace.output_tokens));
    this.element.addEventListener("keydown", (event) => this.onKey(event));
    this.element.addEventListener("click", (event) => {
      const span = event.target.closest(".token");
      if (span) this.onSelect(Number(span.dataset.position));
    });
    this.element.addEventListener("focusin", (event) => this.onFocus(event.target));
    this.element.addEventListener("focusout", hideTooltip);
    this.element.addEventListener("mouseover", (event) => {
      const span = event.target.closest(".token");
      if (span) showTooltip(span, this.describe(this.tokenAt(span)));
    });
    this.element.addEventListener("mouseleave", () => {
      if (!this.element.contains(document.activeElement)) hideTooltip();
    });
    this.setFocusable(this.order[0]);
  }

  group(kind, title, tokens) {
    const spans = tokens.map((token) => {
      const span = h("span", { class: "token", role: "option", id: `token-${token.position}`, tabindex: "-1",
        "aria-selected": "false", dataset: { position: token.position, part: kind } }, tokenText(token.text));
      this.spans.set(token.position, span);
      this.order.push(token.position);
      return span;
    });
    return h("div", { class: `stream stream-${kind}`, role: "group", "aria-label": `${title}, ${tokens.length} tokens` },
      h("div", { class: "stream-title", "aria-hidden": "true" }, `${title} · ${tokens.length} tokens`),
      h("div", { class: "stream-text" }, spans.length ? spans : h("em", {}, "no tokens")));
  }

  tokenAt(span) {
    return this.tokens[this.indexOf.get(Number(span.dataset.position))];
  }

  /** Colour every token by ``constraint``; underline those below ``threshold``; label each for screen readers. */
  paint(constraint, threshold, label) {
    for (const token of this.tokens) {
      const span = this.spans.get(token.position);
      const value = token.scores[constraint];
      const rgb = scoreRgb(value);
      span.style.backgroundColor = css(rgb);
      span.style.color = textOn(rgb);
      span.dataset.score = String(value);
      span.classList.toggle("below", threshold !== null && value < threshold);
      span.setAttribute("aria-label", label(token));
    }
  }

  /** Mark the selected token, and the tokens it attended to with their weights ([[position, weight]]). */
  mark(selected, attended) {
    for (const span of this.element.querySelectorAll(".selected, .attended")) {
      span.classList.remove("selected", "attended");
      span.setAttribute("aria-selected", "false");
      delete span.dataset.weight;
    }
    if (selected === null) return;
    const span = this.spans.get(selected);
    span.classList.add("selected");
    span.setAttribute("aria-selected", "true");
    for (const [position, weight] of attended) {
      const target = this.spans.get(position);
      if (!target) continue;
      target.classList.add("attended");
      target.dataset.weight = score(weight).replace(/^0/, "");
    }
    this.setFocusable(selected);
  }

  focus(position) {
    const span = this.spans.get(position);
    if (!span) return;
    this.setFocusable(position);
    span.focus({ preventScroll: true });
    span.scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  setFocusable(position) {
    if (position === undefined || position === null) return;
    if (this.focusable !== null) this.spans.get(this.focusable).setAttribute("tabindex", "-1");
    this.focusable = position;
    this.spans.get(position).setAttribute("tabindex", "0");
  }

  onFocus(target) {
    if (!target.classList.contains("token")) return;
    this.setFocusable(Number(target.dataset.position));
    showTooltip(target, this.describe(this.tokenAt(target)));
  }

  onKey(event) {
    const span = event.target.closest(".token");
    if (!span) return;
    const index = this.indexOf.get(Number(span.dataset.position));
    const moves = { ArrowRight: index + 1, ArrowDown: index + 1, ArrowLeft: index - 1, ArrowUp: index - 1,
      Home: 0, End: this.order.length - 1 };
    if (event.key in moves) {
      event.preventDefault();
      const next = Math.min(this.order.length - 1, Math.max(0, moves[event.key]));
      this.focus(this.order[next]);
    } else if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      this.onSelect(Number(span.dataset.position));
    } else if (event.key === "Escape") {
      hideTooltip();
    }
  }
}

export function showTooltip(anchor, lines) {
  tooltip.replaceChildren(...lines.map((line) => h("div", {}, line)));
  tooltip.hidden = false;
  const box = anchor.getBoundingClientRect();
  const width = tooltip.offsetWidth;
  const page = document.documentElement.clientWidth;
  // Kept inside the viewport's width, so the tooltip never makes the page scroll sideways.
  const left = Math.max(4, Math.min(box.left, page - width - 4));
  tooltip.style.left = `${left + window.scrollX}px`;
  tooltip.style.top = `${box.bottom + window.scrollY + 4}px`;
}

export function hideTooltip() {
  tooltip.hidden = true;
}

/** Name a token on one line: its position and quoted text. */
export function tokenName(token) {
  return `${token.position} ${tokenLabel(token.text)}`;
}
