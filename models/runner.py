"""Forward passes of the base model for batched decoding.

A runner turns token ids into next-token logits and the tap layers' hidden
states, keeping each row's key/value cache. Two runners share one interface:

- ``LlamaRunner`` runs Llama-architecture models (the default model among
  them) with its own lean forward. It fuses projections, builds rotary tables
  once, and writes a key/value cache preallocated for all rows in place. A
  decode step is then a few dozen tensor operations per layer, and rows of
  different lengths decode together in one pass.
- ``TransformersRunner`` runs any other causal LM through transformers'
  forward, one row at a time: correct for every architecture, without the
  speed of batching.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from models.base import BaseModel

logger = logging.getLogger(__name__)

# The rope types whose frequencies do not depend on the sequence length, so one table serves every step.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope"}


@dataclass
class Prefilled:
    """A prompt run through the base model: what the first sampling step and the heads need."""

    logits: torch.Tensor  # (keep, vocab) float32 logits of the last ``keep`` positions
    tap_hidden_states: torch.Tensor  # (1, P, d_model * len(tap_layers))
    row_cache: object  # the runner's cache of this one row, handed to ``RowCache.add``


class PaddedRows:
    """Tensors of shape (rows, ..., length, width) whose rows live at the front, padded to one length.

    Rows stay dense: removing row i moves the last row into its place. Both
    dimensions grow by doubling, so a long generation copies its cache only
    a logarithmic number of times, and the length shrinks again once the
    longest row has left, so that later steps do not attend over its padding.
    Unused positions hold zeros, so a masked attention weight of exactly 0
    times them stays 0: a row's sums come out the same at any padded length
    (measured on the default model: bit-identical traces at lengths 64 and 512).
    """

    MIN_LENGTH = 64

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.shapes, self.dtype, self.device = shapes, dtype, device
        self.lengths: list[int] = []  # positions filled per row
        self.buffers = self._allocate(1, self.MIN_LENGTH)

    def _allocate(self, rows: int, length: int) -> list[torch.Tensor]:
        return [torch.zeros(rows, *shape, length, width, dtype=self.dtype, device=self.device)
                for *shape, width in self.shapes]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> tuple[int, int]:
        return self.buffers[0].shape[0], self.buffers[0].shape[-2]

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions, keeping what is stored."""
        have_rows, have_length = self.capacity
        if rows <= have_rows and length <= have_length:
            return
        new_rows, new_length = have_rows, have_length
        while new_rows < rows:
            new_rows *= 2
        while new_length < length:
            new_length *= 2
        self._resize(new_rows, new_length)

    def _resize(self, rows: int, length: int) -> None:
        keep_rows, keep_length = min(rows, self.capacity[0]), min(length, self.capacity[1])
        resized = self._allocate(rows, length)
        for new, old in zip(resized, self.buffers):
            new[:keep_rows, ..., :keep_length, :] = old[:keep_rows, ..., :keep_length, :]
        self.buffers = resized

    def add(self, tensors: list[torch.Tensor]) -> int:
        """Append a row from tensors shaped (..., length, width); return its index."""
        length = tensors[0].shape[-2]
        self.reserve(self.rows + 1, length)
        row = self.rows
        for buffer, tensor in zip(self.buffers, tensors):
            buffer[row, ..., :length, :] = tensor
        self.lengths.append(length)
        return row

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (callers renumber it)."""
        last = self.rows - 1
        for buffer in self.buffers:
            if row != last:
                buffer[row] = buffer[last]
            buffer[last].zero_()
        self.lengths[row] = self.lengths[last]
        self.lengths.pop()
        if not self.lengths:
            self.buffers = self._allocate(1, self.MIN_LENGTH)
        elif 4 * (max(self.lengths) + 1) <= self.capacity[1]:
            self._resize(self.capacity[0], max(self.MIN_LENGTH, self.capacity[1] // 2))


class LlamaRunner:
    """A lean forward over a transformers Llama model's weights.

    Built once at start: fused query/key/value and gate/up matrices, on CPU
    in bfloat16 prepacked into oneDNN's blocked layout (twice as fast as an
    unpacked matmul here, and bit-identical to it), and rotary tables for
    every position. Attention runs in float32 over a float32 key/value cache:
    its matmuls are tiny, and oneDNN's bfloat16 batched matmul costs ten
    times the float32 one at these shapes.
    """

    def __init__(self, base: BaseModel, tap_layers: list[int]):
        model = base.model
        config = model.config
        self.tap_layers = list(tap_layers)
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.dtype, self.device = model.dtype, base.device
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.lm_head = packed_linear(model.lm_head.weight)
        self.layers = [self._fuse(layer) for layer in model.model.layers]
        self.cos, self.sin = self._rotary_tables(model.model.rotary_emb, base.context_length)

    @staticmethod
    def supports(base: BaseModel) -> bool:
        config = base.model.config
        rope = getattr(config, "rope_parameters", None) or {}
        return (config.model_type == "llama" and not getattr(config, "attention_bias", False)
                and not getattr(config, "mlp_bias", False) and config.hidden_act == "silu"
                and rope.get("rope_type", "default") in STATIC_ROPE_TYPES)

    def _fuse(self, layer) -> dict:
        attention, mlp = layer.self_attn, layer.mlp
        return {
            "input_norm": layer.input_layernorm.weight,
            "qkv": packed_linear(torch.cat([attention.q_proj.weight, attention.k_proj.weight,
                                            attention.v_proj.weight])),
            "o": packed_linear(attention.o_proj.weight),
            "post_norm": layer.post_attention_layernorm.weight,
            "gate_up": packed_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
            "down": packed_linear(mlp.down_proj.weight),
        }

    def _rotary_tables(self, rotary, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, computed in float32 as transformers does, then cast."""
        positions = torch.arange(context_length, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * rotary.inv_freq.to(self.device, torch.float32)[None, :]
        angles = torch.cat([freqs, freqs], dim=-1)  # (context, head_dim)
        scaling = rotary.attention_scaling
        return (angles.cos() * scaling).to(self.dtype), (angles.sin() * scaling).to(self.dtype)

    def new_cache(self) -> PaddedRows:
        shape = (self.n_kv_heads, self.head_dim)
        return PaddedRows([shape] * (2 * len(self.layers)), torch.float32, self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # As transformers' LlamaRMSNorm: statistics in float32, the scale applied in the model dtype.
        # (F.rms_norm is no faster here at batch 1 and rounds differently in bfloat16.)
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return weight * (x.float() * torch.rsqrt(variance + self.eps)).to(self.dtype)

    def _attention_inputs(self, x: torch.Tensor, layer: dict, cos: torch.Tensor, sin: torch.Tensor):
        """Project x (B, T, D) to query (B, n_heads, T, hd) and key, value (B, n_kv, T, hd), rotated."""
        B, T, _ = x.shape
        qkv = layer["qkv"](self._norm(x, layer["input_norm"])).view(B, T, self.n_heads + 2 * self.n_kv_heads,
                                                                    self.head_dim)
        rotated, value = qkv.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        half = self.head_dim // 2
        # Query and key heads rotate together: one set of operations instead of two.
        rotated = rotated * cos + torch.cat([-rotated[..., half:], rotated[..., :half]], dim=-1) * sin
        query, key = rotated.transpose(1, 2).split([self.n_heads, self.n_kv_heads], dim=1)
        return query, key, value.transpose(1, 2)

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        gate, up = layer["gate_up"](self._norm(x, layer["post_norm"])).chunk(2, dim=-1)
        return x + layer["down"](F.silu(gate) * up)

    def _tap(self, x: torch.Tensor, index: int, taps: dict[int, torch.Tensor]) -> None:
        # hidden_states[i] is the input of layer i; the last one is the final norm's output.
        if index in self.tap_layers:
            taps[index] = self._norm(x, self.final_norm) if index == len(self.layers) else x

    @torch.inference_mode()
    def prefill(self, input_ids: list[int], logits_to_keep: int = 1) -> Prefilled:
        T = len(input_ids)
        x = self.embed[torch.tensor(input_ids, device=self.device)][None]  # (1, T, D)
        cos, sin = self.cos[:T, None, :], self.sin[:T, None, :]
        taps: dict[int, torch.Tensor] = {}
        row_cache = []
        for index, layer in enumerate(self.layers):
            self._tap(x, index, taps)
            query, key, value = self._attention_inputs(x, layer, cos, sin)
            key, value = key.float(), value.float()
            row_cache += [key[0], value[0]]
            # In float32 like the decode step, so that scoring a text in one pass gives what generating it gave.
            attended = F.scaled_dot_product_attention(query.float(), key, value, is_causal=True, enable_gqa=True)
            x = x + layer["o"](attended.transpose(1, 2).reshape(1, T, -1).to(self.dtype))
            x = self._mlp(x, layer)
        self._tap(x, len(self.layers), taps)
        logits = self.lm_head(self._norm(x[0, -logits_to_keep:], self.final_norm)).float()
        return Prefilled(logits, torch.cat([taps[i] for i in self.tap_layers], dim=-1), row_cache)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, cache: PaddedRows) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one new token per row at the row's next position; extend the cache.

        Args:
            input_ids: (B,) with B == cache.rows, row i's new token at position cache.lengths[i].

        Returns float32 logits (B, vocab) and the tap hidden states (B, 1, d_model * len(tap_layers)).
        """
        B = input_ids.shape[0]
        positions = torch.tensor(cache.lengths, device=self.device)
        cache.reserve(B, max(cache.lengths) + 1)
        L = cache.capacity[1]  # attending over the whole capacity keeps each row's sums batch-independent
        rows = torch.arange(B, device=self.device)
        # (B, 1, 1, L): 0 where a row's new token may attend, -inf past the row's own length
        visible = torch.arange(L, device=self.device)[None, :] <= positions[:, None]
        mask = torch.zeros(B, 1, 1, L, device=self.device).masked_fill(~visible[:, None, None, :], float("-inf"))
        cos, sin = self.cos[positions][:, None, None, :], self.sin[positions][:, None, None, :]
        group, scale = self.n_heads // self.n_kv_heads, 1.0 / math.sqrt(self.head_dim)

        x = self.embed[input_ids][:, None]  # (B, 1, D)
        taps: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            self._tap(x, index, taps)
            query, key, value = self._attention_inputs(x, layer, cos, sin)
            keys, values = cache.buffers[2 * index], cache.buffers[2 * index + 1]
            keys[rows, :, positions] = key[:, :, 0].float()
            values[rows, :, positions] = value[:, :, 0].float()
            # Grouped-query attention without repeating keys: the query heads of one key head share a matmul.
            query = query.reshape(B, self.n_kv_heads, group, self.head_dim).float()
            scores = query @ keys[:B, :, :L].transpose(-1, -2) * scale + mask  # (B, n_kv, group, L)
            attended = scores.softmax(dim=-1) @ values[:B, :, :L]  # (B, n_kv, group, hd)
            x = x + layer["o"](attended.reshape(B, 1, -1).to(self.dtype))
            x = self._mlp(x, layer)
        self._tap(x, len(self.layers), taps)
        for row in range(B):
            cache.lengths[row] += 1
        logits = self.lm_head(self._norm(x[:, 0], self.final_norm)).float()
        return logits, torch.cat([taps[i] for i in self.tap_layers], dim=-1)


def packed_linear(weight: torch.Tensor):
    """Return ``x -> x @ weight.T``, with the weight prepacked for oneDNN where that pays.

    Only bfloat16 on CPU is packed: there oneDNN's prepacked matmul gives the
    same bits as ``F.linear`` in half the time. Elsewhere (float32 on CPU,
    any dtype on CUDA) the plain matmul is used.
    """
    # NOTE: the CUDA path (plain matmuls in bfloat16, the same batching) has not run on a GPU yet.
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return lambda x: F.linear(x, weight)


class TransformersRunner:
    """Any causal LM through transformers' forward, one row at a time."""

    def __init__(self, base: BaseModel, tap_layers: list[int]):
        self.model = base.model
        self.tap_layers = list(tap_layers)
        self.device = base.device

    def new_cache(self) -> "RowList":
        return RowList()

    def _taps(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return torch.cat([hidden_states[layer] for layer in self.tap_layers], dim=-1)

    @torch.inference_mode()
    def prefill(self, input_ids: list[int], logits_to_keep: int = 1) -> Prefilled:
        outputs = self.model(input_ids=torch.tensor([input_ids], device=self.device), use_cache=True,
                             output_hidden_states=True, logits_to_keep=logits_to_keep)
        return Prefilled(outputs.logits[0].float(), self._taps(outputs.hidden_states), outputs.cache)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, cache: "RowList") -> tuple[torch.Tensor, torch.Tensor]:
        logits, taps = [], []
        for row, token_id in enumerate(input_ids.tolist()):
            outputs = self.model(input_ids=torch.tensor([[token_id]], device=self.device), cache=cache.caches[row],
                                 use_cache=True, output_hidden_states=True)
            cache.caches[row] = outputs.cache
            logits.append(outputs.logits[0, -1].float())
            taps.append(self._taps(outputs.hidden_states))
        return torch.stack(logits), torch.cat(taps)


class RowList:
    """The per-row caches of ``TransformersRunner``, with PaddedRows' add/remove interface."""

    def __init__(self):
        self.caches: list[object] = []

    @property
    def rows(self) -> int:
        return len(self.caches)

    def add(self, row_cache: object) -> int:
        self.caches.append(row_cache)
        return len(self.caches) - 1

    def remove(self, row: int) -> None:
        self.caches[row] = self.caches[-1]
        self.caches.pop()


def make_runner(base: BaseModel, tap_layers: list[int]) -> LlamaRunner | TransformersRunner:
    if LlamaRunner.supports(base):
        return LlamaRunner(base, tap_layers)
    logger.info("Model %s (%s) has no lean runner; decoding each row through transformers' forward",
                base.name, base.model.config.model_type)
    return TransformersRunner(base, tap_layers)


def preferred_dtype(device: torch.device) -> torch.dtype:
    """Return the default base-model precision on ``device``.

    bfloat16 on CUDA, or float32 on GPUs without bfloat16. On CPUs with AMX
    it is bfloat16 too. There the prepacked bfloat16 matmul measured 1.2x
    float32's decode speed at batch 1 and 2x at batch 8 on the default model,
    and it computes a row to the same bits at any batch size. Other CPUs get
    float32, AVX512-BF16 ones included. On an AMD EPYC with AVX512-BF16 and no
    AMX, bfloat16 decoded 2.4x faster than float32, but a request's logprobs
    changed with the batch it ran in, and the default model's greedy reply to
    "What is the capital of France?" no longer named Paris.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.bfloat16 if amx is not None and amx() else torch.float32
