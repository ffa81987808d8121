"""zaya-jax: ZAYA1 (Zyphra's CCA + top-1 MoE reasoning model) in JAX / Flax NNX.

Public API:
    ZayaConfig, load_preset              the typed config and its YAML presets (configs/)
    ZayaForCausalLM, init_model          the model (Flax NNX; use nnx.split / nnx.merge for pure functions)
    parameter_counts                     total / active parameter counts without allocating
    load_pretrained, save_pretrained     transformers-format safetensors checkpoints
    generate, generate_ids               cached decoding with greedy / temperature / top-k / top-p sampling
    markovian_rsa, RSAConfig             Markovian RSA test-time compute (bounded memory over rounds)
"""

from zaya_jax.config import ZayaConfig, load_preset
from zaya_jax.generate import GenerateOutput, generate, generate_ids
from zaya_jax.hf_io import load_pretrained, save_pretrained
from zaya_jax.model import ForwardOutput, ParameterCounts, ZayaForCausalLM, init_model, parameter_counts
from zaya_jax.router import BalancingBias
from zaya_jax.rsa import RSAConfig, RSAResult, markovian_rsa

__all__ = [
    "BalancingBias",
    "ForwardOutput",
    "GenerateOutput",
    "ParameterCounts",
    "RSAConfig",
    "RSAResult",
    "ZayaConfig",
    "ZayaForCausalLM",
    "generate",
    "generate_ids",
    "init_model",
    "load_preset",
    "load_pretrained",
    "markovian_rsa",
    "parameter_counts",
    "save_pretrained",
]
