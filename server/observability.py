"""Request ids in log records, JSON log lines, proxy headers, and the Prometheus metrics of one app.

The code paths call small methods of Metrics; every metric family is defined here.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from server.store import JudgmentRecord
    from server.worker import GenerationResult, GenerationWorker

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Set for the duration of a request; copied into the worker thread and the thread pool with the context.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
judgment_id_var: ContextVar[str | None] = ContextVar("judgment_id", default=None)

TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


# Logs

class RequestContextFilter(logging.Filter):
    """Set ``request_id`` and ``judgment_id`` on every record from the context, unless ``extra=`` set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "judgment_id", None) is None:
            record.judgment_id = judgment_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, and the ids when known."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        for name, variable in (("request_id", request_id_var), ("judgment_id", judgment_id_var)):
            value = getattr(record, name, None) or variable.get()
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Send every log record to stderr as text or JSON lines, each with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# Request ids and proxies

def _client_host(scope: Scope) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class RequestContextMiddleware:
    """Take the gateway's X-Request-ID when it is well formed (else make one) and return it on every response.

    The id is in ``request.state.request_id`` and in ``request_id_var`` while the
    request runs. It also counts each request by route template and status.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        incoming = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), "")
        request_id = incoming if _REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets when the app raises before it responds

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        request_token, judgment_token = request_id_var.set(request_id), judgment_id_var.set(None)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(request_token)
            judgment_id_var.reset(judgment_token)
            runtime = getattr(scope["app"].state, "runtime", None)
            if runtime is not None:
                runtime.metrics.count_request(scope, status)


def is_trusted_proxy(host: str | None, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if host is None:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a Unix socket path or a test client's name
        return False
    return any(address in network for network in networks)


# Scope key of the address that opened the connection. ProxyHeadersMiddleware replaces scope["client"]
# with the forwarded client, but trust in a gateway's headers depends on who connected.
DIRECT_PEER = "tracehead.direct_peer"


def direct_peer(scope: Scope) -> str | None:
    """Return the address that opened the connection, before any forwarded header replaced the client."""
    return scope[DIRECT_PEER] if DIRECT_PEER in scope else _client_host(scope)


class RootPathMiddleware:
    """Record the direct peer, and set the root_path: X-Forwarded-Prefix from a trusted proxy, else the setting.

    Routes match with or without the prefix in the path, so a proxy may strip it or
    pass it on. It must run before uvicorn's ProxyHeadersMiddleware, which replaces
    the peer address that the trust checks read.
    """

    def __init__(self, app: ASGIApp, root_path: str,
                 trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]):
        self.app = app
        self.root_path = root_path
        self.networks = trusted_networks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        scope[DIRECT_PEER] = _client_host(scope)
        if self.root_path:
            scope["root_path"] = self.root_path
        if is_trusted_proxy(scope[DIRECT_PEER], self.networks):
            prefix = next((value.decode("latin-1") for name, value in scope["headers"]
                           if name == b"x-forwarded-prefix"), "").strip().rstrip("/")
            if prefix.startswith("/"):
                scope["root_path"] = prefix
        await self.app(scope, receive, send)


# Metrics

# Seconds; generation on CPU takes from milliseconds per token to a minute per request.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The Prometheus metrics of one app, in a registry of its own (so tests do not share counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("tracehead_http_requests", "HTTP requests by route template, method and status.",
                                ["route", "method", "status"], registry=registry)
        self.time_to_first_token = Histogram(
            "tracehead_time_to_first_token_seconds", "From queueing a generation to its first output token.",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "tracehead_inter_token_latency_seconds", "Time between consecutive output tokens of a generation.",
            buckets=_TOKEN_BUCKETS, registry=registry)
        self.end_to_end_latency = Histogram(
            "tracehead_end_to_end_latency_seconds",
            "From accepting a request to completing its judgment record, by kind (generation or score).",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.queue_depth = Gauge("tracehead_queue_depth", "Requests waiting for the generation worker.",
                                 registry=registry)
        self.running_batch_size = Gauge(
            "tracehead_running_batch_size", "Requests decoding together in the worker's batch now.",
            registry=registry)
        self.generated_tokens = Counter("tracehead_generated_tokens", "Output tokens sampled by the model.",
                                        registry=registry)
        self.verdicts = Counter("tracehead_verdicts", "Committed verdicts by constraint and result.",
                                ["constraint", "result"], registry=registry)
        self.audit_write_latency = Histogram(
            "tracehead_audit_write_seconds", "Audit store writes by operation (save, start, finish).",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.audit_write_failures = Counter("tracehead_audit_write_failures", "Audit store writes that raised.",
                                            ["operation"], registry=registry)

    def watch_worker(self, worker: GenerationWorker) -> None:
        """Read the queue depth and running batch size from ``worker`` at each scrape."""
        self.queue_depth.set_function(lambda: worker.queue_depth)
        self.running_batch_size.set_function(lambda: worker.running_batch_size)

    def count_request(self, scope: Scope, status: int) -> None:
        # The template, not the path, so that judgment ids do not make a label value each.
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.requests.labels(template, scope["method"], str(status)).inc()

    def observe_generation(self, result: GenerationResult) -> None:
        """Record the token timings of a finished generation; a scored response samples nothing."""
        times = result.token_times_s
        if not times:
            return
        self.generated_tokens.inc(len(times))
        self.time_to_first_token.observe(times[0])
        for earlier, later in zip(times, times[1:]):
            self.inter_token_latency.observe(later - earlier)

    def observe_committed(self, record: JudgmentRecord) -> None:
        """Count the verdicts of a committed judgment and its latency from acceptance to commit."""
        for verdict in record.verdicts:
            self.verdicts.labels(verdict.constraint, "passed" if verdict.passed else "failed").inc()
        if record.latency_ms is not None:
            self.end_to_end_latency.labels(record.kind).observe(record.latency_ms / 1000)

    @contextmanager
    def audit_write(self, operation: str) -> Iterator[None]:
        """Time one audit store write and count it as failed when it raises."""
        started = time.perf_counter()
        try:
            yield
        except Exception:
            self.audit_write_failures.labels(operation).inc()
            raise
        finally:
            self.audit_write_latency.labels(operation).observe(time.perf_counter() - started)
