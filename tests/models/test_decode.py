import pytest
import torch

from models.decode import IncrementalDetokenizer, PromptTooLongError, SamplingParams
from models.judgment import assemble_judgment
from tests.conftest import CONSTRAINTS, TINY_CONTEXT

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(model, params: SamplingParams, messages=QUESTION):
    session = model.start(model.encode(messages=messages), params)
    session.prefill()
    session.run()
    return session


def test_greedy_is_deterministic(tiny_model):
    first = run(tiny_model, SamplingParams(max_tokens=12, temperature=0))
    second = run(tiny_model, SamplingParams(max_tokens=12, temperature=0))
    assert first.output_ids == second.output_ids
    assert [t.scores for t in first.output_trace] == [t.scores for t in second.output_trace]


def test_seeded_sampling_reproduces(tiny_model):
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, seed=1234)
    assert run(tiny_model, params).output_ids == run(tiny_model, params).output_ids


def test_seeds_differ_in_output(tiny_model):
    outputs = {tuple(run(tiny_model, SamplingParams(max_tokens=16, temperature=2.0, seed=seed)).output_ids)
               for seed in range(4)}
    assert len(outputs) > 1


def test_unseeded_session_records_its_seed(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=8, temperature=1.0))
    replay = run(tiny_model, SamplingParams(max_tokens=8, temperature=1.0, seed=session.seed))
    assert replay.output_ids == session.output_ids


@pytest.mark.parametrize("top_p", [1e-6, 5e-324])  # 5e-324 is 0 once compared in float32
def test_tiny_top_p_equals_greedy(tiny_model, top_p):
    greedy = run(tiny_model, SamplingParams(max_tokens=10, temperature=0))
    nucleus = run(tiny_model, SamplingParams(max_tokens=10, temperature=1.0, top_p=top_p, seed=7))
    assert nucleus.output_ids == greedy.output_ids


def test_max_tokens_ends_with_length(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=5, temperature=0))
    assert session.finish_reason == "length"
    assert len(session.output_ids) == 5
    assert len(session.output_trace) == 5


def test_stop_sequence_truncates_text(tiny_model):
    free = run(tiny_model, SamplingParams(max_tokens=12, temperature=0))
    stop = free.text[2:4]
    assert stop, "greedy output too short to pick a stop sequence"
    stopped = run(tiny_model, SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stop not in stopped.text
    assert len(stopped.output_ids) < 12


def test_eos_token_ends_generation(tiny_model):
    eos = tiny_model.base.tokenizer.eos_token_id
    session = tiny_model.start(tiny_model.encode(messages=QUESTION), SamplingParams(max_tokens=10, temperature=0))
    session.prefill()
    session._next_logits = torch.full_like(session._next_logits, -1e9)
    session._next_logits[eos] = 0.0
    trace = session.step()
    assert trace.token_id == eos
    assert session.finish_reason == "stop"
    assert session.text == ""


def test_trace_covers_every_token(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=6, temperature=0))
    prompt_length = len(session.prompt_ids)
    assert [t.position for t in session.prompt_trace] == list(range(prompt_length))
    assert [t.position for t in session.output_trace] == list(range(prompt_length, prompt_length + 6))
    for trace in session.output_trace:
        assert set(trace.scores) == set(CONSTRAINTS)
        assert all(0.0 <= score <= 1.0 for score in trace.scores.values())
        assert trace.logprob is not None and trace.logprob <= 0.0
        for pairs in trace.attention.values():
            assert len(pairs) == 3
            assert all(position <= trace.position for position, _ in pairs)
            assert [weight for _, weight in pairs] == sorted((weight for _, weight in pairs), reverse=True)
    assert "".join(t.text for t in session.output_trace) == session.text


def test_step_scores_equal_full_sequence_pass(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=8, temperature=0))
    sequence = torch.tensor([session.prompt_ids + session.output_ids])
    with torch.inference_mode():
        hidden_states = tiny_model.base.model(input_ids=sequence, output_hidden_states=True).hidden_states
        full = torch.sigmoid(tiny_model.heads(tiny_model.heads.select_hidden_states(hidden_states)).constraint_logits[0])
    traced = [list(t.scores.values()) for t in session.prompt_trace + session.output_trace]
    assert torch.allclose(torch.tensor(traced), full, atol=1e-5)


def test_prompt_too_long_reports_limit(tiny_model):
    input_ids = tiny_model.encode(prompt="The capital of France is Paris. " * 12)
    with pytest.raises(PromptTooLongError) as error:
        tiny_model.start(input_ids, SamplingParams(max_tokens=TINY_CONTEXT))
    assert error.value.context_length == TINY_CONTEXT
    assert error.value.prompt_tokens == len(input_ids)
    assert str(TINY_CONTEXT) in str(error.value)


def test_judgment_uses_last_and_lowest_scores(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=6, temperature=0))
    judgment = assemble_judgment(session.output_trace, session.prompt_trace, tiny_model.heads.config)
    for verdict in judgment.verdicts:
        scores = [t.scores[verdict.constraint] for t in session.output_trace]
        assert verdict.score == scores[-1]
        assert verdict.min_score == min(scores)
        assert session.output_trace[scores.index(min(scores))].position == verdict.min_position
        assert verdict.passed == (verdict.score >= verdict.threshold)
    assert judgment.flagged == any(not v.passed for v in judgment.verdicts)


def test_detokenizer_pieces_join_to_text(tiny_base):
    tokenizer = tiny_base.tokenizer
    text = "Cats are mammals. Tōkyō 東京 and naïve café ☕ end."
    token_ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token_id) for token_id in token_ids]
    assert "".join(pieces) == text
    assert "" in pieces  # multi-byte characters split across byte-level tokens wait for their last byte
    assert all("\ufffd" not in piece for piece in pieces)


def test_score_reproduces_generation_trace(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=8, temperature=0))
    prompt_trace, output_trace = tiny_model.score(session.prompt_ids, session.output_ids)
    assert [t.token_id for t in output_trace] == session.output_ids
    for scored, generated in zip(prompt_trace + output_trace, session.prompt_trace + session.output_trace):
        assert scored.position == generated.position
        assert scored.text == generated.text
        for constraint in CONSTRAINTS:
            assert abs(scored.scores[constraint] - generated.scores[constraint]) < 1e-5
            assert [p for p, _ in scored.attention[constraint]] == [p for p, _ in generated.attention[constraint]]
    for scored, generated in zip(output_trace, session.output_trace):
        assert abs(scored.logprob - generated.logprob) < 1e-4


def test_score_appends_end_of_turn(tiny_model):
    prompt_ids, output_ids = tiny_model.encode_response(None, QUESTION, "Paris.", end_of_turn=True)
    assert output_ids[-1] == tiny_model.base.tokenizer.eos_token_id
    _, cut_ids = tiny_model.encode_response(None, QUESTION, "Paris.", end_of_turn=False)
    assert cut_ids == output_ids[:-1]
    assert prompt_ids == tiny_model.encode(messages=QUESTION)


def test_score_rejects_overlong_text(tiny_model):
    with pytest.raises(PromptTooLongError, match="the response"):
        tiny_model.score([5] * 60, [6] * 60)


def test_constraint_stop_ends_at_first_token_below_minimum(tiny_model):
    free = run(tiny_model, SamplingParams(max_tokens=12, temperature=0))
    # A constraint whose lowest score comes after the first token, so that the stop lands mid-generation.
    name = next(c for c in CONSTRAINTS if min(t.scores[c] for t in free.output_trace) < free.output_trace[0].scores[c])
    scores = [token.scores[name] for token in free.output_trace]
    minimum = (scores[0] + min(scores)) / 2
    first_below = next(index for index, score in enumerate(scores) if score < minimum)

    stopped = run(tiny_model, SamplingParams(max_tokens=12, temperature=0, min_scores={name: minimum}))

    assert stopped.finish_reason == "constraint"
    assert stopped.output_ids == free.output_ids[:first_below + 1]
    assert stopped.stopped_by.constraint == name
    assert stopped.stopped_by.position == free.output_trace[first_below].position
    assert stopped.stopped_by.score == scores[first_below]
    assert stopped.stopped_by.min_score == minimum


def test_constraint_stop_rejects_unknown_constraint(tiny_model):
    with pytest.raises(ValueError, match="honesty, which the heads do not score; known: testifiability"):
        tiny_model.start(tiny_model.encode("Hello"), SamplingParams(max_tokens=2, min_scores={"honesty": 0.5}))


def test_top_logprobs_lists_most_likely_first(tiny_model):
    session = run(tiny_model, SamplingParams(max_tokens=4, temperature=0, top_logprobs=3))

    for trace in session.output_trace:
        assert len(trace.top_logprobs) == 3
        logprobs = [logprob for _, _, logprob in trace.top_logprobs]
        assert logprobs == sorted(logprobs, reverse=True)
        # Greedy decoding picks the most likely token, so it leads the alternatives.
        assert trace.top_logprobs[0][0] == trace.token_id
        assert trace.top_logprobs[0][2] == pytest.approx(trace.logprob)
    assert run(tiny_model, SamplingParams(max_tokens=2, temperature=0)).output_trace[0].top_logprobs is None


def test_take_text_holds_back_possible_stop_sequence(tiny_model):
    free = run(tiny_model, SamplingParams(max_tokens=12, temperature=0))
    stop = free.text[3:6]
    assert len(stop) == 3, "greedy output too short to pick a stop sequence"
    session = tiny_model.start(tiny_model.encode(messages=QUESTION),
                               SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
    session.prefill()

    pieces = []
    while not session.finished:
        session.step()
        pieces.append(session.take_text())
        # Nothing handed out may be cut later by the stop sequence.
        assert session.text.startswith("".join(pieces)) or session.finished

    assert "".join(pieces) == session.text == free.text[:free.text.index(stop)]


def test_take_text_without_stop_sequences_follows_each_token(tiny_model):
    session = tiny_model.start(tiny_model.encode(messages=QUESTION), SamplingParams(max_tokens=8, temperature=0))
    session.prefill()
    pieces = []
    while not session.finished:
        trace = session.step()
        pieces.append(session.take_text())
        if trace.token_id not in tiny_model.base.tokenizer.all_special_ids:
            assert pieces[-1] == trace.text
    assert "".join(pieces) == session.text


def test_cancel_keeps_tokens_so_far(tiny_model):
    session = tiny_model.start(tiny_model.encode(messages=QUESTION), SamplingParams(max_tokens=10, temperature=0))
    session.prefill()
    session.step()
    session.step()

    session.cancel()

    assert session.finished
    assert session.finish_reason == "cancelled"
    assert len(session.output_trace) == 2
    session.cancel()
    assert session.finish_reason == "cancelled"
