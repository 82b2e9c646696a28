"""State of a running server: settings, the model, the worker and the audit store."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from sqlalchemy import Engine

from models.base import fetch_default_model, is_model_dir_complete, load_base_model
from models.decode import ConstraintModel
from models.heads import load_checkpoint
from server.observability import Metrics
from server.auth import KeySlots, log_auth_mode
from server.policy import check_policy
from server.settings import Settings
from server.store import AuditStore, create_engine_for, upgrade_database
from server.store.audit_log import IntegrityLog
from server.store.integrity import load_or_create_key
from server.store.keys import KeyStore
from server.worker import GenerationWorker

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    model: ConstraintModel
    heads_fingerprint: str
    worker: GenerationWorker
    engine: Engine
    store: AuditStore
    integrity: IntegrityLog
    keys: KeyStore
    key_slots: KeySlots = field(default_factory=KeySlots)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.metrics.watch_worker(self.worker)

    def close(self) -> None:
        self.worker.stop()
        self.engine.dispose()


def ensure_default_model(settings: Settings) -> None:
    """Fetch and convert the default model if the settings name it and it is missing."""
    if settings.uses_default_model and not is_model_dir_complete(Path(settings.model_path)):
        logger.info("Default model missing at %s; fetching it", settings.model_path)
        fetch_default_model(settings.cache_dir / "models", progress=logger.info)


def load_model(settings: Settings) -> ConstraintModel:
    """Load the base model and heads in a thread of its own that has ended when this returns.

    Torch's OpenMP runtime (libgomp) keeps a pool of threads for every thread
    that runs parallel operations. Once more pool threads exist than CPUs, it
    stops spinning between operations, and a decode step then waits for
    threads to wake: that doubled its time here. Loading in a passing thread
    leaves the generation worker's pool as the only one.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-loader") as loader:
        return loader.submit(_load_model, settings).result()


def _load_model(settings: Settings) -> ConstraintModel:
    if settings.threads:
        torch.set_num_threads(settings.threads)
    ensure_default_model(settings)
    base = load_base_model(settings.model_path, settings.torch_device, settings.torch_dtype)
    heads = load_checkpoint(settings.heads_path, base.fingerprint)
    return ConstraintModel(base, heads, settings.top_k_attention)


def build_runtime(settings: Settings, model: ConstraintModel | None = None) -> Runtime:
    """Open the store (migrating it and logging older judgments), load the model unless given, start the worker."""
    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    model = model or load_model(settings)
    check_policy(settings.policy, model.constraints, "TRACEHEAD_POLICY")
    integrity = IntegrityLog(engine, load_or_create_key(settings.resolved_signing_key_file))
    integrity.append_missing_leaves()
    keys = KeyStore(engine)
    log_auth_mode(settings, keys)
    worker = GenerationWorker(model, settings.max_queue, settings.queue_retry_after_s, settings.max_batch_size,
                              settings.max_batch_tokens, settings.threads)
    worker.start()
    return Runtime(settings, model, model.heads.fingerprint(), worker, engine, AuditStore(engine), integrity, keys)
