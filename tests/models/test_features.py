import torch

from models.features import extract_hidden_states, frame_text
from tests.conftest import build_tiny_base

TEXTS = ["The capital of France is Paris.", "Cats are mammals.", "Why?"]


def test_frame_marks_text_and_turn_end(tiny_base):
    framed = frame_text(tiny_base.tokenizer, "Cats are mammals.")
    tokens = tiny_base.tokenizer.convert_ids_to_tokens(framed.input_ids)
    assert tokens[framed.turn_end] == "<|im_end|>"
    assert framed.turn_end == framed.text_end + 1 == len(framed.input_ids) - 1
    assert tiny_base.tokenizer.decode(framed.input_ids[:framed.text_end + 1]).endswith("Cats are mammals.")


def test_extraction_equals_full_forward(tiny_base):
    framed = [frame_text(tiny_base.tokenizer, text) for text in TEXTS]
    states = extract_hidden_states(tiny_base, framed, [1, 2], batch_size=2)
    for index, item in enumerate(framed):
        with torch.inference_mode():
            full = tiny_base.model.base_model(input_ids=torch.tensor([item.input_ids]), output_hidden_states=True)
        for layer in (1, 2):
            assert torch.allclose(states.sequence(layer, index), full.hidden_states[layer][0], atol=1e-5)
    assert len(tiny_base.model.base_model.layers) == tiny_base.num_layers


def test_cache_round_trip(tmp_path):
    base = build_tiny_base()
    framed = [frame_text(base.tokenizer, text) for text in TEXTS]
    first = extract_hidden_states(base, framed, [2], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("hidden-*.pt"))) == 1
    second = extract_hidden_states(base, framed, [2], cache_dir=tmp_path)
    assert torch.equal(first.layers[2], second.layers[2])
    assert first.offsets == second.offsets
