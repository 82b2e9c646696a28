"""MODEL_CARD.md for a head checkpoint, written from its config and metrics."""

from __future__ import annotations

from models.data import SOURCES
from models.heads import HeadsConfig

KNOWN_WEAKNESSES = """\
- **Style shortcut on decidability.** SelfAware's unanswerable questions all come from other
  sites than its answerable ones, so part of the decidability score can come from style and
  length rather than answerability. AmbiEnt adds few examples (its dev file has 100 rows).
- **Training texts are short single statements** framed as one assistant turn. In serving, the
  heads also see the system prompt and the user's turn, and the output is often several
  sentences: scores on long outputs are less reliable than the test numbers suggest.
- **Causality means sound cause and effect, as e-CARE defines it.** The causal-news-corpus
  labels say only whether a causal relation is stated, not whether it is sound, so they are
  not used for this head.
- **Testifiability is trained on simple factual statements** (animals, elements, inventors,
  cities, translations, general facts, with negations and compounds); it has not been measured
  on opinions, hedged claims or long-form text.
- **Reciprocity follows ETHICS Justice** (desert and impartiality scenarios written by crowd
  workers); other kinds of unfair exchange are outside its training data.
- **Subsampled data.** Some sets are capped (see Training) to fit a CPU training run; more data
  may raise the numbers.
- Thresholds are calibrated for accuracy on the dev split, not for a chosen false-positive rate.
"""


def _metrics_table(metrics: dict) -> str:
    rows = ["| constraint | test examples | heads AUROC | heads accuracy | threshold | linear probe AUROC | linear probe accuracy |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for constraint, entry in metrics["constraints"].items():
        heads, probe = entry["heads"], entry["linear_probe"]
        rows.append(f"| {constraint} | {entry['examples']} | {heads['auroc']:.3f} | {heads['accuracy']:.3f} | "
                    f"{heads['threshold']:.3f} | {probe['auroc']:.3f} | {probe['accuracy']:.3f} |")
    return "\n".join(rows)


def _source_rows(metrics: dict) -> str:
    rows = ["| constraint | source | test examples | heads AUROC |", "| --- | --- | --- | --- |"]
    for constraint, entry in metrics["constraints"].items():
        for source, numbers in entry["sources"].items():
            auroc = "n/a" if numbers["auroc"] is None else f"{numbers['auroc']:.3f}"
            rows.append(f"| {constraint} | {source} | {numbers['examples']} | {auroc} |")
    return "\n".join(rows)


def _measured_weaknesses(metrics: dict) -> str:
    """List where the test numbers themselves show a weakness: a stronger baseline, a near-chance source."""
    lines = []
    for constraint, entry in metrics["constraints"].items():
        heads, probe = entry["heads"]["auroc"], entry["linear_probe"]["auroc"]
        if probe > heads:
            lines.append(f"- **{constraint}: the linear probe beats the heads** on test AUROC ({probe:.3f} against "
                         f"{heads:.3f}).\n")
        for source, numbers in entry["sources"].items():
            if numbers["auroc"] is not None and numbers["auroc"] < 0.6:
                lines.append(f"- **{constraint} on {source} is near chance**: test AUROC {numbers['auroc']:.3f} "
                             f"over {numbers['examples']} examples.\n")
    return "".join(lines)


def render_model_card(config: HeadsConfig, metrics: dict) -> str:
    training = metrics["training"]
    sources = "\n".join(f"| {s.name} | {s.constraint} | {s.licence} | `{s.commit}` |" for s in SOURCES)
    caps = "; ".join(f"{name} " + ", ".join(f"{split} {count}" for split, count in limits.items())
                     for name, limits in training["max_groups"].items()) or "none (every group)"
    search = ", ".join(f"layer {layer}: {auroc:.3f}" for layer, auroc in metrics["tap_layer_search"].items())
    causality = metrics["constraints"].get("causality", {})
    pairwise = causality.get("heads", {}).get("pairwise_accuracy")
    probe_pairwise = causality.get("linear_probe", {}).get("pairwise_accuracy")
    pairwise_line = "" if pairwise is None else (
        f"\ne-CARE pairwise accuracy (the correct hypothesis scores higher): heads {pairwise:.3f}, "
        f"linear probe {probe_pairwise:.3f}.\n")
    return f"""# {config.name}

Constraint heads for `{config.base_model}` (base-model fingerprint `{config.base_fingerprint}`).
{len(config.constraints)} constraints ({", ".join(config.constraints)}), {config.heads_per_constraint} attention heads each,
d_head {config.d_head}, reading the residual stream at hidden_states[{config.tap_layer}].
A score near 1 means the constraint holds.

## Data
| source | constraint | licence | repository@commit |
| --- | --- | --- | --- |
{sources}

Label mapping: true statement → testifiability 1; answerable question, or an unambiguous
sentence or disambiguated rewrite → decidability 1; reasonable justice scenario →
reciprocity 1; premise joined to its correct e-CARE hypothesis ("As a result, ..." for
effects, "This happened because ..." for causes) → causality 1, to the wrong one → 0.
Splits are by group: a statement with its negation, a block of four ETHICS scenarios, an
e-CARE premise with both hypotheses. ETHICS and e-CARE train on their train files; their
test files are split into dev and test.

## Training
The base model stays frozen. Each text is framed as one assistant turn of the chat template,
the base model runs once, and the heads train on the cached tap-layer states with a logistic
loss at the text's last token and at the token closing the turn, weighted so that every
(constraint, label) cell counts equally. AdamW, learning rate {training["learning_rate"]},
weight decay {training["weight_decay"]}, batch {training["batch_size"]}, seed {training["seed"]}.
Tap layer chosen by mean dev AUROC after {training["search_epochs"]} epochs each ({search});
then up to {training["max_epochs"]} epochs on the chosen layer, keeping the best dev epoch.
Thresholds maximise dev accuracy. Groups kept per source and split: {caps}.

## Metrics (held-out test split)
The baseline is a logistic-regression probe on the same layer's hidden state at the last
token, trained on the same train split (threshold calibrated on dev the same way).
`tracehead heads eval` recomputes this table.

{_metrics_table(metrics)}
{pairwise_line}
Per source:

{_source_rows(metrics)}

## Known weaknesses
{_measured_weaknesses(metrics)}{KNOWN_WEAKNESSES}"""
