"""Head recipe variants, each trained and scored on the same cached states.

Every variant changes one thing against the reference recipe (the defaults
of TrainConfig), so the results page shows what each choice is worth.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace

from models.base import BaseModel
from models.evaluate import evaluate
from models.train import Dataset, TrainConfig, fit_heads, mean_dev_auroc

logger = logging.getLogger(__name__)

# (name, what it changes, TrainConfig overrides); tap layers are fixed to the
# reference's chosen layer unless the variant is about layers.
VARIANTS = [
    ("reference", "defaults of TrainConfig", {}),
    ("token readout", "a direct readout of the token's own state beside the attention", {"token_readout": True}),
    ("1 head per constraint", "heads_per_constraint 1", {"heads_per_constraint": 1}),
    ("4 heads per constraint", "heads_per_constraint 4", {"heads_per_constraint": 4}),
    ("d_head 64", "wider heads", {"d_head": 64}),
    ("d_head 128", "wider heads", {"d_head": 128}),
    ("three tap layers", "layers 10, 14 and 18 concatenated", {"tap_layers": [10, 14, 18]}),
    ("no class balancing", "every example weighs the same", {"class_balance": False}),
    ("pairwise loss", "margin loss weight 0.5 on AmbiEnt rewrites and e-CARE pairs", {"pairwise_weight": 0.5}),
    ("pairwise loss x2", "margin loss weight 1.0", {"pairwise_weight": 1.0}),
    ("no negated truth data", "truth statements without their neg_* versions", {"negations": False}),
    ("no Platt calibration", "raw logits; thresholds still chosen on dev", {"calibrate": False}),
    ("accuracy thresholds", "thresholds maximise accuracy instead of balanced accuracy", {"threshold_target": "accuracy"}),
]


def run_variants(datasets: dict[str, Dataset], base: BaseModel, reference: TrainConfig, tap_layers: list[int],
                 names: list[str] | None = None) -> list[dict]:
    """Train and score each variant on the test split (heads only; baselines are in the card)."""
    results = []
    for name, change, overrides in VARIANTS:
        if names and name not in names:
            continue
        config = replace(reference, **({"tap_layers": tap_layers} | overrides))
        started = time.perf_counter()
        heads, _ = fit_heads(datasets, config, base)
        evaluation = evaluate(heads, datasets, base, config, baselines=False)
        results.append({
            "name": name, "change": change, "overrides": overrides, "tap_layers": heads.config.tap_layers,
            "mean_dev_auroc": round(mean_dev_auroc(heads, datasets["dev"]), 4),
            "constraints": {c: e["methods"]["heads"] for c, e in evaluation["constraints"].items()},
            "pairwise_accuracy": evaluation["constraints"]["causality"]["sources"]["e-care"]["methods"]["heads"]
            .get("pairwise_accuracy"),
            "seconds": round(time.perf_counter() - started, 1), "config": asdict(config)})
        logger.info("variant %s: mean dev AUROC %.4f", name, results[-1]["mean_dev_auroc"])
    return results


def variants_markdown(results: list[dict], constraints: list[str]) -> str:
    """Render the variants as a Markdown table: dev mean, then test AUROC and ECE per constraint."""
    header = "| variant | change | mean dev AUROC | " + " | ".join(f"{c} AUROC / ECE" for c in constraints) + \
        " | e-CARE pairwise | train s |"
    lines = [header, "|" + " --- |" * (len(constraints) + 5)]
    for result in sorted(results, key=lambda r: -r["mean_dev_auroc"]):
        cells = " | ".join(f"{result['constraints'][c]['auroc']:.3f} / {result['constraints'][c]['ece']:.3f}"
                           for c in constraints)
        lines.append(f"| {result['name']} | {result['change']} | {result['mean_dev_auroc']:.3f} | {cells} | "
                     f"{result['pairwise_accuracy']:.3f} | {result['seconds']:.0f} |")
    return "\n".join(lines)


def variants_page(results: list[dict], constraints: list[str], command: str) -> str:
    """Render the results page: how the variants were run, then the table, best mean dev AUROC first."""
    epochs = results[0]["config"]["max_epochs"] if results else 0
    return f"""# Head recipe variants

Each variant changes one thing against the reference recipe (the defaults of
`TrainConfig` in `models/train.py`) and is trained on the same cached hidden states
for up to {epochs} epochs, keeping the best dev epoch. Columns: mean dev AUROC over the
four constraints (what chooses between variants), then test AUROC and expected
calibration error per constraint, e-CARE pairwise accuracy on test, and training
time in seconds on the 2-core CPU this ran on. Rows are sorted by mean dev AUROC,
and every variant that was tried is listed, the losing ones too.

Produced by `{command}`; the raw numbers are in `head-variants.json` beside this page.

{variants_markdown(results, constraints)}
"""
