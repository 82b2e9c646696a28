"""DecodeBatch: sessions decode together and each gets what it would have got alone."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from models.base import BaseModel, fingerprint_model
from models.decode import ConstraintModel, DecodeBatch, SamplingParams
from tests.conftest import build_tiny_base, build_tiny_heads

QUESTIONS = ["What is the capital of France?", "Why is the road wet?", "Cats are mammals.",
             "I deserve a raise because I worked hard. " * 2]


def encode(model: ConstraintModel, question: str) -> list[int]:
    return model.encode(messages=[{"role": "user", "content": question}])


def alone(model: ConstraintModel, question: str, params: SamplingParams):
    session = model.start(encode(model, question), params)
    session.run()
    return session


def staggered(model: ConstraintModel, requests: list[tuple[str, SamplingParams]], steps_between: int = 2):
    """Run requests in one batch, each joining ``steps_between`` steps after the one before it."""
    batch = model.new_batch()
    sessions = []
    for question, params in requests:
        session = model.start(encode(model, question), params)
        batch.add(session)
        sessions.append(session)
        for _ in range(steps_between):
            batch.step()
    while len(batch):
        batch.step()
    return sessions


def trace_of(session) -> list:
    return [(t.position, t.token_id, t.text, t.logprob, t.scores, t.attention, t.top_logprobs)
            for t in session.prompt_trace + session.output_trace]


@pytest.fixture(scope="module")
def bf16_model() -> ConstraintModel:
    """The tiny model in bfloat16, where every matmul of a step computes a row the same way at any batch size."""
    base = build_tiny_base()
    base = BaseModel(base.name, base.model.to(torch.bfloat16), base.tokenizer, base.fingerprint)
    return ConstraintModel(base, build_tiny_heads(base), top_k_attention=3)


def greedy_pairs(model: ConstraintModel, questions: list[str], max_tokens: int = 12) -> list[tuple]:
    """Decode each question alone, then all of them in one staggered batch, and pair the sessions up.

    Each pair must have the same tokens and text.
    """
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    expected = [alone(model, question, params) for question in questions]
    batched = staggered(model, [(question, params) for question in questions])
    for one, together in zip(expected, batched):
        assert together.output_ids == one.output_ids
        assert together.text == one.text
    return list(zip(expected, batched))


def test_greedy_batched_equals_alone_bit_for_bit(bf16_model):
    for one, together in greedy_pairs(bf16_model, QUESTIONS):
        assert trace_of(together) == trace_of(one)


def test_float32_batched_equals_alone_within_rounding(tiny_model):
    # float32 matmuls pick other kernels as the batch grows, so the last bits of a score may differ.
    for one, together in greedy_pairs(tiny_model, QUESTIONS):
        for a, b in zip(one.output_trace, together.output_trace):
            assert b.scores == pytest.approx(a.scores, abs=1e-5)
            assert [p for p, _ in b.attention["causality"]] == [p for p, _ in a.attention["causality"]]


def test_per_request_settings_in_a_batch(bf16_model):
    free = alone(bf16_model, QUESTIONS[0], SamplingParams(max_tokens=10, temperature=0))
    stop = free.text[3:5]
    assert stop, "greedy output too short to pick a stop sequence"
    scores = [t.scores["reciprocity"] for t in free.output_trace]
    requests = [
        (QUESTIONS[0], SamplingParams(max_tokens=10, temperature=1.3, top_p=0.9, seed=11, top_logprobs=2)),
        (QUESTIONS[0], SamplingParams(max_tokens=10, temperature=0, stop=[stop])),
        (QUESTIONS[0], SamplingParams(max_tokens=10, temperature=0, min_scores={"reciprocity": sorted(scores)[2]})),
        (QUESTIONS[1], SamplingParams(max_tokens=3, temperature=0)),
    ]
    expected = [alone(bf16_model, question, params) for question, params in requests]

    batched = staggered(bf16_model, requests, steps_between=1)

    for one, together in zip(expected, batched):
        assert (together.finish_reason, together.text) == (one.finish_reason, one.text)
        assert trace_of(together) == trace_of(one)
    assert batched[0].seed == 11
    assert [s.finish_reason for s in batched[1:]] == ["stop", "constraint", "length"]
    assert batched[2].stopped_by == expected[2].stopped_by


def test_finished_sessions_leave_and_others_go_on(tiny_model):
    batch = tiny_model.new_batch()
    short = tiny_model.start(encode(tiny_model, QUESTIONS[0]), SamplingParams(max_tokens=2, temperature=0))
    long = tiny_model.start(encode(tiny_model, QUESTIONS[1]), SamplingParams(max_tokens=6, temperature=0))
    batch.add(short)
    batch.add(long)

    first = batch.step()
    second = batch.step()

    assert [s for s, _ in first] == [short, long]
    assert short.finished and len(batch) == 1  # it left with its last token
    assert [s for s, _ in second] == [short, long]
    third = batch.step()
    assert [s for s, _ in third] == [long]
    assert len(long.output_ids) == 3


def test_removed_session_keeps_its_tokens(tiny_model):
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = alone(tiny_model, QUESTIONS[1], params)
    batch = tiny_model.new_batch()
    leaving = tiny_model.start(encode(tiny_model, QUESTIONS[0]), params)
    staying = tiny_model.start(encode(tiny_model, QUESTIONS[1]), params)
    batch.add(leaving)
    batch.add(staying)
    batch.step()

    leaving.cancel()
    batch.remove(leaving)
    while len(batch):
        batch.step()

    assert leaving.finish_reason == "cancelled"
    assert len(leaving.output_ids) == 1
    assert staying.output_ids == expected.output_ids


def test_batch_without_heads_samples_the_same_tokens(tiny_model):
    params = SamplingParams(max_tokens=8, temperature=0)
    expected = alone(tiny_model, QUESTIONS[0], params)
    session = tiny_model.start(encode(tiny_model, QUESTIONS[0]), params)
    batch = DecodeBatch(tiny_model, heads=False)
    batch.add(session)

    while len(batch):
        batch.step()

    assert session.output_ids == expected.output_ids
    assert session.prompt_trace == []
    assert all(trace.scores == {} for trace in session.output_trace)


def test_other_architectures_batch_through_transformers(tiny_base):
    config = GPT2Config(vocab_size=len(tiny_base.tokenizer), n_positions=96, n_embd=32, n_layer=3, n_head=4)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(config).eval()
    base = BaseModel("tiny-gpt2", gpt2, tiny_base.tokenizer, fingerprint_model(gpt2))
    model = ConstraintModel(base, build_tiny_heads(base), top_k_attention=3)

    assert len(greedy_pairs(model, QUESTIONS[:3], max_tokens=8)) == 3
