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


def _cells(evaluation: dict) -> list[list[str]]:
    """Return one row of text cells per (constraint, data set, method)."""
    rows = []
    for constraint, source, examples, method, metrics in report_rows(evaluation):
        pairwise = metrics.get("pairwise_accuracy")
        rows.append([constraint, source, str(examples), METHOD_NAMES[method], _number(metrics["auroc"]),
                     _number(metrics["accuracy"]), _number(metrics["ece"]), "" if pairwise is None else _number(pairwise)])
    return rows


# Column widths of the terminal table; a negative width aligns left.
TERMINAL_WIDTHS = (-15, -20, 6, -16, 7, 7, 7, 10)
TERMINAL_HEADER = ["constraint", "data set", "n", "method", "AUROC", "acc", "ECE", "pairwise"]


def format_table(evaluation: dict) -> str:
    """Render the report as a fixed-width table for a terminal."""
    lines = [f"Test split; tap layers {evaluation['tap_layers']}; thresholds for {evaluation['threshold_target']}"]
    for cells in [TERMINAL_HEADER] + _cells(evaluation):
        cells = cells[:3] + ["  " + cells[3]] + cells[4:]  # two spaces between the count and the method
        lines.append("".join(cell.ljust(-width) if width < 0 else cell.rjust(width)
                             for cell, width in zip(cells, TERMINAL_WIDTHS)))
    return "\n".join(lines)


def markdown_table(evaluation: dict) -> str:
    lines = ["| constraint | data set | examples | method | AUROC | accuracy | ECE | pairwise accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(evaluation)]
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
