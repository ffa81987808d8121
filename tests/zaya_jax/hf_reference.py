"""Helpers that build the transformers oracle: a `ZayaForCausalLM` with every parameter and buffer randomized.

transformers' init sets the key temperature to 0, residual scales to 1 and biases to 0, which hides bugs, so every
tensor (balancing biases included) gets random values here.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from zaya_jax.config import ZayaConfig


def random_hf_model(config: ZayaConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    hf_config = transformers.ZayaConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = transformers.ZayaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name:
                continue
            if tensor.ndim == 1 and any(s in name for s in ("scale", "norm", "temp")):
                tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))  # around 1, both signs of deviation
            elif "balancing_biases" in name:
                tensor.copy_(0.2 * torch.randn_like(tensor))
                tensor[-1] = -1.0  # the skip class, as in the released checkpoints
            else:
                tensor.copy_(0.3 * torch.randn_like(tensor))
    return model.to(dtype)


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def hf_choices(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> np.ndarray:
    """Expert choice per layer and token [L, B, S], recomputed from transformers' router logits and its biases."""
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, output_router_logits=True)
    choices = []
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        bias = model.model.layers[layer].mlp.gate.balancing_biases.float()
        choices.append((probs + bias).argmax(-1).reshape(input_ids.shape).numpy())
    return np.stack(choices)
