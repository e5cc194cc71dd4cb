"""Attention maps against transformers' own attention weights, and the PNG they make."""

import matplotlib.image
import pytest
import torch

from conftest import assert_rel_close
from functional_gpt import UserError, init_params, load_params, preset
from functional_gpt.interp.attention_map import attention_maps, draw_attention, plot_attention


def test_attention_maps_equal_transformers_attentions(hf_tiny):
    model, directory = hf_tiny
    params, config = load_params(directory)
    tokens = torch.randint(128, (12,), generator=torch.Generator().manual_seed(0))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        theirs = torch.stack(model(tokens[None], output_attentions=True).attentions)[:, 0]
    ours = attention_maps(params, tokens, config)
    assert ours.shape == (config.n_layer, config.n_head, 12, 12)
    assert_rel_close(ours, theirs, 1e-5)
    uniform = torch.ones(12, 12).tril() / torch.arange(1, 13)[:, None]  # what zero queries and keys give
    assert (theirs - uniform).abs().amax((-1, -2)).min() > 0.1  # trained-like weights (conftest): every head attends


def test_plot_writes_a_png_grid(tmp_path):
    probs = torch.rand(3, 5, 6, 6).softmax(-1)
    plot_attention(probs, list("abcdef"), tmp_path / "a.png")
    image = matplotlib.image.imread(tmp_path / "a.png")
    height, width = image.shape[:2]
    assert width > height  # 5 heads across, 3 layers down
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temp file left


def test_draw_attention_from_text(tmp_path):
    config = preset("cpu-tiny")
    params = init_params(config, seed=0)
    assert draw_attention(params, "Hello there, world", config, tmp_path / "m.png") == 4
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="--prompt"):
        draw_attention(params, "", config, tmp_path / "e.png")
    with pytest.raises(UserError, match="--out"):
        draw_attention(params, "hi", config, tmp_path / "m.jpg")
