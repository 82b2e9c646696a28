"""Constraint heads: dedicated attention heads beside a frozen base model.

Each constraint owns ``heads_per_constraint`` attention heads with their own
query, key and value projections over the residual stream at one tap layer
of the base model. A head attends causally over the sequence so far, and the
constraint's heads are read out to one logit per token; score = sigmoid(logit).
All heads of all constraints run as one batched multi-head attention.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from models.base import fingerprint_tensors
from models.runner import PaddedRows

WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "MODEL_CARD.md"


class HeadsMismatchError(ValueError):
    """A head checkpoint was trained on different base-model weights."""


@dataclass
class HeadsConfig:
    """Shape and identity of a head checkpoint, stored as heads.json."""

    constraints: list[str]
    d_model: int  # hidden size of the base model
    tap_layers: list[int]  # indices into hidden_states (0 is the embedding output), concatenated
    d_head: int = 64
    heads_per_constraint: int = 2
    token_readout: bool = False  # also read each constraint's logit from the token's own hidden state
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_target: str = "balanced_accuracy"  # what the thresholds were chosen to maximise on dev
    base_model: str = ""
    base_fingerprint: str = ""
    name: str = "constraint-heads"  # recorded with every judgment made with these heads

    @property
    def num_heads(self) -> int:
        return len(self.constraints) * self.heads_per_constraint

    @property
    def input_size(self) -> int:
        return self.d_model * len(self.tap_layers)

    def threshold(self, constraint: str) -> float:
        return self.thresholds.get(constraint, 0.5)


@dataclass
class HeadsCache:
    """The heads' own key/value cache for incremental decoding."""

    head_keys: torch.Tensor  # (B, n_heads, T, d_head)
    head_values: torch.Tensor  # (B, n_heads, T, d_head)
    key_mask: torch.Tensor  # (B, T) bool, False at padding

    @property
    def length(self) -> int:
        return self.head_keys.shape[2]


@dataclass
class HeadsOutput:
    constraint_logits: torch.Tensor  # (B, t, C)
    attention_weights: torch.Tensor  # (B, C, t, T): each constraint's heads averaged
    cache: HeadsCache


class ConstraintHeads(nn.Module):
    def __init__(self, config: HeadsConfig):
        super().__init__()
        self.config = config
        width = config.num_heads * config.d_head
        # Each tap layer has its own scale (middle layers carry a few very large values), so each gets its own norm.
        self.norms = nn.ModuleList(nn.LayerNorm(config.d_model) for _ in config.tap_layers)
        self.q_proj = nn.Linear(config.input_size, width)
        self.k_proj = nn.Linear(config.input_size, width)
        self.v_proj = nn.Linear(config.input_size, width)
        # One readout row per constraint over the concatenated outputs of its heads.
        per_constraint = config.heads_per_constraint * config.d_head
        self.readout_weight = nn.Parameter(torch.randn(len(config.constraints), per_constraint) / math.sqrt(per_constraint))
        self.readout_bias = nn.Parameter(torch.zeros(len(config.constraints)))
        if config.token_readout:
            self.token_readout = nn.Linear(config.input_size, len(config.constraints), bias=False)
            nn.init.zeros_(self.token_readout.weight)

    def select_hidden_states(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Concatenate the tap layers from a base model's ``output_hidden_states``."""
        return torch.cat([hidden_states[layer] for layer in self.config.tap_layers], dim=-1)

    def _normalise(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.norms) == 1:
            return self.norms[0](hidden_states)
        chunks = hidden_states.split(self.config.d_model, dim=-1)
        return torch.cat([norm(chunk) for norm, chunk in zip(self.norms, chunks)], dim=-1)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.config.num_heads, self.config.d_head).transpose(1, 2)  # (B, n, T, d)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: HeadsCache | None = None) -> HeadsOutput:
        """Score ``t`` new positions given everything in ``cache`` before them.

        Args:
            hidden_states: (B, t, d_model * len(tap_layers)) tap-layer residual streams of the new positions.
            attention_mask: (B, t) with 1 for real tokens and 0 for padding; default all real.
            cache: keys and values of earlier positions; None for a full-sequence pass.

        Returns the constraint logits of the new positions, each constraint's
        attention over all positions so far, and the extended cache.
        """
        B, t, _ = hidden_states.shape
        cfg = self.config
        normed = self._normalise(hidden_states)
        query = self._split_heads(self.q_proj(normed))
        key = self._split_heads(self.k_proj(normed))
        value = self._split_heads(self.v_proj(normed))

        new_mask = torch.ones(B, t, dtype=torch.bool, device=hidden_states.device) if attention_mask is None \
            else attention_mask.to(torch.bool)
        if cache is not None:
            key = torch.cat([cache.head_keys, key], dim=2)
            value = torch.cat([cache.head_values, value], dim=2)
            new_mask = torch.cat([cache.key_mask, new_mask], dim=1)
        T = key.shape[2]

        # Causal mask: new position i sits at absolute position T - t + i.
        offset = T - t
        causal = torch.ones(t, T, dtype=torch.bool, device=key.device).tril(diagonal=offset)
        allowed = causal[None, None] & new_mask[:, None, None, :]  # (B, 1, t, T)
        scores = query @ key.transpose(-1, -2) / math.sqrt(cfg.d_head)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)  # (B, n, t, T)
        attended = weights @ value  # (B, n, t, d)

        C, H = len(cfg.constraints), cfg.heads_per_constraint
        per_constraint = attended.view(B, C, H, t, cfg.d_head).permute(0, 3, 1, 2, 4).reshape(B, t, C, H * cfg.d_head)
        constraint_logits = (per_constraint * self.readout_weight).sum(-1) + self.readout_bias
        if self.config.token_readout:
            constraint_logits = constraint_logits + self.token_readout(normed)
        constraint_weights = weights.view(B, C, H, t, T).mean(dim=2)
        return HeadsOutput(constraint_logits, constraint_weights, HeadsCache(key, value, new_mask))

    def decode_step(self, hidden_states: torch.Tensor, cache: PaddedRows, fused_qkv: tuple[torch.Tensor, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score one new position per row, each row at its own length; extend the padded cache.

        The same computation as ``forward`` with a cache, for rows of different
        lengths at once: the new key and value go to each row's next position,
        and a mask hides the padding past it.

        Args:
            hidden_states: (B, 1, input_size) tap-layer states of each row's new token.
            cache: rows of head keys and values, (R, n_heads, T, d_head) each, B == cache.rows.
            fused_qkv: the projections as one weight and bias, from ``fused_qkv``.

        Returns constraint logits (B, C) and each constraint's attention (B, C, L) over the cache's
        L positions (its capacity: attending over all of them keeps a row's sums independent of the
        other rows' lengths).
        """
        B = hidden_states.shape[0]
        cfg = self.config
        device = hidden_states.device
        positions = torch.tensor(cache.lengths, device=device)
        cache.reserve(B, max(cache.lengths) + 1)
        L = cache.capacity[1]
        # A batched matmul of one row per batch entry computes each row the same way at any B. A
        # plain float32 linear switches kernels with B, and the trace must not depend on which
        # other requests share the step.
        weight, bias = fused_qkv  # (outputs, input_size): this layout, transposed as a view, is the
        # one whose batched matmul was measured to give each row the same bits at any B
        projected = torch.baddbmm(bias.expand(B, 1, -1), self._normalise(hidden_states),
                                  weight.t().expand(B, *weight.t().shape))[:, 0]
        width = 3 * cfg.num_heads * cfg.d_head
        query, key, value = projected[:, :width].view(B, 3, cfg.num_heads, cfg.d_head).unbind(1)  # (B, n, d)
        rows = torch.arange(B, device=device)
        head_keys, head_values = cache.buffers
        head_keys[rows, :, positions] = key
        head_values[rows, :, positions] = value
        for row in range(B):
            cache.lengths[row] += 1

        hidden = torch.arange(L, device=device)[None, None, None, :] > positions[:, None, None, None]  # (B, 1, 1, L)
        scores = query[:, :, None, :] @ head_keys[:B].transpose(-1, -2) / math.sqrt(cfg.d_head)
        scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1)  # (B, n_heads, 1, L)
        attended = weights @ head_values[:B]  # (B, n_heads, 1, d_head)

        C, H = len(cfg.constraints), cfg.heads_per_constraint
        per_constraint = attended.view(B, C, H * cfg.d_head)
        constraint_logits = (per_constraint * self.readout_weight).sum(-1) + self.readout_bias
        if cfg.token_readout:
            constraint_logits = constraint_logits + projected[:, width:]
        return constraint_logits, weights.view(B, C, H, L).mean(dim=2)

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the query, key and value projections (and the token readout, if any) as one
        weight (outputs, input_size) and bias: one matmul per decode step."""
        weights = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
        biases = [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]
        if self.config.token_readout:
            weights.append(self.token_readout.weight)
            biases.append(torch.zeros_like(self.readout_bias))
        return torch.cat(weights), torch.cat(biases)

    def new_cache(self, device: torch.device) -> PaddedRows:
        shape = (self.config.num_heads, self.config.d_head)
        return PaddedRows([shape, shape], self.readout_bias.dtype, device)

    @torch.no_grad()
    def rescale_logits(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a per-constraint affine map of the logits (Platt scaling) into the readout.

        Args:
            scale, shift: (C,) so that new logit = scale * logit + shift.
        """
        self.readout_weight.mul_(scale[:, None])
        self.readout_bias.mul_(scale).add_(shift)
        if self.config.token_readout:
            self.token_readout.weight.mul_(scale[:, None])

    def fingerprint(self) -> str:
        return fingerprint_tensors(self.state_dict())


def save_checkpoint(directory: Path, heads: ConstraintHeads, metrics: dict | None = None,
                    model_card: str | None = None) -> None:
    """Write a head checkpoint directory: weights, config, and optionally metrics and card."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in heads.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(heads.config), indent=2) + "\n")
    if metrics is not None:
        (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    if model_card is not None:
        (directory / CARD_FILE).write_text(model_card)


def read_heads_config(directory: Path) -> HeadsConfig:
    config_path = directory / CONFIG_FILE
    if not config_path.exists():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}: not a head checkpoint directory")
    return HeadsConfig(**json.loads(config_path.read_text()))


def load_checkpoint(directory: Path, base_fingerprint: str | None = None) -> ConstraintHeads:
    """Load heads from ``directory``; reject them if made for other base weights.

    Args:
        base_fingerprint: the loaded base model's fingerprint; None skips the check
            (only for inspecting a checkpoint without its base model).
    """
    config = read_heads_config(directory)
    if base_fingerprint is not None and config.base_fingerprint != base_fingerprint:
        raise HeadsMismatchError(
            f"head checkpoint {directory} was trained on base model {config.base_model!r} with fingerprint "
            f"{config.base_fingerprint}, but the loaded base model has fingerprint {base_fingerprint}. "
            "Load the base model these heads were trained on, or train heads for this model "
            "with `tracehead heads train`.")
    heads = ConstraintHeads(config)
    heads.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    heads.eval()
    heads.requires_grad_(False)
    return heads
