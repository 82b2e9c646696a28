"""Training and evaluation of constraint heads on cached tap-layer states.

The base model stays frozen: its hidden states are computed once (see
``models.features``) and the heads train on them. The tap layer is chosen
by mean dev AUROC over the constraints, thresholds are calibrated on dev,
and every reported number comes from the held-out test split.
"""

from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from models.base import BaseModel
from models.data import CONSTRAINTS, Example, load_examples
from models.features import FramedText, HiddenStates, extract_hidden_states, frame_text
from models.heads import ConstraintHeads, HeadsConfig

logger = logging.getLogger(__name__)

# Groups kept per source and split. The full sets would take about an hour
# of base-model forward passes on a 2-core CPU (an estimate from the measured
# rate of about 500 tokens/s); these caps took 13 minutes there.
DEFAULT_MAX_GROUPS = {
    "truth-is-universal": {"train": 2000},
    "ethics-justice": {"train": 750, "dev": 150, "test": 150},
    "e-care": {"train": 1500, "dev": 400, "test": 400},
}


@dataclass
class TrainConfig:
    """Everything that decides which heads come out of a training run."""

    candidate_layers: list[int] = field(default_factory=lambda: [6, 10, 14, 18, 22])
    d_head: int = 64
    heads_per_constraint: int = 2
    search_epochs: int = 4  # epochs per candidate layer while choosing the tap layer
    max_epochs: int = 12  # epochs on the chosen layer; the best dev epoch is kept
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    seed: int = 0
    max_groups: dict[str, dict[str, int]] = field(default_factory=lambda: DEFAULT_MAX_GROUPS)


@dataclass
class Dataset:
    """Examples of one split with their framed token ids and hidden states."""

    examples: list[Example]
    framed: list[FramedText]
    states: HiddenStates

    def labels(self) -> np.ndarray:
        return np.array([example.label for example in self.examples])


def prepare_datasets(base: BaseModel, data_dir: Path, config: TrainConfig,
                     cache_dir: Path | None) -> dict[str, Dataset]:
    """Load, frame and run the base model over every split."""
    splits = load_examples(data_dir, config.max_groups, config.seed)
    datasets = {}
    for split, examples in splits.items():
        framed = [frame_text(base.tokenizer, example.text) for example in examples]
        states = extract_hidden_states(base, framed, config.candidate_layers, cache_dir, description=f"{split} split")
        datasets[split] = Dataset(examples, framed, states)
        logger.info("%s split: %d examples, %d tokens", split, len(examples), states.offsets[-1])
    return datasets


def _batch(dataset: Dataset, layer: int, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [len(dataset.framed[i].input_ids) for i in indices]
    hidden_states = torch.zeros(len(indices), max(lengths), dataset.states.layers[layer].shape[1])
    attention_mask = torch.zeros(len(indices), max(lengths), dtype=torch.long)
    for row, index in enumerate(indices):
        hidden_states[row, :lengths[row]] = dataset.states.sequence(layer, index).float()
        attention_mask[row, :lengths[row]] = 1
    return hidden_states, attention_mask


def _length_batches(dataset: Dataset, batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Group examples of similar length; shuffle the batch order when ``rng`` is given."""
    order = sorted(range(len(dataset.examples)), key=lambda i: len(dataset.framed[i].input_ids))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def _readout_logits(heads: ConstraintHeads, dataset: Dataset, indices: list[int],
                    constraint_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each example's own constraint logit at its text end and turn end."""
    rows = torch.arange(len(indices))
    column = torch.tensor([heads.config.constraints.index(dataset.examples[i].constraint) for i in indices])
    text_end = torch.tensor([dataset.framed[i].text_end for i in indices])
    turn_end = torch.tensor([dataset.framed[i].turn_end for i in indices])
    return constraint_logits[rows, text_end, column], constraint_logits[rows, turn_end, column]


def train_heads(datasets: dict[str, Dataset], layer: int, epochs: int, config: TrainConfig,
                base: BaseModel) -> tuple[ConstraintHeads, float]:
    """Train heads on one tap layer; return the best dev epoch's heads and its mean dev AUROC."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    heads = ConstraintHeads(HeadsConfig(list(CONSTRAINTS), base.hidden_size, layer, config.d_head,
                                        config.heads_per_constraint, base_model=base.name,
                                        base_fingerprint=base.fingerprint))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    train = datasets["train"]
    weights = _example_weights(train.examples)

    best_state, best_auroc = None, -1.0
    for epoch in range(epochs):
        heads.train()
        for indices in _length_batches(train, config.batch_size, rng):
            hidden_states, attention_mask = _batch(train, layer, indices)
            text_logits, turn_logits = _readout_logits(heads, train, indices, heads(hidden_states, attention_mask).constraint_logits)
            labels = torch.tensor([float(train.examples[i].label) for i in indices])
            loss_weights = weights[indices]
            loss = (nn.functional.binary_cross_entropy_with_logits(text_logits, labels, weight=loss_weights)
                    + nn.functional.binary_cross_entropy_with_logits(turn_logits, labels, weight=loss_weights)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        dev_auroc = float(np.mean([m["auroc"] for m in evaluate_heads(heads, datasets["dev"]).values()]))
        logger.info("layer %d epoch %d: mean dev AUROC %.4f", layer, epoch + 1, dev_auroc)
        if dev_auroc > best_auroc:
            best_auroc = dev_auroc
            best_state = {name: tensor.clone() for name, tensor in heads.state_dict().items()}

    heads.load_state_dict(best_state)
    heads.eval()
    return heads, best_auroc


def _example_weights(examples: list[Example]) -> torch.Tensor:
    """Weight examples so every (constraint, label) cell carries the same total loss."""
    counts: dict[tuple[str, int], int] = {}
    for example in examples:
        counts[(example.constraint, example.label)] = counts.get((example.constraint, example.label), 0) + 1
    mean_count = len(examples) / len(counts)
    return torch.tensor([mean_count / counts[(e.constraint, e.label)] for e in examples])


@torch.inference_mode()
def score_dataset(heads: ConstraintHeads, dataset: Dataset) -> np.ndarray:
    """Return each example's score for its own constraint at the turn end."""
    scores = np.zeros(len(dataset.examples))
    for indices in _length_batches(dataset, 128, None):
        hidden_states, attention_mask = _batch(dataset, heads.config.tap_layer, indices)
        _, turn_logits = _readout_logits(heads, dataset, indices, heads(hidden_states, attention_mask).constraint_logits)
        scores[indices] = torch.sigmoid(turn_logits).numpy()
    return scores


def _by_constraint(dataset: Dataset) -> dict[str, np.ndarray]:
    constraints = np.array([example.constraint for example in dataset.examples])
    return {constraint: np.flatnonzero(constraints == constraint) for constraint in CONSTRAINTS}


def evaluate_heads(heads: ConstraintHeads, dataset: Dataset) -> dict[str, dict]:
    scores, labels = score_dataset(heads, dataset), dataset.labels()
    return {c: {"auroc": float(roc_auc_score(labels[rows], scores[rows]))} for c, rows in _by_constraint(dataset).items()}


def calibrate_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the threshold with the best accuracy, midway between neighbouring scores."""
    ordered = np.unique(scores)
    candidates = np.concatenate([[0.0], (ordered[:-1] + ordered[1:]) / 2, [1.0]])
    accuracies = [np.mean((scores >= t) == labels) for t in candidates]
    return float(candidates[int(np.argmax(accuracies))])


def choose_tap_layer(datasets: dict[str, Dataset], config: TrainConfig, base: BaseModel) -> tuple[int, dict[int, float]]:
    results = {}
    for layer in config.candidate_layers:
        _, results[layer] = train_heads(datasets, layer, config.search_epochs, config, base)
        logger.info("tap layer %d: mean dev AUROC %.4f", layer, results[layer])
    return max(results, key=results.get), results


def run_training(base: BaseModel, data_dir: Path, config: TrainConfig, cache_dir: Path | None) -> tuple[ConstraintHeads, dict]:
    """Train heads end to end and return them with their metrics (not yet saved)."""
    datasets = prepare_datasets(base, data_dir, config, cache_dir)
    layer, layer_search = choose_tap_layer(datasets, config, base)
    heads, _ = train_heads(datasets, layer, config.max_epochs, config, base)

    dev_scores, dev_labels = score_dataset(heads, datasets["dev"]), datasets["dev"].labels()
    for constraint, rows in _by_constraint(datasets["dev"]).items():
        heads.config.thresholds[constraint] = round(calibrate_threshold(dev_scores[rows], dev_labels[rows]), 6)

    metrics = evaluate_checkpoint(heads, datasets)
    metrics["tap_layer_search"] = {str(k): round(v, 4) for k, v in layer_search.items()}
    metrics["training"] = asdict(config)
    return heads, metrics


def _probe_scores(datasets: dict[str, Dataset], layer: int, constraint: str) -> dict[str, np.ndarray]:
    """Fit a last-token logistic-regression probe for one constraint; score dev and test."""
    features = {}
    for split, dataset in datasets.items():
        rows = _by_constraint(dataset)[constraint]
        features[split] = (np.stack([dataset.states.sequence(layer, i)[dataset.framed[i].turn_end].float().numpy()
                                     for i in rows]), dataset.labels()[rows])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    probe.fit(*features["train"])
    return {split: probe.predict_proba(features[split][0])[:, 1] for split in ("dev", "test")}


def _pairwise_accuracy(examples: list[Example], scores: np.ndarray) -> float:
    """Share of groups of two (one correct, one wrong) where the correct one scores higher."""
    pairs: dict[str, dict[int, float]] = {}
    for example, score in zip(examples, scores):
        pairs.setdefault(example.group, {})[example.label] = score
    complete = [pair for pair in pairs.values() if len(pair) == 2]
    return float(np.mean([pair[1] > pair[0] for pair in complete]))


def evaluate_checkpoint(heads: ConstraintHeads, datasets: dict[str, Dataset]) -> dict:
    """Score heads and the linear-probe baseline on the test split, per constraint and source."""
    test = datasets["test"]
    scores, labels = score_dataset(heads, test), test.labels()
    report: dict = {"split": "test", "tap_layer": heads.config.tap_layer, "constraints": {}}
    for constraint, rows in _by_constraint(test).items():
        threshold = heads.config.threshold(constraint)
        probe = _probe_scores(datasets, heads.config.tap_layer, constraint)
        dev_rows = _by_constraint(datasets["dev"])[constraint]
        probe_threshold = calibrate_threshold(probe["dev"], datasets["dev"].labels()[dev_rows])
        entry = {
            "examples": int(len(rows)),
            "heads": {"auroc": round(float(roc_auc_score(labels[rows], scores[rows])), 4),
                      "accuracy": round(float(np.mean((scores[rows] >= threshold) == labels[rows])), 4),
                      "threshold": threshold},
            "linear_probe": {"auroc": round(float(roc_auc_score(labels[rows], probe["test"])), 4),
                             "accuracy": round(float(np.mean((probe["test"] >= probe_threshold) == labels[rows])), 4)},
            "sources": _source_breakdown(test, rows, scores),
        }
        if constraint == "causality":
            examples = [test.examples[i] for i in rows]
            entry["heads"]["pairwise_accuracy"] = round(_pairwise_accuracy(examples, scores[rows]), 4)
            entry["linear_probe"]["pairwise_accuracy"] = round(_pairwise_accuracy(examples, probe["test"]), 4)
        report["constraints"][constraint] = entry
    return report


def _source_breakdown(dataset: Dataset, rows: np.ndarray, scores: np.ndarray) -> dict[str, dict]:
    sources = np.array([dataset.examples[i].source for i in rows])
    labels = dataset.labels()[rows]
    breakdown = {}
    for source in sorted(set(sources)):
        mask = sources == source
        auroc = float(roc_auc_score(labels[mask], scores[rows][mask])) if len(set(labels[mask])) == 2 else None
        breakdown[source] = {"examples": int(mask.sum()), "auroc": None if auroc is None else round(auroc, 4)}
    return breakdown
