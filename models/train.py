"""Training of constraint heads on cached tap-layer states.

The base model stays frozen: its hidden states are computed once (see
``models.features``) and the heads train on them. The tap layer is chosen
by mean dev AUROC, the logits are Platt-calibrated on dev, thresholds are
chosen on dev for a stated target, and every reported number comes from
the held-out test split (see ``models.evaluate``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from models.base import BaseModel
from models.data import CONSTRAINTS, Example, load_examples
from models.features import FramedText, HiddenStates, extract_hidden_states, frame_text
from models.heads import ConstraintHeads, HeadsConfig

logger = logging.getLogger(__name__)

# Groups kept per source and split. The full sets would take about an hour of
# float32 forward passes on a 2-core CPU, estimated from the measured rate.
# These caps keep training and evaluation to minutes.
DEFAULT_MAX_GROUPS = {
    "truth-is-universal": {"train": 2000},
    "ethics-justice": {"train": 750, "dev": 150, "test": 150},
    "e-care": {"train": 1500, "dev": 400, "test": 400},
}

# Sources whose groups pair a negative with positives of the same content.
PAIRED_SOURCES = ("ambient", "e-care")


@dataclass
class TrainConfig:
    """Everything that decides which heads come out of a training run."""

    candidate_layers: list[int] = field(default_factory=lambda: [6, 10, 14, 18, 22])
    tap_layers: list[int] | None = None  # None searches the candidates for the best single layer
    # Defaults follow docs/head-variants.md: a choice is changed only where a variant
    # beat it by more than 0.005 mean dev AUROC (smaller gaps are within run-to-run noise).
    d_head: int = 32
    heads_per_constraint: int = 2
    token_readout: bool = False
    class_balance: bool = True  # weight every (constraint, label) cell equally
    pairwise_weight: float = 0.0  # margin loss between paired positives and negatives; 0 turns it off
    negations: bool = True  # keep the negated truth statements in the training data
    calibrate: bool = True  # Platt-scale each constraint's logit on dev
    threshold_target: str = "balanced_accuracy"  # or "accuracy", or "precision:0.9"
    search_epochs: int = 4  # epochs per candidate layer while choosing the tap layer
    max_epochs: int = 12  # epochs on the chosen layers; the best dev epoch is kept
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    seed: int = 0
    # Base-model precision for hidden states: 3x faster than float32 on a 2-core CPU.
    # NOTE: the server defaults to float32, where scores differ by about 0.01 (measured on the
    # README example with an earlier checkpoint), so test metrics are those of bfloat16 states.
    dtype: str = "bfloat16"
    max_groups: dict[str, dict[str, int]] = field(default_factory=lambda: DEFAULT_MAX_GROUPS)


@dataclass
class Dataset:
    """Examples of one split with their framed token ids and hidden states."""

    examples: list[Example]
    framed: list[FramedText]
    states: HiddenStates

    def labels(self) -> np.ndarray:
        return np.array([example.label for example in self.examples])

    def rows(self, constraint: str, source: str | None = None) -> np.ndarray:
        return np.array([i for i, e in enumerate(self.examples)
                         if e.constraint == constraint and (source is None or e.source == source)], dtype=int)


def prepare_datasets(base: BaseModel, data_dir, config: TrainConfig, cache_dir) -> dict[str, Dataset]:
    """Load, frame and run the base model over every split."""
    splits = load_examples(data_dir, config.max_groups, config.seed)
    datasets = {}
    for split, examples in splits.items():
        framed = [frame_text(base.tokenizer, example.text) for example in examples]
        states = extract_hidden_states(base, framed, config.candidate_layers, cache_dir, description=f"{split} split")
        datasets[split] = Dataset(examples, framed, states)
        logger.info("%s split: %d examples, %d tokens", split, len(examples), states.offsets[-1])
    return datasets


def batch_states(dataset: Dataset, layers: list[int], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the hidden states of ``indices`` into (B, T, d_model * len(layers)) with an attention mask."""
    lengths = [len(dataset.framed[i].input_ids) for i in indices]
    width = dataset.states.layers[layers[0]].shape[1] * len(layers)
    hidden_states = torch.zeros(len(indices), max(lengths), width)
    attention_mask = torch.zeros(len(indices), max(lengths), dtype=torch.long)
    for row, index in enumerate(indices):
        hidden_states[row, :lengths[row]] = torch.cat([dataset.states.sequence(layer, index) for layer in layers], dim=-1)
        attention_mask[row, :lengths[row]] = 1
    return hidden_states, attention_mask


def length_batches(dataset: Dataset, indices: list[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Group examples of similar length; shuffle the batch order when ``rng`` is given."""
    order = sorted(indices, key=lambda i: len(dataset.framed[i].input_ids))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches


def readout_logits(heads: ConstraintHeads, dataset: Dataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return each example's own constraint logit at its text end and at its turn end."""
    hidden_states, attention_mask = batch_states(dataset, heads.config.tap_layers, indices)
    constraint_logits = heads(hidden_states, attention_mask).constraint_logits
    rows = torch.arange(len(indices))
    column = torch.tensor([heads.config.constraints.index(dataset.examples[i].constraint) for i in indices])
    text_end = torch.tensor([dataset.framed[i].text_end for i in indices])
    turn_end = torch.tensor([dataset.framed[i].turn_end for i in indices])
    return constraint_logits[rows, text_end, column], constraint_logits[rows, turn_end, column]


def _example_weights(examples: list[Example], indices: list[int], balance: bool) -> torch.Tensor:
    """Weight examples so every (constraint, label) cell carries the same total loss."""
    weights = torch.ones(len(examples))
    if not balance:
        return weights
    counts: dict[tuple[str, int], int] = {}
    for i in indices:
        key = (examples[i].constraint, examples[i].label)
        counts[key] = counts.get(key, 0) + 1
    mean_count = len(indices) / len(counts)
    for i in indices:
        weights[i] = mean_count / counts[(examples[i].constraint, examples[i].label)]
    return weights


def _pairs(dataset: Dataset, indices: list[int]) -> list[tuple[int, int]]:
    """List (positive, negative) index pairs that share a group in a paired source."""
    by_group: dict[tuple[str, str], dict[int, list[int]]] = {}
    for i in indices:
        example = dataset.examples[i]
        if example.source in PAIRED_SOURCES:
            by_group.setdefault((example.source, example.group), {0: [], 1: []})[example.label].append(i)
    return [(positive, negative) for members in by_group.values()
            for positive in members[1] for negative in members[0]]


def train_heads(datasets: dict[str, Dataset], tap_layers: list[int], epochs: int, config: TrainConfig,
                base: BaseModel, keep: Callable[[Example], bool] = lambda example: True,
                constraints: list[str] | None = None) -> tuple[ConstraintHeads, float]:
    """Train heads on the given tap layers; return the best dev epoch's heads and its mean dev AUROC.

    Args:
        keep: selects the training examples and the dev examples that choose the epoch
            (out-of-domain checks hold some out of both).
        constraints: constraints whose dev AUROC chooses the epoch; default all.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    heads = ConstraintHeads(HeadsConfig(list(CONSTRAINTS), base.hidden_size, list(tap_layers), config.d_head,
                                        config.heads_per_constraint, config.token_readout, base_model=base.name,
                                        base_fingerprint=base.fingerprint))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    train = datasets["train"]
    indices = [i for i, example in enumerate(train.examples) if keep(example)]
    if not indices:
        raise ValueError("no training examples left after filtering; check the data directory and the filters")
    weights = _example_weights(train.examples, indices, config.class_balance)
    pairs = _pairs(train, indices) if config.pairwise_weight > 0 else []

    best_state, best_auroc = None, -1.0
    for epoch in range(epochs):
        heads.train()
        for batch in length_batches(train, indices, config.batch_size, rng):
            text_logits, turn_logits = readout_logits(heads, train, batch)
            labels = torch.tensor([float(train.examples[i].label) for i in batch])
            loss = (nn.functional.binary_cross_entropy_with_logits(text_logits, labels, weight=weights[batch])
                    + nn.functional.binary_cross_entropy_with_logits(turn_logits, labels, weight=weights[batch])) / 2
            _step(optimizer, loss)
        _train_pairs(heads, train, pairs, optimizer, config, rng)

        dev_auroc = mean_dev_auroc(heads, datasets["dev"], constraints, keep)
        logger.info("layers %s epoch %d: mean dev AUROC %.4f", tap_layers, epoch + 1, dev_auroc)
        if dev_auroc > best_auroc:
            best_auroc = dev_auroc
            best_state = {name: tensor.clone() for name, tensor in heads.state_dict().items()}

    heads.load_state_dict(best_state)
    heads.eval()
    return heads, best_auroc


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train_pairs(heads: ConstraintHeads, train: Dataset, pairs: list[tuple[int, int]],
                 optimizer: torch.optim.Optimizer, config: TrainConfig, rng: random.Random) -> None:
    """Push each positive's turn-end logit above its paired negative's (a softplus margin loss)."""
    if not pairs:
        return
    order = list(pairs)
    rng.shuffle(order)
    half = config.batch_size // 2
    for start in range(0, len(order), half):
        chunk = order[start:start + half]
        _, turn_logits = readout_logits(heads, train, [p for p, _ in chunk] + [n for _, n in chunk])
        margin = turn_logits[:len(chunk)] - turn_logits[len(chunk):]
        _step(optimizer, config.pairwise_weight * nn.functional.softplus(1.0 - margin).mean())


@torch.inference_mode()
def turn_logits(heads: ConstraintHeads, dataset: Dataset) -> np.ndarray:
    """Return each example's logit for its own constraint at the turn end."""
    logits = np.zeros(len(dataset.examples))
    for batch in length_batches(dataset, list(range(len(dataset.examples))), 128, None):
        logits[batch] = readout_logits(heads, dataset, batch)[1].numpy()
    return logits


def mean_dev_auroc(heads: ConstraintHeads, dev: Dataset, constraints: list[str] | None = None,
                   keep: Callable[[Example], bool] = lambda example: True) -> float:
    logits, labels = turn_logits(heads, dev), dev.labels()
    aurocs = []
    for constraint in constraints or CONSTRAINTS:
        rows = [i for i in dev.rows(constraint) if keep(dev.examples[i])]
        aurocs.append(roc_auc_score(labels[rows], logits[rows]))
    return float(np.mean(aurocs))


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target: str) -> float:
    """Choose a threshold on dev scores for ``target``: accuracy, balanced_accuracy or precision:P.

    Candidates lie midway between neighbouring scores. A precision target takes
    the lowest threshold that reaches it, and the highest score if none does.
    """
    ordered = np.unique(scores)
    candidates = np.concatenate([[0.0], (ordered[:-1] + ordered[1:]) / 2, [1.0]])
    predictions = scores[None, :] >= candidates[:, None]
    positives, negatives = labels == 1, labels == 0
    if target.startswith("precision:"):
        wanted = float(target.split(":", 1)[1])
        predicted = predictions.sum(axis=1)
        precision = np.where(predicted > 0, (predictions & positives).sum(axis=1) / np.maximum(predicted, 1), 0.0)
        reaching = np.flatnonzero(precision >= wanted)
        return float(candidates[reaching[0]] if len(reaching) else ordered[-1])
    if target == "accuracy":
        quality = (predictions == positives).mean(axis=1)
    elif target == "balanced_accuracy":
        quality = ((predictions & positives).sum(axis=1) / max(positives.sum(), 1)
                   + (~predictions & negatives).sum(axis=1) / max(negatives.sum(), 1)) / 2
    else:
        raise ValueError(f"unknown threshold target {target!r}; use accuracy, balanced_accuracy or precision:P")
    return float(candidates[int(np.argmax(quality))])


def calibrate(heads: ConstraintHeads, dev: Dataset, config: TrainConfig) -> None:
    """Platt-scale each constraint's logit on dev, then choose its threshold for the target."""
    logits, labels = turn_logits(heads, dev), dev.labels()
    constraints = heads.config.constraints
    if config.calibrate:
        scale, shift = torch.ones(len(constraints)), torch.zeros(len(constraints))
        for c, constraint in enumerate(constraints):
            rows = dev.rows(constraint)
            platt = LogisticRegression(C=1e4).fit(logits[rows, None], labels[rows])
            scale[c], shift[c] = float(platt.coef_[0, 0]), float(platt.intercept_[0])
        heads.rescale_logits(scale, shift)
        logits = turn_logits(heads, dev)
    scores = 1 / (1 + np.exp(-logits))
    heads.config.threshold_target = config.threshold_target
    for constraint in constraints:
        rows = dev.rows(constraint)
        heads.config.thresholds[constraint] = round(choose_threshold(scores[rows], labels[rows], config.threshold_target), 6)


def choose_tap_layers(datasets: dict[str, Dataset], config: TrainConfig, base: BaseModel) -> tuple[list[int], dict[str, float]]:
    if config.tap_layers:
        return list(config.tap_layers), {}
    results = {}
    for layer in config.candidate_layers:
        _, results[str(layer)] = train_heads(datasets, [layer], config.search_epochs, config, base)
        logger.info("tap layer %d: mean dev AUROC %.4f", layer, results[str(layer)])
    best = max(results, key=results.get)
    return [int(best)], {layer: round(auroc, 4) for layer, auroc in results.items()}


def fit_heads(datasets: dict[str, Dataset], config: TrainConfig, base: BaseModel) -> tuple[ConstraintHeads, dict[str, float]]:
    """Choose the tap layers, train, calibrate; return the heads and the layer search's dev AUROCs."""
    tap_layers, layer_search = choose_tap_layers(datasets, config, base)
    keep = (lambda example: True) if config.negations else (lambda example: not _is_negation(example))
    heads, _ = train_heads(datasets, tap_layers, config.max_epochs, config, base, keep=keep)
    calibrate(heads, datasets["dev"], config)
    return heads, layer_search


def _is_negation(example: Example) -> bool:
    return example.subset.startswith("neg_")
