"""The lean Llama forward and the transformers fallback against transformers' own forward."""

import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from models.base import BaseModel, fingerprint_model
from models.runner import LlamaRunner, PaddedRows, TransformersRunner, make_runner, packed_linear, preferred_dtype

PROMPT_IDS = [5, 17, 42, 8, 99, 23, 61]
TAP = 2


def reference(base: BaseModel, input_ids: list[int], steps: list[int]):
    """transformers' logits and tap-layer states for a prompt, then one token at a time."""
    model = base.model
    with torch.inference_mode():
        outputs = model(input_ids=torch.tensor([input_ids]), use_cache=True, output_hidden_states=True)
        results = [(outputs.logits[0, -1], outputs.hidden_states[TAP][0])]
        cache = outputs.cache
        for token_id in steps:
            outputs = model(input_ids=torch.tensor([[token_id]]), cache=cache, use_cache=True,
                            output_hidden_states=True)
            cache = outputs.cache
            results.append((outputs.logits[0, -1], outputs.hidden_states[TAP][0]))
    return results


def test_llama_runner_is_chosen_for_llama(tiny_base):
    assert isinstance(make_runner(tiny_base, [TAP]), LlamaRunner)


def test_llama_runner_matches_transformers(tiny_base):
    steps = [7, 3, 250]
    expected = reference(tiny_base, PROMPT_IDS, steps)
    runner = LlamaRunner(tiny_base, [TAP])

    prefilled = runner.prefill(PROMPT_IDS)
    cache = runner.new_cache()
    cache.add(prefilled.row_cache)
    decoded = [runner.decode(torch.tensor([token_id]), cache) for token_id in steps]

    torch.testing.assert_close(prefilled.logits[-1], expected[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prefilled.tap_hidden_states[0], expected[0][1], atol=1e-5, rtol=1e-5)
    for (logits, tap), (expected_logits, expected_tap) in zip(decoded, expected[1:]):
        torch.testing.assert_close(logits[0], expected_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tap[0, 0], expected_tap[-1], atol=1e-5, rtol=1e-5)
    assert cache.lengths == [len(PROMPT_IDS) + len(steps)]


def test_rows_of_different_lengths_decode_together(tiny_base):
    runner = LlamaRunner(tiny_base, [TAP])
    short, long = PROMPT_IDS[:3], PROMPT_IDS + [11, 12, 13]
    cache = runner.new_cache()
    cache.add(runner.prefill(short).row_cache)
    cache.add(runner.prefill(long).row_cache)

    logits, taps = runner.decode(torch.tensor([7, 9]), cache)

    torch.testing.assert_close(logits[0], reference(tiny_base, short, [7])[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], reference(tiny_base, long, [9])[1][0], atol=1e-5, rtol=1e-5)
    assert taps.shape == (2, 1, tiny_base.hidden_size)
    assert cache.lengths == [len(short) + 1, len(long) + 1]


def test_score_length_logits_cover_the_kept_positions(tiny_base):
    runner = LlamaRunner(tiny_base, [TAP])
    with torch.inference_mode():
        expected = tiny_base.model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -3:]

    prefilled = runner.prefill(PROMPT_IDS, logits_to_keep=3)

    torch.testing.assert_close(prefilled.logits, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_base) -> BaseModel:
    config = GPT2Config(vocab_size=len(tiny_base.tokenizer), n_positions=64, n_embd=32, n_layer=3, n_head=4)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    return BaseModel("tiny-gpt2", model, tiny_base.tokenizer, fingerprint_model(model))


def test_other_architectures_decode_row_by_row(tiny_gpt2):
    runner = make_runner(tiny_gpt2, [TAP])
    assert isinstance(runner, TransformersRunner)
    short, long = PROMPT_IDS[:3], PROMPT_IDS
    cache = runner.new_cache()
    cache.add(runner.prefill(short).row_cache)
    cache.add(runner.prefill(long).row_cache)

    logits, taps = runner.decode(torch.tensor([7, 9]), cache)

    torch.testing.assert_close(logits[0], reference(tiny_gpt2, short, [7])[1][0].float())
    torch.testing.assert_close(logits[1], reference(tiny_gpt2, long, [9])[1][0].float())
    torch.testing.assert_close(taps[1, 0], reference(tiny_gpt2, long, [9])[1][1][-1])
    cache.remove(0)
    assert cache.rows == 1


# PaddedRows

def rows_buffer(length: int, value: float) -> list[torch.Tensor]:
    return [torch.full((2, length, 3), value)]


def test_padded_rows_keep_rows_when_one_leaves():
    rows = PaddedRows([(2, 3)], torch.float32, torch.device("cpu"))
    for value, length in ((1.0, 5), (2.0, 7), (3.0, 4)):
        rows.add(rows_buffer(length, value))

    rows.remove(0)

    assert rows.lengths == [4, 7]  # the last row took the free place
    assert torch.equal(rows.buffers[0][0, :, :4], torch.full((2, 4, 3), 3.0))
    assert torch.equal(rows.buffers[0][1, :, :7], torch.full((2, 7, 3), 2.0))
    assert rows.buffers[0][2:].abs().sum() == 0  # freed rows are zero again


def test_padded_rows_grow_and_shrink():
    rows = PaddedRows([(2, 3)], torch.float32, torch.device("cpu"))
    rows.add(rows_buffer(10, 1.0))
    rows.add(rows_buffer(300, 2.0))
    assert rows.capacity == (2, 512)
    assert torch.equal(rows.buffers[0][0, :, :10], torch.full((2, 10, 3), 1.0))

    rows.remove(1)

    assert rows.capacity[1] < 512  # the long row left, so later steps attend over less padding
    assert torch.equal(rows.buffers[0][0, :, :10], torch.full((2, 10, 3), 1.0))
    rows.remove(0)
    assert rows.capacity == (1, PaddedRows.MIN_LENGTH)


# Precision

def test_packed_linear_matches_plain_linear_bit_for_bit():
    torch.manual_seed(0)
    weight, x = torch.randn(48, 32).bfloat16(), torch.randn(5, 32).bfloat16()

    assert torch.equal(packed_linear(weight)(x), F.linear(x, weight))


def test_dtype_on_cpu_follows_bfloat16_support(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert preferred_dtype(torch.device("cpu")) == torch.float32

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert preferred_dtype(torch.device("cpu")) == torch.float32  # batch-dependent results without AMX

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert preferred_dtype(torch.device("cpu")) == torch.bfloat16


def test_dtype_on_cuda_is_bfloat16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert preferred_dtype(torch.device("cuda")) == torch.bfloat16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert preferred_dtype(torch.device("cuda:1")) == torch.float32
