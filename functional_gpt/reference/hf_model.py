"""transformers' GPT2LMHeadModel as the reference: built around the same params, its
modules hooked under our tap names, its gradients under our param keys.

transformers is imported only here and only when called; it is a development extra, so
its absence is a one-line UserError.
"""

import re

import torch

from ..checks import check_bool, check_tensor, describe
from ..errors import UserError
from ..model.config import GPTConfig, hf_config_dict
from ..model.quantize import dequantize
from ..model.transformer import checked_config
from ..interp.names import hook_names
from ..model.params import Params, flatten

# transformers' module names, less the `transformer.` prefix, are our tap names except two.
_RENAMED = {"drop": "embed", "lm_head": "logits"}
_TAP_NAME = re.compile(r"wte|wpe|embed|h\.\d+(\.(ln_1|attn|ln_2|mlp))?|ln_f|logits")


def reference_names(n_layer: int) -> list[str]:
    """The hook points `capture_reference` records (those that are outputs of transformers'
    modules), in forward order."""
    return [name for name in hook_names(n_layer) if _TAP_NAME.fullmatch(name)]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("the reference needs transformers: pip install 'functional-gpt[dev]'") from None
    return transformers


def reference_model(params: Params, config: GPTConfig | None = None):
    """A GPT2LMHeadModel in eval mode (no dropout) whose parameters are `params`' tensors
    (shared, not copied), with lm_head tied to wte as in GPT-2; for int8 params, the float
    weights they stand for (`dequantize`). config: None takes the one the params carry."""
    config = checked_config(params, config)
    params = dequantize(params, config)
    transformers = _transformers()
    with torch.device("meta"):  # no memory for the random init that would be overwritten
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(config)))
    state = {f"transformer.{k}": v for k, v in flatten(params).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


def capture_reference(model, tokens: torch.Tensor, *, grads: bool = False) -> dict[str, torch.Tensor]:
    """Run `model` on tokens int64 [B, T] -> {name: tensor} in forward order, named as
    functional_gpt's capture (see compare.capture): every tap, then with `grads` "loss"
    (transformers' own next-token loss, nats/token) and "grad.<GPT-2 key>" per parameter.

    "wpe" is broadcast to [B, T, C] as our tap records it (transformers' module gives
    [1, T, C]). The attention module returns a tuple: its first item is the output.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, torch.nn.Module) or getattr(config, "model_type", None) != "gpt2":
        raise UserError(f"model: expected transformers' GPT2LMHeadModel (reference_model), got {describe(model)}")
    check_tensor("tokens", tokens, dims="B T", kind="integer")
    check_bool("grads", grads)
    if not tokens.numel() or tokens.shape[1] > config.n_positions:
        raise UserError(f"tokens: {describe(tokens)} for a model of {config.n_positions} positions")
    low, high = (int(v) for v in torch.aminmax(tokens))
    if low < 0 or high >= config.vocab_size:
        raise UserError(f"token id {low if low < 0 else high} is out of range for vocab_size={config.vocab_size}")
    store = {}

    def hook(name):
        def record(module, args, output):
            store[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return record

    handles = []
    for module_name, module in model.named_modules():
        name = module_name.removeprefix("transformer.")
        name = _RENAMED.get(name, name)
        if _TAP_NAME.fullmatch(name):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grads):
            out = model(input_ids=tokens, labels=tokens if grads else None)
        if grads:
            out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    store["wpe"] = store["wpe"].expand_as(store["wte"])
    if grads:
        store["loss"] = out.loss.detach()
        for name, p in model.named_parameters():  # the tied lm_head appears once, as wte
            store[f"grad.{name.removeprefix('transformer.')}"] = p.grad
    return store
