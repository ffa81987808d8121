"""Prints the figures quoted in closing notes: parity errors against transformers, compile times of the tiny preset,
per-device parameter bytes on the test meshes, and the balancer test's entropy curve.

    PYTHONPATH=. python scripts/report_figures.py parity|compile|bytes|balancer|kernels|inference|tolerances

Run from the repository root with the test extras installed; it reuses the test suite's fixtures (8 virtual CPU
devices via tests/conftest.py).
"""

import dataclasses
import sys

import tests.conftest  # noqa: F401  (8 CPU devices, highest matmul precision; before jax is used)

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx


def parity() -> None:
    from tests.zaya_jax.hf_reference import hf_choices
    from tests.zaya_jax.test_parity import CONFIGS, SHAPES, _models
    from zaya_jax.hf_io import model_from_hf_tensors

    for name in CONFIGS:
        hf, ours = _models(name)
        worst, same = 0.0, True
        for b, s in SHAPES[name]:
            ids = torch.randint(0, ours.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(s))
            with torch.no_grad():
                ref = hf(ids).logits.numpy()
            out = ours(jnp.asarray(ids.numpy()), return_choices=True)
            worst = max(worst, float(np.abs(np.asarray(out.logits) - ref).max() / np.abs(ref).max()))
            same &= bool((np.asarray(out.choices) == hf_choices(hf, ids)).all())
        ids = torch.randint(3, ours.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(7))
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[0, :4] = 0
        mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
        with torch.no_grad():
            ref = hf(ids, attention_mask=mask).logits.numpy()
        got = np.asarray(ours(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
        real = mask.numpy().astype(bool)
        padded = float(np.abs(got - ref)[real].max() / np.abs(ref[real]).max())
        print(f"{name}: fp32 max rel err {worst:.2e} (expert choices identical: {same}); left-padded {padded:.2e}")
    hf32, _ = _models("gqa4x2")
    hf = hf32.to(torch.bfloat16)
    state = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    config = CONFIGS["gqa4x2"].replace(param_dtype="bfloat16", dtype="bfloat16")
    ours = model_from_hf_tensors(config, state.__getitem__, {k: v.shape for k, v in state.items()})
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits.float().numpy()
    got = np.asarray(ours(jnp.asarray(ids.numpy())))
    print(f"gqa4x2 bf16 vs transformers bf16: max rel err {np.abs(got - ref).max() / np.abs(ref).max():.2e}")


def compile_times() -> None:
    from zaya_jax import init_model, load_preset

    for layers in (4, 40):
        model = init_model(load_preset("tiny").replace(num_layers=layers))
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((2, 64), jnp.int32)
        forward = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))
        start = time.perf_counter()
        forward.lower(state, ids).compile()
        fwd = time.perf_counter() - start
        grad = jax.jit(jax.grad(lambda s, i: nnx.merge(graphdef, s)(i).mean()))
        start = time.perf_counter()
        grad.lower(state, ids).compile()
        print(f"tiny, {layers} layers: forward compile {fwd:.2f}s, forward+backward compile "
              f"{time.perf_counter() - start:.2f}s")


def device_bytes() -> None:
    from sharding import init_sharded_model, make_mesh
    from tests.sharding.test_meshes import CONFIG, MESHES

    for name, mesh_config in MESHES.items():
        state = nnx.state(init_sharded_model(CONFIG, make_mesh(mesh_config)))
        total = sum(x.nbytes for x in jax.tree.leaves(state))
        per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state))
        print(f"{name}: {total} bytes in all, {per_device} per device ({per_device / total:.3f})")


def balancer() -> None:
    from train.step import step_batch
    from tests.train.test_step import (BALANCER_STEPS, BalancerConfig, ByteTokenizer, SyntheticSource,
                                       _collapsed_model, _setup, make_dataset)

    for enabled in (True, False):
        _, state, step = _setup(balancer=BalancerConfig(enabled=enabled, lr=0.01), model=_collapsed_model())
        data = iter(make_dataset(SyntheticSource(seed=1), ByteTokenizer(), 128, 4, seed=1, num_threads=0))
        entropy = []
        for _ in range(BALANCER_STEPS):
            raw = next(data)
            state, metrics = step(state, {k: jnp.asarray(v) for k, v in step_batch(raw).items()})
            entropy.append(np.asarray(metrics["routing_entropy"]))
        entropy = np.stack(entropy)
        rows = [0] + list(range(19, BALANCER_STEPS, 20))
        first = [int(np.argmax(entropy[:, l] > 0.95)) + 1 if (entropy[:, l] > 0.95).any() else None
                 for l in range(entropy.shape[1])]
        print(f"balancer {'on' if enabled else 'off'}: min over layers at steps {[r + 1 for r in rows]}: "
              f"{np.round(entropy[rows].min(1), 3).tolist()}; first step > 0.95 per layer {first}; "
              f"mean of the last 50 steps per layer {np.round(entropy[-50:].mean(0), 3).tolist()}")


def kernels() -> None:
    from tests.zaya_jax.test_kernels import POISONED, _inputs, _packed_segments, _rel
    from zaya_jax.attention import xla_attention
    from zaya_jax.kernels.decode_attention import decode_attention
    from zaya_jax.kernels.flash_attention import flash_attention

    segments = _packed_segments(2, 37)
    for dtype in (jnp.float32, jnp.bfloat16):
        q, k, v = _inputs(dtype)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
        flash = lambda *a: flash_attention(*a, 16, 8, POISONED)  # noqa: E731
        loss = lambda fn, *a: jnp.sum(fn(*a, segments, segments, 0).astype(jnp.float32) * w)  # noqa: E731
        fwd = _rel(flash(q, k, v, segments, segments, 0), xla_attention(*f32, segments, segments, 0))
        got = jax.grad(lambda *a: loss(flash, *a), argnums=(0, 1, 2))(q, k, v)
        want = jax.grad(lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2))(*f32)
        print(f"flash attention {jnp.dtype(dtype).name} (B2 S37 Hq4 Hkv2 D16, tiles 16x8, 3 segments + padding): "
              f"forward {fwd:.2e}; grads q {_rel(got[0], want[0]):.2e} k {_rel(got[1], want[1]):.2e} "
              f"v {_rel(got[2], want[2]):.2e}")
        rng = np.random.default_rng(3)
        qd = jnp.asarray(rng.normal(size=(3, 4, 16)), dtype)
        kc = jnp.asarray(rng.normal(size=(3, 2, 21, 16)), dtype)
        vc = jnp.asarray(rng.normal(size=(3, 2, 21, 16)), dtype)
        valid = np.zeros((3, 21), np.int32)
        valid[:, :14] = 1
        valid[0, :4] = 0
        valid = jnp.asarray(valid)
        got = decode_attention(qd, kc, vc, valid, jnp.int32(13), block_k=8, interpret=POISONED)
        ref = xla_attention(qd.astype(jnp.float32)[:, None], kc.astype(jnp.float32).transpose(0, 2, 1, 3),
                            vc.astype(jnp.float32).transpose(0, 2, 1, 3), jnp.ones((3, 1), jnp.int32), valid, 13)[:, 0]
        print(f"decode attention {jnp.dtype(dtype).name} (B3 T21 position 13, tiles of 8): {_rel(got, ref):.2e}")
        from tests.zaya_jax.test_kernels import _prologue_inputs
        from zaya_jax.cca import prologue_reference
        from zaya_jax.kernels.cca_prologue import fused_prologue

        for kernel_sizes in ((2, 2), (3, 1)):
            q0, k0, seg, cos, sin, params = _prologue_inputs(dtype, *kernel_sizes)
            got = fused_prologue(q0, k0, seg, cos, sin, params, 16, POISONED)
            f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (q0, k0, params))
            want = prologue_reference(f32[0], f32[1], seg, cos, sin, f32[2])
            weights = [jnp.asarray(np.random.default_rng(6).normal(size=x.shape), jnp.float32) for x in want]
            loss = lambda fn: lambda *a: sum(jnp.sum(o.astype(jnp.float32) * w)  # noqa: E731
                                             for o, w in zip(fn(*a), weights))
            grads = jax.grad(loss(lambda a, b, p: fused_prologue(a, b, seg, cos, sin, p, 16, POISONED)),
                             argnums=(0, 1, 2))(q0, k0, params)
            expected = jax.grad(loss(lambda a, b, p: prologue_reference(a, b, seg, cos, sin, p)),
                                argnums=(0, 1, 2))(*f32)
            names = ["q0", "k0", *params._fields]
            grad_errors = " ".join(f"{n} {_rel(a, b):.1e}" for n, a, b in zip(names, jax.tree.leaves(grads),
                                                                            jax.tree.leaves(expected)))
            print(f"fused prologue {jnp.dtype(dtype).name} (conv kernels {kernel_sizes}, B2 S37, tiles of 16): "
                  f"q {_rel(got[0], want[0]):.2e} k {_rel(got[1], want[1]):.2e}; grads {grad_errors}")


def inference() -> None:
    import importlib

    from tests.zaya_jax.test_generate import _prompts, cached_vs_full_error
    from tests.zaya_jax.test_parity import _models
    from zaya_jax import generate, init_model
    from zaya_jax.cache import init_cache, kv_bytes_per_token
    from zaya_jax.config import load_preset
    from zaya_jax.rsa import RSAConfig, markovian_rsa
    from zaya_jax.tokenizers import ByteTokenizer

    for name in ("gqa4x2", "mqa"):
        hf, model = _models(name)
        err = cached_vs_full_error(model)
        ids, mask = _prompts(model.config.vocab_size, seed=1)
        with torch.no_grad():
            ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
        out = np.asarray(generate(model, ids, 8, attention_mask=mask, stop_tokens=()).tokens)
        print(f"{name}: cached vs full-forward logits, max |diff| / max |logit| over real positions: {err:.2e}; "
              f"greedy tokens equal to transformers generate: {int((out == ref).sum())}/{out.size}")
    kv = kv_bytes_per_token(init_cache(dataclasses.replace(load_preset("zaya1-8b"), dtype="bfloat16"), 1, 4))
    print(f"zaya1-8b K/V cache per token in bf16: {kv} bytes = {kv / 1024:.0f} KiB")

    generate_module = importlib.import_module("zaya_jax.generate")
    real_init_cache, allocated = generate_module.init_cache, []

    def recording(config, batch, max_len, dtype=None):
        cache = real_init_cache(config, batch, max_len, dtype)
        allocated.append(cache.layers.k.nbytes + cache.layers.v.nbytes)
        return cache

    generate_module.init_cache = recording
    model = init_model(load_preset("tiny"), seed=0)
    for rounds in (1, 8):
        generate_module._compiled.cache_clear()
        allocated.clear()
        markovian_rsa(model, ByteTokenizer(), ["Compute 3 + 4."],
                      RSAConfig(population=4, candidates=2, rounds=rounds, budget=10, tail=6, prompt_format="compact"))
        print(f"Markovian RSA N=4 C=2 tau=6 beta=10, T={rounds}: peak K/V cache allocated {max(allocated)} bytes")
    generate_module.init_cache = real_init_cache


def tolerances() -> None:
    """Each family of float32 comparisons (tests/tolerances.py): the correct result's error and deliberately broken
    variants' (a wrong sign, a missing term, a wrong expert), each as max |error| / max |reference| against the
    family's bound. A broken variant must land above the bound, the correct one below."""
    from tests.tolerances import (ADAM_DEPTH, EXPERT_GRAD_DEPTH, cross_entropy_bound, float32_bound, model_depth,
                                  model_terms, scaled_error)
    from tests.zaya_jax.test_model import _cotangent, make_routed_tokens
    from tests.zaya_jax.test_parity import _models
    from zaya_jax.attention import xla_attention
    from zaya_jax.kernels.flash_attention import flash_attention
    from zaya_jax.moe import experts_dense, experts_sorted

    def report(family: str, bound: float, variants: dict) -> None:
        for name, (got, want) in variants.items():
            err = scaled_error(got, want)
            verdict = "passes" if err <= bound else "FAILS"
            print(f"| {family} | {name} | {err:.2e} | {bound:.2e} | {verdict} |")

    print("| family | variant | max abs error / max abs reference | bound | check |\n|---|---|---|---|---|")
    x, expert, weight, gate_up, down = make_routed_tokens()
    tokens = len(x)
    cotangent = _cotangent(x.shape)
    rng = np.random.default_rng(0)

    def gate_up_grad(fn, expert=expert, down=down):
        return jax.grad(lambda gu: jnp.sum(fn(x, expert, weight, gu, down) * cotangent))(gate_up)

    want = gate_up_grad(experts_dense)
    report("experts: sorted vs dense, d/d gate_up", float32_bound(tokens, EXPERT_GRAD_DEPTH), {
        "correct": (gate_up_grad(experts_sorted), want),
        "wrong expert for one token": (gate_up_grad(experts_sorted, expert=expert.at[0].set((expert[0] + 1) % 4)),
                                       want),
        "wrong sign of one expert's down": (gate_up_grad(experts_sorted, down=down.at[1].multiply(-1)), want),
    })

    hf, ours = _models("gqa4x2")
    ids = torch.randint(0, ours.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    def logits(**edits):
        state = jax.tree.map(lambda a: a, params)
        for path, edit in edits.items():
            node = state
            for key in path.split("/")[:-1]:
                node = node[key]
            node[path.split("/")[-1]][...] = edit(node[path.split("/")[-1]][...])
        return np.asarray(nnx.merge(graphdef, state, rest)(jnp.asarray(ids.numpy())))

    report("model vs transformers, logits", float32_bound(model_terms(ours.config, 9),
                                                          model_depth(ours.config.num_layers)), {
        "correct": (logits(), ref),
        "wrong sign of one layer's conv bias": (
            logits(**{"layers/attn/conv_depthwise_bias": lambda b: b.at[1].multiply(-1)}), ref),
        "missing value shift (delayed values zeroed)": (
            logits(**{"layers/attn/v_delayed": lambda w: w.at[0].set(0)}), ref),
        "experts 0 and 1 swapped in one layer": (
            logits(**{"layers/moe/experts/down": lambda w: w.at[0, 0].set(w[0, 1]).at[0, 1].set(w[0, 0])}), ref),
    })

    q, k, v = (jnp.asarray(rng.normal(size=(2, 37, h, 16)), jnp.float32) for h in (4, 2, 2))
    segments = jnp.ones((2, 37), jnp.int32)
    reference = xla_attention(q, k, v, segments, segments, 0)
    short = segments.at[:, 20].set(0)  # one key masked out for every query: a missing term
    report("kernels vs XLA, flash attention forward", float32_bound(37, 3), {
        "correct": (flash_attention(q, k, v, segments, segments, 0, 16, 8, True), reference),
        "wrong sign of the values": (flash_attention(q, k, -v, segments, segments, 0, 16, 8, True), reference),
        "one key missing": (flash_attention(q, k, v, segments, short, 0, 16, 8, True), reference),
    })

    from sharding import MeshConfig, batch_sharding, init_sharded_model, make_mesh, use_mesh
    from tests.sharding.test_meshes import CONFIG, _loss
    from train.data import ByteTokenizer, make_dataset
    from train.data.sources import SyntheticSource
    from train.step import step_batch
    from zaya_jax import init_model

    raw = next(iter(make_dataset(SyntheticSource(seed=3), ByteTokenizer(), 64, 8, seed=3, num_threads=0)))
    batch = {k: jnp.asarray(v) for k, v in step_batch(raw).items()}

    def loss_and_grads(model, mesh=None):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        fn = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
        if mesh is None:
            return jax.device_get(fn(graphdef, params, rest, batch))
        with use_mesh(mesh):
            return jax.device_get(fn(graphdef, params, rest, jax.device_put(batch, batch_sharding(mesh))))

    mesh = make_mesh(MeshConfig(data=2, expert=4))
    ref_loss, ref_grads = loss_and_grads(init_model(CONFIG, seed=0))
    loss, grads = loss_and_grads(init_sharded_model(CONFIG, mesh, seed=0), mesh)
    swapped = init_model(CONFIG, seed=0)
    down = swapped.layers.moe.experts.down
    down[...] = down[...].at[0, 0].set(down[...][0, 1]).at[0, 1].set(down[...][0, 0])
    broken_loss, broken_grads = loss_and_grads(swapped)
    name = "layers/moe/router/fc1"  # a gradient every token's routing path feeds
    pick = lambda tree: tree["layers"]["moe"]["router"]["fc1"][...]  # noqa: E731
    terms = max(model_terms(CONFIG, 64), CONFIG.vocab_size, 8 * 64)
    report(f"sharded (data 2 x expert 4) vs one device, d loss / d {name}",
           float32_bound(terms, model_depth(CONFIG.num_layers, backward=True) + 2), {
               "correct": (pick(grads), pick(ref_grads)),
               "experts 0 and 1 swapped in one layer": (pick(broken_grads), pick(ref_grads)),
           })
    graphdef, params, rest = nnx.split(init_model(CONFIG, seed=0), nnx.Param, ...)
    unmasked = _loss(graphdef, params, rest, {**batch, "target_mask": jnp.ones_like(batch["target_mask"])})
    max_abs_logit = float(jnp.abs(nnx.merge(graphdef, params, rest)(batch["tokens"])).max())
    loss_bound = cross_entropy_bound(max_abs_logit=max_abs_logit, loss=float(ref_loss), vocab=CONFIG.vocab_size,
                                     tokens=8 * 64, logits_bound=float32_bound(model_terms(CONFIG, 64),
                                                                               model_depth(CONFIG.num_layers)))
    report("sharded (data 2 x expert 4) vs one device, loss", loss_bound / abs(float(ref_loss)), {
        "correct": (loss, ref_loss),
        "experts 0 and 1 swapped in one layer (at init the loss barely depends on one expert)": (broken_loss, ref_loss),
        "target mask ignored (padding and prompts counted)": (unmasked, ref_loss),
    })

    from train.optim import OptimizerConfig, make_optimizer

    cfg = OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.1, clip_norm=None)
    p = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    g = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    opt = make_optimizer(cfg, p)
    update = np.asarray(opt.update(g, opt.init(p), p)[0]["w"], np.float64)
    pw, gw = np.asarray(p["w"], np.float64), np.asarray(g["w"], np.float64)
    lr = cfg.lr * (1 - 0)  # step 0 of a cosine schedule without warmup
    adam = lambda gw, b1c=1 - cfg.b1, b2c=1 - cfg.b2: (  # noqa: E731
        ((1 - cfg.b1) * gw / b1c) / (np.sqrt((1 - cfg.b2) * gw**2 / b2c) + cfg.eps))
    report("optimizer vs float64 NumPy, AdamW update", float32_bound(pw.size, ADAM_DEPTH), {
        "correct": (update, -lr * (adam(gw) + cfg.weight_decay * pw)),
        "wrong sign of weight decay": (update, -lr * (adam(gw) - cfg.weight_decay * pw)),
        "missing second-moment bias correction": (update, -lr * (adam(gw, b2c=1.0) + cfg.weight_decay * pw)),
    })


if __name__ == "__main__":
    {"inference": inference, "parity": parity, "compile": compile_times, "bytes": device_bytes, "balancer": balancer,
     "kernels": kernels, "tolerances": tolerances}[sys.argv[1]]()
