"""The generation worker: one thread that owns the model and serves a bounded queue."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.decode import ConstraintModel, ConstraintStop, DecodeSession, SamplingParams, TokenTrace
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
    future: Future
    enqueued_at: float
    # A generation joins the running batch; anything else (scoring) is a task run once, between steps.
    input_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    task: Callable[["_Job"], GenerationResult] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[PromptEvent | TokenEvent | None], None] = lambda event: None  # called on the worker thread
    # The request's context variables (its request id), so that the worker's log records carry them.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    session: DecodeSession | None = None
    started_at: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # per output token: seconds since it was queued

    @property
    def footprint(self) -> int:
        """Positions the request may fill in the batch's caches: its prompt and every token it may generate."""
        return len(self.input_ids) + (self.params.max_tokens if self.params else 0)


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
    """Runs generations in one continuously batched decode loop on a dedicated thread.

    A new request joins the running batch at the next step (its prompt runs
    first, alone) and a finished one leaves at once, so that short requests
    do not wait for long ones. Sampling settings, seeds, stop sequences and
    constraint minimums stay per request. Requests wait in a queue of
    ``max_queue`` entries; a full queue raises QueueFullError at once rather
    than letting a client wait unboundedly. A request joins only while the
    batch has fewer than ``max_batch_size`` rows and its caches stay within
    ``max_batch_tokens`` positions (rows x the longest row's prompt plus
    max_tokens, the padded layout's size); a request bigger than that alone
    runs when the batch is empty.
    """

    def __init__(self, model: ConstraintModel, max_queue: int, retry_after_s: int, max_batch_size: int = 8,
                 max_batch_tokens: int = 16384, threads: int | None = None):
        self.model = model
        self.threads = threads  # torch CPU threads of the worker thread; None keeps torch's default
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        # Waiting jobs, oldest first. The head stays queued until the batch has room for it, so a job
        # that waits for room still counts against max_queue.
        self._queue: deque[_Job] = deque()
        self._queue_changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._stopping = False  # set by stop() and cancel_all(); later requests are rejected
        self._draining = False  # set by stop(): finish what is running and queued, then end the thread
        self._batch = model.new_batch()
        self._running: list[_Job] = []  # the jobs of the batch's sessions
        self._jobs: set[_Job] = set()  # queued and running; cancel_all() reaches them here
        self._jobs_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()
        logger.info("Generation worker started (batches of up to %d requests and %d cache positions, "
                    "queue of %d)", self.max_batch_size, self.max_batch_tokens, self.max_queue)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish the running and the queued requests, then end the thread."""
        self._stopping = True
        if not self._thread.is_alive():
            return
        with self._queue_changed:
            self._draining = True
            self._queue_changed.notify()
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
        """Requests waiting to join the batch."""
        return len(self._queue)

    @property
    def running_batch_size(self) -> int:
        """Requests decoding in the batch now."""
        return len(self._running)

    async def generate(self, request_id: str, input_ids: list[int], params: SamplingParams) -> GenerationResult:
        """Queue a generation and wait for it."""
        job = self._enqueue(_Job(request_id, Future(), time.perf_counter(), input_ids, params))
        return await asyncio.wrap_future(job.future)

    def stream(self, request_id: str, input_ids: list[int], params: SamplingParams) -> TokenStream:
        """Queue a generation whose events arrive one by one; raises QueueFullError at once."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: PromptEvent | TokenEvent | None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed, so no request reads the stream
                logger.debug("Dropped a stream event of request %s: its event loop is closed", request_id)

        job = _Job(request_id, Future(), time.perf_counter(), input_ids, params, emit=emit)
        return TokenStream(self._enqueue(job), events)

    async def score(self, request_id: str, prompt_ids: list[int], output_ids: list[int]) -> GenerationResult:
        """Queue the scoring of a supplied output and wait for it."""
        job = _Job(request_id, Future(), time.perf_counter(),
                   task=lambda job: self._score(job, prompt_ids, output_ids))
        return await asyncio.wrap_future(self._enqueue(job).future)

    def _enqueue(self, job: _Job) -> _Job:
        if self._stopping:
            raise ApiError(503, "the generation worker is stopping with the server; retry on another replica "
                           "or after the restart", type="service_unavailable", code="worker_stopping")
        with self._queue_changed:
            if len(self._queue) >= self.max_queue:
                logger.warning("Queue full, rejecting request %s", job.request_id)
                raise QueueFullError(self.max_queue, self.retry_after_s)
            self._queue.append(job)
            self._queue_changed.notify()
        with self._jobs_lock:
            self._jobs.add(job)
        return job

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # the setting is per thread under OpenMP
        while True:
            try:
                if not self._running and not self._wait_for_work():
                    return
                self._admit()
                self._cancel_requested()
                self._step()
            except Exception as exc:  # one forward pass serves the whole batch, so its failure is everyone's
                logger.exception("Decode step failed for requests %s",
                                 ", ".join(job.request_id for job in self._running))
                for job in self._running:
                    self._fail(job, exc)
                self._running, self._batch = [], self.model.new_batch()

    def _wait_for_work(self) -> bool:
        """Sleep until a job is queued; return False once stopping with nothing left to do."""
        with self._queue_changed:
            while not self._queue:
                if self._draining:
                    return False
                self._queue_changed.wait()
        return True

    def _admit(self) -> None:
        """Move queued jobs into the batch, oldest first, while it has room for the next one."""
        while True:
            with self._queue_changed:
                if not self._queue or (self._running and not self._fits(self._queue[0])):
                    return
                job = self._queue.popleft()
            if job.task is not None:
                self._run_task(job)
            else:
                self._join(job)

    def _fits(self, job: _Job) -> bool:
        if job.task is not None:
            return True
        longest = max([job.footprint] + [running.footprint for running in self._running])
        return (len(self._running) < self.max_batch_size
                and (len(self._running) + 1) * longest <= self.max_batch_tokens)

    def _join(self, job: _Job) -> None:
        """Prefill a job's prompt and add it to the batch; a job cancelled while queued runs nothing."""
        if not job.future.set_running_or_notify_cancel():
            self._forget(job)
            return
        job.started_at = time.perf_counter()
        try:
            job.session = self.model.start(job.input_ids, job.params)
            if job.cancelled.is_set():
                job.session.cancel()
                self._finish(job)
                return
            prompt_trace = job.context.run(self._batch.add, job.session)
        except Exception as exc:  # the error travels to the waiting request, which maps it
            self._fail(job, exc)
            return
        self._running.append(job)
        job.emit(PromptEvent(prompt_trace))

    def _cancel_requested(self) -> None:
        for job in [job for job in self._running if job.cancelled.is_set()]:
            job.session.cancel()
            self._batch.remove(job.session)
            self._running.remove(job)
            self._finish(job)

    def _step(self) -> None:
        """Decode one token for every running request; finish the ones that end with it."""
        stepped = self._batch.step()
        now = time.perf_counter()
        jobs = {id(job.session): job for job in self._running}
        for session, trace in stepped:
            job = jobs[id(session)]
            job.token_times_s.append(now - job.enqueued_at)
            job.emit(TokenEvent(trace, session.take_text()))
            if session.finished:
                self._running.remove(job)
                self._finish(job)

    def _finish(self, job: _Job) -> None:
        session, finished = job.session, time.perf_counter()
        job.context.run(logger.info, "Request %s: %d prompt + %d output tokens in %.0f ms (%s)", job.request_id,
                        len(job.input_ids), len(session.output_ids), (finished - job.started_at) * 1000,
                        session.finish_reason)
        result = GenerationResult(session.prompt_trace, session.output_trace, session.text, session.finish_reason,
                                  session.seed, (job.started_at - job.enqueued_at) * 1000,
                                  (finished - job.started_at) * 1000, session.stopped_by, job.token_times_s)
        job.future.set_result(result)
        job.emit(None)
        self._forget(job)

    def _fail(self, job: _Job, exc: Exception) -> None:
        job.context.run(logger.error, "Generation failed for request %s: %s", job.request_id, exc,
                        exc_info=exc, extra={"request_id": job.request_id})
        job.future.set_exception(exc)
        job.emit(None)
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.discard(job)

    def _run_task(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            self._forget(job)
            return
        try:
            job.future.set_result(job.context.run(job.task, job))
        except Exception as exc:  # the error travels to the waiting request, which maps it
            self._fail(job, exc)
            return
        self._forget(job)

    def _score(self, job: _Job, prompt_ids: list[int], output_ids: list[int]) -> GenerationResult:
        started = time.perf_counter()
        prompt_trace, output_trace = self.model.score(prompt_ids, output_ids)
        finished = time.perf_counter()
        logger.info("Request %s: scored %d prompt + %d supplied tokens in %.0f ms", job.request_id,
                    len(prompt_ids), len(output_ids), (finished - started) * 1000)
        return GenerationResult(prompt_trace, output_trace, "", "supplied", None,
                                (started - job.enqueued_at) * 1000, (finished - started) * 1000)
