"""The `tracehead` command: serve, fetch the default model, train and evaluate heads, migrate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from server.settings import Settings

logger = logging.getLogger(__name__)

# Reported numbers are rounded to 4 places; eval counts a larger gap as a mismatch.
METRIC_TOLERANCE = 0.002


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from server.app import create_app
    from server.runtime import load_model

    # Loading before uvicorn starts turns a missing model or mismatched heads into a one-line error.
    model = load_model(settings)
    uvicorn.run(create_app(settings, model), host=args.host or settings.host, port=args.port or settings.port,
                workers=1, log_level=settings.log_level)
    return 0


def cmd_models_fetch(args: argparse.Namespace, settings: Settings) -> int:
    from models.base import fetch_default_model

    cache_dir = Path(args.cache_dir) if args.cache_dir else settings.cache_dir / "models"
    fetch_default_model(cache_dir, progress=print)
    return 0


def _load_base(settings: Settings):
    from models.base import load_base_model
    from server.runtime import ensure_default_model

    ensure_default_model(settings)
    return load_base_model(settings.model_path, settings.torch_device, settings.torch_dtype)


def cmd_heads_train(args: argparse.Namespace, settings: Settings) -> int:
    from models.card import render_model_card
    from models.heads import save_checkpoint
    from models.train import TrainConfig, run_training

    config = TrainConfig()
    if args.layers:
        config.candidate_layers = [int(layer) for layer in args.layers.split(",")]
    if args.max_epochs:
        config.max_epochs = args.max_epochs
    base = _load_base(settings)
    heads, metrics = run_training(base, Path(args.data_dir), config, settings.cache_dir / "hidden")
    heads.config.name = args.name or Path(args.output).name
    save_checkpoint(Path(args.output), heads, metrics, render_model_card(heads.config, metrics))
    print(format_metrics(metrics))
    print(f"Wrote head checkpoint to {args.output}")
    return 0


def cmd_heads_eval(args: argparse.Namespace, settings: Settings) -> int:
    from models.heads import METRICS_FILE, load_checkpoint
    from models.train import TrainConfig, evaluate_checkpoint, prepare_datasets

    heads_dir = Path(args.heads) if args.heads else settings.heads_path
    base = _load_base(settings)
    heads = load_checkpoint(heads_dir, base.fingerprint)
    stored_path = heads_dir / METRICS_FILE
    stored = json.loads(stored_path.read_text()) if stored_path.exists() else None
    config = TrainConfig(**stored["training"]) if stored else TrainConfig()

    datasets = prepare_datasets(base, Path(args.data_dir), config, settings.cache_dir / "hidden")
    metrics = evaluate_checkpoint(heads, datasets)
    print(format_metrics(metrics))
    if stored is None:
        print(f"No {METRICS_FILE} in {heads_dir} to compare with.")
        return 0
    mismatches = compare_metrics(stored, metrics)
    for line in mismatches:
        print("MISMATCH " + line)
    print(f"{'All numbers match' if not mismatches else 'Numbers differ from'} {stored_path}")
    return 1 if mismatches else 0


def format_metrics(metrics: dict) -> str:
    """Render the per-constraint table of heads versus the linear-probe baseline."""
    lines = [f"Test split, tap layer {metrics['tap_layer']}",
             f"{'constraint':<16}{'n':>6}{'heads AUROC':>13}{'heads acc':>11}{'probe AUROC':>13}{'probe acc':>11}"]
    for constraint, entry in metrics["constraints"].items():
        heads, probe = entry["heads"], entry["linear_probe"]
        lines.append(f"{constraint:<16}{entry['examples']:>6}{heads['auroc']:>13.4f}{heads['accuracy']:>11.4f}"
                     f"{probe['auroc']:>13.4f}{probe['accuracy']:>11.4f}")
        if "pairwise_accuracy" in heads:
            lines.append(f"{'  pairwise':<16}{'':>6}{heads['pairwise_accuracy']:>13.4f}{'':>11}"
                         f"{probe['pairwise_accuracy']:>13.4f}")
    return "\n".join(lines)


def compare_metrics(stored: dict, measured: dict) -> list[str]:
    """List every reported number that differs by more than METRIC_TOLERANCE."""
    mismatches = []
    for constraint, entry in stored["constraints"].items():
        for method in ("heads", "linear_probe"):
            for name, value in entry[method].items():
                now = measured["constraints"].get(constraint, {}).get(method, {}).get(name)
                if now is None or abs(now - value) > METRIC_TOLERANCE:
                    mismatches.append(f"{constraint} {method} {name}: stored {value}, measured {now}")
    return mismatches


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from server.store import create_engine_for, database_revision, upgrade_database

    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    print(f"Database {engine.url.render_as_string()} is at revision {database_revision(engine)}")
    return 0


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
    train.set_defaults(handler=cmd_heads_train)
    evaluate = heads.add_parser("eval", help="score a checkpoint and the linear-probe baseline on the test split")
    evaluate.add_argument("--data-dir", required=True, help="directory holding the labelled data sets")
    evaluate.add_argument("--heads", help="checkpoint directory (default: TRACEHEAD_HEADS_PATH)")
    evaluate.set_defaults(handler=cmd_heads_eval)

    db = commands.add_parser("db", help="manage the audit database").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="apply every pending migration")
    upgrade.set_defaults(handler=cmd_db_upgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings()
    _configure_logging(settings.log_level)
    try:
        return args.handler(args, settings)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        logger.debug("Command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
