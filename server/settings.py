"""Server settings: one class, read from TRACEHEAD_* environment variables."""

from __future__ import annotations

import ipaddress
import json
import os
from functools import cached_property
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.base import DEFAULT_MODEL_NAME
from models.runner import preferred_dtype
from server.policy import Policy

BUNDLED_HEADS = Path(__file__).resolve().parent.parent / "models" / "default_heads"


def _xdg_dir(variable: str, fallback: str) -> Path:
    return Path(os.environ.get(variable) or Path.home() / fallback) / "tracehead"


class Settings(BaseSettings):
    """Every tunable of the server. Defaults run on a laptop: CPU, SQLite, the bundled model."""

    model_config = SettingsConfigDict(env_prefix="TRACEHEAD_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port of the HTTP server.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level of the server.")
    log_format: Literal["text", "json"] = Field("text", description=(
        "Log line format: text, or json with one object per line (time, level, logger, message, request_id, "
        "judgment_id)."))
    trusted_proxies: list[str] = Field(default_factory=list, description=(
        "IP addresses or CIDR networks of proxies whose X-Forwarded-For, X-Forwarded-Proto and "
        'X-Forwarded-Prefix headers, and gateway identity headers (TRACEHEAD_GATEWAY_*_HEADER), are honoured, as JSON, '
        'e.g. ["10.0.0.0/8"]; other peers\' are ignored.'))
    root_path: str = Field("", description="URL prefix the app is served under, e.g. /tracehead; empty for none.")

    model: str = Field(DEFAULT_MODEL_NAME, description=(
        "Base model: the bundled default's name (fetched into the cache dir on first use), "
        "a transformers causal-LM directory, or a hub id."))
    heads_path: Path = Field(BUNDLED_HEADS, description="Head checkpoint directory trained for the base model.",
                             json_schema_extra={"default_doc": "the bundled `models/default_heads`"})
    cache_dir: Path = Field(default_factory=lambda: _xdg_dir("XDG_CACHE_HOME", ".cache"),
                            description="Where the default model and cached hidden states are stored.",
                            json_schema_extra={"default_doc": "`~/.cache/tracehead`"})
    data_dir: Path = Field(default_factory=lambda: _xdg_dir("XDG_DATA_HOME", ".local/share"),
                           description="Where the SQLite audit database and the signing key live.",
                           json_schema_extra={"default_doc": "`~/.local/share/tracehead`"})
    database_url: str | None = Field(None, description=(
        "SQLAlchemy URL of the audit store, e.g. postgresql+psycopg://user:password@host/db."),
        json_schema_extra={"default_doc": "SQLite `tracehead.db` in the data dir"})

    device: str = Field("auto", description="Torch device: auto (cuda when torch sees a GPU, else cpu), cpu, cuda "
                                              "or cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Base model precision. auto picks bfloat16 on CUDA and on CPUs with AMX, and float32 on other CPUs, "
        "where bfloat16 results change with the batch a request runs in."))
    threads: int | None = Field(None, ge=1, description="Torch CPU threads of the generation worker.",
                                json_schema_extra={"default_doc": "torch's default"})

    max_batch_size: int = Field(16, ge=1, description=(
        "Requests decoded together in one batch; more wait in the queue and join as others finish."))
    max_batch_tokens: int = Field(16384, ge=1, description=(
        "Key/value cache positions the batch may hold: rows x the longest row's prompt plus max_tokens. "
        "A request that would exceed it waits; one that exceeds it alone runs when the batch is empty."))
    max_queue: int = Field(16, ge=1, description="Requests waiting to join the batch before new ones get 429.")
    queue_retry_after_s: int = Field(2, ge=1, description="Retry-After seconds sent with a 429.")
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request leaves it out.")
    max_prompt_tokens: int | None = Field(None, ge=1, description=(
        "Longest prompt in tokens (after the chat template) that a request may send; a longer one gets 400."),
        json_schema_extra={"default_doc": "the model's context length"})
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1, description=(
        "Largest request body in bytes; a larger one gets 413 before it is parsed."))
    shutdown_grace_s: int = Field(30, ge=0, description=(
        "Seconds that in-flight requests get to finish after SIGTERM; generations still running then are "
        "cancelled."))
    top_k_attention: int = Field(5, ge=1, le=64, description="Attended positions kept per token and constraint.")
    signing_key_file: Path | None = Field(None, description=(
        "PEM Ed25519 private key that signs the integrity log's tree heads; created on first start if missing. "
        "Replicas sharing one database must share this key."),
        json_schema_extra={"default_doc": "`signing-key.pem` in the data dir"})
    tree_head_interval_s: float = Field(60.0, gt=0, description="Seconds between signed tree heads while the log grows.")
    retention_days: int | None = Field(None, ge=1, description=(
        "`tracehead audit retain` erases the payloads of judgments older than this many days."),
        json_schema_extra={"default_doc": "unset: payloads are kept"})
    mode: Literal["development", "production"] = Field("development", description=(
        "production refuses unsafe settings, such as auth none."))
    auth: Literal["keys", "none"] | None = Field(None, description=(
        "keys: every request needs an API key (`tracehead keys create`) or a trusted gateway's identity; "
        'none: every request acts as tenant "default" with every scope.'),
        json_schema_extra={"default_doc": "`none` in development, `keys` in production"})
    max_concurrent_per_key: int = Field(4, ge=1, description=(
        "Requests one API key or gateway consumer may have in progress; more get 429."))
    gateway_consumer_header: str = Field("X-Consumer-ID", description="Header with a trusted gateway's consumer id.")
    gateway_tenant_header: str = Field("X-Tenant-ID", description="Header with that consumer's tenant.")
    gateway_scopes_header: str = Field("X-Consumer-Scopes", description=(
        "Header with that consumer's scopes, comma-separated, e.g. generate,audit:read."))
    policy: Policy = Field(default_factory=dict, description=(
        'Default constraint policy as JSON, e.g. {"reciprocity": {"min_score": 0.3, "action": "flag"}}; '
        "a request's policy replaces the rules of the constraints it names. The server refuses to start if "
        "it names a constraint the heads do not score."),
        json_schema_extra={"default_doc": "none"})

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies entry {entry!r} is not an IP address or CIDR network, "
                                 "e.g. 10.0.0.7 or 10.0.0.0/8") from None
        return value

    @field_validator("root_path")
    @classmethod
    def _check_root_path(cls, value: str) -> str:
        if value and (not value.startswith("/") or value.endswith("/")):
            raise ValueError(f"root_path must start with / and not end with one, e.g. /tracehead; got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _check_auth(self) -> Settings:
        if self.auth is None:
            self.auth = "keys" if self.mode == "production" else "none"
        if self.mode == "production" and self.auth == "none":
            raise ValueError("TRACEHEAD_AUTH=none lets anyone call every route, so TRACEHEAD_MODE=production "
                             "rejects it; set TRACEHEAD_AUTH=keys, or TRACEHEAD_MODE=development on a laptop")
        return self

    @cached_property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"TRACEHEAD_DEVICE={self.device} but torch sees no CUDA device; "
                             "install a CUDA build of torch or set TRACEHEAD_DEVICE=cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return preferred_dtype(self.torch_device) if self.dtype == "auto" else getattr(torch, self.dtype)

    @cached_property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(entry, strict=False) for entry in self.trusted_proxies]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tracehead.db'}"

    @property
    def resolved_signing_key_file(self) -> Path:
        return self.signing_key_file or self.data_dir / "signing-key.pem"

    @property
    def uses_default_model(self) -> bool:
        return self.model == DEFAULT_MODEL_NAME

    @property
    def model_path(self) -> str:
        """What to load: the converted default model's directory, or ``model`` as given."""
        if self.uses_default_model:
            return str(self.cache_dir / "models" / DEFAULT_MODEL_NAME)
        return self.model


ENVIRONMENT_TABLE_START = "<!-- settings-table:start (generated by `tracehead settings --write-readme README.md`) -->"
ENVIRONMENT_TABLE_END = "<!-- settings-table:end -->"


def environment_table() -> str:
    """Render every setting as a Markdown table row (variable, values, default, meaning) in declaration order."""
    rows = ["| variable | values | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        variable = Settings.model_config["env_prefix"] + name.upper()
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{variable}` | {_values_text(field)} | {_default_text(field)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _values_text(field) -> str:
    """Describe what a variable accepts: the choices of a Literal, else the type with its bounds."""
    annotation = field.annotation
    if get_origin(annotation) in (Union, UnionType):
        annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
    if get_origin(annotation) is Literal:
        return ", ".join(f"`{choice}`" for choice in get_args(annotation))
    kind = {int: "integer", float: "number", str: "text", Path: "path", list: "JSON list",
            dict: "JSON object"}[get_origin(annotation) or annotation]
    bounds = [f"{symbol} {getattr(rule, attribute)}" for rule in field.metadata
              for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤")) if hasattr(rule, attribute)]
    return f"{kind} {', '.join(bounds)}" if bounds else kind


def _default_text(field) -> str:
    """Format a default for the table: a documented phrase where it depends on the machine, else the value."""
    documented = (field.json_schema_extra or {}).get("default_doc")
    if documented:
        return documented
    default = field.get_default(call_default_factory=True)
    if default == "":
        return "empty"
    return f"`{json.dumps(default) if isinstance(default, (list, dict)) else default}`"


def replace_environment_table(readme: str) -> str:
    """Return ``readme`` with the text between the table markers replaced by a fresh table."""
    start, end = readme.find(ENVIRONMENT_TABLE_START), readme.find(ENVIRONMENT_TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {ENVIRONMENT_TABLE_START} ... {ENVIRONMENT_TABLE_END} block")
    head = readme[:start + len(ENVIRONMENT_TABLE_START)]
    return f"{head}\n{environment_table()}{readme[end:]}"
