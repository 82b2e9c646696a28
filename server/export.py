"""Exported judgments as text lines: JSON Lines of list items, or CSV rows with one column per verdict field.

The HTTP export route and `tracehead audit export` write the same lines.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable, Iterator

from server.records import list_item_body, timestamp
from server.store import JudgmentRecord

EXPORT_FORMATS = ("jsonl", "csv")
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}

# The judgment columns of a CSV row. The columns <constraint>_score and <constraint>_passed follow them.
CSV_COLUMNS = ("id", "created_at", "status", "kind", "model", "heads", "finish_reason", "flagged", "prompt_tokens",
               "completion_tokens", "metadata")


def export_lines(records: Iterable[JudgmentRecord], export_format: str, constraints: list[str],
                 include_trace: bool = False) -> Iterator[str]:
    """Render ``records`` in ``export_format`` ("jsonl" or "csv"), one line per judgment after a CSV header.

    ``constraints`` orders the verdicts of a JSON line and names the CSV
    verdict columns. ``include_trace`` adds the stored trace to each JSON line.
    """
    if export_format == "jsonl":
        return jsonl_lines(records, constraints, include_trace)
    if include_trace:
        raise ValueError("include_trace applies to the jsonl format only, because a CSV row has no trace column")
    return csv_lines(records, constraints)


def jsonl_lines(records: Iterable[JudgmentRecord], constraints: list[str], include_trace: bool) -> Iterator[str]:
    for record in records:
        body = list_item_body(record, constraints)
        if include_trace:
            body["trace"] = record.trace
        yield json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n"


def csv_lines(records: Iterable[JudgmentRecord], constraints: list[str]) -> Iterator[str]:
    """Render a header and one row per record, with CRLF line ends as RFC 4180 has them.

    Booleans are "true" or "false", and a missing value (a finish reason or a
    verdict that a judgment does not have) is an empty cell.
    """
    # NOTE: verdicts of constraints outside ``constraints``, from judgments
    # made with other heads, have no column and are left out of the row.
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = [*CSV_COLUMNS, *(f"{name}_{field}" for name in constraints for field in ("score", "passed"))]
    rows = (csv_row(record, constraints) for record in records)
    for row in itertools.chain([header], rows):
        writer.writerow(row)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()


def csv_row(record: JudgmentRecord, constraints: list[str]) -> list:
    verdicts = {verdict.constraint: verdict for verdict in record.verdicts}
    row = [record.id, timestamp(record.created_at), record.status, record.kind, record.model_name, record.heads_name,
           record.finish_reason or "", _csv_bool(record.flagged), record.prompt_tokens, record.completion_tokens,
           json.dumps(record.metadata, ensure_ascii=False, separators=(",", ":"))]
    for name in constraints:
        verdict = verdicts.get(name)
        row += ["", ""] if verdict is None else [verdict.score, _csv_bool(verdict.passed)]
    return row


def _csv_bool(value: bool) -> str:
    return "true" if value else "false"
