"""Numerical parity with the transformers oracle (`ZayaForCausalLM`, transformers 5.23.0) on random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.tolerances import assert_float32_close, model_depth, model_terms, scaled_error
from tests.zaya_jax.hf_reference import hf_choices, hf_state_numpy, random_hf_model
from zaya_jax.config import ZayaConfig
from zaya_jax.hf_io import model_from_hf_tensors

BASE = dict(vocab_size=131, rope_theta=10000.0, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
# Three shapes that differ in KV heads, head_dim, expert count, widths, conv kernels and depth.
CONFIGS = {
    "gqa4x2": ZayaConfig(**BASE, hidden_size=48, num_layers=3, query_heads=4, kv_heads=2, head_dim=16,
                         num_experts=4, expert_hidden_size=32, router_hidden_size=16),
    "mqa": ZayaConfig(**BASE, hidden_size=40, num_layers=2, query_heads=6, kv_heads=1, head_dim=12,
                      num_experts=3, expert_hidden_size=24, router_hidden_size=8, conv_kernel_depthwise=3,
                      conv_kernel_grouped=1),
    "mha4": ZayaConfig(**BASE, hidden_size=32, num_layers=4, query_heads=4, kv_heads=4, head_dim=8,
                       num_experts=6, expert_hidden_size=16, router_hidden_size=12, rotary_fraction=0.25,
                       conv_kernel_depthwise=1, conv_kernel_grouped=3),
}
# (batch, seq) per config: sequence lengths 1 and odd included.
SHAPES = {"gqa4x2": [(2, 9), (1, 1)], "mqa": [(3, 7)], "mha4": [(1, 13), (2, 1)]}


def _models(name: str, dtype: str = "float32"):
    config = CONFIGS[name].replace(param_dtype=dtype, dtype=dtype)
    hf = random_hf_model(CONFIGS[name], seed=sum(map(ord, name)))
    state = hf_state_numpy(hf)
    ours = model_from_hf_tensors(config, state.__getitem__, {k: v.shape for k, v in state.items()})
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_pair(request):
    return request.param, *_models(request.param)


def _assert_matches(got, ref, config, seq_len: int, name: str = "") -> None:
    """float32 against transformers' float32: the same model, its sums in another order (tests/tolerances.py)."""
    assert_float32_close(got, ref, terms=model_terms(config, seq_len), depth=model_depth(config.num_layers),
                         name=name)


def test_logits_and_expert_choices_match_transformers(model_pair):
    name, hf, ours = model_pair
    forward = jax.jit(lambda ids: ours(ids, return_choices=True))
    for batch, seq in SHAPES[name]:
        ids = torch.randint(0, ours.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            ref = hf(ids).logits.numpy()
        out = forward(jnp.asarray(ids.numpy()))
        _assert_matches(out.logits, ref, ours.config, seq, f"{name} {batch}x{seq}")
        np.testing.assert_array_equal(np.asarray(out.choices), hf_choices(hf, ids))


def test_left_padding_matches_transformers(model_pair):
    name, hf, ours = model_pair
    batch, seq = 3, 11
    ids = torch.randint(3, ours.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.numpy()
    out = ours(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), return_choices=True)
    real = mask.numpy().astype(bool)
    got = np.asarray(out.logits)
    _assert_matches(got[real], ref[real], ours.config, seq, name)
    np.testing.assert_array_equal(np.asarray(out.choices)[:, real], hf_choices(hf, ids, mask)[:, real])


def test_bfloat16_matches_transformers_bfloat16():
    name = "gqa4x2"
    hf32, _ = _models(name)
    hf = hf32.to(torch.bfloat16)
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    config = CONFIGS[name].replace(param_dtype="bfloat16", dtype="bfloat16")
    ours = model_from_hf_tensors(config, state.__getitem__, {k: v.shape for k, v in state.items()})
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits.float().numpy()
    got = np.asarray(ours(jnp.asarray(ids.numpy())))
    assert got.dtype == np.float32
    # bf16 has 8 significant bits (relative rounding 2^-9, spacing 2^-8 near 1); both sides round each layer's
    # activations, the residual merges and the logits, in different places: 3 layers x ~4 roundings x 2^-8 = 0.047.
    assert scaled_error(got, ref) <= 0.05
    # and far from an unrelated model: the fp32 reference of the *same* weights is within the same band
    with torch.no_grad():
        ref32 = hf.float()(ids).logits.numpy()
    assert scaled_error(got, ref32) <= 0.05


def test_packed_documents_equal_separate_runs(model_pair):
    """Each document in a packed row (segment ids, per-document positions) gets the logits it gets alone."""
    name, _, ours = model_pair
    rng = np.random.default_rng(0)
    lengths = [5, 1, 7]
    docs = [rng.integers(0, ours.config.vocab_size, n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    positions = np.concatenate([np.arange(n) for n in lengths])[None]
    packed = np.asarray(ours(jnp.asarray(tokens), segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions)))
    start = 0
    for doc in docs:
        alone = np.asarray(ours(jnp.asarray(doc[None])))
        _assert_matches(packed[:, start:start + len(doc)], alone, ours.config, tokens.shape[1])
        start += len(doc)
