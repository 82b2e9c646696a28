"""The generation worker: one thread that owns the model and serves a bounded queue."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass

from models.decode import ConstraintModel, SamplingParams, TokenTrace
from server.errors import ApiError, QueueFullError

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    prompt_trace: list[TokenTrace]
    output_trace: list[TokenTrace]
    text: str
    finish_reason: str
    seed: int | None  # None for a scored text, which samples nothing
    queued_ms: float
    generation_ms: float


@dataclass
class _Job:
    request_id: str
    task: Callable[[float], GenerationResult]  # runs on the worker thread; gets the enqueue time
    future: Future
    enqueued_at: float


class GenerationWorker:
    """Runs requests one after another on a dedicated thread.

    Requests wait in a queue of ``max_queue`` entries; a full queue raises
    QueueFullError at once rather than letting a client wait unboundedly.
    """

    def __init__(self, model: ConstraintModel, max_queue: int, retry_after_s: int):
        self.model = model
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._stopping = False  # set by stop(); later requests are rejected instead of waiting forever

    def start(self) -> None:
        self._thread.start()
        logger.info("Generation worker started (queue of %d)", self.max_queue)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the request in progress and the queued ones, then end the thread."""
        self._stopping = True
        if not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        logger.info("Generation worker stopped")

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    async def generate(self, request_id: str, input_ids: list[int], params: SamplingParams) -> GenerationResult:
        """Queue a generation and wait for it."""
        return await self._submit(request_id, lambda enqueued_at: self._generate(request_id, input_ids, params,
                                                                                 enqueued_at))

    async def score(self, request_id: str, prompt_ids: list[int], output_ids: list[int]) -> GenerationResult:
        """Queue the scoring of a supplied output and wait for it."""
        return await self._submit(request_id, lambda enqueued_at: self._score(request_id, prompt_ids, output_ids,
                                                                              enqueued_at))

    async def _submit(self, request_id: str, task: Callable[[float], GenerationResult]) -> GenerationResult:
        if self._stopping:
            raise ApiError(503, "the generation worker is stopping with the server; retry on another replica "
                           "or after the restart", type="service_unavailable", code="worker_stopping")
        job = _Job(request_id, task, Future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            logger.warning("Queue full, rejecting request %s", request_id)
            raise QueueFullError(self.max_queue, self.retry_after_s) from None
        return await asyncio.wrap_future(job.future)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.task(job.enqueued_at))
            except Exception as exc:  # the error travels to the waiting request, which maps it
                logger.exception("Generation failed for request %s", job.request_id)
                job.future.set_exception(exc)

    def _generate(self, request_id: str, input_ids: list[int], params: SamplingParams,
                  enqueued_at: float) -> GenerationResult:
        started = time.perf_counter()
        session = self.model.start(input_ids, params)
        session.prefill()
        session.run()
        finished = time.perf_counter()
        logger.info("Request %s: %d prompt + %d output tokens in %.0f ms (%s)", request_id,
                    len(input_ids), len(session.output_ids), (finished - started) * 1000, session.finish_reason)
        return GenerationResult(session.prompt_trace, session.output_trace, session.text, session.finish_reason,
                                session.seed, (started - enqueued_at) * 1000, (finished - started) * 1000)

    def _score(self, request_id: str, prompt_ids: list[int], output_ids: list[int],
               enqueued_at: float) -> GenerationResult:
        started = time.perf_counter()
        prompt_trace, output_trace = self.model.score(prompt_ids, output_ids)
        finished = time.perf_counter()
        logger.info("Request %s: scored %d prompt + %d supplied tokens in %.0f ms", request_id,
                    len(prompt_ids), len(output_ids), (finished - started) * 1000)
        return GenerationResult(prompt_trace, output_trace, "", "supplied", None,
                                (started - enqueued_at) * 1000, (finished - started) * 1000)
