"""The `tracehead` command: serve, fetch the default model, train and evaluate heads, migrate, audit."""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, replace
from datetime import datetime
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from server.keys_cli import add_keys_commands
from pydantic import ValidationError

from server.settings import Settings

if TYPE_CHECKING:
    from server.store import AuditStore, JudgmentQuery

logger = logging.getLogger(__name__)

# Reported numbers are rounded to 4 places; eval counts a larger gap as a mismatch.
METRIC_TOLERANCE = 0.002


def _configure_logging(level: str, log_format: str) -> None:
    from server.observability import configure_logging

    configure_logging(level, log_format)
    # Alembic logs each plugin and migration step at INFO; the store logs the upgrade itself.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger().level))


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from server.app import create_app
    from server.runtime import load_model

    # Loading before uvicorn starts turns a missing model or mismatched heads into a one-line error.
    model = load_model(settings)
    # uvicorn handles SIGTERM itself (stop accepting, wait up to the grace period, run the lifespan shutdown)
    # and then raises the signal again under the handler that was installed before it started. Ignoring it
    # there lets a completed graceful stop exit with 0 instead of being killed by the re-raised signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(create_app(settings, model), host=args.host or settings.host, port=args.port or settings.port,
                workers=1, log_level=settings.log_level, timeout_graceful_shutdown=settings.shutdown_grace_s,
                # The app itself honours forwarded headers of settings.trusted_proxies only, and uvicorn's own
                # log config would bypass the root handler that adds request ids and the JSON format.
                proxy_headers=False, log_config=None)
    return 0


def cmd_models_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from models.base import fetch_default_model

    cache_dir = Path(args.cache_dir) if args.cache_dir else settings.cache_dir / "models"
    fetch_default_model(cache_dir, progress=print)
    return 0


def _load_base(settings: Settings, dtype: str):
    """Load the base model in the precision that training and evaluation use for hidden states."""
    import torch

    from models.base import load_base_model
    from server.runtime import ensure_default_model

    ensure_default_model(settings)
    return load_base_model(settings.model_path, settings.torch_device, getattr(torch, dtype))


def cmd_heads_train(args: argparse.Namespace, settings: Settings) -> int:
    from models.card import render_model_card
    from models.evaluate import evaluate, out_of_domain
    from models.heads import save_checkpoint
    from models.report import baseline_gaps, format_table
    from models.train import TrainConfig, fit_heads, prepare_datasets

    config = TrainConfig(threshold_target=args.threshold_target)
    if args.layers:
        config.candidate_layers = [int(layer) for layer in args.layers.split(",")]
    if args.max_epochs:
        config.max_epochs = args.max_epochs
    base = _load_base(settings, config.dtype)
    datasets = prepare_datasets(base, Path(args.data_dir), config, settings.cache_dir / "hidden")
    heads, layer_search = fit_heads(datasets, config, base)
    heads.config.name = args.name or Path(args.output).name

    metrics = {"evaluation": evaluate(heads, datasets, base, config), "tap_layer_search": layer_search,
               "out_of_domain": out_of_domain(heads, datasets, base, config), "training": asdict(config)}
    save_checkpoint(Path(args.output), heads, metrics, render_model_card(heads.config, metrics))
    print(format_table(metrics["evaluation"]))
    print("\n".join(baseline_gaps(metrics["evaluation"])))
    print(f"Wrote head checkpoint to {args.output}")
    return 0


def cmd_heads_eval(args: argparse.Namespace, settings: Settings) -> int:
    from models.card import render_model_card
    from models.evaluate import evaluate
    from models.heads import CARD_FILE, METRICS_FILE, load_checkpoint
    from models.report import baseline_gaps, format_table, out_of_domain_table
    from models.train import TrainConfig, prepare_datasets

    heads_dir = Path(args.heads) if args.heads else settings.heads_path
    stored_path = heads_dir / METRICS_FILE
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else None
    config = TrainConfig(**stored["training"]) if stored else TrainConfig()
    base = _load_base(settings, config.dtype)
    heads = load_checkpoint(heads_dir, base.fingerprint)

    # Only the tap layers are read, so the base model stops after the deepest one.
    eval_config = replace(config, candidate_layers=list(heads.config.tap_layers))
    datasets = prepare_datasets(base, Path(args.data_dir), eval_config, settings.cache_dir / "hidden")
    evaluation = evaluate(heads, datasets, base, config)
    print(format_table(evaluation))
    print("\n".join(baseline_gaps(evaluation)))
    if stored and stored.get("out_of_domain"):
        print("\nOut-of-domain checks, from the training run (heads train recomputes them):")
        print(out_of_domain_table(stored["out_of_domain"]))
    if args.update_card:
        metrics = (stored or {"training": asdict(config)}) | {"evaluation": evaluation}
        stored_path.write_text(json.dumps(metrics, indent=2) + "\n")
        (heads_dir / CARD_FILE).write_text(render_model_card(heads.config, metrics))
        print(f"Wrote {stored_path} and {heads_dir / CARD_FILE} from this run")
        return 0
    if stored is None:
        print(f"No {METRICS_FILE} in {heads_dir} to compare with.")
        return 0
    mismatches = compare_metrics(stored["evaluation"], evaluation)
    for line in mismatches:
        print("MISMATCH " + line)
    print(f"{'All numbers match' if not mismatches else 'Numbers differ from'} {stored_path}")
    return 1 if mismatches else 0


def cmd_heads_experiment(args: argparse.Namespace, settings: Settings) -> int:
    from models.data import CONSTRAINTS
    from models.experiments import run_variants, variants_page
    from models.train import TrainConfig, prepare_datasets

    config = TrainConfig(max_epochs=args.max_epochs)
    base = _load_base(settings, config.dtype)
    datasets = prepare_datasets(base, Path(args.data_dir), config, settings.cache_dir / "hidden")
    names = args.variants.split(",") if args.variants else None
    results = run_variants(datasets, base, config, [int(layer) for layer in args.layers.split(",")], names)
    output = Path(args.output).with_suffix(".md")
    output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    output.write_text(variants_page(results, list(CONSTRAINTS), "tracehead heads experiment " + " ".join(sys.argv[3:])))
    print(output.read_text())
    print(f"Wrote {output} and {output.with_suffix('.json')}")
    return 0


def compare_metrics(stored: dict, measured: dict) -> list[str]:
    """List every reported number that differs by more than METRIC_TOLERANCE."""
    from models.report import report_rows

    measured_rows = {(c, s, m): metrics for c, s, _, m, metrics in report_rows(measured)}
    mismatches = []
    for constraint, source, _, method, metrics in report_rows(stored):
        now = measured_rows.get((constraint, source, method), {})
        for name, value in metrics.items():
            if value is None or name == "threshold":
                continue
            if now.get(name) is None or abs(now[name] - value) > METRIC_TOLERANCE:
                mismatches.append(f"{constraint} {source} {method} {name}: stored {value}, measured {now.get(name)}")
    return mismatches


def cmd_score(args: argparse.Namespace, settings: Settings) -> int:
    """Judge a supplied response without generating, and commit the judgment to the audit store."""
    import time
    import uuid
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from server.generation import finished_record, prepare_score
    from server.records import generation_body
    from server.runtime import load_model
    from server.schemas import ScoreRequest
    from server.store import AuditStore, create_engine_for, upgrade_database
    from server.worker import GenerationResult

    messages = json.loads(Path(args.messages).read_text()) if args.messages else None
    try:
        body = ScoreRequest(prompt=args.prompt, messages=messages, response=args.response,
                            end_of_turn=not args.no_end_of_turn, metadata=dict(args.metadata or []))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise ValueError(f"invalid input: {problems}") from None
    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    model = load_model(settings)

    created_at, started = datetime.now(timezone.utc), time.perf_counter()
    prompt_ids, output_ids = model.encode_response(body.prompt, messages, body.response, body.end_of_turn)
    prompt_trace, output_trace = model.score(prompt_ids, output_ids)
    result = GenerationResult(prompt_trace, output_trace, "", "supplied", None, 0.0,
                              (time.perf_counter() - started) * 1000)
    prepared = prepare_score(f"cli-{uuid.uuid4().hex}", created_at, body, messages, prompt_ids)
    scorer = SimpleNamespace(model=model, heads_fingerprint=model.heads.fingerprint())
    record = finished_record(scorer, prepared, result, output=body.response)
    AuditStore(engine).save(record)
    rendered = generation_body(record, include_trace=args.trace)
    print(json.dumps(rendered, indent=2))
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from server.store import create_engine_for, database_revision, upgrade_database

    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    print(f"Database {engine.url.render_as_string()} is at revision {database_revision(engine)}")
    return 0


def cmd_settings(args: argparse.Namespace, settings: Settings) -> int:
    from server.settings import environment_table, replace_environment_table

    if args.write_readme is None:
        print(environment_table(), end="")
        return 0
    readme = Path(args.write_readme)
    readme.write_text(replace_environment_table(readme.read_text()))
    print(f"Wrote the environment table to {readme}")
    return 0


def _aware_datetime(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an ISO 8601 time, e.g. 2026-12-04T00:00:00Z") from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no timezone; add one, e.g. {value}Z")
    return parsed


def _metadata_pair(value: str) -> tuple[str, str]:
    key, separator, expected = value.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE, e.g. team=docs")
    return key, expected


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of at least 1")
    return int(value)


def _audit_filters() -> argparse.ArgumentParser:
    """Build the parent parser of the filters that every `audit` command over judgments takes."""
    from server.store.repository import JUDGMENT_ORDERS, JUDGMENT_STATUSES

    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--since", type=_aware_datetime, help="created at or after this time (ISO 8601 with zone)")
    filters.add_argument("--until", type=_aware_datetime, help="created before this time (ISO 8601 with zone)")
    filters.add_argument("--constraint", help="the constraint whose verdict --min-score, --max-score, --passed and "
                         "--failed filter")
    filters.add_argument("--min-score", type=float, help="lowest final score of --constraint, inclusive")
    filters.add_argument("--max-score", type=float, help="highest final score of --constraint, inclusive")
    outcome = filters.add_mutually_exclusive_group()
    outcome.add_argument("--passed", dest="passed", action="store_const", const=True,
                         help="only judgments whose --constraint verdict passed")
    outcome.add_argument("--failed", dest="passed", action="store_const", const=False,
                         help="only judgments whose --constraint verdict failed")
    filters.add_argument("--flagged", action=argparse.BooleanOptionalAction,
                         help="only flagged judgments, or with --no-flagged only unflagged ones")
    filters.add_argument("--kind", choices=("generation", "score"))
    filters.add_argument("--status", choices=JUDGMENT_STATUSES)
    filters.add_argument("--model", help="base model name, matched exactly")
    filters.add_argument("--heads", help="head checkpoint name, matched exactly")
    filters.add_argument("--metadata", type=_metadata_pair, action="append", metavar="KEY=VALUE",
                         help="a pair stored with the judgment; repeat it to require several")
    filters.add_argument("--text", help="case-insensitive substring of the output or of the prompt as JSON text")
    filters.add_argument("--order", choices=JUDGMENT_ORDERS, default="newest",
                         help="by creation time (default: newest)")
    return filters


def _audit_query(args: argparse.Namespace, settings: Settings, constraints: list[str]) -> JudgmentQuery:
    """Build the query of the filter arguments, rejecting what the HTTP API rejects too."""
    from server.store import JudgmentQuery

    if args.constraint is not None and args.constraint not in constraints:
        raise ValueError(f"unknown constraint {args.constraint!r}; the heads in {settings.heads_path} score "
                         f"{', '.join(constraints)}")
    metadata = dict(args.metadata or [])
    if len(metadata) < len(args.metadata or []):
        raise ValueError("a --metadata key is given twice; a judgment stores one value per key, so give each key once")
    return JudgmentQuery(since=args.since, until=args.until, constraint=args.constraint, min_score=args.min_score,
                         max_score=args.max_score, passed=args.passed, flagged=args.flagged, kind=args.kind,
                         status=args.status, model=args.model, heads=args.heads, metadata=metadata, text=args.text,
                         order=args.order)


def _open_audit_store(settings: Settings) -> AuditStore:
    """Open the existing audit store for reading. Raise unless it is at the newest revision, and never create one."""
    from sqlalchemy.engine import make_url

    from server.store import AuditStore, create_engine_for, database_revision, head_revision

    url = make_url(settings.resolved_database_url)
    database = url.database or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:"):
        if not Path(database).expanduser().exists():
            raise FileNotFoundError(f"no audit database at {database}; set TRACEHEAD_DATA_DIR or "
                                    "TRACEHEAD_DATABASE_URL to the store that the server writes")
    engine = create_engine_for(settings.resolved_database_url)
    revision, head = database_revision(engine), head_revision()
    if revision != head:
        raise RuntimeError(f"the audit database {engine.url.render_as_string()} is at revision {revision}, and this "
                           f"tracehead reads revision {head}; run `tracehead db upgrade` first")
    return AuditStore(engine)


def _heads_constraints(settings: Settings) -> list[str]:
    """Return the constraints of the configured heads, in the order that the server lists verdicts."""
    from models.heads import read_heads_config

    return read_heads_config(settings.heads_path).constraints


def cmd_audit_query(args: argparse.Namespace, settings: Settings) -> int:
    """Print the matching judgments as list items, one JSON object per line."""
    from server.export import jsonl_lines

    constraints = _heads_constraints(settings)
    query = _audit_query(args, settings, constraints)
    store = _open_audit_store(settings)
    # Batches of 500 rows at most, as export() reads by default, and never more rows than are printed.
    records = itertools.islice(store.export(query, batch_size=min(args.limit, 500)), args.limit)
    sys.stdout.writelines(jsonl_lines(records, constraints, include_trace=False))
    return 0


def cmd_audit_export(args: argparse.Namespace, settings: Settings) -> int:
    """Stream every matching judgment as JSON Lines or CSV to a file or stdout."""
    from server.export import export_lines

    if args.include_trace and args.format == "csv":
        raise ValueError("--include-trace applies to --format jsonl only, because a CSV row has no trace column")
    constraints = _heads_constraints(settings)
    query = _audit_query(args, settings, constraints)
    store = _open_audit_store(settings)
    lines = export_lines(store.export(query, with_trace=args.include_trace), args.format, constraints,
                         args.include_trace)
    if args.output is None:
        sys.stdout.writelines(lines)
        return 0

    # newline="" keeps the CSV rows' CRLF line ends as they are.
    with open(args.output, "w", encoding="utf-8", newline="") as output:
        line_count = 0
        for line in lines:
            output.write(line)
            line_count += 1
    judgments = line_count - 1 if args.format == "csv" else line_count
    print(f"Wrote {judgments} judgments to {args.output}")
    return 0


def _add_audit_commands(commands: argparse._SubParsersAction) -> None:
    """Add `tracehead audit`: query, export, and the integrity log's verify, erase and retain.

    A new audit command is added to ``actions`` here, directly or by a function
    that takes ``actions``, with its handler set by set_defaults(handler=...).
    parents=[filters] gives it the judgment filters.
    """
    from server.audit_cli import add_integrity_commands
    from server.export import EXPORT_FORMATS

    audit = commands.add_parser("audit", help="query, export and verify the audit store")
    actions = audit.add_subparsers(dest="action", required=True)
    filters = _audit_filters()

    query = actions.add_parser("query", parents=[filters], help="print matching judgments as JSON lines")
    query.add_argument("--limit", type=_positive_int, default=20, help="maximum number of judgments to print (default: 20)")
    query.set_defaults(handler=cmd_audit_query)

    export = actions.add_parser("export", parents=[filters], help="stream every matching judgment as JSONL or CSV")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="jsonl", help="output format (default: jsonl)")
    export.add_argument("--output", help="file to write (default: stdout)")
    export.add_argument("--include-trace", action="store_true", help="jsonl only: add each judgment's stored trace")
    export.set_defaults(handler=cmd_audit_export)

    add_integrity_commands(actions)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracehead", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server (fetches the default model if missing)")
    serve.add_argument("--host", help="bind address (default: TRACEHEAD_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default: TRACEHEAD_PORT or 8000)")
    serve.set_defaults(handler=cmd_serve)

    models = commands.add_parser("models", help="manage base models").add_subparsers(dest="action", required=True)
    fetch = models.add_parser("fetch", help="download and convert the default model; does nothing if present")
    fetch.add_argument("--cache-dir", help="directory for converted models (default: TRACEHEAD_CACHE_DIR/models)")
    fetch.set_defaults(handler=cmd_models_fetch)

    heads = commands.add_parser("heads", help="train and evaluate constraint heads").add_subparsers(dest="action", required=True)
    train = heads.add_parser("train", help="train heads on the labelled data sets and write a checkpoint")
    train.add_argument("--data-dir", required=True, help="directory holding the labelled data sets")
    train.add_argument("--output", required=True, help="checkpoint directory to write")
    train.add_argument("--name", help="checkpoint name recorded with judgments (default: the output folder's name)")
    train.add_argument("--layers", help="comma-separated candidate tap layers, e.g. 6,10,14")
    train.add_argument("--max-epochs", type=int, help="epochs on the chosen tap layer")
    train.add_argument("--threshold-target", default="balanced_accuracy",
                       help="what thresholds maximise on dev: balanced_accuracy, accuracy, or precision:P (e.g. precision:0.9)")
    train.set_defaults(handler=cmd_heads_train)
    evaluate = heads.add_parser("eval", help="score a checkpoint and three baselines on the test split")
    evaluate.add_argument("--data-dir", required=True, help="directory holding the labelled data sets")
    evaluate.add_argument("--heads", help="checkpoint directory (default: TRACEHEAD_HEADS_PATH)")
    evaluate.add_argument("--update-card", action="store_true",
                          help="write this run's numbers into metrics.json and MODEL_CARD.md instead of comparing")
    evaluate.set_defaults(handler=cmd_heads_eval)

    experiment = heads.add_parser("experiment", help="train and score every head recipe variant on the same data")
    experiment.add_argument("--data-dir", required=True, help="directory holding the labelled data sets")
    experiment.add_argument("--output", required=True, help="results page NAME.md; the JSON goes beside it as NAME.json")
    experiment.add_argument("--layers", default="14", help="tap layers of every variant that does not set its own")
    experiment.add_argument("--variants", help="comma-separated variant names (default: all)")
    experiment.add_argument("--max-epochs", type=int, default=6, help="epochs per variant; the best dev epoch is kept")
    experiment.set_defaults(handler=cmd_heads_experiment)

    score = commands.add_parser("score", help="judge a supplied response without generating and log the judgment")
    source = score.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the raw prompt the response answered")
    source.add_argument("--messages", help="JSON file with the chat messages the response answered")
    score.add_argument("--response", required=True, help="the response to judge")
    score.add_argument("--no-end-of-turn", action="store_true", help="the response was cut off, so no end-of-turn token")
    score.add_argument("--metadata", nargs=2, action="append", metavar=("KEY", "VALUE"), help="stored with the judgment")
    score.add_argument("--trace", action="store_true", help="print the per-token trace too")
    score.set_defaults(handler=cmd_score)

    db = commands.add_parser("db", help="manage the audit database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply every pending migration")
    upgrade.set_defaults(handler=cmd_db_upgrade)

    settings = commands.add_parser("settings", help="print every TRACEHEAD_* variable as a Markdown table")
    settings.add_argument("--write-readme", metavar="PATH", help="replace the table between the markers in PATH")
    settings.set_defaults(handler=cmd_settings)

    _add_audit_commands(commands)
    add_keys_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as exc:
        # One line per invalid setting, without the received values, which may be secrets.
        for error in exc.errors():
            name = "TRACEHEAD_" + "_".join(str(part) for part in error["loc"]).upper() if error["loc"] else "settings"
            print(f"error: {name}: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, settings.log_format)
    try:
        return args.handler(args, settings)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        logger.debug("Command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
