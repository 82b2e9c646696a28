"""Device and precision selection, the batching limits, and the environment table the README shows."""

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from server.settings import Settings, environment_table, replace_environment_table


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def cpu_bfloat16(monkeypatch, supported: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: supported, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: supported, raising=False)


def test_auto_device_is_cpu_without_a_gpu(no_gpu):
    assert Settings().torch_device == torch.device("cpu")


def test_auto_device_is_cuda_with_a_gpu(gpu):
    settings = Settings()

    assert settings.torch_device == torch.device("cuda")
    assert settings.torch_dtype == torch.bfloat16


def test_numbered_gpu_is_kept(gpu):
    assert Settings(device="cuda:1").torch_device == torch.device("cuda:1")


def test_cuda_without_a_gpu_says_what_to_do(no_gpu):
    with pytest.raises(ValueError, match="TRACEHEAD_DEVICE=cuda but torch sees no CUDA device"):
        Settings(device="cuda").torch_device


def test_unknown_device_is_rejected():
    with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        Settings(device="gpu")


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_follows_bfloat16_instructions(no_gpu, monkeypatch, supported, expected):
    cpu_bfloat16(monkeypatch, supported)

    assert Settings().torch_dtype == expected


def test_explicit_dtype_wins_over_auto(no_gpu, monkeypatch):
    cpu_bfloat16(monkeypatch, True)

    assert Settings(dtype="float32").torch_dtype == torch.float32


@pytest.mark.parametrize("field", ["max_batch_size", "max_batch_tokens", "max_queue"])
def test_batching_limits_must_be_positive(field):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: 0})


def test_readme_environment_table_matches_settings():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()

    assert replace_environment_table(readme) == readme, (
        "README.md's environment table differs from server/settings.py; "
        "run `.venv/bin/tracehead settings --write-readme README.md`")


def test_environment_table_rows_per_setting():
    rows = environment_table().splitlines()[2:]

    assert [row.split(" | ")[0].strip("| `") for row in rows] == [
        "TRACEHEAD_" + name.upper() for name in Settings.model_fields]
    by_name = {row.split(" | ")[0].strip("| `"): row.split(" | ") for row in rows}
    assert by_name["TRACEHEAD_PORT"][1:3] == ["integer ≥ 1, ≤ 65535", "`8000`"]
    assert by_name["TRACEHEAD_LOG_FORMAT"][1] == "`text`, `json`"
    assert by_name["TRACEHEAD_THREADS"][1:3] == ["integer ≥ 1", "torch's default"]
    assert by_name["TRACEHEAD_ROOT_PATH"][2] == "empty"


def test_replacing_the_table_needs_both_markers():
    with pytest.raises(ValueError, match="settings-table:start"):
        replace_environment_table("# a README without the table\n")
