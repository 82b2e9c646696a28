"""Shared fixtures: a tiny random Llama with its own small tokenizer, and heads for it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from models.base import BaseModel, fingerprint_model, is_model_dir_complete
from models.decode import ConstraintModel, DecodeBatch
from models.heads import ConstraintHeads, HeadsConfig
from server.settings import Settings
from tests.environment import skip_or_fail

CONSTRAINTS = ["testifiability", "decidability", "reciprocity", "causality"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = [
    "The capital of France is Paris.", "Water boils at one hundred degrees.",
    "I deserve a raise because I worked hard.", "The road is wet because it rained.",
    "What is the capital of Spain?", "Cats are mammals and birds lay eggs.",
] * 20
TINY_CONTEXT = 96


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of about 300 tokens on a fixed corpus, with chat tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                      unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_base(seed: int = 0) -> BaseModel:
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return BaseModel(name="tiny-llama", model=model, tokenizer=tokenizer, fingerprint=fingerprint_model(model))


def build_tiny_heads(base: BaseModel, seed: int = 0) -> ConstraintHeads:
    torch.manual_seed(seed)
    config = HeadsConfig(list(CONSTRAINTS), base.hidden_size, tap_layers=[2], d_head=8, heads_per_constraint=2,
                         thresholds={c: 0.5 for c in CONSTRAINTS}, base_model=base.name,
                         base_fingerprint=base.fingerprint, name="tiny-heads")
    return ConstraintHeads(config).eval()


@pytest.fixture(scope="session")
def tiny_base() -> BaseModel:
    return build_tiny_base()


@pytest.fixture(scope="session")
def tiny_model(tiny_base: BaseModel) -> ConstraintModel:
    return ConstraintModel(tiny_base, build_tiny_heads(tiny_base), top_k_attention=3)


# Seconds each decode step of the slowed model waits, so that a test can act while a generation runs.
SLOW_STEP_S = 0.1


class SlowModel(ConstraintModel):
    """The tiny model with each decode step slowed down by SLOW_STEP_S; otherwise the same."""

    def new_batch(self) -> DecodeBatch:
        return _SlowBatch(self)


class _SlowBatch(DecodeBatch):
    def step(self):
        if self.sessions:
            time.sleep(SLOW_STEP_S)
        return super().step()


@pytest.fixture(scope="session")
def slow_model(tiny_model: ConstraintModel) -> SlowModel:
    return SlowModel(tiny_model.base, tiny_model.heads, top_k_attention=tiny_model.top_k_attention)


@pytest.fixture(scope="module")
def default_model_path() -> str:
    """Directory of the fetched default model; the end-to-end tests run it."""
    path = Settings().model_path
    if not is_model_dir_complete(Path(path)):
        skip_or_fail(f"default model not fetched to {path}; run `tracehead models fetch` (make test does)")
    return path
