// Colours: viridis for scores, and line colours that colour-blind readers can tell apart.
//
// Viridis is perceptually uniform and stays ordered for the common colour-vision deficiencies
// and in greyscale. These are matplotlib's viridis at 0, 0.1, ..., 1; the page interpolates
// linearly between neighbours, which differ too little for the interpolation to show.
const VIRIDIS = ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884", "#44bf70",
  "#7ad151", "#bddf26", "#fde725"].map((hex) => [1, 3, 5].map((at) => parseInt(hex.slice(at, at + 2), 16)));

// Okabe and Ito's palette for colour-blind readers; the score lines also differ by dash pattern.
export const LINE_STYLES = [
  { color: "#0072b2", dash: "" },
  { color: "#d55e00", dash: "6 3" },
  { color: "#009e73", dash: "2 3" },
  { color: "#cc79a7", dash: "8 3 2 3" },
  { color: "#e69f00", dash: "12 4" },
  { color: "#56b4e9", dash: "4 4" },
];

/** Map a score in [0, 1] to its viridis colour as [r, g, b]. */
export function scoreRgb(value) {
  const clamped = Math.min(1, Math.max(0, Number(value) || 0));
  const at = clamped * (VIRIDIS.length - 1);
  const low = Math.min(Math.floor(at), VIRIDIS.length - 2);
  const t = at - low;
  return VIRIDIS[low].map((channel, index) => Math.round(channel + (VIRIDIS[low + 1][index] - channel) * t));
}

export function css([r, g, b]) {
  return `rgb(${r}, ${g}, ${b})`;
}

function luminance(rgb) {
  // WCAG 2 relative luminance of an sRGB colour.
  const [r, g, b] = rgb.map((channel) => {
    const c = channel / 255;
    return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}

/** Black or white, whichever contrasts more with the background; over viridis either gives at least 4.5:1. */
export function textOn(rgb) {
  const light = luminance(rgb);
  return (light + 0.05) / 0.05 >= 1.05 / (light + 0.05) ? "#000000" : "#ffffff";
}

/** Build the scale as a CSS gradient from score 0 (left) to 1 (right), for the legend. */
export function scaleGradient() {
  const stops = VIRIDIS.map((rgb, index) => `${css(rgb)} ${(index * 100) / (VIRIDIS.length - 1)}%`);
  return `linear-gradient(to right, ${stops.join(", ")})`;
}
