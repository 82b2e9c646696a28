// The score line: every constraint's score over the token positions, as inline SVG.

import { LINE_STYLES } from "./colors.js";
import { h, s, score } from "./dom.js";

// The drawing's own units; the SVG stretches to the page's width and keeps its lines' width.
const WIDTH = 1000;
const HEIGHT = 160;

function y(value) {
  return (1 - value) * HEIGHT;
}

/**
 * Draw the chart.
 *
 * tokens: the trace's tokens in position order; promptLength: how many are the prompt's;
 * heat: the constraint the page colours by, drawn thicker with its threshold; selected: a
 * position or null; onPick(position): called when the reader clicks the chart.
 */
export function scoreChart({ tokens, constraints, promptLength, heat, threshold, selected, onPick }) {
  const count = tokens.length;
  const x = (position) => ((position + 0.5) / count) * WIDTH;
  const lines = constraints.map((name, index) => {
    const style = LINE_STYLES[index % LINE_STYLES.length];
    const points = tokens.map((token) => `${x(token.position).toFixed(1)},${y(token.scores[name]).toFixed(1)}`);
    return s("polyline", { points: points.join(" "), fill: "none", stroke: style.color,
      "stroke-dasharray": style.dash || null, "stroke-width": name === heat ? 3 : 1.5,
      "vector-effect": "non-scaling-stroke", "data-constraint": name });
  });
  const boundary = (promptLength / count) * WIDTH;
  const graphic = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: "none", role: "img",
    class: "chart-plot", "aria-label": `Scores of ${constraints.length} constraints over ${count} token positions; ` +
      `the prompt is positions 0 to ${promptLength - 1}. The table above lists the final and lowest scores.` },
    s("rect", { x: boundary, y: 0, width: WIDTH - boundary, height: HEIGHT, class: "chart-output" }),
    [0.25, 0.5, 0.75].map((value) => s("line", { x1: 0, x2: WIDTH, y1: y(value), y2: y(value), class: "chart-grid",
      "vector-effect": "non-scaling-stroke" })),
    s("line", { x1: 0, x2: WIDTH, y1: y(threshold), y2: y(threshold), class: "chart-threshold",
      "vector-effect": "non-scaling-stroke" }),
    lines,
    selected === null ? null : s("line", { x1: x(selected), x2: x(selected), y1: 0, y2: HEIGHT,
      class: "chart-selected", "vector-effect": "non-scaling-stroke" }));
  graphic.addEventListener("click", (event) => {
    const box = graphic.getBoundingClientRect();
    onPick(Math.min(count - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * count))));
  });

  const legend = h("ul", { class: "chart-legend" },
    constraints.map((name, index) => {
      const style = LINE_STYLES[index % LINE_STYLES.length];
      return h("li", {}, s("svg", { viewBox: "0 0 32 8", class: "legend-line", "aria-hidden": "true" },
        s("line", { x1: 0, x2: 32, y1: 4, y2: 4, stroke: style.color, "stroke-width": name === heat ? 3 : 2,
          "stroke-dasharray": style.dash || null })), name === heat ? h("strong", {}, name) : name);
    }),
    h("li", {}, h("span", { class: "legend-threshold", "aria-hidden": "true" }),
      `threshold of ${heat} (${score(threshold)})`),
    h("li", {}, h("span", { class: "legend-output", "aria-hidden": "true" }),
      `output, from position ${promptLength}`));

  return h("figure", { class: "chart" },
    h("div", { class: "chart-body" },
      h("div", { class: "chart-axis", "aria-hidden": "true" }, h("span", {}, "1"), h("span", {}, "0.5"), h("span", {}, "0")),
      graphic),
    h("figcaption", {}, legend));
}
