"""MODEL_CARD.md for a head checkpoint, written from its config and metrics."""

from __future__ import annotations

from models.data import SOURCES
from models.evaluate import CALIBRATION_BINS
from models.heads import HeadsConfig
from models.report import METHOD_NAMES, baseline_gaps, markdown_table, out_of_domain_table

KNOWN_WEAKNESSES = """\
- **Style shortcut on decidability.** SelfAware's unanswerable questions all come from other
  sites than its answerable ones, so part of the decidability score can come from style and
  length rather than answerability. AmbiEnt adds few examples (its dev file has 100 rows).
- **Training texts are short single statements** framed as one assistant turn. In serving, the
  heads also see the system prompt and the user's turn, and the output is often several
  sentences: scores on long outputs are less reliable than the test numbers suggest. In a
  chat answer the closing tokens can blur a difference that the content token shows, so
  read the per-token trace, not only the final score.
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
- Thresholds are chosen on the dev split for the stated target, not for a chosen false-positive
  rate; `tracehead heads train --threshold-target precision:0.9` trains for a precision target.
"""


def _measured_weaknesses(metrics: dict) -> str:
    """List where the test numbers themselves show a weakness: a stronger baseline, a near-chance source."""
    evaluation = metrics["evaluation"]
    lines = [f"- **{line.split(':')[0]}: the heads are below a baseline.** {line.split(': ', 1)[1]}.\n"
             for line in baseline_gaps(evaluation) if "BELOW" in line]
    for constraint, entry in evaluation["constraints"].items():
        for source, source_entry in entry["sources"].items():
            auroc = source_entry["methods"]["heads"]["auroc"]
            if auroc is not None and auroc < 0.6:
                lines.append(f"- **{constraint} on {source} is near chance**: test AUROC {auroc:.3f} over "
                             f"{source_entry['examples']} examples.\n")
    ecare = evaluation["constraints"].get("causality", {}).get("sources", {}).get("e-care", {}).get("methods", {})
    if "heads" in ecare:
        heads_pairwise = ecare["heads"]["pairwise_accuracy"]
        better = [f"{METHOD_NAMES[m]} {v['pairwise_accuracy']:.3f}" for m, v in ecare.items()
                  if m != "heads" and v.get("pairwise_accuracy", 0) > heads_pairwise]
        if better:
            lines.append(f"- **e-CARE pairwise accuracy: the heads ({heads_pairwise:.3f}) are below** "
                         f"{', '.join(better)}.\n")
    selfaware = evaluation["constraints"].get("decidability", {}).get("sources", {}).get("selfaware", {})
    style = selfaware.get("methods", {}).get("length_style")
    if style and style["auroc"] is not None:
        lines.append(f"- **SelfAware separates by style:** length and style features alone reach test AUROC "
                     f"{style['auroc']:.3f} there, against {selfaware['methods']['heads']['auroc']:.3f} for the heads.\n")
    return "".join(lines).replace("BELOW", "below")


def _out_of_domain_section(metrics: dict) -> str:
    ood = metrics.get("out_of_domain")
    if not ood:
        return "Not measured for this checkpoint.\n"
    notes = "".join(f"- {constraint}: not checked, because {reason}.\n" for constraint, reason in ood["not_checked"].items())
    return (f"Each row trains heads for one constraint ({ood['epochs']} epochs) without the held-out data and "
            f"compares them with heads trained the same way on all of it.\n\n{out_of_domain_table(ood)}\n\n{notes}")


def render_model_card(config: HeadsConfig, metrics: dict) -> str:
    training, evaluation = metrics["training"], metrics["evaluation"]
    sources = "\n".join(f"| {s.name} | {s.constraint} | {s.licence} | `{s.commit}` |" for s in SOURCES)
    caps = "; ".join(f"{name} " + ", ".join(f"{split} {count}" for split, count in limits.items())
                     for name, limits in training["max_groups"].items()) or "none (every group)"
    search = ", ".join(f"layer {layer}: {auroc:.3f}" for layer, auroc in metrics.get("tap_layer_search", {}).items())
    layer_line = f"Tap layer chosen by mean dev AUROC after {training['search_epochs']} epochs each ({search})." \
        if search else f"Tap layers fixed at {config.tap_layers}."
    gaps = "\n".join(f"- {line}" for line in baseline_gaps(evaluation))
    return f"""# {config.name}

Constraint heads for `{config.base_model}` (base-model fingerprint `{config.base_fingerprint}`).
{len(config.constraints)} constraints ({", ".join(config.constraints)}), {config.heads_per_constraint} attention heads each,
d_head {config.d_head}, reading the residual stream at hidden_states{config.tap_layers}
{"with a direct readout of each token's own state beside the attention" if config.token_readout else "through attention only"}.
A score near 1 means the constraint holds. {"Scores are Platt-calibrated on dev" if training["calibrate"]
else "Scores are uncalibrated sigmoid outputs"}, and thresholds maximise {config.threshold_target} on dev.

## Data
| source | constraint | licence | repository@commit |
| --- | --- | --- | --- |
{sources}

Label mapping: true statement → testifiability 1; answerable question, or an unambiguous
sentence or disambiguated rewrite → decidability 1; reasonable justice scenario →
reciprocity 1; premise joined to its correct e-CARE hypothesis ("As a result, ..." for
effects, "This happened because ..." for causes) → causality 1, to the wrong one → 0.
Splits are by group: a statement with its negation, a block of four ETHICS scenarios, an
e-CARE premise with both hypotheses. ETHICS and e-CARE train on their train files, and their
test files are split into dev and test. Groups kept per source and split: {caps}.

## Training
The base model stays frozen and computes hidden states once, in {training["dtype"]}. Each text
is framed as one assistant turn of the chat template. The heads train with a logistic loss at
the text's last token and at the token closing the turn. {"Every (constraint, label) cell counts equally"
if training["class_balance"] else "Every example weighs the same"}.
{f"Paired data (an AmbiEnt sentence with its rewrites, an e-CARE premise with both hypotheses) adds a margin loss with weight {training['pairwise_weight']}."
if training["pairwise_weight"] else "There is no margin loss on paired data."} Negated truth statements are
{"kept" if training["negations"] else "left out"}. AdamW, learning rate {training["learning_rate"]},
weight decay {training["weight_decay"]}, batch {training["batch_size"]}, seed {training["seed"]},
up to {training["max_epochs"]} epochs, keeping the best dev epoch. {layer_line}
`docs/head-variants.md` lists every recipe that was tried, with its numbers.

## Metrics (held-out test split)
Generated by `tracehead heads eval --update-card`. Baselines, all scored on the same examples:
a logistic-regression probe on the tap layer's hidden state at the last token; zero-shot
prompting of the same base model (P(yes) against P(no) after a question that states the
constraint, threshold 0.5); all-MiniLM-L6-v2 sentence embeddings with logistic regression
(a second model pass). Probe and embedding thresholds are chosen on dev like the heads'.
For SelfAware, a logistic regression on length and style features alone shows how far
source style separates its classes. ECE is the expected calibration error over {CALIBRATION_BINS} bins.

{markdown_table(evaluation)}

Heads against the best baseline (test AUROC):

{gaps}

## Out-of-domain checks
{_out_of_domain_section(metrics)}
## Known weaknesses
{_measured_weaknesses(metrics)}{KNOWN_WEAKNESSES}"""
