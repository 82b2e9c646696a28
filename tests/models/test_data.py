import json
from collections import defaultdict
from pathlib import Path

import pytest

from models.data import SOURCES, ecare_statement, load_examples

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def write_sources(root: Path) -> None:
    """Write a few rows in each source's own layout."""
    truth = root / "truth-is-universal" / "datasets"
    truth.mkdir(parents=True)
    (truth / "facts.csv").write_text("statement,label\nWater is wet.,1\nFire is cold.,0\n")
    (truth / "neg_facts.csv").write_text("statement,label\nWater is not wet.,0\nFire is not cold.,1\n")

    selfaware = root / "selfaware" / "data"
    selfaware.mkdir(parents=True)
    records = [{"question_id": 1, "question": "Who wrote Hamlet?", "answer": ["Shakespeare"], "answerable": True},
               {"question_id": 2, "question": "What is the meaning of life?", "answer": None, "answerable": False}]
    (selfaware / "SelfAware.json").write_text(json.dumps({"example": records}))

    ambient = root / "ambient" / "AmbiEnt"
    ambient.mkdir(parents=True)
    row = {"id": "7", "premise": "I saw her duck.", "hypothesis": "She has a bird.", "premise_ambiguous": True,
           "hypothesis_ambiguous": False, "disambiguations": [
               {"premise": "I saw her pet duck.", "hypothesis": "She has a bird."},
               {"premise": "I saw her lower her head.", "hypothesis": "She has a bird."}]}
    (ambient / "dev.jsonl").write_text(json.dumps(row) + "\n")

    justice = root / "ethics-justice" / "ethics" / "justice"
    justice.mkdir(parents=True)
    rows = "label,scenario\n" + "".join(f"{i % 2},I deserve item {i} because of reason {i}.\n" for i in range(8))
    (justice / "justice_train.csv").write_text(rows)
    (justice / "justice_test.csv").write_text(rows)

    ecare = root / "e-care" / "dataset" / "Causal_Reasoning"
    ecare.mkdir(parents=True)
    item = {"index": "train-0", "premise": "It rained.", "ask-for": "effect", "hypothesis1": "The road got wet.",
            "hypothesis2": "The sun rose.", "label": 0}
    (ecare / "train.jsonl").write_text(json.dumps(item) + "\n")
    (ecare / "dev.jsonl").write_text(json.dumps(item | {"index": "dev-0", "premise": "It snowed.", "label": 1}) + "\n")


def test_adapters_map_labels(tmp_path):
    write_sources(tmp_path)
    examples = [e for split in load_examples(tmp_path).values() for e in split]
    labels = {e.text: (e.constraint, e.label) for e in examples}
    assert labels["Water is not wet."] == ("testifiability", 0)
    assert labels["Fire is not cold."] == ("testifiability", 1)
    assert labels["What is the meaning of life?"] == ("decidability", 0)
    assert labels["I saw her duck."] == ("decidability", 0)
    assert labels["I saw her pet duck."] == ("decidability", 1)
    assert labels["I deserve item 1 because of reason 1."] == ("reciprocity", 1)
    assert labels["It rained. As a result, the road got wet."] == ("causality", 1)
    assert labels["It rained. As a result, the sun rose."] == ("causality", 0)


def test_groups_stay_in_one_split(tmp_path):
    write_sources(tmp_path)
    splits_of_group = defaultdict(set)
    for split, examples in load_examples(tmp_path).items():
        for example in examples:
            assert example.split == split
            splits_of_group[(example.source, example.group)].add(split)
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    negation_pair = {e.group for split in load_examples(tmp_path).values() for e in split if "Water" in e.text}
    assert len(negation_pair) == 1


def test_train_files_never_reach_test(tmp_path):
    write_sources(tmp_path)
    splits = load_examples(tmp_path)
    assert all(e.group.startswith("justice_train") for e in splits["train"] if e.source == "ethics-justice")
    assert all(not e.group.startswith("justice_train") for s in ("dev", "test") for e in splits[s]
               if e.source == "ethics-justice")
    assert {e.group for e in splits["train"] if e.source == "e-care"} == {"train-0"}


def test_group_caps_are_reproducible(tmp_path):
    write_sources(tmp_path)
    caps = {"ethics-justice": {"train": 1}}
    first, second = load_examples(tmp_path, caps, seed=3), load_examples(tmp_path, caps, seed=3)
    kept = [e for e in first["train"] if e.source == "ethics-justice"]
    assert len({e.group for e in kept}) == 1
    assert len(kept) == 4
    assert first == second


def test_missing_source_folder_named(tmp_path):
    write_sources(tmp_path)
    (tmp_path / "selfaware" / "data" / "SelfAware.json").unlink()
    (tmp_path / "selfaware" / "data").rmdir()
    (tmp_path / "selfaware").rmdir()
    with pytest.raises(FileNotFoundError, match="selfaware"):
        load_examples(tmp_path)


def test_cause_statement_wording():
    assert ecare_statement("He slipped.", "cause", "The floor was icy.") == "He slipped. This happened because the floor was icy."
    assert ecare_statement("He slipped.", "cause", "I pushed him.") == "He slipped. This happened because I pushed him."
    assert ecare_statement("He slipped.", "effect", "NASA called.") == "He slipped. As a result, NASA called."


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="the shared labelled data sets are not beside this checkout")
def test_shared_data_row_counts():
    examples = [e for split in load_examples(SHARED_DATA).values() for e in split]
    per_source = defaultdict(int)
    for example in examples:
        per_source[example.source] += 1
    assert per_source["selfaware"] == 3369
    assert per_source["ethics-justice"] == 21791 + 2704
    assert per_source["e-care"] == 2 * (14928 + 2132)
    assert {s.name for s in SOURCES} == set(per_source)
