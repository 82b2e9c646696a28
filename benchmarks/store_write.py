"""Measure how many judgments per second the audit store commits, from one or many writer threads.

Usage:
    python benchmarks/store_write.py --count 2000 \
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test

Each judgment is written with ``AuditStore.save`` as the server writes a
one-shot judgment: four verdicts, a trace of 64 output tokens with five
attended positions per constraint and token, and its integrity leaf. Every
writer thread waits for its own commit before it saves the next judgment, as a
request handler does. The script prints the rate and the per-save latency for 1
and 16 writers on a SQLite file (WAL, synchronous=FULL) and, when it can
connect, on PostgreSQL in a schema of its own that it drops afterwards.
"""

from __future__ import annotations

import argparse
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.store_scale import postgres_engine, synthetic_record  # noqa: E402
from server.store import AuditStore, create_engine_for, upgrade_database  # noqa: E402
from server.store.audit_log import IntegrityLog  # noqa: E402
from server.store.tables import Judgment  # noqa: E402

# Output tokens in each trace, and attended positions per constraint and token (the top_k_attention default).
TRACE_TOKENS = 64
ATTENTION_PAIRS = 5
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def measure_write_rate(database_url: str, count: int, writers: int) -> dict:
    """Save ``count`` synthetic judgments from ``writers`` threads into a new store at ``database_url``.

    A SQLite file at the URL is deleted first. On PostgreSQL the store lives in
    a new schema, dropped afterwards. After the timed saves the judgments are
    counted and the integrity log is verified. Returns the backend name,
    ``count``, ``writers``, the judgments stored, the leaves in the log and
    whether it verified, the wall-clock seconds of the saves, judgments per
    second, and the median and 99th-percentile latency of one save() in
    milliseconds.
    """
    if count < 1 or writers < 1:
        raise ValueError(f"count and writers must be at least 1, got count={count}, writers={writers}")
    rng = random.Random(0)
    records = [synthetic_record(number, rng, TRACE_TOKENS, ATTENTION_PAIRS) for number in range(count)]

    engine, drop_store = _fresh_store(database_url)
    try:
        upgrade_database(engine)
        seconds, latencies_ms = _save_concurrently(AuditStore(engine), records, writers)
        with engine.connect() as connection:
            stored = connection.execute(select(func.count()).select_from(Judgment)).scalar_one()
        report = IntegrityLog(engine, None).verify()
    finally:
        engine.dispose()
        drop_store()

    return {
        "database": make_url(database_url).get_backend_name(), "count": count, "writers": writers,
        "stored": stored, "leaves": report.leaves, "log_verified": report.ok, "seconds": seconds,
        "judgments_per_s": count / seconds,
        "median_ms": statistics.median(latencies_ms),
        "p99_ms": statistics.quantiles(latencies_ms, n=100)[98] if count > 1 else latencies_ms[0],
    }


def _fresh_store(database_url: str) -> tuple[Engine, Callable[[], None]]:
    """Return an engine on an empty database at ``database_url`` and a function that removes it."""
    url = make_url(database_url)
    if url.get_backend_name() == "postgresql":
        schema = f"tracehead_write_{secrets.token_hex(4)}"
        engine = postgres_engine(database_url, schema)

        def drop_schema() -> None:
            admin = create_engine_for(database_url)
            with admin.begin() as connection:
                connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()

        return engine, drop_schema

    if url.database and url.database != ":memory:":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{url.database}{suffix}").unlink(missing_ok=True)
    return create_engine_for(database_url), lambda: None


def _save_concurrently(store: AuditStore, records: list, writers: int) -> tuple[float, list[float]]:
    """Save ``records`` from ``writers`` threads that start together; return wall seconds and save latencies."""
    shares = [records[offset::writers] for offset in range(writers)]
    latencies_ms: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    start = threading.Barrier(writers + 1)

    def write(share: list, latencies: list[float]) -> None:
        start.wait()
        try:
            for record in share:
                began = time.perf_counter()
                store.save(record)
                latencies.append((time.perf_counter() - began) * 1000)
        except BaseException as exc:  # reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(share, latencies))
               for share, latencies in zip(shares, latencies_ms)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} of {writers} writers failed; first error: {errors[0]!r}") from errors[0]
    return seconds, [latency for latencies in latencies_ms for latency in latencies]


def _postgres_reachable(url: str) -> bool:
    engine = create_engine_for(url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        print(f"PostgreSQL at {make_url(url).render_as_string(hide_password=True)} is unreachable, skipped: "
              f"{str(exc).partition(chr(10))[0]}")
        return False
    finally:
        engine.dispose()
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="judgments saved per measurement")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 16], help="writer thread counts to measure")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                        help="PostgreSQL database to measure too, when reachable (a schema of its own is used)")
    parser.add_argument("--sqlite-path", help="SQLite file to write (replaced); default a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        targets = [("SQLite", f"sqlite:///{args.sqlite_path or Path(directory) / 'write.db'}")]
        if _postgres_reachable(args.postgres_url):
            targets.append(("PostgreSQL", args.postgres_url))
        print(f"{args.count} judgments per run, {TRACE_TOKENS}-token traces")
        print("| database | writers | judgments/s | median ms | p99 ms | stored | leaves | log verified |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for label, url in targets:
            for writers in args.writers:
                result = measure_write_rate(url, args.count, writers)
                print(f"| {label} | {writers} | {result['judgments_per_s']:.0f} | {result['median_ms']:.2f} | "
                      f"{result['p99_ms']:.2f} | {result['stored']} | {result['leaves']} | {result['log_verified']} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
