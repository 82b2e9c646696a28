"""The serving benchmark: what the heads cost, the decode loop, HTTP end to end, concurrency, the audit store.

Usage (one command, under 10 minutes on a 2-core CPU):
    make bench        # or: .venv/bin/python benchmarks/serving.py

Every figure is a ratio of two runs measured in this process, one after the
other on the same machine. The pairs are: with heads / without, tracehead's
loop / transformers' generate(), an HTTP request / the bare loop, and N
clients / one client. It prints a table, writes the numbers as JSON (--output) and
rewrites the results section of the docs page (--docs) between its markers.
The server under test is a `tracehead serve` subprocess on the default
model with a fresh SQLite store. Its settings come from TRACEHEAD_* variables,
as for any server (TRACEHEAD_DTYPE, TRACEHEAD_DEVICE, TRACEHEAD_THREADS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import torch
from sqlalchemy.exc import OperationalError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.store_write import measure_write_rate  # noqa: E402
from models.decode import ConstraintModel, DecodeBatch, SamplingParams  # noqa: E402
from server.runtime import load_model  # noqa: E402
from server.settings import Settings  # noqa: E402

STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}]
DECODE_TOKENS = 48  # greedy tokens per decode-loop and end-to-end measurement
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"  # the test suite's default too


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.contextmanager
def without_end_of_turn(model: ConstraintModel) -> Iterator[None]:
    """Decode every requested token, as generate(min_new_tokens=N) does, so both sides do equal work."""
    saved, model.eos_token_ids = model.eos_token_ids, set()
    try:
        yield
    finally:
        model.eos_token_ids = saved


def filled_batch(model: ConstraintModel, rows: int, tokens: int, heads: bool = True) -> DecodeBatch:
    batch = DecodeBatch(model, heads=heads)
    input_ids = model.encode(messages=STORY)
    for _ in range(rows):
        batch.add(model.start(input_ids, SamplingParams(max_tokens=tokens, temperature=0)))
    return batch


# 1. Heads overhead

def heads_overhead(model: ConstraintModel, batch_sizes=(1, 8), steps: int = 40, rounds: int = 3) -> list[dict]:
    """Median decode-step time with the heads and their traces against the same steps without them.

    The two batches step in turn, so that a change in the machine's speed
    during the run weighs on both sides alike.
    """
    results = []
    with without_end_of_turn(model):
        for rows in batch_sizes:
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(rounds):
                batches = {heads: filled_batch(model, rows, steps + 2, heads) for heads in (True, False)}
                for _ in range(2):  # warm-up steps: the caches grow to their size
                    for batch in batches.values():
                        batch.step()
                for _ in range(steps):
                    for heads, batch in batches.items():
                        times[heads].append(timed(batch.step))
            with_heads, without = statistics.median(times[True]), statistics.median(times[False])
            results.append({"batch": rows, "step_ms_with_heads": with_heads * 1000,
                            "step_ms_without_heads": without * 1000, "ratio": with_heads / without})
    return results


# 2. tracehead's loop against transformers' generate()

def loop_vs_generate(model: ConstraintModel, batch_sizes=(1, 8), rounds: int = 3) -> list[dict]:
    """Tokens per second of the whole loop (prefill, heads, traces) against generate() for the same tokens."""
    tokenizer, hf_model = model.base.tokenizer, model.base.model
    input_ids = torch.tensor([model.encode(messages=STORY)], device=model.base.device)
    results = []
    for rows in batch_sizes:
        prompt = input_ids.expand(rows, -1)

        def generate() -> None:
            with torch.inference_mode():
                hf_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)

        def loop() -> None:
            batch = filled_batch(model, rows, DECODE_TOKENS)
            while len(batch):
                batch.step()

        with without_end_of_turn(model):
            generate(), loop()  # warm-up: first calls allocate and pack
            ours, theirs = [], []
            for _ in range(rounds):
                theirs.append(timed(generate))
                ours.append(timed(loop))
        tokens = rows * DECODE_TOKENS
        ours_rate, theirs_rate = tokens / statistics.median(ours), tokens / statistics.median(theirs)
        results.append({"dtype": str(model.base.model.dtype).removeprefix("torch."), "batch": rows,
                        "tracehead_tok_s": ours_rate, "generate_tok_s": theirs_rate,
                        "ratio": ours_rate / theirs_rate})
    return results


# 3. End to end over HTTP

class Server:
    """A `tracehead serve` subprocess on the default model with a fresh SQLite store."""

    def __init__(self, settings: Settings, data_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = os.environ | {"TRACEHEAD_DATA_DIR": str(data_dir), "TRACEHEAD_PORT": str(self.port),
                            "TRACEHEAD_HOST": "127.0.0.1", "TRACEHEAD_DTYPE": settings.dtype,
                            "TRACEHEAD_DEVICE": settings.device, "TRACEHEAD_LOG_LEVEL": "warning"}
        if settings.threads:
            env["TRACEHEAD_THREADS"] = str(settings.threads)
        self.log = (data_dir / "server.log").open("w")
        self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env, cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {self.log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the server did not become ready within 180 s; see {self.log.name}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024

    def reset_peak_rss(self) -> None:
        """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def end_to_end(model: ConstraintModel, server: Server, rounds: int = 5) -> dict:
    """Time a non-streamed HTTP generation (heads, trace, audit commit, JSON) against the bare loop's same tokens."""
    body = {"messages": STORY, "max_tokens": DECODE_TOKENS, "temperature": 0}
    http_times, bare_times, completion_tokens = [], [], 0

    def request() -> None:
        nonlocal completion_tokens
        response = httpx.post(f"{server.url}/v1/generate", json=body, timeout=300)
        response.raise_for_status()
        completion_tokens = response.json()["usage"]["completion_tokens"]

    def bare() -> None:
        batch = filled_batch(model, 1, DECODE_TOKENS, heads=False)
        while len(batch):
            batch.step()

    request(), bare()  # warm-up
    saves_before = (server.metric('tracehead_audit_write_seconds_sum{operation="save"}'),
                    server.metric('tracehead_audit_write_seconds_count{operation="save"}'))
    for _ in range(rounds):
        http_times.append(timed(request))
        bare_times.append(timed(bare))
    save_seconds = server.metric('tracehead_audit_write_seconds_sum{operation="save"}') - saves_before[0]
    saves = server.metric('tracehead_audit_write_seconds_count{operation="save"}') - saves_before[1]
    http_s, bare_s = statistics.median(http_times), statistics.median(bare_times)
    return {"tokens": completion_tokens, "http_ms": http_s * 1000, "bare_loop_ms": bare_s * 1000,
            "ratio": http_s / bare_s, "audit_save_ms": save_seconds / saves * 1000,
            "audit_share_of_request": save_seconds / saves / http_s}


# 4. Concurrent clients

def concurrency(server: Server, levels=(1, 4, 8, 16), requests_per_client: int = 2, tokens: int = 128) -> list[dict]:
    """Aggregate tokens per second, time to first token and inter-token latency with N streaming clients.

    ``tokens`` defaults to the server's default max_tokens. Every joining
    request's prompt runs alone before it decodes with the others, so shorter
    requests spend a larger share of the time in those prefills.
    """
    body = {"messages": STORY, "max_tokens": tokens, "temperature": 0, "stream": True}
    results = []
    for clients in levels:
        first_token, gaps, counts = [], [], []
        lock = threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=600) as http:
                for _ in range(requests_per_client):
                    times = _stream_token_times(http, f"{server.url}/v1/generate", body)
                    with lock:
                        first_token.append(times[0])
                        gaps.extend(b - a for a, b in zip(times, times[1:]))
                        counts.append(len(times))

        server.reset_peak_rss()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        results.append({"clients": clients, "max_tokens": tokens, "tok_s": sum(counts) / wall, "requests": len(counts),
                        "ttft_ms_p50": percentile(first_token, 0.5) * 1000,
                        "ttft_ms_p90": percentile(first_token, 0.9) * 1000,
                        "itl_ms_p50": percentile(gaps, 0.5) * 1000, "itl_ms_p90": percentile(gaps, 0.9) * 1000,
                        "itl_ms_p99": percentile(gaps, 0.99) * 1000, "peak_rss_mb": server.peak_rss_mb()})
    for row in results:
        row["ratio"] = row["tok_s"] / results[0]["tok_s"]
        row["rss_ratio"] = row["peak_rss_mb"] / results[0]["peak_rss_mb"]
    return results


def _stream_token_times(http: httpx.Client, url: str, body: dict) -> list[float]:
    """Stream one generation; return the seconds from sending it to each of its token events."""
    started = time.perf_counter()
    times = []
    with http.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "event: token":
                times.append(time.perf_counter() - started)
    return times


# 5. Audit store

def audit_store(count: int, postgres_url: str | None) -> list[dict]:
    """Measure write rates on a fresh SQLite file and, when it accepts connections, on PostgreSQL."""
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for writers in (1, 16):
            rows.append({"database": "sqlite", "writers": writers}
                        | measure_write_rate(f"sqlite:///{scratch}/writes-{writers}.db", count, writers))
    if not postgres_url:
        return rows
    try:
        for writers in (1, 16):
            rows.append({"database": "postgresql", "writers": writers}
                        | measure_write_rate(postgres_url, count, writers))
    except OperationalError as error:
        print(f"PostgreSQL at {postgres_url} is unreachable, so its write rates are left out: "
              f"{str(error).splitlines()[0]}", flush=True)
    return rows


# Report

TARGETS = {"heads": 1.03, "loop": 1.5, "concurrency_8": 5.0, "end_to_end": 1.10, "writes": 1000.0}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def table(results: dict) -> str:
    lines = ["| figure | measured | reference | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for row in results["heads_overhead"]:
        lines.append(f"| decode step with heads, batch {row['batch']} | {row['step_ms_with_heads']:.1f} ms | "
                     f"{row['step_ms_without_heads']:.1f} ms without heads | {row['ratio']:.3f}x | "
                     f"<= {TARGETS['heads']}x |")
    for row in results["loop_vs_generate"]:
        lines.append(f"| tracehead loop, {row['dtype']}, batch {row['batch']} | {row['tracehead_tok_s']:.1f} tok/s | "
                     f"{row['generate_tok_s']:.1f} tok/s generate() | {row['ratio']:.2f}x | "
                     + (f">= {TARGETS['loop']}x |" if row["batch"] == 1 else "- |"))
    e2e = results["end_to_end"]
    lines.append(f"| HTTP generation, {e2e['tokens']} tokens | {e2e['http_ms']:.0f} ms | {e2e['bare_loop_ms']:.0f} ms "
                 f"bare loop | {e2e['ratio']:.3f}x | <= {TARGETS['end_to_end']}x |")
    for rows in (results["concurrency"], results["concurrency_short"]):
        for row in rows:
            lines.append(f"| {plural(row['clients'], 'streaming client')}, {row['max_tokens']}-token requests | "
                         f"{row['tok_s']:.1f} tok/s | {rows[0]['tok_s']:.1f} tok/s with 1 | {row['ratio']:.2f}x | "
                         + (f">= {TARGETS['concurrency_8']}x |" if row["clients"] == 8 else "- |"))
    for row in results["audit_store"]:
        lines.append(f"| audit writes, {row['database']}, {plural(row['writers'], 'writer')} | "
                     f"{row['judgments_per_s']:.0f} judgments/s | {TARGETS['writes']:.0f} judgments/s target | "
                     f"{row['judgments_per_s'] / TARGETS['writes']:.2f}x | >= 1.00x |")
    lines.append(f"| audit write's share of an HTTP generation | {e2e['audit_save_ms']:.1f} ms | "
                 f"{e2e['http_ms']:.0f} ms request | {e2e['audit_share_of_request']:.3f} | - |")
    return "\n".join(lines)


def latency_table(results: dict) -> str:
    lines = ["| clients | max_tokens | requests | tok/s | TTFT p50 | TTFT p90 | ITL p50 | ITL p90 | ITL p99 | peak RSS |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["concurrency"] + results["concurrency_short"]:
        lines.append(f"| {row['clients']} | {row['max_tokens']} | {row['requests']} | {row['tok_s']:.1f} | "
                     f"{row['ttft_ms_p50']:.0f} ms | "
                     f"{row['ttft_ms_p90']:.0f} ms | {row['itl_ms_p50']:.0f} ms | {row['itl_ms_p90']:.0f} ms | "
                     f"{row['itl_ms_p99']:.0f} ms | {row['peak_rss_mb']:.0f} MB ({row['rss_ratio']:.2f}x) |")
    return "\n".join(lines)


def update_docs(path: Path, results: dict) -> None:
    page = path.read_text()
    if RESULTS_START not in page or RESULTS_END not in page:
        raise SystemExit(f"{path} has no {RESULTS_START} ... {RESULTS_END} section to replace")
    info = results["machine"]
    section = (f"{RESULTS_START}\nMeasured {results['date']} on {info['cpu']} ({info['cores']} cores, "
               f"{info['torch_threads']} torch threads), torch {info['torch']}, Python {info['python']}, "
               f"base model in {results['dtype']}; {results['duration_s']:.0f} s for the whole run.\n\n"
               f"{table(results)}\n\n{latency_table(results)}\n{RESULTS_END}")
    head, rest = page.split(RESULTS_START, 1)
    path.write_text(head + section + rest.split(RESULTS_END, 1)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--writes", type=int, default=2000, help="judgments written per audit store figure")
    parser.add_argument("--postgres-url", default=os.environ.get("TRACEHEAD_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="also time audit writes on this PostgreSQL when it accepts connections (default "
                             "$TRACEHEAD_TEST_POSTGRES_URL, else %(default)s); an empty value skips it")
    parser.add_argument("--no-float32", dest="float32", action="store_false",
                        help="skip comparing the loop with generate() in float32 when the default dtype is another")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    settings = Settings()
    model = load_model(settings)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "dtype": str(model.base.model.dtype).removeprefix("torch.")}
    print(f"Benchmarking on {results['machine']['cpu']}, base model in {results['dtype']}", flush=True)
    results["heads_overhead"] = heads_overhead(model)
    results["loop_vs_generate"] = loop_vs_generate(model)
    if args.float32 and model.base.model.dtype != torch.float32:
        float32_model = load_model(settings.model_copy(update={"dtype": "float32"}))
        results["loop_vs_generate"] += loop_vs_generate(float32_model)
        del float32_model
    with tempfile.TemporaryDirectory() as data_dir:
        server = Server(settings, Path(data_dir))
        try:
            results["end_to_end"] = end_to_end(model, server)
            results["concurrency"] = concurrency(server)
            results["concurrency_short"] = concurrency(server, levels=(1, 8), requests_per_client=3, tokens=32)
        finally:
            server.stop()
    results["audit_store"] = audit_store(args.writes, args.postgres_url)
    results["duration_s"] = time.perf_counter() - started

    print(table(results), latency_table(results), sep="\n\n")
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    if args.docs:
        update_docs(args.docs, results)
    print(f"\nWrote {args.output} and the results section of {args.docs} in {results['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
