import torch

import models.base as base_module
from models.base import FINGERPRINT_FILE, default_model_dir, fetch_default_model, load_base_model
from tests.conftest import build_tiny_base


def test_fingerprint_survives_save_and_load(tmp_path):
    base = build_tiny_base()
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path), torch.device("cpu"), torch.float32)
    assert loaded.fingerprint == base.fingerprint
    assert loaded.name == tmp_path.name


def test_fingerprint_taken_before_dtype_cast(tmp_path):
    base = build_tiny_base()
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    loaded = load_base_model(str(tmp_path), torch.device("cpu"), torch.bfloat16)
    assert loaded.fingerprint == base.fingerprint
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_fetch_skips_complete_directory(tmp_path):
    target = default_model_dir(tmp_path)
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", FINGERPRINT_FILE):
        (target / name).write_text("{}")
    messages = []
    assert fetch_default_model(tmp_path, progress=messages.append) == target
    assert messages == [f"Default model already present at {target}"]


def test_fetched_files_are_readable_by_other_users(tmp_path, monkeypatch):
    """A cache mounted into a container runs as another uid than the one that fetched it."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"")

    def convert(gguf_path, output_dir, progress):
        output_dir.mkdir()
        for name in ("config.json", "model.safetensors", FINGERPRINT_FILE):
            (output_dir / name).write_text("{}")
            (output_dir / name).chmod(0o600)  # as safetensors leaves the weights

    monkeypatch.setattr(base_module, "_download_gguf", lambda scratch_dir, progress: gguf)
    monkeypatch.setattr(base_module, "_convert_gguf", convert)
    target = fetch_default_model(tmp_path / "cache", progress=lambda message: None)

    assert {path.name: path.stat().st_mode & 0o777 for path in target.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644, FINGERPRINT_FILE: 0o644}
