"""Pallas kernels (interpret mode, memory the kernel does not write reads as NaN) against the XLA reference.

Random inputs (never zeros), sequence lengths that are not multiples of the tiles, several packed segments and left
padding, float32 and bfloat16; outputs and gradients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from tests.tolerances import BF16_EPS, float32_bound, model_depth, model_terms
from zaya_jax import generate, init_model, load_preset
from zaya_jax.attention import attend, xla_attention
from zaya_jax.kernels.decode_attention import decode_attention
from zaya_jax.kernels.flash_attention import DKV_LAYOUTS, flash_attention

POISONED = pltpu.InterpretParams(uninitialized_memory="nan")


def _bound(dtype, terms: int, depth: int) -> float:
    """Allowed max |difference| / max |reference| against the float32 XLA reference (tests/tolerances.py). float32:
    the same sums in another order. bfloat16 (inputs exactly representable in both): every chained step's result is
    rounded to bfloat16 (relative step 2^-7) once, against which float32's reordering is negligible."""
    return float32_bound(terms, depth) if dtype == jnp.float32 else depth * BF16_EPS


# Attention's chained reductions: forward scores, softmax sum, probabilities x values (3); the backward adds dP,
# the softmax's row sums and dS x keys/queries (3 more).
ATTENTION_DEPTH, ATTENTION_GRAD_DEPTH = 3, 6
# The prologue: depthwise conv, grouped conv (a head_dim sum), q-k mean, QK-norm's sum, RoPE (5); backward twice.
PROLOGUE_DEPTH, PROLOGUE_GRAD_DEPTH = 5, 10


def _inputs(dtype, batch=2, seq=37, kv_len=None, q_heads=4, kv_heads=2, head_dim=16, seed=0):
    rng = np.random.default_rng(seed)
    kv_len = kv_len or seq
    q = rng.normal(size=(batch, seq, q_heads, head_dim))
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    return [jnp.asarray(x, dtype) for x in (q, k, v)]


def _packed_segments(batch, seq):
    segments = np.ones((batch, seq), np.int32)
    segments[0, 11:26] = 2  # three packed documents in row 0
    segments[0, 26:] = 3
    segments[1, :5] = 0  # left padding in row 1
    return jnp.asarray(segments)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.isfinite(a).all(), "NaN/inf: an output element was not written"
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("dkv_layout", DKV_LAYOUTS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_flash_attention_forward_and_gradients_match_xla(dtype, dkv_layout):
    q, k, v = _inputs(dtype)
    segments = _packed_segments(2, 37)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), dtype)  # the output's cotangent
    flash = lambda q, k, v: flash_attention(q, k, v, segments, segments, 0, 16, 8, POISONED,  # noqa: E731
                                            dkv_layout)  # tiles of 16 queries, 8 keys
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    reference, reference_vjp = jax.vjp(lambda *a: xla_attention(*a, segments, segments, 0), *f32)
    out, flash_vjp = jax.vjp(flash, q, k, v)  # one forward for the output and the gradients
    terms = max(q.shape[1], q.shape[3])  # the keys of a row, or a head's dims
    assert _rel(out, reference) <= _bound(dtype, terms, ATTENTION_DEPTH)
    expected = reference_vjp(weights.astype(jnp.float32))
    for name, g, e in zip("qkv", flash_vjp(weights), expected):
        assert g.dtype == dtype
        # dK and dV also sum over the query heads that share a KV head.
        assert _rel(g, e) <= _bound(dtype, terms * q.shape[2], ATTENTION_GRAD_DEPTH), name


@pytest.mark.parametrize("dkv_layout", DKV_LAYOUTS)
def test_flash_attention_prefill_into_a_longer_cache(dkv_layout):
    """Queries at indices start + arange(S) against keys at arange(T), T > S, as the cached prefill calls it; the
    gradients too, where the dk/dv kernel's first visible query tile depends on the start (and the last key tile,
    after every query, is seen by none)."""
    q, k, v = _inputs(jnp.float32, seq=9, kv_len=37, seed=2)
    start = 11
    valid = np.zeros((2, 37), np.int32)
    valid[:, :start + 9] = 1
    valid[1, :3] = 0  # left padding of row 1
    valid = jnp.asarray(valid)
    q_segments = valid[:, start:start + 9]
    flash = lambda q, k, v: flash_attention(q, k, v, q_segments, valid, jnp.int32(start), 8, 8, POISONED,  # noqa: E731
                                            dkv_layout)
    reference = lambda q, k, v: xla_attention(q, k, v, q_segments, valid, start)  # noqa: E731
    (out, flash_vjp), (want, reference_vjp) = jax.vjp(flash, q, k, v), jax.vjp(reference, q, k, v)
    assert _rel(out, want) <= _bound(jnp.float32, 37, ATTENTION_DEPTH)
    weights = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)  # the output's cotangent
    for name, g, e in zip("qkv", flash_vjp(weights), reference_vjp(weights)):
        assert _rel(g, e) <= _bound(jnp.float32, 37 * q.shape[2], ATTENTION_GRAD_DEPTH), name


def test_an_unknown_dkv_layout_is_a_clear_error():
    q, k, v = _inputs(jnp.float32, seq=4)
    ones = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"dkv_layout 'query_tiles' is not one of \('query_loop', 'query_grid'\)"):
        flash_attention(q, k, v, ones, ones, 0, 8, 8, POISONED, "query_tiles")
    # The TPU layout's sequential grid axes do not exist in Triton: lowering it for anything but a TPU is refused.
    grad = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v, ones, ones, 0, 8, 8, False, "query_grid")))
    with pytest.raises(ValueError, match=r"'cca_flash_dkv' has 2 sequential grid axes .* only Mosaic \(TPU\) runs; "
                                         "this lowers for cpu"):
        jax.make_jaxpr(grad)(q)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_matches_xla(dtype):
    rng = np.random.default_rng(3)
    batch, slots, position = 3, 21, 13
    q = jnp.asarray(rng.normal(size=(batch, 4, 16)), dtype)
    k_cache = jnp.asarray(rng.normal(size=(batch, 2, slots, 16)), dtype)
    v_cache = jnp.asarray(rng.normal(size=(batch, 2, slots, 16)), dtype)
    valid = np.zeros((batch, slots), np.int32)
    valid[:, :position + 1] = 1
    valid[0, :4] = 0  # rows of different lengths (left padding)
    valid[2, :1] = 0
    valid = jnp.asarray(valid)
    got = decode_attention(q, k_cache, v_cache, valid, jnp.int32(position), block_k=8, interpret=POISONED)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    reference = xla_attention(f32(q)[:, None], f32(k_cache).transpose(0, 2, 1, 3), f32(v_cache).transpose(0, 2, 1, 3),
                              jnp.ones((batch, 1), jnp.int32), valid, position)[:, 0]
    assert _rel(got, reference) <= _bound(dtype, slots, ATTENTION_DEPTH)


def test_the_tiny_model_with_pallas_attention_equals_xla(monkeypatch):
    monkeypatch.setenv("ZAYA_PALLAS_INTERPRET", "1")
    config = dataclasses.replace(load_preset("tiny"), num_layers=2)
    xla_model = init_model(config, seed=0)
    pallas_model = init_model(dataclasses.replace(config, attention_impl="pallas"), seed=0)
    ids = jnp.asarray(np.random.default_rng(4).integers(5, config.vocab_size, (2, 20)))
    segments = jnp.asarray(np.repeat([[1] * 12 + [2] * 8], 2, axis=0))
    positions = jnp.asarray(np.repeat([list(range(12)) + list(range(8))], 2, axis=0))
    terms = model_terms(config, ids.shape[1])
    assert _rel(pallas_model(ids, segment_ids=segments, positions=positions),
                xla_model(ids, segment_ids=segments, positions=positions)) <= float32_bound(
                    terms, model_depth(config.num_layers))

    def grads(model):  # through the fused prologue and flash attention backward kernels
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids, segment_ids=segments, positions=positions)[..., :9])  # noqa: E731
        return jax.tree.leaves(jax.grad(loss)(params))

    for got, want in zip(grads(pallas_model), grads(xla_model)):
        assert _rel(got, want) <= float32_bound(terms, model_depth(config.num_layers, backward=True))
    prompt = np.asarray(ids[:, :7])
    mask = np.ones_like(prompt)
    mask[1, :2] = 0
    ours = generate(pallas_model, prompt, 6, attention_mask=mask, stop_tokens=())
    reference = generate(xla_model, prompt, 6, attention_mask=mask, stop_tokens=())
    np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(reference.tokens))


def test_asking_for_a_kernel_the_backend_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ZAYA_PALLAS_INTERPRET", raising=False)
    q, k, v = _inputs(jnp.float32, seq=4)
    ones = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="'pallas' runs Pallas kernels, which need a GPU or TPU; this process runs on cpu"):
        attend(q, k, v, ones, ones, 0, "pallas")
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA GPU; this process runs on cpu"):
        attend(q, k, v, ones, ones, 0, "cudnn")
    with pytest.raises(ValueError, match="attention_impl"):
        dataclasses.replace(load_preset("tiny"), attention_impl="flash")


def _prologue_inputs(dtype, k_dw, k_gr, seed=5, batch=2, seq=37, q_heads=4, kv_heads=2, head_dim=16, rotary=8):
    from zaya_jax.kernels.cca_prologue import PrologueParams
    from zaya_jax.layers import rotary_embedding

    rng = np.random.default_rng(seed)
    channels = (q_heads + kv_heads) * head_dim
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    segments = _packed_segments(batch, seq)
    positions = np.zeros((batch, seq), np.int32)
    for row in range(batch):  # positions restart at every document, as packing writes them
        for seg in np.unique(np.asarray(segments[row])):
            where = np.flatnonzero(np.asarray(segments[row]) == seg)
            positions[row, where] = np.arange(len(where))
    cos, sin = rotary_embedding(jnp.asarray(positions), rotary, 10000.0)
    params = PrologueParams(normal(k_dw, channels) * 0.5, normal(channels) * 0.1,
                            normal(k_gr, q_heads + kv_heads, head_dim, head_dim) * 0.25, normal(channels) * 0.1,
                            jnp.asarray(rng.uniform(0.5, 1.5, kv_heads), dtype))
    return normal(batch, seq, q_heads * head_dim), normal(batch, seq, kv_heads * head_dim), segments, cos, sin, params


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernels", [(2, 2), (3, 1)])
def test_fused_prologue_matches_the_reference_and_its_gradients(dtype, kernels):
    from zaya_jax.cca import prologue_reference
    from zaya_jax.kernels.cca_prologue import PrologueParams, fused_prologue

    q0, k0, segments, cos, sin, params = _prologue_inputs(dtype, *kernels)
    fused = lambda q0, k0, params: fused_prologue(q0, k0, segments, cos, sin, params, 16, POISONED)  # noqa: E731
    reference = lambda q0, k0, params: prologue_reference(q0, k0, segments, cos, sin, params)  # noqa: E731
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    got, want = fused(q0, k0, params), reference(*f32((q0, k0, params)))
    terms = max(kernels) * 16  # the longest sum: the grouped conv's taps x a head's 16 dims
    for g, w in zip(got, want):
        assert g.dtype == dtype and _rel(g, w) <= _bound(dtype, terms, PROLOGUE_DEPTH)
    weights = [jnp.asarray(np.random.default_rng(6).normal(size=w.shape), jnp.float32) for w in want]
    loss = lambda fn: lambda *a: sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(fn(*a), weights))  # noqa: E731
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q0, k0, params)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(*f32((q0, k0, params)))
    names = ["q0", "k0", *PrologueParams._fields]
    tokens = q0.shape[0] * q0.shape[1]  # a parameter's gradient sums over every token
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == dtype and _rel(g, w) <= _bound(dtype, tokens, PROLOGUE_GRAD_DEPTH), name


# Lowering for the accelerators, on the CPU: Triton for CUDA GPUs, Mosaic for TPUs (lowered for an abstract TPU
# v5p through `jax.sharding.use_abstract_mesh`, the same check Mosaic's block-shape rules get on a TPU host).
LOWERINGS = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _lowering_context(platform: str):
    """(context to lower in, jax.export's disabled checks) for lowering Pallas kernels for `platform` on the CPU."""
    import contextlib

    from jax import export

    if platform == "tpu":
        device = jax.sharding.AbstractDevice(device_kind="TPU v5p", num_cores=1, platform="tpu")
        return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)), []
    return contextlib.nullcontext(), [export.DisabledSafetyCheck.custom_call(LOWERINGS[platform])]


@pytest.mark.parametrize("platform", sorted(LOWERINGS))
def test_every_kernel_lowers_for_the_accelerators(platform):
    """Each kernel, forward and backward, at ZAYA1-8B's shapes (bf16, 8 query / 2 KV heads of 128, batch 2):
    Pallas -> Triton (cuda) and Pallas -> Mosaic (tpu). Compiling and running need the device."""
    from jax import export

    from zaya_jax.cca import prologue_reference  # noqa: F401  (the model module imports the kernel's params type)
    from zaya_jax.kernels.cca_prologue import PrologueParams, fused_prologue

    bf16, s, b = jnp.bfloat16, jax.ShapeDtypeStruct, 2
    q, k, seg = s((b, 256, 8, 128), bf16), s((b, 256, 2, 128), bf16), s((b, 256), jnp.int32)
    flash = lambda q, k, v, g: flash_attention(q, k, v, g, g, 0, 128, 128, False)  # noqa: E731
    params = PrologueParams(s((2, 1280), bf16), s((1280,), bf16), s((2, 10, 128, 128), bf16), s((1280,), bf16),
                            s((2,), bf16))
    prologue_args = (s((b, 256, 1024), bf16), s((b, 256, 256), bf16), seg, s((b, 256, 64), jnp.float32),
                     s((b, 256, 64), jnp.float32), params)
    prologue = lambda *a: fused_prologue(*a, 64, False)  # noqa: E731
    total = lambda fn: lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fn(*a)))  # noqa: E731
    cases = {
        "flash": (flash, (q, k, k, seg)),
        "flash backward": (jax.grad(total(flash), argnums=(0, 1, 2)), (q, k, k, seg)),
        "decode": (lambda *a: decode_attention(*a, block_k=128),
                   (s((b, 8, 128), bf16), s((b, 2, 1024, 128), bf16), s((b, 2, 1024, 128), bf16),
                    s((b, 1024), jnp.int32), s((), jnp.int32))),
        "prologue": (prologue, prologue_args),
        "prologue backward": (jax.grad(total(prologue), argnums=(0, 1, 5)), prologue_args),
    }
    kernel_call = LOWERINGS[platform]
    context, checks = _lowering_context(platform)
    for name, (fn, args) in cases.items():
        with context:
            module = export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args).mlir_module()
        assert kernel_call in module, name


# (platform as jax.export names it, query_heads, kv_heads, head_dim): sizes either side of each tiling rule.
TILE_CASES = [("tpu", 8, 2, 128), ("tpu", 8, 2, 64), ("tpu", 4, 1, 64), ("cuda", 8, 2, 64), ("cuda", 8, 2, 96),
              ("cuda", 6, 2, 64)]


@pytest.mark.parametrize("platform, heads_q, heads_kv, head_dim", TILE_CASES)
def test_the_tile_rules_are_the_ones_the_lowering_enforces(platform, heads_q, heads_kv, head_dim):
    """kernels.tile_problems names a rule exactly when Pallas refuses to lower the prologue or the decode kernel (the
    kernels whose blocks the rules are about) for those sizes; check_tiles raises it as one line naming the key and
    value."""
    from jax import export

    from zaya_jax.kernels import check_tiles, tile_problems
    from zaya_jax.kernels.cca_prologue import PrologueParams, fused_prologue

    s, f32, b, seq = jax.ShapeDtypeStruct, jnp.float32, 1, 64
    channels = (heads_q + heads_kv) * head_dim
    params = PrologueParams(s((2, channels), f32), s((channels,), f32),
                            s((2, heads_q + heads_kv, head_dim, head_dim), f32), s((channels,), f32),
                            s((heads_kv,), f32))
    args = (s((b, seq, heads_q * head_dim), f32), s((b, seq, heads_kv * head_dim), f32), s((b, seq), jnp.int32),
            s((b, seq, head_dim // 2), f32), s((b, seq, head_dim // 2), f32), params)
    context, checks = _lowering_context(platform)
    decode_args = (s((b, heads_q, head_dim), f32), s((b, heads_kv, 128, head_dim), f32),
                   s((b, heads_kv, 128, head_dim), f32), s((b, 128), jnp.int32), s((), jnp.int32))
    try:
        with context:
            for fn, fn_args in ((lambda *a: fused_prologue(*a, 64, False), args),
                                (lambda *a: decode_attention(*a, block_k=128), decode_args)):
                export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*fn_args)
        lowered = True
    except ValueError as e:
        assert "power of 2" in str(e) or "divisible by 8 and 128" in str(e), e  # the lowering's own rule
        lowered = False
    config = dataclasses.replace(load_preset("tiny"), query_heads=heads_q, kv_heads=heads_kv, head_dim=head_dim,
                                 attention_impl="pallas")
    ours = "gpu" if platform == "cuda" else platform
    problems = tile_problems(config, ours)
    assert lowered == (not problems), problems
    if problems:
        with pytest.raises(ValueError) as info:
            check_tiles(config, ours)
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"attention_impl 'pallas' on {ours}: ")
        assert f"head_dim = {head_dim}" in message or f"= {heads_q // heads_kv}:" in message
    check_tiles(dataclasses.replace(config, attention_impl="xla"), ours)  # no kernels, no tiles to check


def test_a_prologue_tile_shorter_than_the_conv_history_is_a_clear_error():
    """A tile reads the conv history from the tile before it, so block_s >= (k_dw - 1) + (k_gr - 1)."""
    from zaya_jax.kernels.cca_prologue import fused_prologue

    q0, k0, segments, cos, sin, params = _prologue_inputs(jnp.float32, 3, 3)  # history 4
    with pytest.raises(ValueError, match=r"block_s \(2\) must be at least the conv history .* = 4"):
        fused_prologue(q0, k0, segments, cos, sin, params, 2, POISONED)
