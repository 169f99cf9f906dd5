"""Our GPT's weights as a Hugging Face `GPT2LMHeadModel`, for running HF peers on the SAME weights.

The parameter names already match GPT-2's; the one difference is the layout of the four projections
per block: HF's `Conv1D` stores (in_features, out_features), nn.Linear (out_features, in_features),
so those weights are transposed. The head is untied and has no bias, as in our model.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt import GPT

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(model: GPT, attn_implementation: str = "sdpa") -> GPT2Config:
    c = model.config
    p = c.dropout
    config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=4 * c.n_embd, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
        tie_word_embeddings=False,
        # No end-of-text token in a character vocabulary: generation runs for exactly max_new_tokens.
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn_implementation
    return config


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("_orig_mod.")
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        state[name] = tensor.detach().clone().contiguous()
    return state


def to_hf(model: GPT, attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """A GPT2LMHeadModel (eval mode, same dtype and device) holding a copy of `model`'s weights."""
    p = next(model.parameters())
    hf = GPT2LMHeadModel(hf_config(model, attn_implementation))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    # HF keeps a causal-mask buffer ("attn.bias") in some versions; it is not a weight.
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0  # never used to pad: every prompt in a batch has one length
    return hf.to(device=p.device, dtype=p.dtype).eval()


@torch.inference_mode()
def max_logit_difference(model: GPT, hf: GPT2LMHeadModel, ids: list[int]) -> float:
    """Largest |difference| between the two models' logits over a whole prompt."""
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    ours, _ = model(idx)
    theirs = hf(idx).logits
    return float((ours.float() - theirs.float()).abs().max())


def check_same_logits(model: GPT, hf: GPT2LMHeadModel, ids: list[int], atol: float = 1e-4) -> float:
    diff = max_logit_difference(model, hf, ids)
    if not diff <= atol:
        raise AssertionError(f"HF conversion differs from our model: max |logit difference| "
                             f"{diff:.2e} > {atol}")
    return diff
