"""GPT-2's weights by role, in TransformerLens's names and shapes: `weights_by_role(params)`.

The fused GPT-2 tensors split per layer and head (c_attn [C, 3C] into W_Q, W_K, W_V
[L, H, C, D]; c_proj into W_O [L, H, D, C]), as views of the params stacked over layers.
Nothing is folded or centred: these are the weights the model runs, as TransformerLens 4's
`TransformerBridge` gives them outside its compatibility mode. L n_layer, H heads, C n_embd,
D head size, V vocab_size, P n_positions.
"""

from dataclasses import dataclass

import torch

from ..model.config import GPTConfig
from ..model.params import Params
from ..model.quantize import dequantize
from ..model.transformer import checked_config


@dataclass(frozen=True)
class RoleWeights:
    """W_E [V, C], W_pos [P, C]; per layer and head W_Q, W_K, W_V [L, H, C, D], b_Q, b_K,
    b_V [L, H, D], W_O [L, H, D, C]; per layer b_O [L, C], W_in [L, C, 4C], b_in [L, 4C],
    W_out [L, 4C, C], b_out [L, C]; the tied unembedding W_U [C, V] and b_U [V] (zeros:
    GPT-2 has no unembedding bias). A query of head h in layer l is x @ W_Q[l, h] + b_Q[l, h]."""

    W_E: torch.Tensor
    W_pos: torch.Tensor
    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    b_Q: torch.Tensor
    b_K: torch.Tensor
    b_V: torch.Tensor
    W_O: torch.Tensor
    b_O: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_out: torch.Tensor
    b_out: torch.Tensor
    W_U: torch.Tensor
    b_U: torch.Tensor


def weights_by_role(params: Params, config: GPTConfig | None = None) -> RoleWeights:
    """params (checked against config, by default the one they carry) -> RoleWeights (of
    int8 params: the float matrices they stand for)."""
    config = checked_config(params, config)
    params = dequantize(params, config)
    C, H, D = config.n_embd, config.n_head, config.head_dim
    blocks = params["h"]

    def stacked(get) -> torch.Tensor:
        return torch.stack([get(block) for block in blocks])

    qkv = [block["attn"]["c_attn"]["weight"].view(C, 3, H, D).permute(1, 2, 0, 3) for block in blocks]  # [3, H, C, D]
    qkv_bias = [block["attn"]["c_attn"]["bias"].view(3, H, D) for block in blocks]
    wte = params["wte"]["weight"]
    return RoleWeights(
        W_E=wte,
        W_pos=params["wpe"]["weight"],
        W_Q=torch.stack([w[0] for w in qkv]), W_K=torch.stack([w[1] for w in qkv]), W_V=torch.stack([w[2] for w in qkv]),
        b_Q=torch.stack([b[0] for b in qkv_bias]), b_K=torch.stack([b[1] for b in qkv_bias]),
        b_V=torch.stack([b[2] for b in qkv_bias]),
        W_O=stacked(lambda b: b["attn"]["c_proj"]["weight"].view(H, D, C)),
        b_O=stacked(lambda b: b["attn"]["c_proj"]["bias"]),
        W_in=stacked(lambda b: b["mlp"]["c_fc"]["weight"]),
        b_in=stacked(lambda b: b["mlp"]["c_fc"]["bias"]),
        W_out=stacked(lambda b: b["mlp"]["c_proj"]["weight"]),
        b_out=stacked(lambda b: b["mlp"]["c_proj"]["bias"]),
        W_U=wte.T,
        b_U=wte.new_zeros(config.vocab_size),
    )
