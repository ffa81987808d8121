"""Cached decoding: logits equal the full forward, greedy tokens equal transformers' generate, cache size."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.tolerances import float32_bound, model_depth, model_terms
from tests.zaya_jax.test_parity import _models
from zaya_jax import generate, load_preset
from zaya_jax.cache import init_cache, kv_bytes_per_token


@pytest.fixture(scope="module", params=["gqa4x2", "mqa"])
def pair(request):
    return _models(request.param)


def _prompts(vocab: int, rows: int = 3, length: int = 9, seed: int = 0):
    ids = np.random.default_rng(seed).integers(3, vocab, (rows, length))
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    return np.where(mask == 1, ids, 0), mask


@functools.lru_cache(maxsize=4)
def _full_forward_and_step(model):
    """The full forward's logits on the 12-token prompts, and the jitted cached step: one compile per model for
    every prefill length tried."""
    ids, mask = _prompts(model.config.vocab_size, length=12)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions)))
    return ids, mask, positions, full, jax.jit(model.cached_forward)


def cached_vs_full_error(model, prefill: int = 5) -> float:
    """Max |cached - full| / max |full| over real positions: prefill `prefill` tokens, then one token per call."""
    ids, mask, positions, full, step = _full_forward_and_step(model)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1])
    logits, cache = step(jnp.asarray(ids[:, :prefill]), jnp.asarray(positions[:, :prefill]),
                         jnp.asarray(mask[:, :prefill]), cache)
    cached = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):  # teacher-forced, one token per call
        logits, cache = step(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]),
                             jnp.asarray(mask[:, t:t + 1]), cache)
        cached.append(np.asarray(logits))
    cached = np.concatenate(cached, axis=1)
    real = mask.astype(bool)
    return float(np.abs(cached - full)[real].max() / np.abs(full[real]).max())


# Row 0 has 4 padding tokens: a 5-token prefill ends on its first real token; a 3-token one ends on padding, so the
# next call ends on padding too and the one after starts with the first real token, which must see no history.
@pytest.mark.parametrize("prefill", [5, 3])
def test_cached_decoding_logits_equal_the_full_forward(pair, prefill):
    _, model = pair
    # The same float32 model; the cache changes the order of the attention and convolution sums.
    config = model.config
    bound = float32_bound(model_terms(config, 12), model_depth(config.num_layers))
    assert cached_vs_full_error(model, prefill) <= bound


def test_greedy_tokens_equal_transformers_generate(pair):
    hf, model = pair
    ids, mask = _prompts(model.config.vocab_size, seed=1)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=8,
                          do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    out = generate(model, ids, 8, attention_mask=mask, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    assert (np.asarray(out.lengths) == 8).all()


def _output_shapes(jaxpr):
    """The shapes of every value a jaxpr computes, inside nested jaxprs (jit, scan, while) too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _output_shapes(inner)


def test_prefill_computes_the_logits_of_the_last_prompt_token_only(pair):
    _, model = pair
    vocab = model.config.vocab_size
    ids, mask = _prompts(vocab)  # [3, 9]
    program = jax.make_jaxpr(lambda ids, mask: generate(model, ids, 2, attention_mask=mask, stop_tokens=()).tokens)
    per_row = {s for s in _output_shapes(program(ids, mask).jaxpr) if len(s) >= 2 and s[0] == 3 and s[-1] == vocab}
    assert (3, 1, vocab) in per_row  # the logits of prefill and of each decode step
    # Nothing vocabulary-wide covers more than one token per row: no [3, 9, V] prefill logits.
    assert all(int(np.prod(s[1:-1])) == 1 for s in per_row), per_row


def test_stop_tokens_pad_the_rest_and_sampling_settings(pair):
    _, model = pair
    ids, mask = _prompts(model.config.vocab_size, seed=2)
    greedy = np.asarray(generate(model, ids, 6, attention_mask=mask, stop_tokens=()).tokens)
    stop = int(greedy[0, 2])
    out = generate(model, ids, 6, attention_mask=mask, stop_tokens=(stop,))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    first = int(np.argmax(greedy[0] == stop))
    assert lengths[0] == first + 1 and (tokens[0, first + 1:] == 0).all()
    np.testing.assert_array_equal(tokens[0, :first + 1], greedy[0, :first + 1])
    # top_k = 1 and a tiny top_p are greedy whatever the temperature; sampling is reproducible from the seed.
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        np.testing.assert_array_equal(
            np.asarray(generate(model, ids, 6, attention_mask=mask, stop_tokens=(), temperature=1.5, **kwargs).tokens),
            greedy)
    a = generate(model, ids, 6, attention_mask=mask, stop_tokens=(), temperature=1.0, seed=7).tokens
    b = generate(model, ids, 6, attention_mask=mask, stop_tokens=(), temperature=1.0, seed=7).tokens
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zaya1_8b_kv_cache_is_40_kib_per_token():
    config = load_preset("zaya1-8b")  # bfloat16
    cache = jax.eval_shape(lambda: init_cache(config, batch=1, max_len=8))
    assert kv_bytes_per_token(cache) == 40 * 1024  # 40 layers x (2 + 2 heads x 128) x 2 bytes
    assert cache.layers.k.shape == (40, 1, 2, 8, 128)
    assert cache.layers.conv.shape == (40, 1, 2, 1280)


def test_bad_generate_arguments():
    _, model = _models("gqa4x2")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(model, np.ones((1, 3), np.int32), 0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, np.full((1, 3), 10_000), 2)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        generate(model, np.ones((1, 3), np.int32), 300)


def test_generate_programs_do_not_copy_the_stacked_bfloat16_weights():
    """XLA:CPU computes bfloat16 matmuls in float32; with its loop-invariant code motion on, the conversion of every
    stacked weight is hoisted out of the layer scan (and the decode loop), a float32 copy of all layers: 2x their
    bfloat16 bytes. A full-size model then needs 35 GB besides its 17.7 GB weights. Compiled without allocating."""
    from flax import nnx

    from zaya_jax import ZayaForCausalLM
    from zaya_jax.generate import _compiled

    config = load_preset("tiny").replace(param_dtype="bfloat16", dtype="bfloat16", hidden_size=256,
                                         expert_hidden_size=512, num_experts=8, router_hidden_size=64)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0))))
    layer_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state).layers)))
    programs = _compiled(graphdef, 4, 0.0, 0, 1.0, (), 0, False)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    first = programs.first_token.lower(state, ids, ids, key).compile()
    carry = jax.eval_shape(programs.first_token, state, ids, ids, key)
    decode = programs.decode.lower(state, carry).compile()
    for name, compiled in (("prefill", first), ("decode loop", decode)):
        temp = compiled.memory_analysis().temp_size_in_bytes
        # One layer's float32 weights plus activations at batch 1: a small fraction of the stack (4 layers here).
        assert temp < 0.5 * layer_bytes, f"{name}: temporaries {temp} B for {layer_bytes} B of stacked weights"
