import torch

from models.base import FINGERPRINT_FILE, fetch_default_model, default_model_dir, load_base_model
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
