"""The census's cases over the Python API's faces, beyond the CLI (`bad_input_census.py`
runs them with its own; maintainers): every class issue 21 found, and their neighbours, for
the model, interp, training and reference faces. Each case is a direct call in a fresh
directory `ws`, classified as the CLI's cases are (clean, correct, traceback, wrong, data
loss)."""

import math
import os
import stat

import numpy as np
import torch

import functional_gpt as fg
from bad_input_census import OK, TINY, Case, E, returned, tiny_flat
from functional_gpt import interp, reference, training
from functional_gpt.training.data import Position

ids = torch.tensor([[1, 2, 3]])


def P():
    return fg.init_params(TINY, seed=0)


def plain():  # the params as a plain nested dict, without their config
    return fg.unflatten(tiny_flat())


def batch(x=None, y=None):
    t = torch.randint(100, (1, 2, 9), generator=torch.Generator().manual_seed(0))
    return training.Batch(t[..., :-1] if x is None else x, t[..., 1:] if y is None else y, Position())


def settings(**kw):
    return training.StepSettings(**dict(config=TINY, lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=10,
                                        dropout=False) | kw)


def step(**kw):
    return lambda ws: training.train_step(training.new_state(P(), 0, "cpu"), kw.pop("b", batch()), settings(**kw))


def a_device(path, minor=3):
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return path


def mixed():
    return fg.unflatten({k: v.double() if k.startswith("h.0") else v for k, v in tiny_flat().items()})


def blocks_as_dict():
    p = P()
    return {**p, "h": {str(i): b for i, b in enumerate(p["h"])}}


def meta():
    return fg.unflatten({k: v.to("meta") for k, v in tiny_flat().items()})


def face_cases() -> list[Case]:
    cases = []

    def add(name, fn, expect, owner):
        cases.append(Case(name, fn, expect, owner=owner))

    m = "model"
    add("forward plain dict without a config", lambda ws: fg.forward(plain(), ids), E("n_head"), m)
    add("forward params of 4 heads of 32 run with their own", lambda ws: fg.forward(
        fg.init_params(fg.GPTConfig(vocab_size=300, n_positions=8, n_embd=128, n_layer=1, n_head=4)), ids),
        OK(returned(lambda v: v.shape == (1, 3, 300), "logits [1, 3, 300]")), m)
    add("forward blocks as a dict", lambda ws: fg.forward(blocks_as_dict(), ids, TINY), E("params['h']"), m)
    add("forward mixed dtypes", lambda ws: fg.forward(mixed(), ids, TINY), E("several dtypes"), m)
    add("forward meta params", lambda ws: fg.forward(meta(), ids, TINY), E("meta"), m)
    add("forward int16 tokens", lambda ws: fg.forward(P(), ids.short()), E("tokens"), m)
    add("forward int32 tokens", lambda ws: fg.forward(P(), ids.int()), OK(returned(
        lambda v: torch.equal(v, fg.forward(P(), ids)), "the int64 logits")), m)
    add("forward dropout 1", lambda ws: fg.forward(P(), ids, dropout=1), E("dropout"), m)
    add("forward tap a string", lambda ws: fg.forward(P(), ids, tap="h.0"), E("tap"), m)
    add("forward tokens [1, 1, T]", lambda ws: fg.forward(P(), ids[None]), E("tokens"), m)
    add("forward_hidden checkpoint 'yes'", lambda ws: fg.model.forward_hidden(P(), ids, checkpoint="yes"),
        E("checkpoint"), m)
    add("forward_cached counts a float", lambda ws: fg.forward_cached(P(), ids, fg.new_cache(TINY, 1), counts=(2.0,)),
        E("counts[0]"), m)
    add("forward_cached a bf16 cache", lambda ws: fg.forward_cached(P(), ids, fg.new_cache(TINY, 1, dtype=torch.bfloat16)),
        E("cache"), m)
    add("forward_cached a cache of other lengths", lambda ws: fg.forward_cached(
        P(), ids, fg.KVCache(fg.new_cache(TINY, 1).k, fg.new_cache(TINY, 1).v, (99,))), E("cache.lengths[0]"), m)
    add("forward_cached a dict cache", lambda ws: fg.forward_cached(P(), ids, {"k": 1}), E("cache"), m)
    add("decode_step rows of ints", lambda ws: fg.decode_step(P(), ids[0, :1], fg.new_cache(TINY, 1), TINY, rows=(1,)),
        E("rows[0]"), m)
    add("decode_step id out of range", lambda ws: fg.decode_step(P(), torch.tensor([60000]), fg.new_cache(TINY, 1), TINY),
        E("60000"), m)
    add("decode_step mixed params", lambda ws: fg.decode_step(mixed(), ids[0, :1], fg.new_cache(TINY, 1), TINY),
        E("several dtypes"), m)
    add("decode_step config a dict", lambda ws: fg.decode_step(P(), ids[0, :1], fg.new_cache(TINY, 1), TINY.to_dict()),
        E("config"), m)
    add("new_cache dtype int8", lambda ws: fg.new_cache(TINY, 1, dtype=torch.int8), E("dtype"), m)
    add("new_cache device gpu", lambda ws: fg.new_cache(TINY, 1, device="gpu"), E("gpu"), m)
    add("new_cache 10**9 rows", lambda ws: fg.new_cache(TINY, 10**9), E("batch_size=1000000000"), m)
    add("new_cache np.int64 rows", lambda ws: fg.new_cache(TINY, np.int64(2)), OK(returned(
        lambda v: v.lengths == (0, 0), "two empty rows")), m)
    add("init_params seed 2**70", lambda ws: fg.init_params(TINY, seed=2**70), E("seed"), m)
    add("init_params seed 1.5", lambda ws: fg.init_params(TINY, seed=1.5), E("seed"), m)
    add("init_params dtype int64", lambda ws: fg.init_params(TINY, dtype=torch.int64), E("dtype"), m)
    add("init_params device 3", lambda ws: fg.init_params(TINY, device=3), E("device"), m)
    add("init_params a dict config", lambda ws: fg.init_params(TINY.to_dict()), E("config"), m)
    add("init_params beyond the free memory", lambda ws: fg.init_params(fg.GPTConfig(n_layer=400, n_embd=4096, n_head=32)),
        E("GiB"), m)
    add("init_params on meta", lambda ws: fg.init_params(TINY, device="meta"), OK(returned(
        lambda v: v["wte"]["weight"].is_meta and v.config == TINY, "meta params carrying the config")), m)
    add("GPTConfig n_layer 10**6", lambda ws: fg.GPTConfig(n_layer=10**6), E("n_layer"), m)
    add("GPTConfig 10**15 parameters", lambda ws: fg.GPTConfig(vocab_size=10**9, n_embd=2**20, n_head=1),
        E("parameters"), m)
    add("GPTConfig n_head a tensor", lambda ws: fg.GPTConfig(n_head=torch.zeros(2, 2)), E("n_head"), m)
    add("GPTConfig np.int64 n_layer", lambda ws: fg.GPTConfig(n_layer=np.int64(3)), OK(returned(
        lambda v: type(v.n_layer) is int, "an int n_layer")), m)
    add("preset a dict", lambda ws: fg.preset({}), E("preset"), m)
    add("preset None", lambda ws: fg.preset(None), E("preset"), m)
    add("with_config mismatched", lambda ws: fg.with_config(plain(), fg.preset("cpu-tiny")), E("missing keys"), m)
    add("config_of a plain dict", lambda ws: fg.config_of(plain()), E("n_head"), m)
    add("flatten an int", lambda ws: fg.flatten(5), E("params"), m)
    add("unflatten a list", lambda ws: fg.unflatten([1]), E("flat"), m)
    add("unflatten a key both tensor and prefix", lambda ws: fg.unflatten({"a": 1, "a.b": 2}), E("a"), m)
    add("unflatten an empty key part", lambda ws: fg.unflatten({"a..b": 1}), E("a..b"), m)
    add("count_params of a string", lambda ws: fg.count_params("gpt2"), E("config"), m)
    add("encode bytes", lambda ws: fg.encode(b"hi"), E("text"), m)
    add("encode None", lambda ws: fg.encode(None), E("text"), m)
    add("decode id 60000", lambda ws: fg.decode([60000]), E("ids[0]"), m)
    add("decode a float id", lambda ws: fg.decode([1.5]), E("ids[0]"), m)
    add("decode a 2-D tensor", lambda ws: fg.decode(torch.zeros(2, 2, dtype=torch.long)), E("ids"), m)
    add("decode a 1-D tensor", lambda ws: fg.decode(torch.tensor([15496, 995])), OK(returned(
        lambda v: v == "Hello world", "'Hello world'")), m)
    add("load_params None", lambda ws: fg.load_params(None), E("path"), m)
    add("load_params NUL in the path", lambda ws: fg.load_params("m\x00.safetensors"), E("path"), m)
    add("load_params a path with a newline", lambda ws: fg.load_params(ws / "a\nb"), E("a\\nb"), m)
    add("load_params config a dict", lambda ws: fg.load_params(ws.parent.parent / "fixtures/tiny.safetensors",
                                                               config={}), E("config"), m)
    add("load_params device meta", lambda ws: fg.load_params(ws.parent.parent / "fixtures/tiny.safetensors",
                                                             device="meta"), E("meta"), m)
    add("load_params carries its config", lambda ws: fg.load_params(ws.parent.parent / "fixtures/tiny.safetensors")[0],
        OK(returned(lambda v: v.config == TINY, "params carrying TINY")), m)
    add("save_params shared tensors", lambda ws: fg.save_params(ws / "m.safetensors", fg.unflatten(
        dict(tiny_flat(), **{"h.0.ln_2.weight": tiny_flat()["h.0.ln_1.weight"]})), TINY),
        OK(lambda ws, out, v: None if fg.load_params(ws / "m.safetensors")[0] else "not loadable"), m)
    add("save_params path None", lambda ws: fg.save_params(None, P(), TINY), E("path"), m)
    add("save_params into a FIFO", lambda ws: (os.mkfifo(ws / "f"), fg.save_params(ws / "f", P(), TINY)),
        E("FIFO"), m)
    add("save_params into a device node", lambda ws: fg.save_params(a_device(ws / "null"), P(), TINY),
        OK(lambda ws, out, v: None if stat.S_ISCHR(os.stat(ws / "null").st_mode) else "the device was replaced"), m)
    add("save_params into a full device", lambda ws: fg.save_params(a_device(ws / "full", 7), P(), TINY),
        E("No space left"), m)

    i = "interp"
    add("ablate_heads heads=True", lambda ws: interp.ablate_heads(1, True), E("heads"), i)
    add("ablate_heads layer np.int64", lambda ws: interp.run_with_hooks(P(), ids, [interp.ablate_heads(np.int64(0), [1])]),
        OK(returned(lambda v: v.shape == (1, 3, 50257), "logits")), i)
    add("ablate_heads layer -1", lambda ws: interp.ablate_heads(-1, 0), E("layer"), i)
    add("ablate_heads head past the last", lambda ws: interp.run_with_hooks(P(), ids, [interp.ablate_heads(0, 5)]),
        E("heads"), i)
    add("ablate_heads how 'max'", lambda ws: interp.ablate_heads(0, 0, "max"), E("how"), i)
    add("ablate_heads layer past the last", lambda ws: interp.run_with_hooks(P(), ids, [interp.ablate_heads(3, 0)]),
        E("h.3"), i)
    add("patch_sweep a vector metric", lambda ws: interp.patch_sweep(P(), ids, ids, lambda l: l[0, -1]), E("metric"), i)
    add("patch_sweep a metric returning a string", lambda ws: interp.patch_sweep(P(), ids, ids, lambda l: "x"),
        E("metric"), i)
    add("patch_sweep metric not callable", lambda ws: interp.patch_sweep(P(), ids, ids, 3), E("metric"), i)
    add("patch_sweep shapes differ", lambda ws: interp.patch_sweep(P(), ids, ids[:, :2], lambda l: l.sum()),
        E("corrupted"), i)
    add("patch_sweep over 'layers'", lambda ws: interp.patch_sweep(P(), ids, ids, lambda l: l.sum(), over="layers"),
        E("over"), i)
    add("patch_sweep empty clean", lambda ws: interp.patch_sweep(P(), ids[:, :0], ids[:, :0], lambda l: l.sum()),
        E("clean"), i)
    add("logit_lens a list", lambda ws: interp.logit_lens(P(), [1, 2, 3]), E("tokens"), i)
    add("logit_lens [1, T]", lambda ws: interp.logit_lens(P(), ids), E("[T]"), i)
    add("logit_lens empty", lambda ws: interp.logit_lens(P(), ids[0, :0]), E("empty"), i)
    add("logit_attribution position 3 of 3", lambda ws: interp.logit_attribution(P(), ids[0], 5, 7, position=3),
        E("position"), i)
    add("logit_attribution position -4 of 3", lambda ws: interp.logit_attribution(P(), ids[0], 5, 7, position=-4),
        E("position"), i)
    add("logit_attribution target np.int64", lambda ws: interp.logit_attribution(P(), ids[0], np.int64(5), 7),
        OK(returned(lambda v: math.isfinite(v.total), "an attribution")), i)
    add("logit_attribution other 50257", lambda ws: interp.logit_attribution(P(), ids[0], 5, 50257), E("other"), i)
    add("logit_attribution target 2.0", lambda ws: interp.logit_attribution(P(), ids[0], 2.0, 7), E("target"), i)
    add("run_with_cache names 5", lambda ws: interp.run_with_cache(P(), ids, 5), E("names"), i)
    add("run_with_cache a TransformerLens name", lambda ws: interp.run_with_cache(P(), ids, ["blocks.0.attn.hook_z"]),
        E("TransformerLens's name for 'h.0.attn.z'"), i)
    add("run_with_cache grad_of a string", lambda ws: interp.run_with_cache(P(), ids, ["h.0"], grad_of="loss"),
        E("grad_of"), i)
    add("run_with_cache grad_of not a scalar", lambda ws: interp.run_with_cache(P(), ids, ["h.0"], grad_of=lambda l: l),
        E("grad_of"), i)
    add("run_with_hooks a hook 3", lambda ws: interp.run_with_hooks(P(), ids, {"h.0.mlp": 3}), E("h.0.mlp"), i)
    add("run_with_hooks a patch of the wrong shape", lambda ws: interp.run_with_hooks(P(), ids, {"h.0.mlp": torch.zeros(3)}),
        E("h.0.mlp"), i)
    add("run_with_hooks hooks a string", lambda ws: interp.run_with_hooks(P(), ids, "h.0"), E("hooks"), i)
    add("hook_names 10**9 layers", lambda ws: interp.hook_names(10**9), E("n_layer"), i)
    add("to_transformer_lens 5", lambda ws: interp.to_transformer_lens(5), E("name"), i)
    add("stack_params of mismatched members", lambda ws: interp.stack_params([P(), fg.init_params(fg.preset("cpu-tiny"))]),
        E("members[1]"), i)
    add("stack_params of mixed dtypes", lambda ws: interp.stack_params([P(), fg.unflatten(
        {k: v.double() for k, v in tiny_flat().items()})], TINY), E("members[1]"), i)
    add("stack_params of nothing", lambda ws: interp.stack_params([]), E("members"), i)
    add("stack_params a dict", lambda ws: interp.stack_params({"a": P()}), E("members"), i)
    add("ensemble_logits of plain params", lambda ws: interp.ensemble_logits(plain(), ids), E("stacked"), i)
    add("per_example_grads targets shorter", lambda ws: interp.per_example_grads(P(), ids, ids[:, :2]), E("targets"), i)
    add("per_example_grads targets 60000", lambda ws: interp.per_example_grads(P(), ids, ids + 60000),
        E("targets id 60003"), i)
    add("attention_maps [1, T]", lambda ws: interp.attention_maps(P(), ids), E("tokens"), i)
    add("plot_sweep empty", lambda ws: interp.plot_sweep(torch.zeros(0, 2), ws / "s.png", columns=["a", "b"]),
        E("result"), i)
    add("plot_sweep labels short", lambda ws: interp.plot_sweep(torch.zeros(2, 2), ws / "s.png", columns=["a"]),
        E("columns"), i)

    t = "training"
    add("train_step y one token shorter", step(b=batch(y=batch().y[..., :-1])), E("batch.y"), t)
    add("train_step x 2-D", step(b=batch(x=batch().x[0], y=batch().y[0])), E("batch.x"), t)
    add("train_step ids past the vocabulary", step(b=batch(x=batch().x + 60000)), E("batch.x: token id 600"), t)
    add("train_step windows past the context", lambda ws: training.train_step(
        training.new_state(P(), 0, "cpu"), batch(torch.zeros(1, 1, 40, dtype=torch.long),
                                                 torch.zeros(1, 1, 40, dtype=torch.long)), settings()), E("40"), t)
    add("train_step state a Params", lambda ws: training.train_step(P(), batch(), settings()), E("state"), t)
    add("train_step settings a dict", lambda ws: training.train_step(training.new_state(P(), 0, "cpu"), batch(),
                                                                     {"lr": 1}), E("settings"), t)
    add("train_step params of another config", lambda ws: training.train_step(
        training.new_state(fg.init_params(fg.preset("cpu-tiny")), 0, "cpu"), batch(), settings()), E("state.params"), t)
    add("StepSettings grad_clip -1", lambda ws: settings(grad_clip=-1), E("grad_clip"), t)
    add("StepSettings grad_clip 0 trains", step(grad_clip=0.0), OK(returned(
        lambda v: math.isfinite(v[1]["loss"]) and v[0].step == 1, "one step")), t)
    add("StepSettings lr 0", lambda ws: settings(lr=0.0), E("lr"), t)
    add("StepSettings lr inf", lambda ws: settings(lr=math.inf), E("lr"), t)
    add("StepSettings min_lr above lr", lambda ws: settings(lr=1e-4, min_lr=1e-3), E("min_lr"), t)
    add("StepSettings betas a list", lambda ws: settings(betas=[0.9, 0.99]), E("betas"), t)
    add("StepSettings beta1 1.0", lambda ws: settings(betas=(1.0, 0.99)), E("beta1"), t)
    add("StepSettings weight_decay nan", lambda ws: settings(weight_decay=math.nan), E("weight_decay"), t)
    add("StepSettings decay_steps 0", lambda ws: settings(decay_steps=0), E("decay_steps"), t)
    add("StepSettings dtype int8", lambda ws: settings(dtype=torch.int8), E("dtype"), t)
    add("StepSettings compile 'yes'", lambda ws: settings(compile="yes"), E("compile"), t)
    add("StepSettings world None", lambda ws: settings(world=None), E("world"), t)
    add("new_state seed 2**70", lambda ws: training.new_state(P(), 2**70, "cpu"), E("seed"), t)
    add("new_state device gpu", lambda ws: training.new_state(P(), 0, "gpu"), E("gpu"), t)
    add("new_state a list", lambda ws: training.new_state([P()], 0, "cpu"), E("params"), t)
    add("adamw_step grads missing a key", lambda ws: training.adamw_step(
        tiny_flat(), {k: v for k, v in tiny_flat().items() if k != "ln_f.bias"}, training.adamw_init(tiny_flat()),
        lr=1e-3), E("ln_f.bias"), t)
    add("adamw_step lr that overflows float32", lambda ws: training.adamw_step(
        tiny_flat(), tiny_flat(), training.adamw_init(tiny_flat()), lr=1e38), E("lr"), t)
    add("adamw_step state a tuple", lambda ws: training.adamw_step(tiny_flat(), tiny_flat(), (0, 0), lr=1e-3),
        E("state"), t)
    add("clip_grad_norm -1", lambda ws: training.clip_grad_norm(tiny_flat(), -1.0), E("max_norm"), t)
    add("clip_grad_norm of no gradients", lambda ws: training.clip_grad_norm({}, 1.0), OK(returned(
        lambda v: v == 0.0, "0.0")), t)
    add("lr_at step -1", lambda ws: training.lr_at(-1, lr=1.0, warmup_steps=1, decay_steps=2, min_lr=0.1), E("step"), t)
    add("lr_at min_lr above lr", lambda ws: training.lr_at(1, lr=1.0, warmup_steps=1, decay_steps=2, min_lr=2.0),
        E("min_lr"), t)
    add("next_batch seed 2**62 (overflowed torch)", lambda ws: training.next_batch(
        training.load_tokens(ws.parent.parent / "fixtures/data", "train"), Position(), batch_size=2, context_length=8,
        stride=8, seed=2**62), OK(returned(lambda v: v[0].shape == (2, 8), "a batch [2, 8]")), t)
    add("next_batch stride 2**64", lambda ws: training.next_batch(
        training.load_tokens(ws.parent.parent / "fixtures/data", "train"), Position(), batch_size=1, context_length=8,
        stride=2**64, seed=0), OK(returned(lambda v: v[0].shape == (1, 8), "one window")), t)
    add("next_batch position a string", lambda ws: training.next_batch(
        training.load_tokens(ws.parent.parent / "fixtures/data", "train"), "start", batch_size=1, context_length=8,
        stride=8, seed=0), E("position"), t)
    add("next_batch 10**10 windows", lambda ws: training.next_batch(
        training.load_tokens(ws.parent.parent / "fixtures/data", "train"), Position(), batch_size=10**10,
        context_length=8, stride=8, seed=0), E("batch_size"), t)
    add("load_tokens split 'test'", lambda ws: training.load_tokens(ws.parent.parent / "fixtures/data", "test"),
        E("split"), t)
    add("load_tokens vocab_size a dict", lambda ws: training.load_tokens(ws.parent.parent / "fixtures/data", "val",
                                                                         vocab_size={}), E("vocab_size"), t)
    add("lm_head_loss targets past the vocabulary", lambda ws: training.lm_head_loss(
        torch.randn(2, 8), P()["wte"]["weight"], torch.tensor([1, 60000])), E("60000"), t)
    add("lm_head_loss wte of another width", lambda ws: training.lm_head_loss(torch.randn(2, 8), torch.randn(10, 4),
                                                                              torch.tensor([1, 2])), E("wte"), t)
    add("make_config a list", lambda ws: training.make_config([1]), E("settings"), t)
    add("make_config lr a tensor", lambda ws: training.make_config({"lr": torch.ones(2, 2)}), E("--lr"), t)
    add("train a dict", lambda ws: training.train({"lr": 1}), E("cfg"), t)
    add("load_checkpoint None", lambda ws: training.load_checkpoint(None), E("run_dir"), t)
    add("prepare the same file twice", lambda ws: training.prepare(
        [ws.parent.parent / "fixtures/texts/a.txt"] * 2, ws / "d", progress=False), E("given twice"), t)
    add("prepare a copy in the validation split", lambda ws: (
        (ws / "in").mkdir(), (ws / "in/a.txt").write_text("x " * 200), (ws / "in/b.txt").write_text("x " * 200),
        training.prepare([ws / "in"], ws / "d", progress=False)), E("same text"), t)
    add("prepare inputs [None]", lambda ws: training.prepare([None], ws / "d", progress=False), E("inputs"), t)

    r = "reference"
    add("evaluate texts a tensor", lambda ws: reference.evaluate(P(), torch.arange(5), TINY, show_progress=False),
        E("texts"), r)
    add("evaluate int32 texts", lambda ws: reference.evaluate(P(), [torch.arange(9, dtype=torch.int32)], TINY,
                                                               show_progress=False),
        OK(returned(lambda v: math.isfinite(v.nats), "a finite loss")), r)
    add("evaluate stride a tensor", lambda ws: reference.evaluate(P(), [torch.arange(9)], TINY, stride=torch.ones(2, 2),
                                                                   show_progress=False), E("--stride"), r)
    add("evaluate show_progress 'no'", lambda ws: reference.evaluate(P(), [torch.arange(9)], TINY,
                                                                      show_progress="no"), E("show_progress"), r)
    add("load_eval_data a dir of no text files", lambda ws: ((ws / "bins").mkdir(), (ws / "bins/x.dat").write_bytes(b"1"),
                                                             reference.load_eval_data(ws / "bins", "unused")), E(".txt"), r)
    add("load_eval_data NUL in the path", lambda ws: reference.load_eval_data("a\x00b", "unused"), E("--data"), r)
    add("capture int32 tokens with grads", lambda ws: reference.capture(P(), ids.int(), TINY, grads=True),
        OK(returned(lambda v: math.isfinite(float(v["loss"])), "a finite loss")), r)
    add("capture tokens None", lambda ws: reference.capture(P(), None, TINY), E("tokens"), r)
    add("diff_tensors a list", lambda ws: reference.diff_tensors([1], {}, atol=0, rtol=0), E("a"), r)
    add("diff_tensors atol -1", lambda ws: reference.diff_tensors({}, {}, atol=-1, rtol=0), E("atol"), r)
    add("reference_names 10**9 layers", lambda ws: reference.reference_names(10**9), E("n_layer"), r)
    add("reference_model of a plain dict", lambda ws: reference.reference_model(plain()), E("n_head"), r)
    add("capture_reference of a dict model", lambda ws: reference.capture_reference({}, ids), E("model"), r)
    add("write_dump into a FIFO", lambda ws: (os.mkfifo(ws / "f"), reference.write_dump(
        ws / "f", {"x": torch.ones(1)}, side="functional_gpt", prompt="p", tokens=ids)), E("FIFO"), r)
    return cases
