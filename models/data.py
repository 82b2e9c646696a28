"""Labelled examples for the constraint heads, one adapter per source format.

Every adapter turns its source's files into ``Example`` rows whose label is 1
when the constraint holds. Splits are made by group (a topic row with its
negation, a block of related scenarios, a premise with both hypotheses), so
no group has rows on both sides of a split.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "dev", "test")

# Fractions of groups per split where a source ships one pool of rows.
TRAIN_FRACTION, DEV_FRACTION = 0.7, 0.15


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 = the constraint holds
    constraint: str
    source: str
    group: str  # rows sharing a group always land in the same split
    split: str
    subset: str = ""  # the file a truth statement came from, e.g. "neg_facts" or "cities_disj"

    @property
    def topic(self) -> str:
        """Topic of a truth statement without its negated, conjunction or disjunction form."""
        return self.subset.removeprefix("neg_").removesuffix("_conj").removesuffix("_disj")


@dataclass(frozen=True)
class SourceInfo:
    """A data set the adapters read: where it lives and how it is cited."""

    name: str
    folder: str
    constraint: str
    licence: str
    commit: str
    reader: Callable[[Path], Iterator[Example]]


def _split_for(source: str, group: str, pools: tuple[str, ...] = SPLITS) -> str:
    """Assign a group to a split by a stable hash, so reruns agree."""
    value = int(hashlib.sha256(f"{source}:{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if pools != SPLITS:
        return pools[0] if value < 0.5 else pools[1]
    if value < TRAIN_FRACTION:
        return "train"
    if value < TRAIN_FRACTION + DEV_FRACTION:
        return "dev"
    return "test"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def read_truth(folder: Path) -> Iterator[Example]:
    """Topic sets, their negations, conjunctions and disjunctions (testifiability).

    Row i of ``facts.csv`` and row i of ``neg_facts.csv`` negate each other,
    so they share a group.
    """
    for path in sorted((folder / "datasets").glob("*.csv")):
        stem = path.stem
        topic = stem.removeprefix("neg_")
        for index, row in enumerate(_read_csv(path)):
            group = f"{topic}:{index}"
            yield Example(row["statement"].strip(), int(row["label"]), "testifiability", "truth-is-universal",
                          group, _split_for("truth-is-universal", group), subset=stem)


def read_selfaware(folder: Path) -> Iterator[Example]:
    """Answerable versus unanswerable questions (decidability)."""
    records = json.loads((folder / "data" / "SelfAware.json").read_text(encoding="utf-8"))["example"]
    for record in records:
        group = str(record["question_id"])
        yield Example(record["question"].strip(), int(bool(record["answerable"])), "decidability", "selfaware",
                      group, _split_for("selfaware", group))


def read_ambient(folder: Path) -> Iterator[Example]:
    """Ambiguous sentences (0) and their disambiguated rewrites (1) (decidability).

    A text that occurs with both labels across rows is dropped, because its
    ambiguity depends on the reading and the data gives no single answer.
    """
    labels: dict[str, set[int]] = {}
    groups: dict[str, str] = {}
    for line in (folder / "AmbiEnt" / "dev.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        group = str(row["id"])
        candidates = [(row["premise"], 0 if row["premise_ambiguous"] else 1),
                      (row["hypothesis"], 0 if row["hypothesis_ambiguous"] else 1)]
        candidates += [(rewrite[part], 1) for rewrite in row["disambiguations"] for part in ("premise", "hypothesis")]
        for text, label in candidates:
            text = text.strip()
            labels.setdefault(text, set()).add(label)
            groups.setdefault(text, group)
    for text, seen in labels.items():
        if len(seen) == 1:
            yield Example(text, seen.pop(), "decidability", "ambient", groups[text],
                          _split_for("ambient", groups[text]))


def read_ethics_justice(folder: Path) -> Iterator[Example]:
    """Justice scenarios in groups of four (reciprocity); the test file gives dev and test."""
    base = folder / "ethics" / "justice"
    for file_name, pools in (("justice_train.csv", None), ("justice_test.csv", ("dev", "test"))):
        for index, row in enumerate(_read_csv(base / file_name)):
            group = f"{file_name}:{index // 4}"
            split = "train" if pools is None else _split_for("ethics-justice", group, pools)
            yield Example(row["scenario"].strip(), int(row["label"]), "reciprocity", "ethics-justice", group, split)


def ecare_statement(premise: str, ask_for: str, hypothesis: str) -> str:
    """Join a premise and a hypothesis into one cause or effect statement."""
    if ask_for == "effect":
        return f"{premise.strip()} As a result, {_lower_first(hypothesis.strip())}"
    return f"{premise.strip()} This happened because {_lower_first(hypothesis.strip())}"


def _lower_first(text: str) -> str:
    # Keep "I" and acronyms such as "NASA" as written.
    if len(text) > 1 and text[0].isupper() and text[1].islower() and not text.startswith("I "):
        return text[0].lower() + text[1:]
    return text


def read_ecare(folder: Path) -> Iterator[Example]:
    """Premise with its correct (1) and wrong (0) hypothesis (causality); dev file gives dev and test."""
    base = folder / "dataset" / "Causal_Reasoning"
    for file_name, pools in (("train.jsonl", None), ("dev.jsonl", ("dev", "test"))):
        for line in (base / file_name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            group = str(row["index"])
            split = "train" if pools is None else _split_for("e-care", group, pools)
            for number, hypothesis in ((0, row["hypothesis1"]), (1, row["hypothesis2"])):
                text = ecare_statement(row["premise"], row["ask-for"], hypothesis)
                yield Example(text, int(row["label"] == number), "causality", "e-care", group, split)


SOURCES = (
    SourceInfo("truth-is-universal", "truth-is-universal", "testifiability", "MIT",
               "sciai-lab/Truth_is_Universal@605ef00514415deb4806969a172f6e13e0798df7", read_truth),
    SourceInfo("selfaware", "selfaware", "decidability", "CC BY-SA 4.0 (research use)",
               "yinzhangyue/SelfAware@f0bad1ff77bd42fc4eb2360281ed646c7bb7bd0c", read_selfaware),
    SourceInfo("ambient", "ambient", "decidability", "CC BY 4.0",
               "alisawuffles/ambient@1fcb43effda068f3047d46b6f9ff0e50e0ee1c1b", read_ambient),
    SourceInfo("ethics-justice", "ethics-justice", "reciprocity", "MIT (per the dataset card)",
               "oughtinc/ice@5449543c71c039753603ab57344147a1156bfb46", read_ethics_justice),
    SourceInfo("e-care", "e-care", "causality", "MIT",
               "Waste-Wood/e-CARE@c3b52648adcc919303a297a377811e24d703e197", read_ecare),
)

CONSTRAINTS = ("testifiability", "decidability", "reciprocity", "causality")


def load_examples(data_dir: Path, max_groups: dict[str, dict[str, int]] | None = None,
                  seed: int = 0) -> dict[str, list[Example]]:
    """Read every source under ``data_dir`` and return examples per split.

    Args:
        max_groups: per source, per split, the most groups to keep; groups are
            sampled with ``seed`` so the same call always returns the same rows.
    """
    missing = [str(data_dir / source.folder) for source in SOURCES if not (data_dir / source.folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"missing data set folders: {', '.join(missing)}. Pass the directory that "
                                "holds the labelled sets (see its README) with --data-dir.")

    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for source in SOURCES:
        examples = list(source.reader(data_dir / source.folder))
        limits = (max_groups or {}).get(source.name, {})
        for split in SPLITS:
            in_split = [example for example in examples if example.split == split]
            splits[split].extend(_sample_groups(in_split, limits.get(split), seed))
    return splits


def _sample_groups(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    groups = sorted({example.group for example in examples})
    if limit is None or len(groups) <= limit:
        return examples
    kept = set(random.Random(seed).sample(groups, limit))
    return [example for example in examples if example.group in kept]
