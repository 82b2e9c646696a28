// One judgment: verdicts, the token heatmap with its score line, the why view of a selected token,
// the stored record's details and its integrity status.

import { getJson } from "./api.js";
import { scoreChart } from "./chart.js";
import { css, scaleGradient, scoreRgb } from "./colors.js";
import { cell, h, score, tokenText, utc } from "./dom.js";
import { checkIntegrity } from "./integrity.js";
import { TokenStream, tokenName } from "./tokens.js";

// Parameters of the judgment view; the rest of the URL's query is the list's filters.
const VIEW_PARAMS = ["judgment", "heat", "token"];

export async function renderJudgment(container, params, app) {
  const id = params.get("judgment");
  const record = await getJson(`v1/judgments/${encodeURIComponent(id)}`);
  new JudgmentView(container, record, params, app).show();
}

class JudgmentView {
  constructor(container, record, params, app) {
    this.container = container;
    this.record = record;
    this.params = new URLSearchParams(params);
    this.app = app;
    this.trace = record.trace || null;
    this.verdicts = record.judgment.constraints;
    this.constraints = this.trace ? this.trace.constraints : Object.keys(this.verdicts);
    this.tokens = this.trace ? [...this.trace.prompt_tokens, ...this.trace.output_tokens] : [];
    this.byPosition = new Map(this.tokens.map((token) => [token.position, token]));
    const failed = this.constraints.find((name) => this.verdicts[name] && !this.verdicts[name].passed);
    const heat = params.get("heat");
    this.heat = this.constraints.includes(heat) ? heat : failed || this.constraints[0];
    const token = Number.parseInt(params.get("token"), 10);
    this.selected = this.byPosition.has(token) ? token : null;
  }

  threshold(name) {
    return this.verdicts[name] ? this.verdicts[name].threshold : null;
  }

  show() {
    const back = new URLSearchParams(this.params);
    VIEW_PARAMS.forEach((name) => back.delete(name));
    this.badge = h("span", { id: "badge", class: "badge", dataset: { status: "checking" } }, "checking…");
    this.integrity = h("div", { id: "integrity-detail" }, h("p", {}, "Checking the inclusion proof…"));
    const parts = [
      h("p", { class: "back" }, h("a", { href: `./?${back}`, "data-nav": true }, "← All judgments")),
      h("h1", { tabindex: "-1" }, "Judgment ", h("code", { class: "id" }, this.record.id)),
      this.summary(),
      this.notices(),
      this.verdictTable(),
      this.trace ? this.tokenSection() : h("section", { class: "panel" }, h("h2", {}, "Tokens"),
        h("p", { id: "no-trace" }, this.record.erasure ? "The trace was erased with the payload." : "No trace is stored.")),
      this.details(),
      h("section", { class: "panel", "aria-labelledby": "integrity-title" },
        h("h2", { id: "integrity-title" }, "Integrity"), this.integrity)];
    this.container.append(...parts.filter(Boolean));
    if (this.trace) this.update();
    this.runIntegrity();
  }

  // Summary and notices

  summary() {
    const record = this.record;
    const fact = (term, ...value) => h("div", {}, h("dt", {}, term), h("dd", {}, ...value));
    return h("dl", { class: "facts" },
      fact("Status", record.status),
      fact("Kind", record.kind),
      fact("Flagged", record.judgment.flagged ? h("strong", { class: "failed" }, "flagged") : "no"),
      fact("Created", utc(record.created_at)),
      fact("Integrity", this.badge));
  }

  notices() {
    const record = this.record;
    const notes = [];
    if (record.erasure) {
      const { erased_at: at, erased_by: by, reason } = record.erasure;
      notes.push(`The payload was erased at ${utc(at)} by ${by}: ${reason}. The prompt, output and trace are gone; ` +
        "the verdicts and the record's place in the integrity log remain.");
    }
    if (record.judgment.policy && record.judgment.policy.withheld) {
      notes.push("A withhold rule kept this text from the client; the audit store keeps it, and it is shown here.");
    }
    if (record.status === "started") {
      notes.push("This judgment is still started: a stream in progress, or one whose final commit failed. " +
        "It has no final verdicts, and no leaf in the integrity log yet.");
    } else if (record.status === "cancelled") {
      notes.push("The client disconnected; the trace holds the tokens generated until then.");
    } else if (record.status === "failed") {
      notes.push("The generation failed; the trace holds the tokens generated until then.");
    }
    return notes.length ? h("div", { id: "notes", class: "notes" }, notes.map((note) => h("p", {}, note))) : null;
  }

  // Verdicts

  verdictTable() {
    const names = Object.keys(this.verdicts);
    const section = h("section", { class: "panel", "aria-labelledby": "verdicts-title" },
      h("h2", { id: "verdicts-title" }, "Verdicts"));
    if (names.length === 0) {
      section.append(h("p", {}, "No verdicts are stored yet."));
      return section;
    }
    const rows = names.map((name) => {
      const verdict = this.verdicts[name];
      const lowest = this.byPosition.get(verdict.min_position);
      const button = lowest ? h("button", { type: "button", class: "lowest", dataset: { position: verdict.min_position },
        "aria-label": `Select the lowest-scoring token of ${name}: ${tokenName(lowest)}`,
        onclick: () => this.showLowest(name, verdict.min_position) }, `Token ${tokenName(lowest)}`) : `position ${verdict.min_position}`;
      return h("tr", { dataset: { constraint: name }, class: verdict.passed ? "passed" : "failed" },
        h("th", { scope: "row", "data-label": "Constraint" }, name),
        cell("Score", {}, score(verdict.score)),
        cell("Lowest score", {}, score(verdict.min_score)),
        cell("Threshold", {}, score(verdict.threshold)),
        cell("Result", { class: "result" }, verdict.passed ? "passed" : "failed"),
        cell("Lowest token", {}, button));
    });
    section.append(h("table", { id: "verdicts", class: "stacking" },
      h("caption", { class: "visually-hidden" }, "Verdict per constraint"),
      h("thead", {}, h("tr", {}, ["Constraint", "Score", "Lowest score", "Threshold", "Result", "Lowest token"]
        .map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows)),
    h("p", { class: "hint" }, "The score is the head's score at the last judged token; a constraint passes when it " +
      "is at least the threshold. The lowest score is over the output tokens."));
    return section;
  }

  showLowest(name, position) {
    this.heat = name;
    this.heatSelect.value = name;
    this.select(position, { focus: true });
  }

  // Tokens, legend, score line and the why view

  tokenSection() {
    this.heatSelect = h("select", { id: "heat" },
      this.constraints.map((name) => h("option", { value: name, selected: name === this.heat }, name)));
    this.heatSelect.addEventListener("change", () => {
      this.heat = this.heatSelect.value;
      this.update();
    });
    this.stream = new TokenStream(this.trace, {
      onSelect: (position) => this.select(position, { focus: true }),
      describe: (token) => this.describe(token),
    });
    this.legend = h("div", { class: "legend" });
    this.chart = h("div", { id: "chart" });
    this.why = h("section", { id: "why", class: "why", "aria-labelledby": "why-title" });
    this.announcer = h("p", { class: "visually-hidden", role: "status" });
    return h("section", { class: "panel", "aria-labelledby": "tokens-title" },
      h("h2", { id: "tokens-title" }, "Tokens"),
      h("div", { class: "heat-controls" },
        h("div", { class: "field" }, h("label", { for: "heat" }, "Colour by"), this.heatSelect),
        this.legend),
      this.chart,
      h("p", { class: "hint" }, "Click a token, or Tab to the tokens, move with the arrow keys and press Enter, to see " +
        "which tokens, up to and including that one, each head attended to."),
      h("div", { class: "token-layout" }, this.stream.element, this.why),
      this.announcer);
  }

  select(position, { focus = false } = {}) {
    this.selected = position;
    this.update();
    const token = this.byPosition.get(position);
    this.announcer.textContent = `Selected token ${tokenName(token)}.`;
    if (focus) this.stream.focus(position);
  }

  /** Redraw what depends on the constraint shown and the selected token, and keep both in the URL. */
  update() {
    const threshold = this.threshold(this.heat);
    this.stream.element.setAttribute("aria-label", `Tokens, coloured by ${this.heat}`);
    this.stream.paint(this.heat, threshold, (token) => this.ariaLabel(token));
    const selected = this.selected === null ? null : this.byPosition.get(this.selected);
    this.stream.mark(this.selected, selected ? selected.attention[this.heat] || [] : []);
    this.legend.replaceChildren(...legend(this.heat, threshold));
    this.chart.replaceChildren(scoreChart({ tokens: this.tokens, constraints: this.constraints,
      promptLength: this.trace.prompt_tokens.length, heat: this.heat, threshold: threshold ?? 0.5,
      selected: this.selected, onPick: (position) => this.select(position, { focus: true }) }));
    this.why.replaceChildren(...this.whyView(selected));

    this.params.set("heat", this.heat);
    if (this.selected === null) this.params.delete("token");
    else this.params.set("token", String(this.selected));
    history.replaceState(history.state, "", `?${this.params}`);
  }

  part(token) {
    return token.position < this.trace.prompt_tokens.length ? "prompt" : "output";
  }

  ariaLabel(token) {
    const value = token.scores[this.heat];
    const threshold = this.threshold(this.heat);
    const below = threshold !== null && value < threshold ? ", below the threshold" : "";
    const attended = this.attendedWeight(token);
    return `${tokenName(token)}, ${this.part(token)}, ${this.heat} ${score(value)}${below}` +
      (attended === null ? "" : `, attention weight ${score(attended)} from the selected token`);
  }

  attendedWeight(token) {
    if (this.selected === null) return null;
    const pairs = this.byPosition.get(this.selected).attention[this.heat] || [];
    const pair = pairs.find(([position]) => position === token.position);
    return pair ? pair[1] : null;
  }

  describe(token) {
    const threshold = this.threshold(this.heat);
    const lines = [`${tokenName(token)} · ${this.part(token)}`];
    for (const name of this.constraints) {
      const value = token.scores[name];
      const limit = this.threshold(name);
      const mark = limit !== null && value < limit ? ` (below ${score(limit)})` : "";
      lines.push(`${name === this.heat ? "▸ " : ""}${name}: ${score(value)}${mark}`);
    }
    if (token.logprob !== null && token.logprob !== undefined) lines.push(`logprob ${token.logprob.toFixed(3)}`);
    const attended = this.attendedWeight(token);
    if (attended !== null) lines.push(`attention from the selected token: ${score(attended)}`);
    if (threshold === null) lines.push("no threshold stored for this constraint");
    return lines;
  }

  whyView(token) {
    const title = h("h3", { id: "why-title" }, "Why");
    if (!token) {
      return [title, h("p", {}, "Select a token to see, for each constraint, which tokens up to it its head attended to.")];
    }
    const sections = this.constraints.map((name) => {
      const value = token.scores[name];
      const limit = this.threshold(name);
      const pairs = token.attention[name] || [];
      const swatch = h("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.backgroundColor = css(scoreRgb(value));
      return h("div", { class: "why-constraint", dataset: { constraint: name } },
        h("h4", {}, swatch, `${name}: ${score(value)}`,
          limit !== null && value < limit ? h("span", { class: "failed" }, ` below ${score(limit)}`) : null),
        pairs.length ? h("ol", { class: "attended-list", "aria-label": `Tokens the ${name} head attended to` },
          pairs.map(([position, weight]) => this.attendedItem(name, position, weight))) : h("p", {}, "No attention stored."));
    });
    return [title,
      h("p", { class: "why-token" }, `Token ${tokenName(token)}, ${this.part(token)}` +
        (token.logprob === null || token.logprob === undefined ? "" : `, logprob ${token.logprob.toFixed(3)}`)),
      h("p", { class: "hint" }, "Each head's heaviest positions up to this token, with the attention weight (mean over that " +
        "constraint's heads). Select one to go to it."),
      ...sections];
  }

  attendedItem(name, position, weight) {
    const target = this.byPosition.get(position);
    const chip = h("button", { type: "button", class: "chip", dataset: { position },
      "aria-label": `${tokenName(target)}, weight ${score(weight)}; select it`,
      onclick: () => this.select(position, { focus: true }) }, tokenText(target.text));
    const bar = h("span", { class: "weight-bar", "aria-hidden": "true" });
    bar.style.width = `${Math.round(weight * 100)}%`;
    return h("li", { dataset: { position, weight } },
      chip, h("span", { class: "position" }, `@${position}`),
      h("span", { class: "weight" }, score(weight)), h("span", { class: "weight-track", "aria-hidden": "true" }, bar));
  }

  // Record details

  details() {
    const record = this.record;
    const row = (term, ...value) => h("div", {}, h("dt", {}, term), h("dd", {}, ...value));
    const code = (text) => h("code", { class: "wrap" }, text);
    const json = (value) => h("pre", { class: "json" }, JSON.stringify(value, null, 2));
    const metadata = Object.entries(record.metadata || {});
    const policy = record.judgment.policy;
    return h("section", { class: "panel", "aria-labelledby": "record-title" },
      h("h2", { id: "record-title" }, "Record"),
      h("dl", { class: "details" },
        row("Judgment id", code(record.id)),
        row("Request id", code(record.request_id)),
        row("Created", utc(record.created_at)),
        row("Completed", record.completed_at ? utc(record.completed_at) : "not yet"),
        row("Latency", record.latency_ms === null || record.latency_ms === undefined ? "–" : `${record.latency_ms} ms`),
        row("Model", record.model, h("br"), code(record.model_fingerprint)),
        row("Heads", record.heads, h("br"), code(record.heads_fingerprint)),
        row("Seed", record.seed === null || record.seed === undefined ? "none" : code(String(record.seed))),
        row("Finish reason", record.finish_reason || "–"),
        row("Tokens", `${record.usage.prompt_tokens} prompt, ${record.usage.completion_tokens} output`),
        row("Metadata", metadata.length ? h("ul", { class: "plain" },
          metadata.map(([key, value]) => h("li", {}, code(key), ": ", value))) : "none"),
        row("Parameters", json(record.parameters)),
        row("Input as sent", Object.keys(record.input || {}).length ? inputView(record.input) : h("em", {}, "erased")),
        row("Policy", policy ? json(policy) : "none"),
        record.erasure ? row("Erasure", `${utc(record.erasure.erased_at)} by ${record.erasure.erased_by}: ` +
          record.erasure.reason) : null));
  }

  // Integrity

  async runIntegrity() {
    let result;
    try {
      result = await checkIntegrity(this.record.id);
    } catch (error) {
      this.badge.dataset.status = "pending";
      this.badge.textContent = "pending";
      this.integrity.replaceChildren(h("p", {}, `Not checked: ${error.message}`));
      return;
    }
    this.badge.dataset.status = result.status;
    this.badge.textContent = result.status;
    this.integrity.replaceChildren(...integrityView(result));
  }
}

function legend(heat, threshold) {
  const bar = h("div", { class: "scale-bar", role: "img", "aria-label": `Colour scale of ${heat}: dark purple at ` +
    `score 0 through green to yellow at 1${threshold === null ? "" : `; threshold ${score(threshold)}`}` });
  bar.style.backgroundImage = scaleGradient();
  if (threshold !== null) {
    const marker = h("span", { class: "threshold-marker", "aria-hidden": "true" });
    marker.style.left = `${threshold * 100}%`;
    bar.append(marker);
  }
  const ticks = h("div", { class: "scale-ticks", "aria-hidden": "true" },
    [0, 0.25, 0.5, 0.75, 1].map((value) => {
      const tick = h("span", {}, String(value));
      tick.style.left = `${value * 100}%`;
      return tick;
    }));
  return [h("div", { class: "scale" }, bar, ticks),
    h("p", { class: "hint legend-text" }, threshold === null ? `${heat} score, 0 to 1.` :
      `${heat} score, 0 to 1; the white mark is the threshold ${score(threshold)}. Tokens below it are underlined.`)];
}

function inputView(input) {
  if (Array.isArray(input.messages)) {
    return h("ol", { class: "messages" }, input.messages.map((message) =>
      h("li", {}, h("strong", {}, `${message.role}: `), h("span", { class: "pre" }, message.content))));
  }
  return h("span", { class: "pre" }, input.prompt ?? JSON.stringify(input));
}

function integrityView(result) {
  const head = result.head;
  const MARKS = new Map([[true, "✓ passed"], [false, "✗ failed"]]);
  const mark = (ok) => MARKS.get(ok) ?? "– not run";
  const views = [
    h("p", { class: `integrity-status status-${result.status}` }, h("strong", {}, result.status), result.reason ?
      `: ${result.reason}` : result.status === "verified" ? ": the judgment is in the signed log, unchanged." : ""),
    h("ul", { class: "checks" }, result.checks.map((check) =>
      h("li", { dataset: { by: check.by, ok: String(check.ok) } }, h("span", { class: "check-mark" }, mark(check.ok)),
        ` ${check.by}: ${check.label}`))),
  ];
  if (result.browserNote) views.push(h("p", { class: "hint" }, `Checked by the server only: ${result.browserNote}.`));
  if (result.erased) views.push(h("p", { class: "hint" }, "The payload is erased; its hash stays in the record hash."));
  if (head) {
    views.push(h("dl", { class: "details" },
      h("div", {}, h("dt", {}, "Leaf index"), h("dd", {}, result.leafIndex === null ? "none yet" : String(result.leafIndex))),
      h("div", {}, h("dt", {}, "Signed tree head"), h("dd", {}, `size ${head.tree_size}, signed ${utc(head.timestamp)}`)),
      h("div", {}, h("dt", {}, "Root hash"), h("dd", {}, h("code", { class: "wrap" }, head.root_hash))),
      h("div", {}, h("dt", {}, "Key id"), h("dd", {}, h("code", { class: "wrap" }, head.key_id)))));
  }
  views.push(h("p", { class: "hint" }, "The page checks against the key this server publishes. To check against a " +
    "key you hold, run tracehead audit verify --public-key."));
  return views;
}
