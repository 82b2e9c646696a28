"""Load synthetic judgments into the audit store and time the auditor's common queries.

Usage:
    python benchmarks/store_scale.py --count 1000000 \
        --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test --sqlite-path /tmp/scale.db

For each database the script loads a reference size first (--reference, default
10,000 judgments), times every query there, then loads up to --count and times
them again in the same process. It prints each query's median time at both sizes
and their ratio, then times one full `audit verify`. Every judgment has four
verdicts, a trace of eight tokens and its integrity leaf, as the server writes them.
PostgreSQL runs in a schema of its own (--schema, dropped and created again).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Engine, insert, text, update
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.store import AuditStore, JudgmentQuery, create_engine_for, integrity, merkle, upgrade_database  # noqa: E402
from server.store.audit_log import IntegrityLog  # noqa: E402
from server.store.repository import JudgmentRecord, VerdictRecord  # noqa: E402
from server.store.tables import IntegrityLeaf, IntegrityState, Judgment, MerkleNode, Trace, Verdict  # noqa: E402

CONSTRAINTS = ["testifiability", "decidability", "reciprocity", "causality"]
MODELS = ["SmolLM2-135M-Instruct", "other-model"]
TENANTS = [f"tenant-{i}" for i in range(20)]
TRACE_TOKENS = 8
BATCH = 5000
# Timing runs per query; the median is reported.
REPEATS = 5
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def synthetic_record(number: int, rng: random.Random, trace_tokens: int = TRACE_TOKENS,
                     attention_pairs: int = 1) -> JudgmentRecord:
    """Build one judgment as the server stores it, created `number` seconds after START (11.6 days per million).

    The trace has ``trace_tokens`` output tokens, each with ``attention_pairs``
    attended (position, weight) pairs per constraint. The server keeps five
    (the top_k_attention setting).
    """
    created_at = START + timedelta(seconds=number)
    scores = {name: rng.random() for name in CONSTRAINTS}
    verdicts = [VerdictRecord(name, score, score * rng.random(), 40 + rng.randrange(trace_tokens), 0.5, score >= 0.5)
                for name, score in scores.items()]
    tokens = [{"position": 40 + i, "token_id": rng.randrange(49152), "text": f" w{i}", "logprob": -rng.random(),
               "scores": {name: rng.random() for name in CONSTRAINTS},
               "attention": {name: [[rng.randrange(40 + i + 1), rng.random()] for _ in range(attention_pairs)]
                             for name in CONSTRAINTS}}
              for i in range(trace_tokens)]
    return JudgmentRecord(
        id=str(uuid.UUID(int=(int(created_at.timestamp() * 1000) << 80) | (0x7 << 76) | (0b10 << 62) | number)),
        created_at=created_at, completed_at=created_at + timedelta(milliseconds=300), request_id=f"req-{number}",
        model_name=MODELS[number % len(MODELS)], model_fingerprint="sha256:" + "a" * 64,
        heads_name="tracehead-smollm2-135m-v2", heads_fingerprint="sha256:" + "b" * 64,
        prompt={"messages": [{"role": "user", "content": f"Question number {number}?"}]},
        output=" ".join(token["text"] for token in tokens), parameters={"max_tokens": trace_tokens, "seed": number},
        finish_reason="length", status="completed", prompt_tokens=40, completion_tokens=trace_tokens,
        latency_ms=300.0, flagged=any(not v.passed for v in verdicts), metadata={"tenant": TENANTS[number % 20]},
        verdicts=verdicts,
        trace={"constraints": CONSTRAINTS, "prompt_tokens": [], "output_tokens": tokens}, kind="generation")


class Loader:
    """Bulk-inserts synthetic judgments with their leaves, keeping the Merkle nodes in memory."""

    def __init__(self, engine: Engine):
        self.engine, self.loaded, self.nodes = engine, 0, {}
        self.rng = random.Random(0)

    def load_to(self, count: int) -> float:
        started = time.perf_counter()
        while self.loaded < count:
            batch = [synthetic_record(number, self.rng) for number in range(self.loaded, min(count, self.loaded + BATCH))]
            self._insert(batch)
            self.loaded += len(batch)
        return time.perf_counter() - started

    def _insert(self, batch: list[JudgmentRecord]) -> None:
        judgments, verdicts, traces, leaves, nodes = [], [], [], [], []
        for offset, record in enumerate(batch):
            index = self.loaded + offset
            payload = integrity.payload_hash(record)
            digest = integrity.record_hash(record, payload)
            leaf = merkle.leaf_hash(bytes.fromhex(digest))
            self.nodes[(0, index)] = leaf
            for level, node_index, node in merkle.nodes_completed_by(index, leaf, lambda l, i: self.nodes[(l, i)]):
                self.nodes[(level, node_index)] = node
                nodes.append({"level": level, "node_index": node_index, "hash": node.hex()})
            judgments.append(_judgment_row(record))
            verdicts.extend({"judgment_id": record.id, **vars(verdict)} for verdict in record.verdicts)
            traces.append({"judgment_id": record.id, "format_version": 1, "data": record.trace})
            leaves.append({"leaf_index": index, "judgment_id": record.id, "record_hash": digest,
                           "payload_hash": payload, "leaf_hash": leaf.hex(), "hash_version": integrity.HASH_VERSION,
                           "appended_at": record.completed_at})
        with self.engine.begin() as connection:
            connection.execute(insert(Judgment), judgments)
            connection.execute(insert(Verdict), verdicts)
            connection.execute(insert(Trace), traces)
            connection.execute(insert(IntegrityLeaf), leaves)
            if nodes:
                connection.execute(insert(MerkleNode), nodes)
            connection.execute(update(IntegrityState).values(tree_size=self.loaded + len(batch)))


def _judgment_row(record: JudgmentRecord) -> dict:
    row = {name: getattr(record, name) for name in (
        "id", "created_at", "completed_at", "request_id", "model_name", "model_fingerprint", "heads_name",
        "heads_fingerprint", "prompt", "output", "parameters", "finish_reason", "status", "prompt_tokens",
        "completion_tokens", "latency_ms", "flagged", "kind", "policy")}
    return row | {"metadata": record.metadata}  # Core inserts use column names


def queries(store: AuditStore, log: IntegrityLog, loaded: int) -> dict[str, Callable[[], object]]:
    """Return the auditor's common queries, each as the server runs it."""
    middle = START + timedelta(seconds=loaded // 2)
    probe = synthetic_record(loaded // 2, random.Random(1)).id
    page = store.list(JudgmentQuery(), 20, None)
    return {
        "newest page (20)": lambda: store.list(JudgmentQuery(), 20, None),
        "next page by cursor": lambda: store.list(JudgmentQuery(), 20, page.next_cursor),
        "one hour, newest 20": lambda: store.list(JudgmentQuery(since=middle, until=middle + timedelta(hours=1)), 20,
                                                  None),
        "constraint failed (causality)": lambda: store.list(JudgmentQuery(constraint="causality", passed=False), 20,
                                                            None),
        "score range (testifiability 0.1-0.2)": lambda: store.list(
            JudgmentQuery(constraint="testifiability", min_score=0.1, max_score=0.2), 20, None),
        "flagged, newest 20": lambda: store.list(JudgmentQuery(flagged=True), 20, None),
        "model, newest 20": lambda: store.list(JudgmentQuery(model=MODELS[1]), 20, None),
        "metadata tenant=tenant-7": lambda: store.list(JudgmentQuery(metadata={"tenant": "tenant-7"}), 20, None),
        "one judgment with trace": lambda: store.get(probe),
        "one day's stats, causality, tenant-7": lambda: store.daily_stats(JudgmentQuery(
            constraint="causality", metadata={"tenant": "tenant-7"}, since=middle, until=middle + timedelta(days=1))),
        "text search, newest 20": lambda: store.list(JudgmentQuery(text="question number 12345?"), 20, None),
        "inclusion proof": lambda: log.inclusion_proof(probe),
        "tree root": lambda: log.root_at(loaded),
    }


def time_queries(store: AuditStore, log: IntegrityLog, loaded: int) -> dict[str, float]:
    """Median milliseconds per query."""
    results = {}
    for name, run in queries(store, log, loaded).items():
        run()  # warm caches, as a serving database has them
        samples = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            run()
            samples.append((time.perf_counter() - started) * 1000)
        results[name] = statistics.median(samples)
    return results


def run_database(label: str, engine: Engine, count: int, reference: int) -> None:
    upgrade_database(engine)
    loader, store, log = Loader(engine), AuditStore(engine), IntegrityLog(engine, None)
    load_reference = loader.load_to(reference)
    _analyze(engine)
    at_reference = time_queries(store, log, reference)
    load_full = loader.load_to(count)
    _analyze(engine)
    at_full = time_queries(store, log, count)

    print(f"\n## {label}: {reference:,} then {count:,} judgments")
    print(f"load: {reference:,} in {load_reference:.0f} s, then {count - reference:,} more in {load_full:.0f} s")
    print(f"| query | ms at {reference:,} | ms at {count:,} | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name in at_full:
        print(f"| {name} | {at_reference[name]:.1f} | {at_full[name]:.1f} | {at_full[name] / at_reference[name]:.2f} |")
    started = time.perf_counter()
    report = log.verify()
    print(f"verify: {report.leaves:,} leaves in {time.perf_counter() - started:.0f} s, ok={report.ok}")
    sys.stdout.flush()


def _analyze(engine: Engine) -> None:
    """Refresh the planner's statistics after a bulk load, as autovacuum would soon do."""
    with engine.begin() as connection:
        connection.execute(text("ANALYZE"))


def postgres_engine(url: str, schema: str) -> Engine:
    admin = create_engine_for(url)
    with admin.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    scoped = make_url(url).update_query_dict({"options": f"-csearch_path={schema}"})
    return create_engine_for(scoped.render_as_string(hide_password=False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--reference", type=int, default=10_000)
    parser.add_argument("--postgres-url", help="PostgreSQL database to load into (a schema of its own is used)")
    parser.add_argument("--schema", default="tracehead_scale")
    parser.add_argument("--sqlite-path", help="SQLite file to create (replaced if it exists)")
    args = parser.parse_args()
    if args.postgres_url:
        run_database("PostgreSQL", postgres_engine(args.postgres_url, args.schema), args.count, args.reference)
    if args.sqlite_path:
        path = Path(args.sqlite_path)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        run_database("SQLite", create_engine_for(f"sqlite:///{path}"), args.count, args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
