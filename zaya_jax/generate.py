"""Cached decoding: prefill the prompt once (one compiled program), then a compiled `lax.while_loop` of
single-token steps (a second one).

    generate(model, input_ids [B, P], max_new_tokens=N, attention_mask [B, P] (left padding), temperature,
             top_k, top_p, stop_tokens, seed) -> GenerateOutput(tokens [B, N] int32, lengths [B] int32)

Prompts of different lengths are left-padded to one length P (mask 0 on the padding), so every row writes the same
cache slot at each step. RoPE positions count real tokens only (cumsum(mask) - 1), as transformers' generate does.
After a row emits a stop token it emits `pad_token_id` and its length stops growing; the loop ends when every row
has stopped or N tokens are out. Sampling: temperature 0 is greedy; otherwise logits / temperature, restricted to
the top_k most likely tokens (0 = all) and to the smallest set whose probability reaches top_p (1.0 = all).

Streaming: `on_tokens(tokens [B], done [B])` is called from inside the compiled loop (an ordered io_callback) with
each step's tokens, so a caller can print text as it decodes; `done` marks rows that had already stopped.

The two programs the loop is made of, which zaya-compile also compiles on their own (train/compile.py):
    prefill(model, input_ids [B, P], mask [B, P], cache_len T, key, sampling) -> (token [B], position [B], cache, key)
    decode_step(model, token [B], position [B], cache, key, sampling) -> (token [B], position [B], cache, key)

    generate_ids(model, prompts: list of id lists, max_new_tokens, ...) -> list of generated id lists
left-pads prompts of any lengths (to `pad_to` when given, so repeated calls share one compiled program) and decodes
them in batches of `batch_size` rows (the last batch padded with copies), which is what evaluation and RSA use.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from zaya_jax.cache import Cache, init_cache
from zaya_jax.model import ZayaForCausalLM, check_token_ids, inference_jit


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


class Sampling(NamedTuple):
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1.0 = all tokens


def prefill(model: ZayaForCausalLM, input_ids: jax.Array, mask: jax.Array, cache_len: int, key: jax.Array,
            sampling: Sampling) -> tuple[jax.Array, jax.Array, Cache, jax.Array]:
    """The prompt through a fresh cache of `cache_len` slots: input_ids, mask [B, P] (left padding) ->
    (first generated token [B], its position [B], the cache holding the P prompt slots, the next key)."""
    cache = init_cache(model.config, input_ids.shape[0], cache_len)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, cache = model.cached_forward(input_ids, positions, mask, cache, last_only=True)
    key, sub = jax.random.split(key)
    return sample_token(logits[:, 0], sub, *sampling), positions[:, -1] + 1, cache, key


def decode_step(model: ZayaForCausalLM, token: jax.Array, position: jax.Array, cache: Cache, key: jax.Array,
                sampling: Sampling) -> tuple[jax.Array, jax.Array, Cache, jax.Array]:
    """One cached step: the last token [B] at `position` [B] -> (the next token [B], its position [B], the cache
    with one more slot, the next key)."""
    logits, cache = model.cached_forward(token[:, None], position[:, None], jnp.ones_like(token)[:, None], cache)
    key, sub = jax.random.split(key)
    return sample_token(logits[:, 0], sub, *sampling), position + 1, cache, key


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
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
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
                    config.pad_token_id or 0, on_tokens is not None)
    if on_tokens is None:
        return run(state, input_ids, mask, jax.random.key(seed))
    _stream_sink.append(on_tokens)
    try:
        return jax.block_until_ready(run(state, input_ids, mask, jax.random.key(seed)))
    finally:
        _stream_sink.pop()


# The compiled loop calls `_emit`, which forwards to the innermost generate() call's on_tokens: one compiled program
# serves every callback instead of one per callback object.
_stream_sink: list[Callable[[np.ndarray, np.ndarray], None]] = []


def _emit(tokens, done) -> None:
    _stream_sink[-1](np.asarray(tokens), np.asarray(done))


def generate_ids(
    model: ZayaForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    pad_to: int | None = None,
    batch_size: int | None = None,
    pad_id: int = 0,
    **sampling,
) -> list[list[int]]:
    """Generated ids per prompt (up to and including its stop token, no padding); `sampling` goes to generate()."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_ids needs at least one prompt, and no empty prompt")
    longest = max(len(p) for p in prompts)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"a prompt has {longest} tokens, more than pad_to={pad_to}")
    rows_per_call = len(prompts) if batch_size is None else batch_size
    seed = sampling.pop("seed", 0)
    out: list[list[int]] = []
    for call, start in enumerate(range(0, len(prompts), rows_per_call)):
        chunk = list(prompts[start:start + rows_per_call])
        rows = len(chunk)
        chunk += [chunk[-1]] * (rows_per_call - rows)  # one compiled shape for every call
        tokens = np.full((rows_per_call, width), pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for row, ids in enumerate(chunk):
            tokens[row, width - len(ids):] = ids
            mask[row, width - len(ids):] = 1
        result = generate(model, tokens, max_new_tokens, attention_mask=mask, seed=seed + call, **sampling)
        generated, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        out.extend(generated[row, :lengths[row]].tolist() for row in range(rows))
    return out


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              stops: tuple[int, ...], pad_id: int, stream: bool):
    """`_Programs`: two compiled programs, the prefill (prompt -> cache and first token) and the decode loop, so
    the first token does not wait for the loop's compilation (nor, with max_new_tokens=1, compile it at all)."""
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)
    sampling = Sampling(temperature, top_k, top_p)

    @inference_jit
    def first_token(state, input_ids, mask, key):
        model = nnx.merge(graphdef, state)
        batch, prompt_len = input_ids.shape
        token, position, cache, key = prefill(model, input_ids, mask, prompt_len + max_new_tokens, key, sampling)
        out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
        done = jnp.isin(token, stop_ids)
        if stream:
            io_callback(_emit, None, token, jnp.zeros_like(done), ordered=True)
        lengths = jnp.ones((batch,), jnp.int32)
        return jnp.ones((), jnp.int32), token, position, cache, done, out, lengths, key

    @inference_jit
    def decode(state, carry):
        model = nnx.merge(graphdef, state)

        def cond(carry):
            i, _, _, _, done, _, _, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def body(carry):
            i, token, position, cache, done, out, lengths, key = carry
            new, position, cache, key = decode_step(model, token, position, cache, key, sampling)
            new = jnp.where(done, pad_id, new)
            if stream:
                io_callback(_emit, None, new, done, ordered=True)
            out = jax.lax.dynamic_update_index_in_dim(out, new, i, axis=1)
            lengths = lengths + (~done).astype(jnp.int32)
            done = done | jnp.isin(new, stop_ids)
            return i + 1, new, position, cache, done, out, lengths, key

        _, _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, carry)
        return GenerateOutput(out, lengths)

    return _Programs(first_token, decode, max_new_tokens)


class _Programs(NamedTuple):
    """generate's two compiled programs; calling it runs them: (state, input_ids, mask, key) -> GenerateOutput."""
    first_token: Callable  # (state, input_ids, mask, key) -> the decode loop's carry, the first token in it
    decode: Callable  # (state, carry) -> GenerateOutput
    max_new_tokens: int

    def __call__(self, state, input_ids, mask, key) -> GenerateOutput:
        carry = self.first_token(state, input_ids, mask, key)
        return GenerateOutput(carry[5], carry[6]) if self.max_new_tokens == 1 else self.decode(state, carry)
