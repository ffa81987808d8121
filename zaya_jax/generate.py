"""Cached decoding: prefill the prompt once, then one compiled `lax.while_loop` of single-token steps.

    generate(model, input_ids [B, P], max_new_tokens=N, attention_mask [B, P] (left padding), temperature,
             top_k, top_p, stop_tokens, seed) -> GenerateOutput(tokens [B, N] int32, lengths [B] int32)

Prompts of different lengths are left-padded to one length P (mask 0 on the padding), so every row writes the same
cache slot at each step. RoPE positions count real tokens only (cumsum(mask) - 1), as transformers' generate does.
After a row emits a stop token it emits `pad_token_id` and its length stops growing; the loop ends when every row
has stopped or N tokens are out. Sampling: temperature 0 is greedy; otherwise logits / temperature, restricted to
the top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p (1.0 = all).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.cache import init_cache
from zaya_jax.model import ZayaForCausalLM, check_token_ids


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, N] int32, pad after a stop token
    lengths: jax.Array  # [B] int32: generated tokens up to and including the first stop token


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        # Keep a token while the mass before it is below top_p: the most likely token always stays.
        keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: ZayaForCausalLM,
    input_ids: jax.Array,
    max_new_tokens: int,
    *,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] | None = None,
    seed: int = 0,
) -> GenerateOutput:
    """Decodes up to `max_new_tokens` tokens after each prompt row (see the module docstring)."""
    config = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, prompt_len] with prompt_len >= 1, got {input_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    total = input_ids.shape[1] + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_position_embeddings "
                         f"({config.max_position_embeddings})")
    check_token_ids(input_ids, config.vocab_size)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    stops = tuple(config.eos_ids if stop_tokens is None else stop_tokens)
    graphdef, state = nnx.split(model)
    run = _compiled(graphdef, max_new_tokens, float(temperature), int(top_k), float(top_p), stops,
                    config.pad_token_id or 0)
    return run(state, input_ids, mask, jax.random.key(seed))


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              stops: tuple[int, ...], pad_id: int):
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)

    @jax.jit
    def run(state, input_ids, mask, key):
        model = nnx.merge(graphdef, state)
        batch, prompt_len = input_ids.shape
        cache = init_cache(model.config, batch, prompt_len + max_new_tokens)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = model.cached_forward(input_ids, positions, mask, cache)
        key, sub = jax.random.split(key)
        token = sample_token(logits[:, -1], sub, temperature, top_k, top_p)
        out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, stop_ids)
        lengths = jnp.ones((batch,), jnp.int32)
        position = positions[:, -1] + 1

        def cond(carry):
            i, _, _, _, done, _, _, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, token, position, cache, done, out, lengths, key = carry
            logits, cache = model.cached_forward(token[:, None], position[:, None], jnp.ones_like(token)[:, None],
                                                 cache)
            key, sub = jax.random.split(key)
            new = sample_token(logits[:, -1], sub, temperature, top_k, top_p)
            new = jnp.where(done, pad_id, new)
            out = jax.lax.dynamic_update_index_in_dim(out, new, i, axis=1)
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(new, stop_ids)
            return i + 1, new, position + 1, cache, done, out, lengths, key

        carry = (jnp.ones((), jnp.int32), token, position, cache, done, out, lengths, key)
        _, _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return GenerateOutput(out, lengths)

    return run
