"""Tap-layer hidden states for labelled texts, cached on disk.

Training and evaluation read the same hidden states, so they are computed
once per (base model, texts, layers) and stored as float32 tensors (middle layers carry values near float16's limit).
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from models.base import BaseModel

logger = logging.getLogger(__name__)


@dataclass
class FramedText:
    """A text as the heads see it in training, with the positions that are read out."""

    input_ids: list[int]
    text_end: int  # position of the text's last token
    turn_end: int  # position of the token that closes the turn (the judgment's final token)


def frame_text(tokenizer, text: str) -> FramedText:
    """Render ``text`` as an assistant turn, the way generated output reaches the heads.

    Models without a chat template get the bare text followed by the EOS token.
    """
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": ""}, {"role": "assistant", "content": text}], tokenize=False)
        cut = rendered.rindex(text) + len(text)
        prefix_ids = tokenizer(rendered[:cut], add_special_tokens=False).input_ids
        full_ids = tokenizer(rendered, add_special_tokens=False).input_ids
        input_ids = full_ids[:len(prefix_ids) + 1]
    else:
        prefix_ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids = prefix_ids + [tokenizer.eos_token_id]
    return FramedText(input_ids, text_end=len(prefix_ids) - 1, turn_end=len(input_ids) - 1)


@dataclass
class HiddenStates:
    """Per-layer hidden states of many sequences, packed along the token axis."""

    layers: dict[int, torch.Tensor]  # layer → (total_tokens, d_model) float32
    offsets: list[int]  # sequence i spans offsets[i]:offsets[i + 1]

    def sequence(self, layer: int, index: int) -> torch.Tensor:
        return self.layers[layer][self.offsets[index]:self.offsets[index + 1]]


def _cache_key(base: BaseModel, framed: list[FramedText], layers: list[int]) -> str:
    digest = hashlib.sha256(base.fingerprint.encode())
    digest.update(str(next(base.model.parameters()).dtype).encode())
    digest.update(repr(sorted(layers)).encode())
    for item in framed:
        digest.update(repr(item.input_ids).encode())
    return digest.hexdigest()[:24]


@contextmanager
def _first_layers(decoder: torch.nn.Module, count: int):
    """Run only the first ``count`` decoder layers; hidden_states[i] for i < count stay exact.

    The model's last hidden state is taken after its final norm, so callers
    keep one layer more than the deepest index they read.
    """
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[:count])
    try:
        yield
    finally:
        decoder.layers = layers


@torch.inference_mode()
def extract_hidden_states(base: BaseModel, framed: list[FramedText], layers: list[int],
                          cache_dir: Path | None = None, batch_size: int = 32,
                          description: str = "hidden states") -> HiddenStates:
    """Run the base model once over every sequence and keep ``layers`` of its residual stream."""
    cache_path = cache_dir / f"hidden-{_cache_key(base, framed, layers)}.pt" if cache_dir else None
    if cache_path is not None and cache_path.exists():
        logger.info("Reading cached hidden states from %s", cache_path)
        stored = torch.load(cache_path)
        return HiddenStates(stored["layers"], stored["offsets"])

    lengths = [len(item.input_ids) for item in framed]
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    packed = {layer: torch.empty(offsets[-1], base.hidden_size, dtype=torch.float32) for layer in layers}

    # Batches of similar length waste little compute on padding.
    order = sorted(range(len(framed)), key=lambda i: lengths[i])
    decoder = base.model.base_model
    with _first_layers(decoder, max(layers) + 1):
        _run_batches(base, decoder, framed, layers, order, lengths, offsets, packed, batch_size, description)

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"layers": packed, "offsets": offsets}, cache_path)
    return HiddenStates(packed, offsets)


def _run_batches(base, decoder, framed, layers, order, lengths, offsets, packed, batch_size, description) -> None:
    for start in tqdm(range(0, len(order), batch_size), desc=description, unit="batch"):
        batch = order[start:start + batch_size]
        width = max(lengths[i] for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, index in enumerate(batch):
            input_ids[row, :lengths[index]] = torch.tensor(framed[index].input_ids)
            attention_mask[row, :lengths[index]] = 1
        outputs = decoder(input_ids=input_ids.to(base.device), attention_mask=attention_mask.to(base.device),
                          output_hidden_states=True)
        for layer in layers:
            states = outputs.hidden_states[layer].float().cpu()
            for row, index in enumerate(batch):
                packed[layer][offsets[index]:offsets[index + 1]] = states[row, :lengths[index]]
