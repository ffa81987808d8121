"""The attention interface: causal GQA softmax attention inside CCA's compressed latent.

    attend(q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D], q_segments [B, S], kv_segments [B, T],
           q_start: int32 [], impl) -> [B, S, Hq, D]
    attend_cached(q [B, S, Hq, D], k_cache [B, Hkv, T, D], v_cache [B, Hkv, T, D], q_segments [B, S],
                  valid [B, T], start: int32 [], impl) -> [B, S, Hq, D]      S new tokens at slots start..start+S-1

Query i sits at sequence index q_start + i (the same for every row: 0 for a training sequence, the first new slot
when new tokens attend to a cache), key j at index j. Query head h reads KV head h // (Hq // Hkv). A query attends
to a key when both carry the same segment id (packed documents and left padding never mix) and the key's sequence
index is not later than the query's (causal; sequence indices, not RoPE positions, which restart per packed
document). Scores are scaled by 1/sqrt(D); softmax runs in
float32.

Implementations (`ZayaConfig.attention_impl`):
    xla     the plain reference every kernel is tested against (materialises the [S, T] scores)
    pallas  zaya_jax/kernels: flash attention (forward + backward) for sequences, decode attention for one new
            token against the cache. Needs a GPU or TPU; on CPU only with ZAYA_PALLAS_INTERPRET=1 (the Pallas
            interpreter, slow: what the tests use).
    cudnn   jax.nn.dot_product_attention(implementation="cudnn") with the segment/causal mask; needs a CUDA GPU
            and a bfloat16 compute dtype.
Asking for one on a backend that lacks it is a ValueError naming the backend. The backend is the platform the
program is lowered for: the default backend, or the device of the mesh being traced under when compiling for
hardware this host does not have (`zaya-compile --target gpu:...`/`tpu:...`, zaya_jax.kernels.target_platform);
then `pallas` lowers the compiled kernels and `cudnn` cuDNN's fused attention, as on that hardware.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp

from zaya_jax.kernels import target_platform
from zaya_jax.masking import MASKED_SCORE

AttentionFn = Callable[..., jax.Array]


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    q_start: jax.Array | int = 0,
) -> jax.Array:
    """Reference attention materializing the [B, Hkv, G, S, T] score tensor (see module docstring for shapes)."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    qg = q.reshape(batch, seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * (head_dim**-0.5)
    scores = jnp.where(_allowed(q_segments, kv_segments, q_start)[:, None, None], scores, MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)


def pallas_interpret(impl: str):
    """False when lowering for a GPU or TPU; the interpreter's settings on CPU when ZAYA_PALLAS_INTERPRET=1; else an
    error."""
    backend = target_platform()
    if backend in ("gpu", "tpu"):
        return False
    if os.environ.get("ZAYA_PALLAS_INTERPRET") == "1":
        from jax.experimental.pallas import tpu as pltpu

        # Memory the kernel does not write reads as NaN, so an unwritten output element cannot pass a test.
        return pltpu.InterpretParams(uninitialized_memory="nan")
    raise ValueError(f"attention_impl {impl!r} runs Pallas kernels, which need a GPU or TPU; {_lowered_for(backend)} "
                     f"(set ZAYA_PALLAS_INTERPRET=1 to run them in the Pallas interpreter, slowly)")


def _lowered_for(platform: str) -> str:
    if platform == jax.default_backend():
        return f"this process runs on {platform}"
    return f"the program is compiled for {platform}"


def _allowed(q_segments: jax.Array, kv_segments: jax.Array, q_start) -> jax.Array:
    """[B, S, T] bool: same segment and causal in sequence index."""
    q_index = q_start + jnp.arange(q_segments.shape[1])
    kv_index = jnp.arange(kv_segments.shape[1])
    return (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_index[None, :] <= q_index[:, None])[None]


def pallas_attention(q, k, v, q_segments, kv_segments, q_start) -> jax.Array:
    from zaya_jax.kernels.flash_attention import flash_attention

    interpret = pallas_interpret("pallas")
    block = 16 if interpret is not False else 128  # small tiles keep the interpreter's per-tile overhead bounded
    return flash_attention(q, k, v, q_segments, kv_segments, q_start, block, block, interpret)


def check_backend(impl: str) -> None:
    """Raises the ValueError `attend` would raise for `impl` on this backend, before any work is done."""
    if impl == "pallas":
        pallas_interpret(impl)
    elif impl == "cudnn" and target_platform() != "gpu":
        raise ValueError(f"attention_impl 'cudnn' needs a CUDA GPU; {_lowered_for(target_platform())}")


def cudnn_attention(q, k, v, q_segments, kv_segments, q_start) -> jax.Array:
    check_backend("cudnn")
    allowed = _allowed(q_segments, kv_segments, q_start)
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="cudnn")
    except RuntimeError as e:
        # jax asks the host's cuDNN library for its version while tracing, also when it only compiles for a GPU
        # this host lacks (zaya-compile); without the library that is a bare "cuDNN not found."
        if not any(missing in str(e) for missing in ("cuDNN not found", "cuDNN is not detected")):
            raise
        raise ValueError(f"attention_impl 'cudnn': jax found no cuDNN library on this host ({e}); building a cuDNN "
                         f"program needs it, also to compile for a GPU target: pip install nvidia-cudnn-cu12") from e


ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": xla_attention, "pallas": pallas_attention,
                                           "cudnn": cudnn_attention}


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    q_start: jax.Array | int = 0,
    impl: str = "xla",
) -> jax.Array:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not available; available: {', '.join(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[impl](q, k, v, q_segments, kv_segments, q_start)


def attend_cached(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_segments: jax.Array, valid: jax.Array,
                  start: jax.Array, impl: str = "xla") -> jax.Array:
    """S new tokens (already written at slots start..start+S-1) against the cache; see the module docstring."""
    if impl == "pallas" and q.shape[1] == 1:
        from zaya_jax.kernels.decode_attention import decode_attention

        interpret = pallas_interpret(impl)
        out = decode_attention(q[:, 0], k_cache, v_cache, valid, start, block_k=16 if interpret is not False else 128,
                               interpret=interpret)
        return out[:, None]
    return attend(q, k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3), q_segments, valid, start, impl)
