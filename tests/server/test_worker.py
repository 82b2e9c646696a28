"""GenerationWorker tests with the tiny model: results, the bounded queue, shutdown and error propagation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from models.decode import DecodeBatch, PromptTooLongError, SamplingParams
from server.errors import ApiError, QueueFullError
from server.worker import GenerationResult, GenerationWorker, PromptEvent, TokenEvent, TokenStream
from tests.conftest import CONSTRAINTS, TINY_CONTEXT


@pytest.fixture
def input_ids(tiny_model) -> list[int]:
    return tiny_model.encode("The road is wet because")


@pytest.fixture
def worker(tiny_model) -> Iterator[GenerationWorker]:
    worker = GenerationWorker(tiny_model, max_queue=4, retry_after_s=2)
    worker.start()
    yield worker
    worker.stop(timeout_s=10)


def test_generate_returns_result_with_traces(worker, input_ids):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3)

    result = asyncio.run(worker.generate("req-1", input_ids, params))

    assert isinstance(result, GenerationResult)
    assert [trace.token_id for trace in result.prompt_trace] == input_ids
    assert 1 <= len(result.output_trace) <= 6
    assert result.output_trace[0].position == len(input_ids)
    for trace in result.prompt_trace + result.output_trace:
        assert list(trace.scores) == CONSTRAINTS
        assert list(trace.attention) == CONSTRAINTS
    assert result.finish_reason in ("stop", "length")
    assert isinstance(result.text, str)
    assert result.seed == 3
    assert result.queued_ms >= 0
    assert result.generation_ms > 0


def test_generate_draws_seed_when_absent(worker, input_ids):
    params = SamplingParams(max_tokens=4, temperature=1.0)

    result = asyncio.run(worker.generate("req-1", input_ids, params))
    replay = asyncio.run(worker.generate("req-2", input_ids, SamplingParams(max_tokens=4, seed=result.seed)))

    assert 0 <= result.seed < 2**63
    assert [t.token_id for t in replay.output_trace] == [t.token_id for t in result.output_trace]


def test_requests_served_in_order(worker, input_ids):
    async def run_three() -> list[GenerationResult]:
        return await asyncio.gather(*[
            worker.generate(f"req-{seed}", input_ids, SamplingParams(max_tokens=3, seed=seed)) for seed in range(3)])

    results = asyncio.run(run_three())

    assert [result.seed for result in results] == [0, 1, 2]


def test_full_queue_raises_429(tiny_model, input_ids):
    worker = GenerationWorker(tiny_model, max_queue=1, retry_after_s=7)
    params = SamplingParams(max_tokens=2, seed=0)

    async def overfill() -> GenerationResult:
        # The worker is not started yet, so the first job stays queued and fills the queue.
        first = asyncio.create_task(worker.generate("first", input_ids, params))
        await asyncio.sleep(0)
        assert worker.queue_depth == 1
        with pytest.raises(QueueFullError) as raised:
            await worker.generate("second", input_ids, params)
        error = raised.value
        assert error.status_code == 429
        assert error.headers == {"Retry-After": "7"}
        assert error.type == "rate_limit_error"
        assert error.code == "queue_full"
        assert "1 requests waiting" in error.message

        # Once started, the worker serves the queued job and the queue has room again.
        worker.start()
        return await first

    try:
        result = asyncio.run(overfill())
    finally:
        worker.stop(timeout_s=10)

    assert result.seed == 0
    assert worker.queue_depth == 0


def test_stop_ends_thread(tiny_model):
    worker = GenerationWorker(tiny_model, max_queue=2, retry_after_s=1)
    worker.start()
    assert worker._thread.is_alive()

    worker.stop(timeout_s=10)

    assert not worker._thread.is_alive()


def test_stopped_worker_rejects_requests(tiny_model, input_ids):
    worker = GenerationWorker(tiny_model, max_queue=2, retry_after_s=1)
    worker.start()
    worker.stop(timeout_s=10)

    with pytest.raises(ApiError) as raised:
        asyncio.run(worker.generate("late", input_ids, SamplingParams(max_tokens=2)))

    assert raised.value.status_code == 503
    assert raised.value.code == "worker_stopping"


def test_stop_unstarted_returns_at_once(tiny_model):
    worker = GenerationWorker(tiny_model, max_queue=1, retry_after_s=1)

    worker.stop(timeout_s=10)

    assert worker.queue_depth == 0


def test_stop_finishes_queued_jobs(tiny_model, input_ids):
    worker = GenerationWorker(tiny_model, max_queue=3, retry_after_s=1)

    async def queue_then_stop() -> list[GenerationResult]:
        tasks = [asyncio.create_task(worker.generate(f"req-{seed}", input_ids, SamplingParams(max_tokens=3, seed=seed)))
                 for seed in range(3)]
        await asyncio.sleep(0)
        assert worker.queue_depth == 3
        worker.start()
        # stop() blocks this event loop until the thread ends, so the results reach the loop afterwards.
        worker.stop(timeout_s=10)
        assert not worker._thread.is_alive()
        return await asyncio.gather(*tasks)

    results = asyncio.run(queue_then_stop())

    assert [result.seed for result in results] == [0, 1, 2]


def test_model_error_reaches_caller(worker):
    too_long = [5] * (TINY_CONTEXT + 4)

    with pytest.raises(PromptTooLongError) as raised:
        asyncio.run(worker.generate("req-long", too_long, SamplingParams(max_tokens=2)))

    assert raised.value.prompt_tokens == TINY_CONTEXT + 4
    assert raised.value.context_length == TINY_CONTEXT
    assert f"context holds {TINY_CONTEXT} tokens" in str(raised.value)


def test_worker_survives_model_error(worker, input_ids):
    with pytest.raises(PromptTooLongError):
        asyncio.run(worker.generate("req-long", [5] * (TINY_CONTEXT + 1), SamplingParams(max_tokens=1)))

    result = asyncio.run(worker.generate("req-next", input_ids, SamplingParams(max_tokens=2, seed=1)))

    assert worker._thread.is_alive()
    assert result.seed == 1


# Streams

async def collect(stream: TokenStream) -> tuple[list, GenerationResult]:
    events = [event async for event in stream]
    return events, await stream.result()


def test_stream_sends_prompt_then_each_token(worker, input_ids):
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=5)

    async def run() -> tuple[list, GenerationResult, GenerationResult]:
        events, result = await collect(worker.stream("req-s", input_ids, params))
        return events, result, await worker.generate("req-g", input_ids, params)

    events, result, unstreamed = asyncio.run(run())

    assert isinstance(events[0], PromptEvent)
    assert events[0].prompt_trace == result.prompt_trace
    tokens = events[1:]
    assert all(isinstance(event, TokenEvent) for event in tokens)
    assert [event.trace for event in tokens] == result.output_trace
    assert "".join(event.text for event in tokens) == result.text
    # Streaming changes nothing about what is generated.
    assert result.output_trace == unstreamed.output_trace
    assert result.text == unstreamed.text


def test_cancelled_stream_stops_within_a_step(slow_model, input_ids):
    worker = GenerationWorker(slow_model, max_queue=2, retry_after_s=1)
    worker.start()
    params = SamplingParams(max_tokens=30, temperature=0)

    async def cancel_after_two_tokens() -> GenerationResult:
        stream = worker.stream("req-c", input_ids, params)
        tokens = 0
        async for event in stream:
            tokens += isinstance(event, TokenEvent)
            if tokens == 2:
                stream.cancel()
        return await stream.result()

    try:
        result = asyncio.run(cancel_after_two_tokens())
    finally:
        worker.stop(timeout_s=10)

    assert result.finish_reason == "cancelled"
    # The step under way when cancel() came may finish; no later one starts.
    assert 2 <= len(result.output_trace) <= 3
    assert result.prompt_trace


def test_stream_cancelled_while_queued_runs_nothing(tiny_model, input_ids):
    worker = GenerationWorker(tiny_model, max_queue=2, retry_after_s=1)

    async def cancel_before_start() -> tuple[list, GenerationResult]:
        stream = worker.stream("req-q", input_ids, SamplingParams(max_tokens=4, seed=0))
        stream.cancel()
        worker.start()
        return await collect(stream)

    try:
        events, result = asyncio.run(cancel_before_start())
    finally:
        worker.stop(timeout_s=10)

    assert events == []
    assert result.finish_reason == "cancelled"
    assert result.prompt_trace == []
    assert result.output_trace == []


# Continuous batching

async def watch_batch(worker: GenerationWorker, requests) -> tuple[list[GenerationResult], int, int]:
    """Run requests while polling the worker; return results, the largest batch and the longest queue seen."""
    tasks = [asyncio.ensure_future(request) for request in requests]
    largest = longest_queue = 0
    while not all(task.done() for task in tasks):
        largest, longest_queue = max(largest, worker.running_batch_size), max(longest_queue, worker.queue_depth)
        await asyncio.sleep(0.01)
    return [task.result() for task in tasks], largest, longest_queue


def slow_worker(slow_model, **limits) -> GenerationWorker:
    worker = GenerationWorker(slow_model, max_queue=8, retry_after_s=1, **limits)
    worker.start()
    return worker


def test_concurrent_requests_decode_in_one_batch(slow_model, input_ids):
    worker = slow_worker(slow_model)
    params = [SamplingParams(max_tokens=6, temperature=0), SamplingParams(max_tokens=4, temperature=1.0, seed=3),
              SamplingParams(max_tokens=5, temperature=0, stop=["zz"])]
    try:
        alone = [asyncio.run(worker.generate(f"alone-{i}", input_ids, p)) for i, p in enumerate(params)]
        together, largest, _ = asyncio.run(watch_batch(
            worker, [worker.generate(f"together-{i}", input_ids, p) for i, p in enumerate(params)]))
    finally:
        worker.stop(timeout_s=10)

    assert largest == 3
    for one, batched in zip(alone, together):
        assert [t.token_id for t in batched.output_trace] == [t.token_id for t in one.output_trace]
        assert (batched.text, batched.finish_reason) == (one.text, one.finish_reason)


def test_request_joins_and_leaves_a_running_batch(slow_model, input_ids):
    worker = slow_worker(slow_model)
    long, short = SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=2, temperature=0)

    async def join_after_two_tokens() -> tuple[GenerationResult, GenerationResult, int]:
        stream = worker.stream("long", input_ids, long)
        tokens, joined = 0, None
        async for event in stream:
            tokens += isinstance(event, TokenEvent)
            if tokens == 2:
                joined = asyncio.ensure_future(worker.generate("short", input_ids, short))
            if joined is not None and joined.done() and not finished_at:
                finished_at.append(tokens)
        return await stream.result(), await joined, finished_at[0]

    finished_at: list[int] = []
    try:
        alone = asyncio.run(worker.generate("alone", input_ids, long))
        long_result, short_result, long_tokens_when_short_finished = asyncio.run(join_after_two_tokens())
    finally:
        worker.stop(timeout_s=10)

    assert len(short_result.output_trace) == 2
    assert long_tokens_when_short_finished < 12  # the short request left while the long one went on
    assert [t.token_id for t in long_result.output_trace] == [t.token_id for t in alone.output_trace]
    assert long_result.text == alone.text


def test_batch_size_limit_queues_the_rest(slow_model, input_ids):
    worker = slow_worker(slow_model, max_batch_size=2)
    params = SamplingParams(max_tokens=4, temperature=0)
    try:
        results, largest, longest_queue = asyncio.run(watch_batch(
            worker, [worker.generate(f"req-{i}", input_ids, params) for i in range(3)]))
    finally:
        worker.stop(timeout_s=10)

    assert largest == 2
    assert longest_queue == 1
    assert all(len(result.output_trace) == 4 for result in results)


def test_token_budget_keeps_requests_apart(slow_model, input_ids):
    footprint = len(input_ids) + 4
    # Room for one request, not two; and a request bigger than the whole budget still runs alone.
    worker = slow_worker(slow_model, max_batch_tokens=2 * footprint - 1)
    params, big = SamplingParams(max_tokens=4, temperature=0), SamplingParams(max_tokens=2 * footprint, temperature=0)
    try:
        results, largest, _ = asyncio.run(watch_batch(
            worker, [worker.generate("a", input_ids, params), worker.generate("b", input_ids, params),
                     worker.generate("big", input_ids, big)]))
    finally:
        worker.stop(timeout_s=10)

    assert largest == 1
    assert [len(result.output_trace) for result in results[:2]] == [4, 4]
    assert results[2].output_trace


def test_failed_step_fails_its_batch(tiny_model, input_ids, monkeypatch):
    worker = GenerationWorker(tiny_model, max_queue=4, retry_after_s=1)
    original_step, calls = DecodeBatch.step, []

    def failing_once(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("out of memory in the decode step")
        return original_step(batch)

    monkeypatch.setattr(DecodeBatch, "step", failing_once)
    worker.start()
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            asyncio.run(worker.generate("fails", input_ids, SamplingParams(max_tokens=5, temperature=0)))
        after = asyncio.run(worker.generate("after", input_ids, SamplingParams(max_tokens=3, temperature=0)))
    finally:
        worker.stop(timeout_s=10)

    assert len(after.output_trace) == 3
    assert worker.running_batch_size == 0
