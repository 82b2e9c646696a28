"""Plain-text and Markdown tables of an evaluation report."""

from __future__ import annotations

METHOD_NAMES = {"heads": "heads", "linear_probe": "linear probe", "zero_shot": "zero-shot",
                "sentence_embedding": "MiniLM + LR", "length_style": "length/style"}


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_rows(evaluation: dict) -> list[tuple[str, str, int, str, dict]]:
    """Flatten a report into (constraint, data set, examples, method, metrics) rows."""
    rows = []
    for constraint, entry in evaluation["constraints"].items():
        for method, metrics in entry["methods"].items():
            rows.append((constraint, "all", entry["examples"], method, metrics))
        for source, source_entry in entry["sources"].items():
            for method, metrics in source_entry["methods"].items():
                rows.append((constraint, source, source_entry["examples"], method, metrics))
    return rows


def format_table(evaluation: dict) -> str:
    """Render the report as a fixed-width table for a terminal."""
    lines = [f"Test split; tap layers {evaluation['tap_layers']}; thresholds for {evaluation['threshold_target']}",
             f"{'constraint':<15}{'data set':<20}{'n':>6}  {'method':<14}{'AUROC':>7}{'acc':>7}{'ECE':>7}{'pairwise':>10}"]
    for constraint, source, examples, method, metrics in report_rows(evaluation):
        pairwise = metrics.get("pairwise_accuracy")
        lines.append(f"{constraint:<15}{source:<20}{examples:>6}  {METHOD_NAMES[method]:<14}"
                     f"{_number(metrics['auroc']):>7}{_number(metrics['accuracy']):>7}{_number(metrics['ece']):>7}"
                     f"{'' if pairwise is None else _number(pairwise):>10}")
    return "\n".join(lines)


def markdown_table(evaluation: dict) -> str:
    lines = ["| constraint | data set | examples | method | AUROC | accuracy | ECE | pairwise accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for constraint, source, examples, method, metrics in report_rows(evaluation):
        pairwise = metrics.get("pairwise_accuracy")
        lines.append(f"| {constraint} | {source} | {examples} | {METHOD_NAMES[method]} | {_number(metrics['auroc'])} | "
                     f"{_number(metrics['accuracy'])} | {_number(metrics['ece'])} | "
                     f"{'' if pairwise is None else _number(pairwise)} |")
    return "\n".join(lines)


def baseline_gaps(evaluation: dict) -> list[str]:
    """Say, per constraint, whether the heads reach the best baseline's test AUROC and by how much."""
    lines = []
    for constraint, entry in evaluation["constraints"].items():
        if "best_baseline" not in entry:
            continue
        gap, best = entry["heads_minus_best_baseline"], METHOD_NAMES[entry["best_baseline"]]
        verdict = "above" if gap >= 0 else "BELOW"
        lines.append(f"{constraint}: heads AUROC {entry['methods']['heads']['auroc']:.3f} is {verdict} the best "
                     f"baseline ({best}, {entry['methods'][entry['best_baseline']]['auroc']:.3f}) by {abs(gap):.3f}")
    return lines


def out_of_domain_table(out_of_domain: dict) -> str:
    lines = ["| constraint | held out | examples | in-domain AUROC | out-of-domain AUROC |", "| --- | --- | --- | --- | --- |"]
    for constraint in ("testifiability", "decidability"):
        for row in out_of_domain.get(constraint, []):
            lines.append(f"| {constraint} | {row['held_out']} | {row['examples']} | {row['in_domain_auroc']:.3f} | "
                         f"{row['out_of_domain_auroc']:.3f} |")
    return "\n".join(lines)
