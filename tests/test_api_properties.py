"""Generated inputs over the Python API's faces (model, interp, training, reference).

For every public function Hypothesis draws the arguments: each a good value, except at
most one, spoiled with a hostile value (a wrong type, shape, dtype or device, a number
out of range, NaN, infinity, a numpy scalar, a meta tensor, params missing a key or of
mixed dtypes, ids past the vocabulary, ...). The property:

- the call gives an answer, or raises a UserError whose one-line message names the
  spoiled argument; it never raises anything else;
- a call whose arguments are all good is never refused;
- the inputs are unchanged afterwards (except what a function is documented to update in
  place: the optimizer's params, moments and gradients, a KV cache's buffers).

CI runs the "ci" profile of tests/conftest.py (a few dozen examples per function,
derandomized); `HYPOTHESIS_PROFILE=deep` digs further. The generation face's functions
are in tests/test_generation_properties.py.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

import functional_gpt as fg
import functional_gpt.device as device_module
import functional_gpt.interp as interp
import functional_gpt.reference as reference
import functional_gpt.training as training
import functional_gpt.training.budget as budget_module
import functional_gpt.training.muon as muon_module
import functional_gpt.training.settings as settings_module
import functional_gpt.generation.speculative as speculative
from functional_gpt import UserError
from functional_gpt.checks import describe
from functional_gpt.generation.sampling import Sampling
from functional_gpt.training.data import Position

from conftest import TINY

PARAMS = fg.init_params(TINY, seed=0)
TOKENS = torch.randint(TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
WORK = Path(tempfile.mkdtemp(prefix="fgpt-properties-"))  # removed at the end of the module


# ------------------------------------------------------------------------ hostile values


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 50).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    return torch.randint(-3, 200, shape, generator=g).to(dtype)


TENSORS = st.builds(_tensor, st.lists(st.integers(0, 4), max_size=4).map(tuple),
                    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int32,
                                     torch.uint8, torch.bool]), st.integers(0, 2**16))
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    # Relative names only, resolved in the module's scratch directory (the fixture below
    # works there): a drawn path is written to, and must not land in the checkout or in /.
    st.text(max_size=4).filter(lambda t: not t.startswith("/") and (not t or not Path(t).exists())),
    st.lists(st.integers(-3, 200), max_size=3), st.just({}), st.just(()), TENSORS,
    st.builds(np.int64, st.integers(-3, 200)), st.builds(np.float32, st.floats(-1e3, 1e3, width=32)),
    st.just(torch.zeros(2, 3, device="meta")), st.just(torch.tensor(3, device="meta")), st.just(object()),
)


def _spoiled_params(which: int) -> dict:
    """Params wrong in one way: a key missing, blocks as a dict, mixed dtypes, meta
    tensors, a tensor as a list, a shape off, a plain dict without its config."""
    flat = fg.flatten(PARAMS)
    if which == 0:
        return fg.unflatten({k: v for k, v in flat.items() if k != "h.1.mlp.c_fc.bias"})
    if which == 1:
        return {**PARAMS, "h": {str(i): b for i, b in enumerate(PARAMS["h"])}}
    if which == 2:
        return fg.unflatten({k: v.double() if k.startswith("h.0") else v for k, v in flat.items()})
    if which == 3:
        return fg.unflatten({k: v.to("meta") for k, v in flat.items()})
    if which == 4:
        return fg.unflatten(dict(flat, **{"ln_f.bias": flat["ln_f.bias"].tolist()}))
    if which == 5:
        return fg.unflatten(dict(flat, **{"wpe.weight": flat["wpe.weight"][:, :5]}))
    return fg.unflatten(flat)  # no config of its own


SPOILED_PARAMS = st.builds(_spoiled_params, st.integers(0, 6))
SPOILED_TOKENS = st.sampled_from([
    torch.tensor([[1, 2, 128]]), torch.tensor([[-1, 2]]), torch.zeros(1, 40, dtype=torch.long),
    torch.zeros(0, 3, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), torch.zeros(1, 3),
    torch.zeros(3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.int16),
    torch.zeros(1, 3, dtype=torch.long, device="meta"),
])


# ------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    call: Callable  # (**arguments) -> anything
    good: dict  # argument -> () -> a good value
    says: dict = field(default_factory=dict)  # argument -> the words a message about it may use instead
    spoilers: dict = field(default_factory=dict)  # argument -> extra hostile values for it
    updates: tuple = ()  # arguments the function changes in place, as documented

    def words(self, arg: str) -> tuple:
        return (arg,) + self.says.get(arg, ())


def _saved(name="m.safetensors") -> Path:
    path = WORK / "saved" / name
    if not path.exists():
        fg.save_params(path, PARAMS, TINY)
    return path


def _data_dir() -> Path:
    path = WORK / "data"
    if not (path / "val.bin").exists():
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        rng.integers(0, TINY.vocab_size, 400).astype("<u2").tofile(path / "train.bin")
        rng.integers(0, TINY.vocab_size, 100).astype("<u2").tofile(path / "val.bin")
    return path


def _texts() -> Path:
    path = WORK / "texts"
    if not path.exists():
        path.mkdir(parents=True)
        for i in range(3):
            (path / f"{i}.txt").write_text(f"Text number {i}: to be or not to be. " * 5, encoding="utf-8")
    return path


def _out(suffix: str) -> Callable:
    counter = iter(range(10**9))
    return lambda: WORK / "out" / f"{next(counter)}{suffix}"


def _adapter() -> "fg.model.Adapter":
    return fg.model.init_adapter(PARAMS, 2, targets=("attn.c_attn", "mlp.c_proj"), seed=1)


def _saved_adapter() -> Path:
    path = WORK / "saved" / "adapter"
    if not path.exists():
        fg.model.save_adapter(path, _adapter())
    return path


SPOILED_ADAPTERS = st.sampled_from([
    fg.model.Adapter({}, 2, 2.0),
    fg.model.Adapter({"h.0.attn.c_attn.lora_A": torch.zeros(TINY.n_embd, 2)}, 2, 2.0),  # no lora_B
    fg.model.Adapter({"h.9.attn.c_attn.lora_A": torch.zeros(1, 2), "h.9.attn.c_attn.lora_B": torch.zeros(2, 1)}, 2, 1.0),
    fg.model.Adapter({"h.0.attn.c_q.lora_A": torch.zeros(1, 2)}, 2, 1.0),
    fg.model.Adapter({"h.0.mlp.c_fc.lora_A": torch.zeros(TINY.n_embd, 3),
                      "h.0.mlp.c_fc.lora_B": torch.zeros(3, 4 * TINY.n_embd)}, 2, 1.0),  # rank 3 tensors, rank 2
    fg.model.Adapter({"h.0.mlp.c_fc.lora_A": torch.zeros(TINY.n_embd, 2, dtype=torch.long),
                      "h.0.mlp.c_fc.lora_B": torch.zeros(2, 4 * TINY.n_embd)}, 2, 1.0),
    fg.model.Adapter(_adapter_tensors := {"h.0.mlp.c_fc.lora_A": torch.zeros(TINY.n_embd, 2),
                                          "h.0.mlp.c_fc.lora_B": torch.zeros(2, 4 * TINY.n_embd)}, 0, 1.0),
    fg.model.Adapter(_adapter_tensors, 2, float("nan")),
    fg.model.Adapter(_adapter_tensors, 2, 1.0, rslora="yes"),
    fg.model.Adapter([1, 2], 2, 1.0),
])


def _settings(**overrides):
    return training.StepSettings(**dict(config=TINY, lr=1e-3, min_lr=1e-4, warmup_steps=1, decay_steps=10,
                                        dropout=False) | overrides)


def _batch():
    t = torch.randint(TINY.vocab_size, (1, 2, 9), generator=torch.Generator().manual_seed(1))
    return training.Batch(t[..., :-1], t[..., 1:], Position())


def _fresh_params():
    return fg.init_params(TINY, seed=1)


_CACHE = []


def _cache():
    """A cache of every point of PARAMS on TOKENS, made once."""
    if not _CACHE:
        _CACHE.append(interp.run_with_cache(PARAMS, TOKENS)[1])
    return _CACHE[0]


P = lambda: PARAMS  # noqa: E731
PARAMS_WORDS = ("config", "params", "state.params", "members")
TOKEN_WORDS = ("tokens", "token id", "sequence of", "rows for a cache")
FLAT = lambda: fg.flatten(_fresh_params())  # noqa: E731
MATRICES = lambda: {k: t for k, t in FLAT().items() if muon_module.is_muon_matrix(k, t)}  # noqa: E731

CASES = {
    # --- model
    "forward": Case(fg.forward, dict(params=P, tokens=lambda: TOKENS, config=lambda: None, dropout=lambda: False,
                                     tap=lambda: fg.no_tap),
                    says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS),
                    spoilers=dict(params=SPOILED_PARAMS, tokens=SPOILED_TOKENS)),
    "forward_hidden": Case(fg.model.forward_hidden, dict(params=P, tokens=lambda: TOKENS, config=lambda: TINY,
                                                         checkpoint=lambda: False),
                           says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, config=PARAMS_WORDS),
                           spoilers=dict(params=SPOILED_PARAMS, tokens=SPOILED_TOKENS)),
    "forward_cached": Case(fg.forward_cached, dict(params=P, tokens=lambda: TOKENS[:1, :3],
                                                   cache=lambda: fg.new_cache(TINY, 1), config=lambda: None,
                                                   counts=lambda: None, cache_rows=lambda: None,
                                                   last_only=lambda: True),
                           says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, cache=("tokens",),
                                     cache_rows=("cache_rows", "tokens")),
                           spoilers=dict(params=SPOILED_PARAMS, tokens=SPOILED_TOKENS), updates=("cache",)),
    "decode_step": Case(fg.decode_step, dict(params=P, tokens=lambda: TOKENS[:, 0], cache=lambda: fg.new_cache(TINY, 2),
                                             config=lambda: TINY, rows=lambda: (True, False)),
                        says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, cache=("tokens",)),
                        spoilers=dict(params=SPOILED_PARAMS), updates=("cache",)),
    "new_cache": Case(fg.new_cache, dict(config=lambda: TINY, batch_size=lambda: 2, max_len=lambda: 8,
                                         dtype=lambda: torch.float32, device=lambda: "cpu"),
                      says=dict(batch_size=("rows",), max_len=("positions",), dtype=("kv cache",))),
    "init_params": Case(fg.init_params, dict(config=lambda: TINY, seed=lambda: 3, dtype=lambda: torch.bfloat16,
                                             device=lambda: "cpu"), says=dict(config=("parameters of",))),
    "with_config": Case(fg.with_config, dict(params=lambda: fg.unflatten(fg.flatten(PARAMS)), config=lambda: TINY),
                        says=dict(params=PARAMS_WORDS), spoilers=dict(params=SPOILED_PARAMS)),
    "flatten": Case(fg.flatten, dict(params=P)),
    "unflatten": Case(fg.unflatten, dict(flat=lambda: fg.flatten(PARAMS)),
                      spoilers=dict(flat=st.sampled_from([{"a.b": 1, "a.b.c": 2}, {"": 1}, {3: 1}, {"a..b": 1}]))),
    "config_of": Case(fg.config_of, dict(params=P), says=dict(params=PARAMS_WORDS)),
    "count_params": Case(fg.count_params, dict(config=lambda: TINY)),
    "param_spec": Case(fg.param_spec, dict(config=lambda: TINY)),
    "preset": Case(fg.preset, dict(name=lambda: "cpu-tiny"), says=dict(name=("preset",))),
    "GPTConfig": Case(lambda **kw: fg.GPTConfig(**kw), dict(n_layer=lambda: 2, n_head=lambda: 2, n_embd=lambda: 8,
                                                             layer_norm_epsilon=lambda: 1e-5, attn_pdrop=lambda: 0.0),
                      says=dict(n_head=("n_embd",), n_embd=("n_head",))),
    "quantize": Case(fg.quantize, dict(params=P, scheme=lambda: "int8"), says=dict(params=PARAMS_WORDS)),
    "dequantize": Case(fg.dequantize, dict(params=lambda: fg.quantize(PARAMS)), says=dict(params=PARAMS_WORDS)),
    "speculative_generate": Case(lambda **kw: list(speculative.speculative_generate(**kw)),
                                 dict(params=P, prompt=lambda: TOKENS[0].tolist(), config=lambda: TINY,
                                      max_new_tokens=lambda: 5, proposer=lambda: speculative.PromptLookup(2),
                                      k=lambda: 3, stop_tokens=lambda: (), window=lambda: None,
                                      sampling=lambda: Sampling(temperature=0.7),
                                      generator=lambda: torch.Generator().manual_seed(0)),
                                 says=dict(params=PARAMS_WORDS, prompt=("token id", "tokens"),
                                           max_new_tokens=("--max_new_tokens",), k=("--speculate",),
                                           stop_tokens=("stop",))),
    "DraftModel": Case(speculative.DraftModel, dict(params=P, config=lambda: TINY, target=lambda: TINY,
                                                    rows=lambda: 2),
                       says=dict(params=PARAMS_WORDS, target=("--draft", "config"))),
    "PromptLookup": Case(speculative.PromptLookup, dict(max_ngram=lambda: 3), says=dict(max_ngram=("--prompt_lookup",))),
    "save_params": Case(fg.save_params, dict(path=_out(".safetensors"), params=P, config=lambda: TINY),
                        says=dict(params=PARAMS_WORDS, path=("out",)), spoilers=dict(params=SPOILED_PARAMS)),
    "load_params": Case(fg.load_params, dict(path=_saved, dtype=lambda: torch.float32, device=lambda: "cpu",
                                             config=lambda: None)),
    "encode": Case(fg.encode, dict(text=lambda: "Hello <|endoftext|> world")),
    "decode": Case(fg.decode, dict(ids=lambda: [15496, 50256, 995])),
    # --- interp
    "run_with_cache": Case(interp.run_with_cache, dict(params=P, tokens=lambda: TOKENS, names=lambda: ["h.0.attn.z"],
                                                       hooks=lambda: (), grad_of=lambda: None, config=lambda: None),
                           says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, names=("hook name",),
                                     hooks=("hook name", "hook")),
                           spoilers=dict(params=SPOILED_PARAMS, tokens=SPOILED_TOKENS,
                                         grad_of=st.just(lambda logits: logits))),
    "run_with_hooks": Case(interp.run_with_hooks, dict(params=P, tokens=lambda: TOKENS,
                                                       hooks=lambda: {"h.1.mlp.post": lambda x: x * 0},
                                                       config=lambda: TINY),
                           says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, hooks=("hook name", "hook"),
                                     config=PARAMS_WORDS),
                           spoilers=dict(hooks=st.sampled_from([{"h.1.mlp": torch.zeros(1)}, {"h.1.mlp": lambda x: 3},
                                                                [("h.0", 1, 2)], {"h.7": lambda x: x}]))),
    "hook_names": Case(interp.hook_names, dict(n_layer=lambda: 2)),
    "to_transformer_lens": Case(interp.to_transformer_lens, dict(name=lambda: "h.1.attn.pattern"),
                                says=dict(name=("hook",))),
    "from_transformer_lens": Case(interp.from_transformer_lens, dict(name=lambda: "blocks.1.hook_resid_post"),
                                  says=dict(name=("transformerlens",))),
    "tl_name": Case(interp.tl_name, dict(name=lambda: "scale", layer=lambda: 1, layer_type=lambda: "ln1")),
    "weights_by_role": Case(interp.weights_by_role, dict(params=P, config=lambda: None), says=dict(params=PARAMS_WORDS)),
    "to_str_tokens": Case(fg.to_str_tokens, dict(text_or_ids=lambda: "Hello world", prepend_bos=lambda: True),
                          says=dict(text_or_ids=("text_or_ids", "ids"))),
    "to_single_token": Case(fg.to_single_token, dict(text=lambda: " Mary")),
    "cache.accumulated_resid": Case(lambda **kw: _cache().accumulated_resid(**kw),
                                    dict(layer=lambda: 1, incl_mid=lambda: True, apply_ln=lambda: True,
                                         pos_slice=lambda: -1, mlp_input=lambda: False),
                                    says=dict(pos_slice=("slice",))),
    "cache.decompose_resid": Case(lambda **kw: _cache().decompose_resid(**kw),
                                  dict(layer=lambda: 1, mode=lambda: "attn", apply_ln=lambda: True,
                                       pos_slice=lambda: (0, 2)), says=dict(pos_slice=("slice",))),
    "cache.stack_head_results": Case(lambda **kw: _cache().stack_head_results(**kw),
                                     dict(layer=lambda: -1, incl_remainder=lambda: True, apply_ln=lambda: True,
                                          pos_slice=lambda: [0, 1]), says=dict(pos_slice=("slice",))),
    "cache.apply_ln_to_stack": Case(lambda **kw: _cache().apply_ln_to_stack(**kw),
                                    dict(residual_stack=lambda: torch.randn(3, 2, 6, TINY.n_embd), layer=lambda: 1,
                                         mlp_input=lambda: True, batch_slice=lambda: 0),
                                    says=dict(batch_slice=("slice",), residual_stack=("residual_stack", "slice"))),
    "cache.logit_attrs": Case(lambda **kw: _cache().logit_attrs(**kw),
                              dict(residual_stack=lambda: torch.randn(3, 2, 6, TINY.n_embd), tokens=lambda: TOKENS,
                                   incorrect_tokens=lambda: TOKENS.flip(1)),
                              says=dict(residual_stack=("residual_stack", "slice"),
                                        incorrect_tokens=("incorrect_tokens",), tokens=("tokens",))),
    "cache.stack_activation": Case(lambda **kw: _cache().stack_activation(**kw),
                                   dict(activation_name=lambda: "pattern", layer=lambda: -1),
                                   says=dict(activation_name=("activation_name", "not in this cache", "name"))),
    "ablate_heads": Case(interp.ablate_heads, dict(layer=lambda: 1, heads=lambda: [0, 2], how=lambda: "mean")),
    "patch_sweep": Case(interp.patch_sweep, dict(params=P, clean=lambda: TOKENS[:1, :3], corrupted=lambda: TOKENS[1:, :3],
                                                 metric=lambda: (lambda logits: logits[0, -1, 5] - logits[0, -1, 7]),
                                                 over=lambda: "heads", config=lambda: None),
                        says=dict(params=PARAMS_WORDS, clean=TOKEN_WORDS, corrupted=TOKEN_WORDS)),
    "logit_lens": Case(interp.logit_lens, dict(params=P, tokens=lambda: TOKENS[0], config=lambda: None),
                       says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS)),
    "logit_attribution": Case(interp.logit_attribution, dict(params=P, tokens=lambda: TOKENS[0], target=lambda: 5,
                                                             other=lambda: 7, position=lambda: -2, config=lambda: None),
                              says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, position=("tokens",))),
    "per_example_grads": Case(interp.per_example_grads, dict(params=P, tokens=lambda: TOKENS[:, :4],
                                                             targets=lambda: TOKENS[:, 1:5], config=lambda: None),
                              says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS, targets=("token id",))),
    "stack_params": Case(interp.stack_params, dict(members=lambda: [PARAMS, _fresh_params()], config=lambda: None),
                         says=dict(members=PARAMS_WORDS)),
    "ensemble_logits": Case(interp.ensemble_logits, dict(stacked=lambda: interp.stack_params([PARAMS, PARAMS]),
                                                         tokens=lambda: TOKENS, config=lambda: None),
                            says=dict(stacked=PARAMS_WORDS, tokens=TOKEN_WORDS)),
    "attention_maps": Case(interp.attention_maps, dict(params=P, tokens=lambda: TOKENS[0], config=lambda: None),
                           says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS)),
    "plot_sweep": Case(interp.plot_sweep, dict(result=lambda: torch.rand(2, 3), path=_out(".png"),
                                               columns=lambda: ["a", "b", "c"], title=lambda: "t"),
                       says=dict(result=("columns",))),
    # --- training
    "StepSettings": Case(lambda **kw: _settings(**kw), dict(lr=lambda: 1e-3, grad_clip=lambda: 0.0,
                                                            betas=lambda: (0.9, 0.95), weight_decay=lambda: 0.1,
                                                            dtype=lambda: torch.bfloat16, compile=lambda: False),
                         says=dict(lr=("min_lr",), betas=("beta1", "beta2"))),
    "new_state": Case(training.new_state, dict(params=_fresh_params, seed=lambda: 2**63, device=lambda: "cpu"),
                      says=dict(params=PARAMS_WORDS)),
    "train_step": Case(training.train_step, dict(state=lambda: training.new_state(_fresh_params(), 0, "cpu"),
                                                 batch=_batch, settings=_settings),
                       says=dict(batch=TOKEN_WORDS, state=PARAMS_WORDS),
                       spoilers=dict(batch=st.sampled_from([
                           training.Batch(_batch().x, _batch().y[..., :-1], Position()),
                           training.Batch(_batch().x[0], _batch().y[0], Position()),
                           training.Batch(_batch().x + 500, _batch().y, Position()),
                           training.Batch(_batch().x, _batch().y, (0, 0))])),
                       updates=("state",)),
    "init_adapter": Case(fg.model.init_adapter, dict(params=P, rank=lambda: 2, alpha=lambda: 4.0,
                                                     targets=lambda: ("attn.c_attn", "mlp.c_fc"), layers=lambda: [1],
                                                     seed=lambda: 3, config=lambda: None),
                         says=dict(params=PARAMS_WORDS, config=PARAMS_WORDS), spoilers=dict(params=SPOILED_PARAMS)),
    "merge": Case(fg.model.merge, dict(params=P, adapter=_adapter, config=lambda: None),
                  says=dict(params=PARAMS_WORDS, config=PARAMS_WORDS), spoilers=dict(params=SPOILED_PARAMS,
                                                                                      adapter=SPOILED_ADAPTERS)),
    "unmerge": Case(fg.model.unmerge, dict(params=P, adapter=_adapter, config=lambda: TINY),
                    says=dict(params=PARAMS_WORDS, config=PARAMS_WORDS), spoilers=dict(adapter=SPOILED_ADAPTERS)),
    "trainable_count": Case(fg.model.trainable_count, dict(adapter=_adapter)),
    "save_adapter": Case(fg.model.save_adapter, dict(directory=_out("-adapter"), adapter=_adapter, base=lambda: None),
                         says=dict(directory=("path", "out")), spoilers=dict(adapter=SPOILED_ADAPTERS)),
    "load_adapter": Case(fg.model.load_adapter, dict(directory=_saved_adapter, params=P, config=lambda: None),
                         says=dict(directory=("adapter", "not found"), params=PARAMS_WORDS, config=PARAMS_WORDS),
                         spoilers=dict(params=SPOILED_PARAMS)),
    "lm_head_loss": Case(training.lm_head_loss, dict(hidden=lambda: torch.randn(2, 5, TINY.n_embd),
                                                     wte=lambda: PARAMS["wte"]["weight"],
                                                     targets=lambda: TOKENS[:, :5], chunk_rows=lambda: 3),
                         says=dict(hidden=("wte", "targets"), wte=("hidden",), targets=("hidden", "token id"))),
    "adamw_init": Case(training.adamw_init, dict(params=FLAT)),
    "adamw_step": Case(training.adamw_step, dict(params=FLAT, grads=FLAT, state=lambda: training.adamw_init(FLAT()),
                                                 lr=lambda: 1e-3, betas=lambda: (0.9, 0.99), eps=lambda: 1e-8,
                                                 weight_decay=lambda: 0.0),
                       says=dict(betas=("betas[",), grads=("params",)), updates=("params", "state")),
    "clip_grad_norm": Case(training.clip_grad_norm, dict(grads=FLAT, max_norm=lambda: 0.5), updates=("grads",)),
    "lr_at": Case(training.lr_at, dict(step=lambda: 3, lr=lambda: 1.0, warmup_steps=lambda: 2, decay_steps=lambda: 9,
                                       min_lr=lambda: 0.1, schedule=lambda: "wsd", cooldown=lambda: 0.25),
                  says=dict(lr=("min_lr",), min_lr=("lr",))),
    "muon_step": Case(muon_module.muon_step, dict(params=MATRICES, grads=MATRICES,
                                                  momentum_buffers=lambda: {k: t.zero_() for k, t in MATRICES().items()},
                                                  lr=lambda: 1e-2, weight_decay=lambda: 0.1, momentum=lambda: 0.95,
                                                  ns_dtype=lambda: torch.float32),
                      says=dict(grads=("params",), momentum_buffers=("params",)),
                      updates=("params", "momentum_buffers")),
    "budget_seconds": Case(budget_module.budget_seconds, dict(text=lambda: "10m"), says=dict(text=("--time_budget",)),
                           spoilers=dict(text=st.text(alphabet="0123456789.-+e smhinx", max_size=8))),
    "next_batch": Case(training.next_batch, dict(tokens=lambda: training.load_tokens(_data_dir(), "train"),
                                                 position=lambda: Position(1, 3), batch_size=lambda: 3,
                                                 context_length=lambda: 8, stride=lambda: 4, seed=lambda: 0),
                       says=dict(position=("data position",), tokens=("tokens hold",), batch_size=("windows",),
                                 context_length=("tokens hold",))),
    "load_tokens": Case(training.load_tokens, dict(data_dir=_data_dir, split=lambda: "val",
                                                   vocab_size=lambda: TINY.vocab_size),
                        says=dict(data_dir=("val.bin",), vocab_size=("val.bin",))),
    "make_config": Case(training.make_config, dict(values=lambda: {"lr": 0.01, "batch_size": 2}),
                        says=dict(values=("training settings",))),
    "lora_targets": Case(settings_module.lora_targets, dict(text=lambda: "attn.c_attn,mlp.c_fc"),
                         says=dict(text=("--lora_targets",)), spoilers=dict(text=st.text(max_size=16))),
    "lora_layers": Case(settings_module.lora_layers, dict(text=lambda: "0-3,5"), says=dict(text=("--lora_layers",)),
                        spoilers=dict(text=st.text(alphabet="0123456789-, x", max_size=10))),
    # --- reference
    "evaluate": Case(reference.evaluate, dict(params=P, texts=lambda: [TOKENS[0], TOKENS[1, :3]], config=lambda: TINY,
                                              max_length=lambda: 4, stride=lambda: 2, batch_size=lambda: 2,
                                              show_progress=lambda: False),
                     says=dict(params=PARAMS_WORDS, texts=("token ids", "nothing to evaluate"),
                               max_length=("--max_length", "--stride"), stride=("--stride",),
                               batch_size=("--batch_size",), config=PARAMS_WORDS)),
    "load_eval_data": Case(reference.load_eval_data, dict(data=_texts, weights=lambda: "unused"),
                           says=dict(data=("--data",))),
    "capture": Case(reference.capture, dict(params=P, tokens=lambda: TOKENS, config=lambda: TINY, grads=lambda: True),
                    says=dict(params=PARAMS_WORDS, tokens=TOKEN_WORDS + ("--prompt",), config=PARAMS_WORDS)),
    "diff_tensors": Case(reference.diff_tensors, dict(a=lambda: {"x": torch.ones(3)}, b=lambda: {"x": torch.ones(3)},
                                                      atol=lambda: 1e-4, rtol=lambda: 0.0),
                         says=dict(atol=("--atol",), rtol=("--rtol",))),
    "reference_names": Case(reference.reference_names, dict(n_layer=lambda: 2)),
    "reference_model": Case(reference.reference_model, dict(params=P, config=lambda: None),
                            says=dict(params=PARAMS_WORDS)),
}


@pytest.fixture(scope="module", autouse=True)
def workspace():
    """The work directory (the current one while the module runs), and a memory bound: whatever would allocate more than 256 MiB
    is refused as on a machine with that much free (device.check_memory), so a drawn size
    that fits the real machine cannot make the test take minutes and gigabytes."""
    real, cwd = device_module.free_memory, os.getcwd()
    device_module.free_memory = lambda device: min(real(device) or 0, 2**28)
    scratch = WORK / "cwd"
    scratch.mkdir(parents=True)
    os.chdir(scratch)
    yield
    os.chdir(cwd)
    device_module.free_memory = real
    shutil.rmtree(WORK, ignore_errors=True)


def _snapshot(value):
    """A deep copy to compare with (tensors cloned; meta tensors by shape and dtype)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), None if value.is_meta else value.detach().clone())
    if isinstance(value, dict):
        return ("dict", type(value), {k: _snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_snapshot(v) for v in value])
    return ("value", value)


def _same(value, snap) -> bool:
    kind = snap[0]
    if kind == "tensor":
        _, dtype, shape, data = snap
        if not (isinstance(value, torch.Tensor) and value.dtype == dtype and tuple(value.shape) == shape):
            return False
        if data is None or not data.is_floating_point():
            return data is None or torch.equal(value, data)
        return bool(((value == data) | (value.isnan() & data.isnan())).all())  # NaN where NaN was
    if kind == "dict":
        return isinstance(value, dict) and value.keys() == snap[2].keys() and all(
            _same(value[k], s) for k, s in snap[2].items())
    if kind in ("list", "tuple"):
        return len(value) == len(snap[1]) and all(_same(v, s) for v, s in zip(value, snap[1]))
    return True


@pytest.mark.parametrize("name", list(CASES))
@given(data=st.data())
def test_right_answer_or_a_user_error_naming_the_argument_and_inputs_unchanged(name, data):
    case = CASES[name]
    spoiled = data.draw(st.sampled_from([None, *case.good]), label="spoiled argument")
    arguments = {}
    for arg, good in case.good.items():
        if arg == spoiled:
            hostile = HOSTILE if arg not in case.spoilers else st.one_of(case.spoilers[arg], HOSTILE)
            arguments[arg] = data.draw(hostile, label=arg)
        else:
            arguments[arg] = good()
    note(f"{name}({', '.join(f'{k}={describe(v)}' for k, v in arguments.items())})")
    before = {k: _snapshot(v) for k, v in arguments.items()}
    try:
        case.call(**arguments)
    except UserError as e:
        message = str(e)
        assert "\n" not in message, message
        assert spoiled is not None, f"a good call was refused: {message}"
        given = arguments[spoiled]
        named = any(word.lower() in message.lower() for word in case.words(spoiled)) or (
            isinstance(given, (str, Path)) and str(given) and UserError(str(given)).args[0] in message)  # a path, named
        assert named, f"{spoiled} was spoiled, the message does not name it: {message}"
    changed = [k for k, v in arguments.items() if k not in case.updates and not _same(v, before[k])]
    assert not changed, f"changed its inputs: {changed}"


def test_int32_token_ids_give_what_int64_ids_give():
    """Found by the deep profile: int32 ids passed the checks, then failed in cross_entropy."""
    ids = torch.randint(TINY.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    for run in (lambda t: fg.forward(PARAMS, t), lambda t: interp.per_example_grads(PARAMS, t, t)["wte.weight"],
                lambda t: torch.tensor(reference.evaluate(PARAMS, [t[0]], TINY, show_progress=False).nats),
                lambda t: reference.capture(PARAMS, t, TINY, grads=True)["loss"]):
        assert torch.equal(run(ids.int()), run(ids))
