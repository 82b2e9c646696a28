import pytest
import torch

from models.heads import ConstraintHeads, HeadsConfig, HeadsMismatchError, load_checkpoint, save_checkpoint


def make_heads(seed: int = 0) -> ConstraintHeads:
    torch.manual_seed(seed)
    config = HeadsConfig(["a", "b", "c"], d_model=16, tap_layers=[1], d_head=4, heads_per_constraint=2,
                         base_model="base", base_fingerprint="sha256:base")
    return ConstraintHeads(config).eval().requires_grad_(False)


def test_forward_shapes_and_score_range():
    heads = make_heads()
    hidden_states = torch.randn(2, 7, 16)
    out = heads(hidden_states)
    assert out.constraint_logits.shape == (2, 7, 3)
    assert out.attention_weights.shape == (2, 3, 7, 7)
    scores = torch.sigmoid(out.constraint_logits)
    assert bool(((scores >= 0) & (scores <= 1)).all())


def test_attention_is_causal_and_normalised():
    out = make_heads()(torch.randn(1, 6, 16))
    weights = out.attention_weights[0]
    assert torch.allclose(weights.sum(-1), torch.ones(3, 6), atol=1e-6)
    future = torch.ones(6, 6, dtype=torch.bool).triu(diagonal=1)
    assert float(weights[:, future].abs().max()) == 0.0


def test_incremental_steps_equal_full_pass():
    heads = make_heads()
    hidden_states = torch.randn(1, 12, 16)
    full = heads(hidden_states)

    prefill = heads(hidden_states[:, :5])
    logits, cache = [prefill.constraint_logits], prefill.cache
    for position in range(5, 12):
        step = heads(hidden_states[:, position:position + 1], cache=cache)
        assert torch.allclose(step.attention_weights[0, :, 0], full.attention_weights[0, :, position, :position + 1],
                              atol=1e-5)
        logits.append(step.constraint_logits)
        cache = step.cache
    assert torch.allclose(torch.cat(logits, dim=1), full.constraint_logits, atol=1e-5)


def test_padding_does_not_change_real_positions():
    heads = make_heads()
    short, long = torch.randn(1, 4, 16), torch.randn(1, 7, 16)
    batch = torch.zeros(2, 7, 16)
    batch[0, :4], batch[1] = short[0], long[0]
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1] * 7])
    batched = heads(batch, attention_mask=mask).constraint_logits
    assert torch.allclose(batched[0, :4], heads(short).constraint_logits[0], atol=1e-5)
    assert torch.allclose(batched[1], heads(long).constraint_logits[0], atol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    heads = make_heads()
    save_checkpoint(tmp_path, heads, metrics={"constraints": {}}, model_card="# card\n")
    loaded = load_checkpoint(tmp_path, "sha256:base")
    hidden_states = torch.randn(1, 5, 16)
    assert torch.equal(loaded(hidden_states).constraint_logits, heads(hidden_states).constraint_logits)
    assert loaded.config == heads.config
    assert loaded.fingerprint() == heads.fingerprint()
    assert (tmp_path / "MODEL_CARD.md").read_text() == "# card\n"


def test_checkpoint_for_other_base_rejected(tmp_path):
    save_checkpoint(tmp_path, make_heads())
    with pytest.raises(HeadsMismatchError) as error:
        load_checkpoint(tmp_path, "sha256:other")
    assert "sha256:base" in str(error.value)
    assert "sha256:other" in str(error.value)
    assert "tracehead heads train" in str(error.value)


def test_missing_checkpoint_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="heads.json"):
        load_checkpoint(tmp_path / "absent")


def test_fingerprint_changes_with_weights():
    assert make_heads(0).fingerprint() == make_heads(0).fingerprint()
    assert make_heads(0).fingerprint() != make_heads(1).fingerprint()
