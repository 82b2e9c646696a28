"""`tracehead audit verify`, `erase` and `retain`: the integrity log from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from server.settings import Settings


def add_integrity_commands(audit: argparse._SubParsersAction) -> None:
    """Add verify, erase and retain to the `tracehead audit` command group."""
    verify = audit.add_parser("verify", help="recompute every leaf from the stored records and check the signed tree")
    verify.add_argument("--since-head", metavar="FILE",
                        help="a tree head saved earlier (JSON from GET /v1/audit/tree-head): check that today's "
                             "log extends it")
    verify.add_argument("--public-key", metavar="HEX",
                        help="raw Ed25519 public key to check signatures with (default: the server's signing key)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=cmd_audit_verify)

    erase = audit.add_parser("erase", help="remove a judgment's prompt, output and trace; its proof stays valid")
    erase.add_argument("judgment_id")
    erase.add_argument("--reason", required=True, help="why, e.g. 'privacy request 2026-118'")
    erase.add_argument("--by", required=True, dest="erased_by", help="who asked for it")
    erase.set_defaults(handler=cmd_audit_erase)

    retain = audit.add_parser("retain", help="erase the payloads of judgments older than the retention period")
    retain.add_argument("--days", type=_positive_days, help="retention period (default: TRACEHEAD_RETENTION_DAYS)")
    retain.set_defaults(handler=cmd_audit_retain)


def _positive_days(value: str) -> int:
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--days must be a whole number of days, got {value!r}") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"--days must be at least 1, got {days}: a shorter period would erase "
                                         "judgments created today")
    return days


def _integrity_log(settings: Settings, with_key: bool = True):
    """Open the store's integrity log; with_key loads the signing key if its file exists, never creating one."""
    from server.store import create_engine_for, upgrade_database
    from server.store.audit_log import IntegrityLog
    from server.store.integrity import load_or_create_key

    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    key_file = settings.resolved_signing_key_file
    signer = load_or_create_key(key_file) if with_key and key_file.exists() else None
    return IntegrityLog(engine, signer)


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from server.store.integrity import Mismatch

    key_given = args.public_key is not None
    log = _integrity_log(settings, with_key=not key_given)
    if key_given:
        public_key = _public_key(args.public_key)
    else:
        public_key = log.signer.public_key_bytes if log.signer else None
    if public_key is None:
        raise ValueError(f"no public key to check tree heads with: {settings.resolved_signing_key_file} does not "
                         "exist here; pass --public-key HEX (from GET /v1/audit/public-key)")
    saved = _saved_head(args.since_head) if args.since_head else None
    report = log.verify(public_key)
    if saved is not None:
        problems = _check_saved_head(log, saved, public_key, report)
        report.mismatches.extend(Mismatch(None, None, problem) for problem in problems)
        if not problems:
            print(f"saved head at size {saved.tree_size}: signature valid, and today's log extends it")

    if args.json:
        print(json.dumps(_report_dict(report), indent=2))
    else:
        _print_report(report)
    return 0 if report.ok else 1


def _public_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"--public-key must be 64 hex digits (a raw Ed25519 key), got {text[:80]!r}")
    return key


def _saved_head(path: str):
    from server.store.integrity import SignedTreeHead

    try:
        return SignedTreeHead.from_dict(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--since-head {path}: not a tree head saved from GET /v1/audit/tree-head "
                         f"({type(exc).__name__}: {exc})") from None


def _check_saved_head(log, saved, public_key: bytes, report) -> list[str]:
    """Check a head saved earlier: its signature, and a consistency proof from it to today's tree."""
    from server.store import merkle
    from server.store.integrity import verify_head_signature

    problems = []
    if not verify_head_signature(saved, public_key):
        problems.append(f"the saved head at size {saved.tree_size} has an invalid signature for this key")
    if saved.tree_size > report.leaves:
        return problems + [f"the saved head covers {saved.tree_size} leaves but the log has only {report.leaves}"]
    if saved.tree_size == 0:
        return problems
    proof = [bytes.fromhex(digest) for digest in log.consistency_proof(saved.tree_size, report.leaves)]
    if not merkle.verify_consistency(saved.tree_size, report.leaves, bytes.fromhex(saved.root_hash),
                                     bytes.fromhex(report.root), proof):
        problems.append(f"today's log of {report.leaves} leaves does not extend the saved head at size "
                        f"{saved.tree_size}: a logged record was changed or removed since")
    return problems


def _report_dict(report) -> dict:
    return {"ok": report.ok, "leaves": report.leaves, "erased": report.erased, "unfinished": report.unfinished,
            "root_hash": report.root, "signed_head": report.head.as_dict() if report.head else None,
            "mismatches": [{"judgment_id": m.judgment_id, "leaf_index": m.leaf_index, "problem": m.problem}
                           for m in report.mismatches]}


def _print_report(report) -> None:
    print(f"{report.leaves} leaves checked ({report.erased} with erased payloads); root {report.root}")
    if report.head is not None:
        print(f"latest signed head: size {report.head.tree_size}, signed {report.head.as_dict()['timestamp']}")
    else:
        print("no signed tree head yet: the server signs one within tree_head_interval_s of a new judgment")
    if report.unfinished:
        print(f"{report.unfinished} streamed judgments are still started (no leaf until they finish)")
    for mismatch in report.mismatches:
        where = f"judgment {mismatch.judgment_id}" if mismatch.judgment_id else "log"
        index = f" (leaf {mismatch.leaf_index})" if mismatch.leaf_index is not None else ""
        print(f"MISMATCH {where}{index}: {mismatch.problem}")
    count = len(report.mismatches)
    print("OK: the log verifies" if report.ok else f"FAILED: {count} problem{'s' if count != 1 else ''}")


def cmd_audit_erase(args: argparse.Namespace, settings: Settings) -> int:
    from server.store.audit_log import JudgmentNotFoundError

    log = _integrity_log(settings, with_key=False)
    try:
        erasure = log.erase(args.judgment_id, args.erased_by, args.reason)
    except JudgmentNotFoundError:
        raise ValueError(f"judgment {args.judgment_id} has no leaf in the integrity log: it does not exist or its "
                         "stream has not finished") from None
    print(f"erased the payload of judgment {erasure.judgment_id} at {erasure.erased_at.isoformat()} "
          f"(by {erasure.erased_by}: {erasure.reason})")
    return 0


def cmd_audit_retain(args: argparse.Namespace, settings: Settings) -> int:
    days = args.days if args.days is not None else settings.retention_days
    if days is None:
        raise ValueError("no retention period: pass --days N or set TRACEHEAD_RETENTION_DAYS")
    erased = _integrity_log(settings, with_key=False).retain(days)
    print(f"erased the payloads of {erased} judgments created more than {days} days ago")
    return 0
