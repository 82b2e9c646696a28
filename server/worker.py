"""The generation worker: one thread that owns the model and serves a bounded queue."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass, field

from models.decode import ConstraintModel, ConstraintStop, SamplingParams, TokenTrace
from server.errors import ApiError, QueueFullError

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    prompt_trace: list[TokenTrace]  # empty when the request was cancelled before it ran
    output_trace: list[TokenTrace]
    text: str
    finish_reason: str  # stop, length, constraint, cancelled, or supplied for a scored text
    seed: int | None  # None for a scored text, which samples nothing
    queued_ms: float
    generation_ms: float
    stopped_by: ConstraintStop | None = None
    token_times_s: list[float] = field(default_factory=list)  # per output token: seconds since it was queued


@dataclass
class PromptEvent:
    """The prompt has been run through the model; its trace is ready."""

    prompt_trace: list[TokenTrace]


@dataclass
class TokenEvent:
    """One generated token with its trace and the text that became final with it (often empty)."""

    trace: TokenTrace
    text: str


@dataclass(eq=False)  # jobs are tracked in a set, by identity
class _Job:
    request_id: str
    task: Callable[["_Job"], GenerationResult]  # runs on the worker thread
    future: Future
    enqueued_at: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[PromptEvent | TokenEvent], None] = lambda event: None  # called on the worker thread
    # The request's context variables (its request id), so that the worker's log records carry them.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)


class TokenStream:
    """A queued generation whose prompt and tokens arrive as they are produced.

    Iterate it for the events; ``result()`` then gives the finished generation.
    ``cancel()`` makes the worker stop before its next step.
    """

    def __init__(self, job: _Job, events: asyncio.Queue):
        self._job, self._events = job, events

    def __aiter__(self):
        return self

    async def __anext__(self) -> PromptEvent | TokenEvent:
        event = await self._events.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def cancel(self) -> None:
        self._job.cancelled.set()

    async def result(self) -> GenerationResult:
        return await asyncio.wrap_future(self._job.future)


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
        self._running = 0
        self._jobs: set[_Job] = set()  # queued and running; cancel_all() reaches them here
        self._jobs_lock = threading.Lock()

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

    def cancel_all(self) -> None:
        """Reject new requests and make every queued or running generation stop before its next step.

        Cancelled generations still finish with what they have (finish_reason "cancelled"), so their
        streams end and their records can be committed.
        """
        self._stopping = True
        with self._jobs_lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled.set()
        if jobs:
            logger.info("Cancelled %d queued or running generations: %s", len(jobs),
                        ", ".join(job.request_id for job in jobs))

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def running_batch_size(self) -> int:
        """Return the requests running now: 0 or 1, because the worker runs one request at a time."""
        return self._running

    async def generate(self, request_id: str, input_ids: list[int], params: SamplingParams) -> GenerationResult:
        """Queue a generation and wait for it."""
        job = self._enqueue(request_id, lambda job: self._generate(job, input_ids, params))
        return await asyncio.wrap_future(job.future)

    def stream(self, request_id: str, input_ids: list[int], params: SamplingParams) -> TokenStream:
        """Queue a generation whose events arrive one by one; raises QueueFullError at once."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: PromptEvent | TokenEvent | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed, so no request reads the stream
                logger.debug("Dropped a stream event of request %s: its event loop is closed", request_id)

        def task(job: _Job) -> GenerationResult:
            try:
                return self._generate(job, input_ids, params)
            finally:
                emit(None)

        job = self._enqueue(request_id, task)
        job.emit = emit
        return TokenStream(job, events)

    async def score(self, request_id: str, prompt_ids: list[int], output_ids: list[int]) -> GenerationResult:
        """Queue the scoring of a supplied output and wait for it."""
        job = self._enqueue(request_id, lambda job: self._score(job, prompt_ids, output_ids))
        return await asyncio.wrap_future(job.future)

    def _enqueue(self, request_id: str, task: Callable[[_Job], GenerationResult]) -> _Job:
        if self._stopping:
            raise ApiError(503, "the generation worker is stopping with the server; retry on another replica "
                           "or after the restart", type="service_unavailable", code="worker_stopping")
        job = _Job(request_id, task, Future(), time.perf_counter())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            logger.warning("Queue full, rejecting request %s", request_id)
            raise QueueFullError(self.max_queue, self.retry_after_s) from None
        with self._jobs_lock:
            self._jobs.add(job)
        return job

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                self._run_job(job)
            finally:
                with self._jobs_lock:
                    self._jobs.discard(job)

    def _run_job(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        self._running = 1
        try:
            job.future.set_result(job.context.run(job.task, job))
        except Exception as exc:  # the error travels to the waiting request, which maps it
            logger.exception("Generation failed for request %s", job.request_id,
                             extra={"request_id": job.request_id})
            job.future.set_exception(exc)
        finally:
            self._running = 0

    def _generate(self, job: _Job, input_ids: list[int], params: SamplingParams) -> GenerationResult:
        started = time.perf_counter()
        session = self.model.start(input_ids, params)
        if job.cancelled.is_set():  # cancelled while queued: nothing ran, so nothing is traced
            session.cancel()
        else:
            job.emit(PromptEvent(session.prefill()))
        token_times_s = []
        while not session.finished:
            if job.cancelled.is_set():
                session.cancel()
                break
            trace = session.step()
            token_times_s.append(time.perf_counter() - job.enqueued_at)
            job.emit(TokenEvent(trace, session.take_text()))
        finished = time.perf_counter()
        logger.info("Request %s: %d prompt + %d output tokens in %.0f ms (%s)", job.request_id,
                    len(input_ids), len(session.output_ids), (finished - started) * 1000, session.finish_reason)
        return GenerationResult(session.prompt_trace, session.output_trace, session.text, session.finish_reason,
                                session.seed, (started - job.enqueued_at) * 1000, (finished - started) * 1000,
                                session.stopped_by, token_times_s)

    def _score(self, job: _Job, prompt_ids: list[int], output_ids: list[int]) -> GenerationResult:
        started = time.perf_counter()
        prompt_trace, output_trace = self.model.score(prompt_ids, output_ids)
        finished = time.perf_counter()
        logger.info("Request %s: scored %d prompt + %d supplied tokens in %.0f ms", job.request_id,
                    len(prompt_ids), len(output_ids), (finished - started) * 1000)
        return GenerationResult(prompt_trace, output_trace, "", "supplied", None,
                                (started - job.enqueued_at) * 1000, (finished - started) * 1000)
