import numpy as np
import pytest

from models.baselines import minilm_embeddings, style_features, zero_shot_scores
from models.evaluate import evaluate, expected_calibration_error, out_of_domain
from models.report import baseline_gaps, format_table, markdown_table, out_of_domain_table
from models.train import fit_heads, prepare_datasets
from tests.conftest import build_tiny_base
from tests.models.test_train import tiny_config, write_learnable_sources


def test_ece_of_calibrated_scores_is_zero():
    scores = np.array([0.25] * 4 + [0.75] * 4)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(scores, labels) == pytest.approx(0.0)


def test_ece_of_overconfident_scores():
    scores = np.array([0.95] * 10)
    labels = np.array([1] * 5 + [0] * 5)
    assert expected_calibration_error(scores, labels) == pytest.approx(0.45)


def test_style_features_shape():
    features = style_features(["What is the capital of France?", "Will I be happy?", ""])
    assert features.shape[0] == 3
    assert features[0, 3] == 1.0  # one question mark
    assert np.isfinite(features).all()


def test_minilm_embeddings_are_unit_length():
    embeddings = minilm_embeddings(["The sky is blue.", "Paris is in France.", "The sky is blue."])
    assert embeddings.shape == (3, 384)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert np.allclose(embeddings[0], embeddings[2], atol=1e-6)
    assert not np.allclose(embeddings[0], embeddings[1], atol=1e-2)


def test_zero_shot_scores_are_probabilities(tiny_base):
    scores = zero_shot_scores(tiny_base, ["Paris is in France.", "I deserve a car."], ["testifiability", "reciprocity"])
    assert scores.shape == (2,)
    assert ((scores > 0) & (scores < 1)).all()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    write_learnable_sources(root / "data")
    words = {1: "Paris", 0: "Rome"}
    (root / "data" / "truth-is-universal" / "datasets" / "inventors.csv").write_text("statement,label\n" + "".join(
        f"Inventor {i} lived in {words[i % 2]}.,{i % 2}\n" for i in range(40)))
    base, config = build_tiny_base(), tiny_config()
    datasets = prepare_datasets(base, root / "data", config, None)
    heads, _ = fit_heads(datasets, config, base)
    return heads, datasets, base, config


def test_report_has_every_method_and_source(suite):
    heads, datasets, base, config = suite
    report = evaluate(heads, datasets, base, config)
    for constraint, entry in report["constraints"].items():
        assert set(entry["methods"]) == {"heads", "linear_probe", "zero_shot", "sentence_embedding"}
        assert entry["best_baseline"] in ("linear_probe", "zero_shot", "sentence_embedding")
        assert entry["heads_minus_best_baseline"] == pytest.approx(
            entry["methods"]["heads"]["auroc"] - entry["methods"][entry["best_baseline"]]["auroc"], abs=1e-4)
    selfaware = report["constraints"]["decidability"]["sources"]["selfaware"]["methods"]
    assert "length_style" in selfaware
    assert "pairwise_accuracy" in report["constraints"]["causality"]["sources"]["e-care"]["methods"]["zero_shot"]
    assert report["constraints"]["testifiability"]["methods"]["zero_shot"]["threshold"] == 0.5

    table = format_table(report)
    assert "MiniLM + LR" in table
    assert "length/style" in table
    assert markdown_table(report).count("\n") == table.count("\n")
    assert len(baseline_gaps(report)) == 4


def test_out_of_domain_rows(suite):
    heads, datasets, base, config = suite
    ood = out_of_domain(heads, datasets, base, config)
    assert [row["held_out"] for row in ood["testifiability"]] == ["topic facts", "topic inventors"]
    assert all(0.0 <= row["out_of_domain_auroc"] <= 1.0 for row in ood["testifiability"])
    assert ood["decidability"][0]["held_out"] == "train selfaware, test ambient"
    assert ood["decidability"][0]["examples"] > 0
    assert set(ood["not_checked"]) == {"causality", "reciprocity"}
    assert "topic facts" in out_of_domain_table(ood)
