"""Head ablation and patching sweeps against transformers with the same patches through its
hooks; the logit lens and direct logit attribution against closed forms (the model's own
output, an exact sum); `fgpt lens` end to end and its bad input."""

import pytest
import torch

from conftest import TINY, assert_rel_close, hf_model, params_of
from functional_gpt import GPTConfig, UserError, forward, init_params, save_params
from functional_gpt.cli import main
from functional_gpt.interp.attention_map import token_label
from functional_gpt.interp.func import ensemble_logits, per_example_grads, stack_params
from functional_gpt.interp.hooks import run_with_cache, run_with_hooks
from functional_gpt.interp.lens import logit_attribution, logit_lens
from functional_gpt.interp.patching import ablate_heads, patch_sweep, plot_sweep

transformers = pytest.importorskip("transformers")
D = TINY.head_dim


@pytest.fixture(scope="module")
def pair():
    model = hf_model(TINY, seed=7)
    return model, params_of(model)


def _tokens(B=2, T=10, seed=0):
    return torch.randint(TINY.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _theirs_with_z(model, tokens, layer, edit):  # transformers' logits with c_proj's input of `layer` edited
    def pre(module, args):
        z = args[0].clone().view(*args[0].shape[:2], TINY.n_head, D)
        return (edit(z).flatten(2),)

    handle = model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return model(tokens).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("how", ["zero", "mean"])
def test_head_ablation_equals_transformers_with_the_head_ablated(pair, how):
    model, params = pair
    tokens = _tokens()

    def edit(z):
        z[:, :, [1, 3]] = 0.0 if how == "zero" else z[:, :, [1, 3]].mean(dim=(0, 1), keepdim=True)
        return z

    got = run_with_hooks(params, tokens, [ablate_heads(1, [1, 3], how)], TINY)
    assert_rel_close(got, _theirs_with_z(model, tokens, 1, edit), 1e-5)
    assert (got - forward(params, tokens, TINY)).abs().max() > 1e-2


def test_patch_sweep_over_heads_equals_patching_transformers_head_by_head(pair, tmp_path):
    model, params = pair
    clean, corrupted = _tokens(seed=1), _tokens(seed=2)
    metric = lambda logits: logits[:, -1, 3].mean() - logits[:, -1, 5].mean()
    heads = patch_sweep(params, clean, corrupted, metric, over="heads", config=TINY)
    assert heads.shape == (TINY.n_layer, TINY.n_head)
    with torch.no_grad():  # transformers' clean z per layer, then each head patched in on its side
        seen = {}
        handles = [b.attn.c_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0].clone()))
                   for i, b in enumerate(model.transformer.h)]
        model(clean)
        for h in handles:
            h.remove()
    for layer in range(TINY.n_layer):
        for head in range(TINY.n_head):
            clean_z = seen[layer].view(2, 10, TINY.n_head, D)

            def edit(z):
                z[:, :, head] = clean_z[:, :, head]
                return z

            expected = metric(_theirs_with_z(model, corrupted, layer, edit))
            assert abs(heads[layer, head] - expected) < 1e-4 * max(1.0, abs(float(expected)))
    plot_sweep(heads, tmp_path / "heads.png", columns=[f"head {h}" for h in range(TINY.n_head)])
    assert (tmp_path / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_patch_sweep_over_positions_restores_the_one_corrupted_position(pair):
    """Corrupted differs from clean at position 4 only: patching block 0's input there is the
    clean run itself; at any other position it changes nothing."""
    _, params = pair
    clean = _tokens(seed=1)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 1) % TINY.vocab_size
    metric = lambda logits: logits[:, -1, 3].mean() - logits[:, -1, 5].mean()
    positions = patch_sweep(params, clean, corrupted, metric, over="positions", config=TINY)
    assert positions.shape == (TINY.n_layer, 10)
    clean_value, corrupted_value = float(metric(forward(params, clean, TINY))), float(metric(forward(params, corrupted, TINY)))
    assert abs(clean_value - corrupted_value) > 1e-3
    assert abs(float(positions[0, 4]) - clean_value) < 1e-5 * max(1.0, abs(clean_value))
    others = torch.cat([positions[0, :4], positions[0, 5:]])
    assert_rel_close(others, torch.full_like(others, corrupted_value), 1e-5)
    with pytest.raises(UserError, match=r"^over: expected one of 'positions', 'heads', got 'layers' \(a str\)$"):
        patch_sweep(params, clean, corrupted, metric, over="layers", config=TINY)


def test_logit_lens_last_row_is_the_models_own_output(pair):
    _, params = pair
    tokens = _tokens(B=1)[0]
    lens = logit_lens(params, tokens, TINY)
    assert lens.shape == (TINY.n_layer + 1, 10, TINY.vocab_size)
    assert_rel_close(lens[-1], forward(params, tokens[None], TINY)[0].log_softmax(-1), 1e-5)
    assert (lens[0] - lens[-1]).abs().max() > 0.1


def test_direct_logit_attribution_sums_to_the_logit_difference(pair):
    _, params = pair
    tokens = _tokens(B=1)[0]
    a = logit_attribution(params, tokens, 3, 5, config=TINY)
    parts = a.embed + float(a.heads.sum()) + float(a.attn_bias.sum()) + float(a.mlp.sum()) + a.ln_f_bias
    logits = forward(params, tokens[None], TINY)[0, -1]
    assert abs(a.total - float(logits[3] - logits[5])) < 1e-5 * max(1.0, abs(a.total))
    assert abs(parts - a.total) < 1e-4 * max(1.0, abs(a.total)), (parts, a.total)
    assert a.heads.shape == (TINY.n_layer, TINY.n_head) and a.layers().shape == (TINY.n_layer, 2)
    assert a.heads.abs().max() > 1e-3


def test_a_batch_is_read_row_by_row(pair):
    """A batch [B, T] gets each row's own lens and attribution, with a target per row."""
    _, params = pair
    tokens = _tokens(B=3)
    lens = logit_lens(params, tokens, TINY)
    assert lens.shape == (TINY.n_layer + 1, 3, 10, TINY.vocab_size)
    targets = [3, 4, 5]
    a = logit_attribution(params, tokens, targets, 6, position=-2, config=TINY)
    assert a.heads.shape == (3, TINY.n_layer, TINY.n_head) and a.layers().shape == (3, TINY.n_layer, 2)
    for b in range(3):
        assert_rel_close(lens[:, b], logit_lens(params, tokens[b], TINY), 1e-5, f"lens of row {b}")
        one = logit_attribution(params, tokens[b], targets[b], 6, position=-2, config=TINY)
        for field in ("heads", "attn_bias", "mlp"):
            assert_rel_close(getattr(a, field)[b], getattr(one, field), 1e-5, f"{field} of row {b}")
        for field in ("embed", "ln_f_bias", "total"):
            assert abs(float(getattr(a, field)[b]) - getattr(one, field)) <= 1e-5 * max(1.0, abs(one.total)), field
    same = logit_attribution(params, tokens, torch.tensor([4, 4, 4]), 6, config=TINY)
    assert torch.equal(same.total, logit_attribution(params, tokens, 4, 6, config=TINY).total)


def test_each_heads_share_is_its_centred_result_along_the_scaled_unembedding_difference(pair):
    """Closed form per head: (r - mean(r)) . (g * (w_t - w_o)) / sigma, r the head's result
    at the position, sigma ln_f's divisor of the last block's output there; layers() is the
    heads' sum plus the bias share, beside the MLP's."""
    from functional_gpt.interp.hooks import run_with_cache
    _, params = pair
    tokens = _tokens(B=1)[0]
    a = logit_attribution(params, tokens, 3, 5, position=4, config=TINY)
    _, cache = run_with_cache(params, tokens[None], ["h.0.attn.result", "h.1.attn.result", "h.1"], config=TINY)
    final = cache["h.1"][0, 4].double()
    sigma = (final.var(unbiased=False) + TINY.layer_norm_epsilon).sqrt()
    w = params["wte"]["weight"].double()
    direction = params["ln_f"]["weight"].double() * (w[3] - w[5]) / sigma
    for layer in range(2):
        r = cache[f"h.{layer}.attn.result"][0, 4].double()  # [H, C]
        expected = (r - r.mean(-1, keepdim=True)) @ direction
        assert_rel_close(a.heads[layer].double(), expected, 1e-5)
    assert torch.equal(a.layers(), torch.stack([a.heads.sum(1) + a.attn_bias, a.mlp], 1))
    assert (a.attn_bias.abs() > 1e-4).all()


def test_fgpt_lens_writes_a_png_and_a_table_and_refuses_bad_input(tmp_path, capsys):
    config = GPTConfig(n_positions=16, n_embd=64, n_layer=2, n_head=2)  # GPT-2's vocabulary, for text prompts
    weights = tmp_path / "w.safetensors"
    save_params(weights, init_params(config, seed=0), config)
    out = tmp_path / "lens.png"
    assert main(["lens", "--weights", str(weights), "--prompt", "Hello world, this", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["h.0", "h.1", "output"] and f"wrote {out}" in table[-1]
    assert main(["lens", "--weights", str(weights), "--prompt", "word " * 20, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--prompt: 21 tokens, more than the context of 16") and "\n" not in err
    assert main(["lens", "--weights", str(weights), "--prompt", "hi", "--out", str(tmp_path / "x.jpg")]) == 2
    assert "must be a .png file" in capsys.readouterr().err


def test_the_lens_table_and_picture_are_the_logit_lens_top_tokens(tmp_path, monkeypatch):
    """draw_lens: the picture gets each cell's top-1 token and probability; the table's
    cells are the top 3 tokens (cut to 14 characters), rows h.i in and output."""
    from functional_gpt.interp import lens as lens_module
    from functional_gpt.model.tokenizer import decode, encode
    from functional_gpt.interp.attention_map import token_label
    config = GPTConfig(n_positions=16, n_embd=64, n_layer=2, n_head=2)
    params = init_params(config, seed=1)
    drawn = {}
    monkeypatch.setattr(lens_module, "_plot_lens", lambda prob, best, rows, columns, path: drawn.update(
        prob=prob, best=best, rows=rows, columns=columns))
    prompt = "Hello world, this"
    table = lens_module.draw_lens(params, prompt, config, tmp_path / "lens.png").splitlines()
    ids = encode(prompt)
    probs, best = logit_lens(params, torch.tensor(ids), config).exp().topk(3, dim=-1)
    assert torch.equal(drawn["best"], best[..., 0]) and torch.allclose(drawn["prob"], probs[..., 0])
    rows = ["h.0 in", "h.1 in", "output"]
    assert drawn["rows"] == rows and drawn["columns"] == [token_label(decode([t])) for t in ids]
    assert table[0] == " " * 10 + " | ".join(f"{token_label(decode([t])):>14}" for t in ids)
    for r, name in enumerate(rows):
        cells = [" ".join(token_label(decode([int(k)])) for k in best[r, t])[:14] for t in range(len(ids))]
        assert table[r + 1] == f"{name:10}" + " | ".join(f"{c:>14}" for c in cells)


def test_an_empty_sequence_is_named():
    params = init_params(TINY, seed=0)
    with pytest.raises(UserError, match=r"^tokens: empty \(an int64 tensor \[0\]\)$"):
        logit_lens(params, torch.zeros(0, dtype=torch.long), TINY)


# ---------------------------------------------------------- bad input to the interventions


@pytest.mark.parametrize("args, message", [
    ((1, True), r"^heads: expected an integer >= 0, got True \(a bool\)$"),
    ((1, [0, "1"]), r"^heads\[1\]: expected an integer >= 0, got '1' \(a str\)$"),
    ((1, -1), r"^heads: expected an integer >= 0, got -1 \(an int\)$"),
    ((1.0, 0), r"^layer: expected an integer >= 0, got 1\.0 \(a float\)$"),
    ((1, 0, "avg"), r"^how: expected one of 'zero', 'mean', got 'avg' \(a str\)$"),
])
def test_ablate_heads_names_bad_arguments(args, message):
    with pytest.raises(UserError, match=message):
        ablate_heads(*args)


def test_a_head_past_the_models_heads_is_named_when_the_hook_runs(pair):
    _, params = pair
    tokens = _tokens()
    run_with_hooks(params, tokens, [ablate_heads(1, [TINY.n_head - 1])], TINY)  # the last head is a head
    with pytest.raises(UserError, match=r"^ablate_heads: heads \[4\] must be in 0\.\.3$"):
        run_with_hooks(params, tokens, [ablate_heads(1, [TINY.n_head])], TINY)


def test_numpy_integers_are_integers(pair):
    """A layer, a head or a token id given as np.int64 works as the int it is."""
    np = pytest.importorskip("numpy")
    _, params = pair
    tokens = _tokens()
    assert torch.equal(run_with_hooks(params, tokens, [ablate_heads(np.int64(1), [np.int64(2)])]),
                       run_with_hooks(params, tokens, [ablate_heads(1, [2])]))
    got = logit_attribution(params, tokens[0], np.int64(5), np.int64(7), position=np.int64(-1))
    assert got.total == logit_attribution(params, tokens[0], 5, 7).total


@pytest.mark.parametrize("metric, said", [
    (lambda logits: logits[:, -1, 0], r"a float32 tensor \[2\]"),
    (lambda logits: "good", r"'good' \(a str\)"),
    (lambda logits: None, "None"),
])
def test_a_metric_that_is_not_a_scalar_is_named(pair, metric, said):
    _, params = pair
    with pytest.raises(UserError, match=r"^metric: expected a function of the logits returning a scalar, it "
                                        rf"returned {said}$"):
        patch_sweep(params, _tokens(), _tokens(seed=1), metric)


def test_patch_sweep_names_its_token_arguments(pair):
    _, params = pair
    with pytest.raises(UserError, match=r"^corrupted: an int64 tensor \[2, 9\], but clean is an int64 tensor \[2, 10\]; "
                                        r"they must have one shape$"):
        patch_sweep(params, _tokens(), _tokens(T=9), lambda l: l.sum())
    with pytest.raises(UserError, match=r"^clean: expected an integer tensor \[B, T\], got a list of 3$"):
        patch_sweep(params, [1, 2, 3], _tokens(), lambda l: l.sum())
    with pytest.raises(UserError, match=r"^metric: expected a function of the logits returning a scalar, got 3"):
        patch_sweep(params, _tokens(), _tokens(), 3)


@pytest.mark.parametrize("call, message", [
    (lambda p: logit_lens(p, [1, 2, 3]), r"^tokens: expected an integer tensor \[T\] or \[B, T\], got a list of 3$"),
    (lambda p: logit_lens(p, _tokens(1, 10)[None]), r"^tokens: expected an integer tensor \[T\] or \[B, T\], got an "
                                                    r"int64 tensor \[1, 1, 10\]$"),
    (lambda p: logit_attribution(p, _tokens(), [5, 6, 7], 7), r"^target: 3 ids for a batch of 2 rows$"),
    (lambda p: logit_attribution(p, _tokens(), 5, [7, 128]), r"^other\[1\]: expected an integer in 0\.\.127, got 128"),
    (lambda p: logit_attribution(p, _tokens()[0], 5, 7, position=10),
     r"^position \(in tokens of length 10\): expected an integer in -10\.\.9, got 10 \(an int\)$"),
    (lambda p: logit_attribution(p, _tokens()[0], 5, 128), r"^other: expected an integer in 0\.\.127, got 128"),
    (lambda p: logit_attribution(p, _tokens()[0], 5.0, 7), r"^target: expected an integer in 0\.\.127, got 5\.0"),
])
def test_the_lens_names_bad_tokens_and_positions(pair, call, message):
    _, params = pair
    with pytest.raises(UserError, match=message):
        call(params)


def test_plot_sweep_names_its_labels(tmp_path):
    with pytest.raises(UserError, match=r"^columns: expected 3 labels, one per column of the result, got a list of 2"):
        plot_sweep(torch.zeros(2, 3), tmp_path / "s.png", columns=["a", "b"])
    assert not (tmp_path / "s.png").exists()


def test_every_function_runs_plain_params_with_the_config_given(pair):
    """A plain nested dict carries no config: each function must run the one passed to it
    (and to every call it makes), giving what the params that carry it give."""
    _, params = pair
    plain = {k: v for k, v in params.items()}
    assert not hasattr(plain, "config")
    clean, corrupted = _tokens(1, 6, seed=1), _tokens(1, 6, seed=2)

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 5]

    calls = [
        lambda p, c: run_with_hooks(p, clean, [ablate_heads(0, [1])], c),
        lambda p, c: run_with_cache(p, clean, ["h.1.attn.pattern"], config=c, grad_of=metric)[1].grads["h.1.attn.pattern"],
        lambda p, c: patch_sweep(p, clean, corrupted, metric, over="positions", config=c),
        lambda p, c: patch_sweep(p, clean, corrupted, metric, over="heads", config=c),
        lambda p, c: logit_lens(p, clean[0], c),
        lambda p, c: torch.stack([logit_attribution(p, clean[0], 3, 5, config=c).heads.flatten()]),
        lambda p, c: per_example_grads(p, clean, corrupted, c)["h.0.mlp.c_fc.weight"],
        lambda p, c: ensemble_logits(stack_params([p, p], c), clean, c),
    ]
    for i, call in enumerate(calls):
        assert_rel_close(call(plain, TINY), call(params, None), 1e-6, f"call {i}")


def test_the_lens_and_attribution_use_the_model_s_own_layer_norm_epsilon():
    """An epsilon of 0.5, far from the default 1e-5: every row of the lens and the
    attribution's total still end in the model's own output."""
    from dataclasses import replace

    config = replace(TINY, layer_norm_epsilon=0.5)
    params = params_of(hf_model(config, seed=4))
    tokens = _tokens(B=1)[0]
    logits = forward(params, tokens[None], config)[0]
    assert_rel_close(logit_lens(params, tokens, config)[-1], logits.log_softmax(-1), 1e-5)
    a = logit_attribution(params, tokens, 3, 5, config=config)
    assert abs(a.total - float(logits[-1, 3] - logits[-1, 5])) < 1e-5 * max(1.0, abs(a.total))


# ---------------------------------------------------------- what the pictures hold


def _saved_figure(monkeypatch):
    """Capture the figure each PNG is saved from: {"figure", "dpi", "open"} (figures still
    open right after the save's caller returns are counted by the test)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    saved, savefig = {}, Figure.savefig

    def spy(fig, fname, **kwargs):
        saved.update(figure=fig, dpi=kwargs.get("dpi"), format=kwargs.get("format"))
        return savefig(fig, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_sweep_picture_is_the_result_on_a_symmetric_red_blue_scale(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    saved, open_before = _saved_figure(monkeypatch), plt.get_fignums()
    result = torch.tensor([[0.5, -2.0, 1.0], [0.0, 0.25, -0.5]])
    plot_sweep(result, tmp_path / "s.png", columns=["a", "bb", "c"], title="the sweep")
    fig = saved["figure"]
    assert plt.get_fignums() == open_before and saved["format"] == "png" and saved["dpi"] == 100
    assert tuple(fig.get_size_inches()) == pytest.approx((1.0 + 0.6 * 3, 1.0 + 0.5 * 2))
    ax, bar = fig.axes  # the heatmap and its colour bar
    image = ax.get_images()[0]
    assert image.get_array().tolist() == result.tolist() and image.get_cmap().name == "RdBu"
    assert image.get_clim() == (-2.0, 2.0) and ax.get_aspect() == "auto"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "bb", "c"] and list(ax.get_xticks()) == [0, 1, 2]
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["h.0", "h.1"] and list(ax.get_yticks()) == [0, 1]
    assert ax.get_title() == "the sweep" and bar.get_ylim() == pytest.approx((-2.0, 2.0))
    assert ax.get_position().x0 != pytest.approx(0.125)  # tight_layout moved the axes from matplotlib's default
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_sweep(torch.zeros(1, 2), tmp_path / "z.png", columns=["a", "b"])
    assert saved["figure"].axes[0].get_images()[0].get_clim() == (-1e-9, 1e-9)  # all zeros: a scale all the same


def test_the_lens_picture_writes_each_cell_s_token_in_a_colour_that_reads_on_its_blue(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from functional_gpt.interp import lens as lens_module
    from functional_gpt.model.tokenizer import decode, encode

    saved, open_before = _saved_figure(monkeypatch), plt.get_fignums()
    prob = torch.tensor([[0.9, 0.2, 0.61], [0.6, 0.05, 0.95]])  # the scale is 0..1, not the values
    best = torch.tensor([encode(" a")[0], encode(" longer word")[0], encode("\n")[0],
                         encode(" b")[0], encode(" c")[0], encode(" d")[0]]).reshape(2, 3)
    best[0, 1] = encode(" information")[0]  # one token of 12 characters: cut to 8
    lens_module._plot_lens(prob, best, ["h.0 in", "output"], ["x", "y", "z"], tmp_path / "l.png")
    fig = saved["figure"]
    assert plt.get_fignums() == open_before and saved["format"] == "png" and saved["dpi"] == 100
    assert tuple(fig.get_size_inches()) == pytest.approx((1.5 + 0.9 * 3, 1.0 + 0.45 * 2))
    assert _png_size(tmp_path / "l.png") == (round(100 * (1.5 + 0.9 * 3)), round(100 * (1.0 + 0.45 * 2)))
    ax, _ = fig.axes
    image = ax.get_images()[0]
    assert torch.equal(torch.as_tensor(image.get_array()), prob) and image.get_cmap().name == "Blues"
    assert image.get_clim() == (0, 1) and ax.get_aspect() == "auto"
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert cells[0, 1].get_text() == "·informa"
    assert sorted(cells) == [(r, c) for r in range(2) for c in range(3)]
    for (r, c), text in cells.items():
        assert text.get_text() == token_label(decode([int(best[r, c])]))[:8]
        assert text.get_color() == ("white" if prob[r, c] > 0.6 else "black")
        assert (text.get_ha(), text.get_va(), text.get_fontsize()) == ("center", "center", 7)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"] and list(ax.get_xticks()) == [0, 1, 2]
    assert all(t.get_rotation() == 90 and t.get_fontsize() == 8 for t in ax.get_xticklabels())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["h.0 in", "output"] and list(ax.get_yticks()) == [0, 1]
    assert all(t.get_fontsize() == 8 for t in ax.get_yticklabels())
    assert ax.get_title() == "logit lens: top next token (colour: its probability)"
    assert ax.get_position().x0 != pytest.approx(0.125)  # tight_layout moved the axes from matplotlib's default


@pytest.mark.parametrize("as_number", [float, lambda t: int(t > 0)])
def test_a_metric_may_return_a_python_number(pair, as_number):
    _, params = pair
    clean, corrupted = _tokens(seed=1), _tokens(seed=2)
    metric = lambda logits: logits[:, -1, 3].mean() - logits[:, -1, 5].mean()
    want = patch_sweep(params, clean, corrupted, lambda logits: as_number(metric(logits)), over="heads")
    assert want.dtype == torch.float32 and want.shape == (TINY.n_layer, TINY.n_head)
    assert torch.equal(want, patch_sweep(params, clean, corrupted, metric, over="heads").apply_(as_number))


@pytest.mark.parametrize("call, message", [
    (lambda p, d: plot_sweep("x", d / "s.png", columns=[]), "result: expected a float tensor [L, N], got 'x' (a str)"),
    (lambda p, d: plot_sweep(torch.zeros(2, 3, dtype=torch.long), d / "s.png", columns=[]),
     "result: expected a float tensor [L, N], got an int64 tensor [2, 3]"),
    (lambda p, d: plot_sweep(torch.zeros(3), d / "s.png", columns=[]),
     "result: expected a float tensor [L, N], got a float32 tensor [3]"),
    (lambda p, d: plot_sweep(torch.zeros(0, 3), d / "s.png", columns=["a", "b", "c"]),
     "result: empty (a float32 tensor [0, 3])"),
    (lambda p, d: patch_sweep(p, _tokens(), "x", lambda logits: logits[0, -1, 0]),
     "corrupted: expected an integer tensor, got 'x' (a str)"),
    (lambda p, d: patch_sweep(p, _tokens(), _tokens().float(), lambda logits: logits[0, -1, 0]),
     "corrupted: expected an integer tensor, got a float32 tensor [2, 10]"),
    (lambda p, d: patch_sweep(p, _tokens()[:, :0], _tokens()[:, :0], lambda logits: logits[0, -1, 0]),
     "clean: empty (an int64 tensor [2, 0])"),
])
def test_the_sweeps_name_a_bad_result_or_corrupted_run(pair, tmp_path, call, message):
    with pytest.raises(UserError) as e:
        call(pair[1], tmp_path)
    assert str(e.value) == message and not (tmp_path / "s.png").exists()


def test_a_sweep_picture_has_no_title_unless_given(tmp_path, monkeypatch):
    saved = _saved_figure(monkeypatch)
    plot_sweep(torch.ones(1, 1), tmp_path / "s.png", columns=["a"])
    assert saved["figure"].axes[0].get_title() == ""


def test_draw_lens_runs_plain_params_with_the_config_given(tmp_path, monkeypatch):
    from functional_gpt.interp import lens as lens_module

    config = GPTConfig(n_positions=16, n_embd=64, n_layer=2, n_head=2)
    params = init_params(config, seed=1)
    monkeypatch.setattr(lens_module, "_plot_lens", lambda *args: None)
    plain = {k: v for k, v in params.items()}
    assert lens_module.draw_lens(plain, "Hello world", config, tmp_path / "l.png") == lens_module.draw_lens(
        params, "Hello world", config, tmp_path / "l.png")
