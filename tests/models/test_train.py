import json
from pathlib import Path

import numpy as np

from models.card import render_model_card
from models.heads import load_checkpoint, save_checkpoint
from models.train import TrainConfig, calibrate_threshold, evaluate_checkpoint, prepare_datasets, run_training
from server.cli import compare_metrics, format_metrics
from tests.conftest import build_tiny_base

ROWS = 60


def write_learnable_sources(root: Path) -> None:
    """Write every source with enough rows for all splits; the label shows in the words."""
    words = {1: "Paris", 0: "Rome"}
    truth = root / "truth-is-universal" / "datasets"
    truth.mkdir(parents=True)
    (truth / "facts.csv").write_text("statement,label\n" + "".join(
        f"Fact {i} is {words[i % 2]}.,{i % 2}\n" for i in range(ROWS)))

    selfaware = root / "selfaware" / "data"
    selfaware.mkdir(parents=True)
    records = [{"question_id": i, "question": f"What is {words[i % 2]} number {i}?", "answerable": bool(i % 2)}
               for i in range(ROWS)]
    (selfaware / "SelfAware.json").write_text(json.dumps({"example": records}))

    ambient = root / "ambient" / "AmbiEnt"
    ambient.mkdir(parents=True)
    (ambient / "dev.jsonl").write_text("".join(json.dumps(
        {"id": i, "premise": f"Premise {i} of {words[i % 2]}.", "hypothesis": f"Hypothesis {i} of Paris.",
         "premise_ambiguous": i % 2 == 0, "hypothesis_ambiguous": False, "disambiguations": []}) + "\n"
        for i in range(ROWS)))

    justice = root / "ethics-justice" / "ethics" / "justice"
    justice.mkdir(parents=True)
    rows = "label,scenario\n" + "".join(f"{i % 2},I deserve {words[i % 2]} {i}.\n" for i in range(ROWS * 2))
    (justice / "justice_train.csv").write_text(rows)
    (justice / "justice_test.csv").write_text(rows)

    ecare = root / "e-care" / "dataset" / "Causal_Reasoning"
    ecare.mkdir(parents=True)
    items = "".join(json.dumps({"index": f"item-{i}", "premise": f"Event {i}.", "ask-for": "effect",
                                "hypothesis1": "Paris followed.", "hypothesis2": "Rome followed.", "label": 0}) + "\n"
                    for i in range(ROWS))
    (ecare / "train.jsonl").write_text(items)
    (ecare / "dev.jsonl").write_text(items)


def tiny_config() -> TrainConfig:
    return TrainConfig(candidate_layers=[1, 2], d_head=8, search_epochs=1, max_epochs=3, batch_size=16,
                       max_groups={})


def test_training_writes_reproducible_checkpoint(tmp_path):
    write_learnable_sources(tmp_path / "data")
    base = build_tiny_base()
    heads, metrics = run_training(base, tmp_path / "data", tiny_config(), tmp_path / "cache")

    assert heads.config.tap_layer in (1, 2)
    assert set(metrics["tap_layer_search"]) == {"1", "2"}
    for constraint, entry in metrics["constraints"].items():
        assert 0.0 <= entry["heads"]["threshold"] <= 1.0
        assert 0.0 <= entry["heads"]["auroc"] <= 1.0
        assert 0.0 <= entry["linear_probe"]["auroc"] <= 1.0
        assert entry["examples"] > 0
    assert "pairwise_accuracy" in metrics["constraints"]["causality"]["heads"]

    checkpoint = tmp_path / "heads"
    save_checkpoint(checkpoint, heads, metrics, render_model_card(heads.config, metrics))
    reloaded = load_checkpoint(checkpoint, base.fingerprint)
    datasets = prepare_datasets(base, tmp_path / "data", TrainConfig(**metrics["training"]), tmp_path / "cache")
    assert compare_metrics(metrics, evaluate_checkpoint(reloaded, datasets)) == []

    card = (checkpoint / "MODEL_CARD.md").read_text()
    assert "linear probe" in card
    assert "sciai-lab/Truth_is_Universal@" in card
    table = format_metrics(metrics)
    assert all(constraint in table for constraint in metrics["constraints"])


def test_heads_learn_a_lexical_signal(tmp_path):
    write_learnable_sources(tmp_path / "data")
    config = tiny_config()
    config.max_epochs = 15
    _, metrics = run_training(build_tiny_base(), tmp_path / "data", config, None)
    assert metrics["constraints"]["testifiability"]["heads"]["auroc"] > 0.9


def test_threshold_maximises_accuracy():
    scores = np.array([0.1, 0.2, 0.35, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = calibrate_threshold(scores, labels)
    assert 0.35 < threshold <= 0.6
    assert np.mean((scores >= threshold) == labels) == 1.0


def test_compare_metrics_reports_drift():
    stored = {"constraints": {"a": {"heads": {"auroc": 0.8}, "linear_probe": {"auroc": 0.7}}}}
    measured = {"constraints": {"a": {"heads": {"auroc": 0.81}, "linear_probe": {"auroc": 0.7}}}}
    assert compare_metrics(stored, measured) == ["a heads auroc: stored 0.8, measured 0.81"]
