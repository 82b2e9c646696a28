import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from models.card import render_model_card
from models.evaluate import evaluate
from models.heads import load_checkpoint, save_checkpoint
from models.report import format_table
from models.train import TrainConfig, choose_threshold, fit_heads, prepare_datasets, train_heads, turn_logits
from server.cli import compare_metrics
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
                       max_groups={}, dtype="float32")


def test_training_writes_reproducible_checkpoint(tmp_path):
    write_learnable_sources(tmp_path / "data")
    base = build_tiny_base()
    config = tiny_config()
    datasets = prepare_datasets(base, tmp_path / "data", config, tmp_path / "cache")
    heads, layer_search = fit_heads(datasets, config, base)
    evaluation = evaluate(heads, datasets, base, config, baselines=False)

    assert heads.config.tap_layers in ([1], [2])
    assert set(layer_search) == {"1", "2"}
    for constraint, entry in evaluation["constraints"].items():
        assert 0.0 <= heads.config.thresholds[constraint] <= 1.0
        assert entry["methods"]["heads"]["threshold"] == heads.config.thresholds[constraint]
        assert 0.0 <= entry["methods"]["heads"]["auroc"] <= 1.0
        assert 0.0 <= entry["methods"]["heads"]["ece"] <= 1.0
        assert entry["examples"] > 0
    assert "pairwise_accuracy" in evaluation["constraints"]["causality"]["sources"]["e-care"]["methods"]["heads"]

    metrics = {"evaluation": evaluation, "tap_layer_search": layer_search, "training": asdict(config)}
    checkpoint = tmp_path / "heads"
    save_checkpoint(checkpoint, heads, metrics, render_model_card(heads.config, metrics))
    reloaded = load_checkpoint(checkpoint, base.fingerprint)
    again = prepare_datasets(base, tmp_path / "data", TrainConfig(**metrics["training"]), tmp_path / "cache")
    assert compare_metrics(evaluation, evaluate(reloaded, again, base, config, baselines=False)) == []

    card = (checkpoint / "MODEL_CARD.md").read_text()
    assert "sciai-lab/Truth_is_Universal@" in card
    assert "| testifiability | all |" in card
    assert all(constraint in format_table(evaluation) for constraint in evaluation["constraints"])


def test_heads_learn_a_lexical_signal(tmp_path):
    write_learnable_sources(tmp_path / "data")
    config = tiny_config()
    config.max_epochs = 15
    base = build_tiny_base()
    datasets = prepare_datasets(base, tmp_path / "data", config, None)
    heads, _ = fit_heads(datasets, config, base)
    evaluation = evaluate(heads, datasets, base, config, baselines=False)
    assert evaluation["constraints"]["testifiability"]["methods"]["heads"]["auroc"] > 0.9


def test_calibration_folds_into_readout(tmp_path):
    write_learnable_sources(tmp_path / "data")
    config = tiny_config()
    base = build_tiny_base()
    datasets = prepare_datasets(base, tmp_path / "data", config, None)
    heads, _ = train_heads(datasets, [2], 2, config, base)
    before = turn_logits(heads, datasets["dev"])
    heads.rescale_logits(torch.full((4,), 2.0), torch.full((4,), -1.0))
    assert np.allclose(turn_logits(heads, datasets["dev"]), 2.0 * before - 1.0, atol=1e-4)


@pytest.mark.parametrize("target, expected", [
    ("accuracy", (0.35, 0.6)),
    ("balanced_accuracy", (0.35, 0.6)),
    ("precision:1.0", (0.35, 0.6)),
])
def test_threshold_targets(target, expected):
    scores = np.array([0.1, 0.2, 0.35, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    threshold = choose_threshold(scores, labels, target)
    assert expected[0] < threshold <= expected[1]


def test_precision_target_trades_recall():
    scores = np.array([0.1, 0.4, 0.5, 0.6, 0.7, 0.9])
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert choose_threshold(scores, labels, "precision:1.0") == pytest.approx(0.8)
    assert choose_threshold(scores, labels, "accuracy") < 0.8


def test_unknown_threshold_target_rejected():
    with pytest.raises(ValueError, match="precision:P"):
        choose_threshold(np.array([0.2, 0.8]), np.array([0, 1]), "f1")


def test_compare_metrics_reports_drift():
    def report(auroc):
        return {"constraints": {"a": {"examples": 2, "methods": {"heads": {"auroc": auroc, "accuracy": 0.5}},
                                      "sources": {}}}}
    assert compare_metrics(report(0.8), report(0.801)) == []
    assert compare_metrics(report(0.8), report(0.81)) == ["a all heads auroc: stored 0.8, measured 0.81"]
