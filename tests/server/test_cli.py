from models.heads import save_checkpoint
from server.cli import main
from server.store import create_engine_for, database_revision, head_revision
from tests.conftest import build_tiny_base, build_tiny_heads


def test_db_upgrade_reaches_head(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACEHEAD_DATA_DIR", str(tmp_path))

    assert main(["db", "upgrade"]) == 0

    engine = create_engine_for(f"sqlite:///{tmp_path / 'tracehead.db'}")
    assert database_revision(engine) == head_revision()
    assert f"revision {head_revision()}" in capsys.readouterr().out


def test_serve_rejects_mismatched_heads(tmp_path, monkeypatch, capsys):
    base = build_tiny_base()
    base.model.save_pretrained(tmp_path / "model")
    base.tokenizer.save_pretrained(tmp_path / "model")
    heads = build_tiny_heads(base)
    heads.config.base_fingerprint = "sha256:" + "0" * 64
    save_checkpoint(tmp_path / "heads", heads)
    monkeypatch.setenv("TRACEHEAD_MODEL", str(tmp_path / "model"))
    monkeypatch.setenv("TRACEHEAD_HEADS_PATH", str(tmp_path / "heads"))

    assert main(["serve", "--port", "1"]) == 2

    error = capsys.readouterr().err
    assert "sha256:" + "0" * 64 in error
    assert base.fingerprint in error
    assert "tracehead heads train" in error


def test_models_fetch_reports_present_model(tmp_path, capsys):
    target = tmp_path / "SmolLM2-135M-Instruct"
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tracehead-fingerprint.json"):
        (target / name).write_text("{}")

    assert main(["models", "fetch", "--cache-dir", str(tmp_path)]) == 0

    assert "already present" in capsys.readouterr().out


def test_invalid_setting_prints_one_line_without_its_value(monkeypatch, capsys):
    monkeypatch.setenv("TRACEHEAD_MODE", "production")
    monkeypatch.setenv("TRACEHEAD_AUTH", "none")
    monkeypatch.setenv("TRACEHEAD_PORT", "not-a-port")

    assert main(["db", "upgrade"]) == 2

    err = capsys.readouterr().err
    assert "error: TRACEHEAD_PORT: Input should be a valid integer" in err
    assert "not-a-port" not in err
    assert "Traceback" not in err
