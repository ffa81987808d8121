"""Tests for train/optim.py: schedules against hand-written formulas, AdamW (+clipping, decay mask) against a float64
NumPy implementation, Muon's parameter grouping, equality with optax.contrib.muon, and stacked-matrix slicing."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tolerances import ADAM_DEPTH, assert_float32_close
from train.optim import OptimizerConfig, make_optimizer, make_schedule, param_groups

# Muon: momentum, the Frobenius normalisation, then 5 Newton-Schulz steps of 3 matmuls each (optax's default).
MUON_DEPTH = 2 + 5 * 3


def _runner(opt: optax.GradientTransformation):
    """A jitted function applying `opt` to a list of gradients in turn and returning the list of update pytrees.

    The whole sequence is one jit so each optimizer compiles once; reuse the runner for same-shaped inputs.
    """

    def run(params, grads_seq):
        state = opt.init(params)
        out = []
        for grads in grads_seq:
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            out.append(updates)
        return out

    return jax.jit(run)


def _run(opt: optax.GradientTransformation, params, grads_seq) -> list:
    return _runner(opt)(params, grads_seq)


def _grads_like(params, seed: int, scale: float = 1.0):
    # NumPy draws: jax.random would compile a sampler per shape, which dominates these tiny tests.
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), params)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0, mean: float = 0.0) -> jax.Array:
    return jnp.asarray(mean + scale * rng.normal(size=shape), jnp.float32)


# ---- schedules ---------------------------------------------------------------------------------------------------


def test_cosine_schedule() -> None:
    lr, w, t_total, ratio = 1e-3, 10, 110, 0.1
    sched = make_schedule(OptimizerConfig(lr=lr, warmup_steps=w, total_steps=t_total, min_lr_ratio=ratio))
    lo = lr * ratio

    def cosine(t: int) -> float:
        return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * min(max((t - w) / (t_total - w), 0), 1)))

    expected = {
        0: lr / w,  # warmup starts at lr / W
        4: lr * 5 / w,
        9: lr,  # warmup ends at the peak
        10: lr,
        35: cosine(35),
        60: (lr + lo) / 2,  # cosine midpoint
        110: lo,
        500: lo,
    }
    for t, value in expected.items():
        assert float(sched(t)) == pytest.approx(value, rel=1e-5), t
    assert float(jax.jit(sched)(jnp.int32(60))) == pytest.approx((lr + lo) / 2, rel=1e-5)


def test_wsd_schedule() -> None:
    lr, lo = 2e-3, 2e-4
    sched = make_schedule(
        OptimizerConfig(lr=lr, schedule="wsd", warmup_steps=10, total_steps=100, min_lr_ratio=0.1, decay_fraction=0.2)
    )
    expected = {0: lr / 10, 9: lr, 10: lr, 50: lr, 80: lr, 85: lr - (lr - lo) * 5 / 20, 90: (lr + lo) / 2, 100: lo,
                1000: lo}
    for t, value in expected.items():
        assert float(sched(t)) == pytest.approx(value, rel=1e-5), t


def test_constant_schedule() -> None:
    sched = make_schedule(OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=4, total_steps=10))
    assert [float(sched(t)) for t in (0, 1, 3, 4, 9, 50)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    flat = make_schedule(OptimizerConfig(lr=1e-3, schedule="constant", warmup_steps=0, total_steps=10))
    assert float(flat(0)) == pytest.approx(1e-3)


# ---- AdamW -------------------------------------------------------------------------------------------------------


def _small_params():
    rng = np.random.default_rng(0)
    return {
        "embed": {"embedding": _normal(rng, (6, 4))},
        "layer": {"kernel": _normal(rng, (4, 3)), "bias": _normal(rng, (3,))},
        "norm": {"scale": _normal(rng, (4,), 0.1, 1.0)},
    }


def test_adamw_with_clipping_matches_numpy() -> None:
    cfg = OptimizerConfig(lr=1e-2, warmup_steps=2, total_steps=10, weight_decay=0.1, clip_norm=1.0, b2=0.95)
    params = _small_params()
    # Gradient norms ~0.3, ~6.5, ~0.65: the clip only triggers on the second step.
    grads_seq = [_grads_like(params, 1, 0.05), _grads_like(params, 2, 1.0), _grads_like(params, 3, 0.1)]
    updates = _run(make_optimizer(cfg, params), params, grads_seq)

    names = ["embed/embedding", "layer/kernel", "layer/bias", "norm/scale"]
    get = lambda tree, name: np.asarray(tree[name.split("/")[0]][name.split("/")[1]], np.float64)  # noqa: E731
    p = {n: get(params, n) for n in names}
    m = {n: np.zeros_like(p[n]) for n in names}
    v = {n: np.zeros_like(p[n]) for n in names}
    decayed = {n: p[n].ndim >= 2 for n in names}
    assert decayed == {"embed/embedding": True, "layer/kernel": True, "layer/bias": False, "norm/scale": False}
    clipped = []
    n_elements = sum(p[n].size for n in names)
    for step, grads in enumerate(grads_seq):
        g = {n: get(grads, n) for n in names}
        norm = math.sqrt(sum(float((x**2).sum()) for x in g.values()))
        scale = min(1.0, cfg.clip_norm / norm)
        clipped.append(scale < 1.0)
        lr = cfg.lr * (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else (
            cfg.lr * cfg.min_lr_ratio + cfg.lr * (1 - cfg.min_lr_ratio) * 0.5
            * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps)))
        )
        t = step + 1
        for n in names:
            gn = g[n] * scale
            m[n] = cfg.b1 * m[n] + (1 - cfg.b1) * gn
            v[n] = cfg.b2 * v[n] + (1 - cfg.b2) * gn**2
            adam = (m[n] / (1 - cfg.b1**t)) / (np.sqrt(v[n] / (1 - cfg.b2**t)) + cfg.eps)
            u = -lr * (adam + (cfg.weight_decay * p[n] if decayed[n] else 0.0))
            # float32 against float64: the clip's global norm sums every gradient element, and each step chains
            # ADAM_DEPTH roundings through the moments, which carry the earlier steps' errors (tests/tolerances.py).
            assert_float32_close(get(updates[step], n), u, terms=n_elements, depth=ADAM_DEPTH * (step + 1),
                                 name=f"{n} step {step}")
            p[n] = p[n] + u
    assert clipped == [False, True, False]


def test_adamw_groups_are_ndim_based() -> None:
    groups = param_groups(OptimizerConfig(), {"w": jnp.zeros((3, 4, 5)), "e": jnp.zeros((7, 3)), "b": jnp.zeros(3)})
    assert groups == {"w": "decay", "e": "decay", "b": "no_decay"}


# ---- Muon --------------------------------------------------------------------------------------------------------


def _muon_params():
    rng = np.random.default_rng(7)
    return {
        "embed": {"embedding": _normal(rng, (8, 6), 0.02)},
        "blocks": {
            "attn": {"kernel": _normal(rng, (6, 6), 0.02)},
            "stacked": _normal(rng, (3, 6, 5), 0.02),
            "experts": _normal(rng, (2, 3, 5, 4), 0.02),
            "norm": {"weight": _normal(rng, (6,), 0.01, 1.0)},
            "bias": _normal(rng, (5,), 0.01),
        },
    }


MUON_CFG = OptimizerConfig(name="muon", lr=1e-2, warmup_steps=1, total_steps=10, weight_decay=0.1, clip_norm=None)


def _contrib_muon(cfg: OptimizerConfig) -> optax.GradientTransformation:
    return optax.contrib.muon(
        learning_rate=make_schedule(cfg),
        beta=cfg.muon_momentum,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        consistent_rms=cfg.muon_consistent_rms,
    )


def test_muon_param_groups() -> None:
    groups = param_groups(MUON_CFG, _muon_params())
    assert groups == {
        "embed": {"embedding": "decay"},
        "blocks": {
            "attn": {"kernel": "muon"},
            "stacked": "muon",
            "experts": "muon",
            "norm": {"weight": "no_decay"},
            "bias": "no_decay",
        },
    }


@pytest.fixture(scope="module")
def muon_run():
    """MUON_CFG applied for three steps to `_muon_params()`: (params, grads_seq, updates), shared by the tests below."""
    params = _muon_params()
    grads_seq = [_grads_like(params, s) for s in (11, 12, 13)]
    return params, grads_seq, _run(make_optimizer(MUON_CFG, params), params, grads_seq)


@pytest.fixture(scope="module")
def contrib_muon_runner():
    """optax.contrib.muon with MUON_CFG's settings, jitted once and reused for every same-shaped matrix."""
    return _runner(_contrib_muon(MUON_CFG))


def test_muon_adamw_leaves_match_plain_adamw(muon_run) -> None:
    params, grads_seq, updates = muon_run

    def pick(t):
        return {"embed": t["embed"]["embedding"], "norm": t["blocks"]["norm"]["weight"], "bias": t["blocks"]["bias"]}

    ref_opt = optax.adamw(
        make_schedule(MUON_CFG), b1=MUON_CFG.b1, b2=MUON_CFG.b2, eps=MUON_CFG.eps,
        weight_decay=MUON_CFG.weight_decay, mask={"embed": True, "norm": False, "bias": False},
    )
    ref = _run(ref_opt, pick(params), [pick(g) for g in grads_seq])
    for got, want in zip(updates, ref):
        for name, value in pick(got).items():
            # Both are optax's AdamW, in two programs that XLA may fuse differently (elementwise: no long sums).
            assert_float32_close(value, want[name], terms=1, depth=ADAM_DEPTH * len(updates), name=name)

    # The hidden matrices do NOT get the AdamW update.
    matrices = lambda t: {k: t["blocks"][k] for k in ("stacked", "experts")}  # noqa: E731
    adam = optax.adamw(make_schedule(MUON_CFG), b1=MUON_CFG.b1, b2=MUON_CFG.b2, eps=MUON_CFG.eps,
                       weight_decay=MUON_CFG.weight_decay)
    adam_updates = _run(adam, matrices(params), [matrices(g) for g in grads_seq])
    for key in ("stacked", "experts"):
        assert not np.allclose(np.asarray(updates[-1]["blocks"][key]), np.asarray(adam_updates[-1][key]))


def test_muon_matrix_matches_optax_contrib_muon(muon_run, contrib_muon_runner) -> None:
    params, grads_seq, updates = muon_run
    kernel = lambda t: {"w": t["blocks"]["attn"]["kernel"]}  # noqa: E731
    ref = contrib_muon_runner(kernel(params), [kernel(g) for g in grads_seq])
    for got, want in zip(updates, ref):
        assert_float32_close(kernel(got)["w"], want["w"], terms=max(want["w"].shape), depth=MUON_DEPTH)


def test_muon_width_scale_matches_optax_contrib_muon() -> None:
    cfg = dataclasses.replace(MUON_CFG, muon_consistent_rms=None)
    params = {"w": _normal(np.random.default_rng(8), (4, 7), 0.02), "b": jnp.zeros(7)}  # fan_out > fan_in
    grads_seq = [_grads_like(params, s) for s in (21, 22)]
    updates = _run(make_optimizer(cfg, params), params, grads_seq)
    ref = _run(_contrib_muon(cfg), {"w": params["w"]}, [{"w": g["w"]} for g in grads_seq])
    for got, want in zip(updates, ref):
        assert_float32_close(got["w"], want["w"], terms=max(want["w"].shape), depth=MUON_DEPTH)


@pytest.mark.parametrize("key", ["stacked", "experts"])
def test_muon_stacked_equals_per_slice(key: str, muon_run, contrib_muon_runner) -> None:
    params, grads_seq, updates = muon_run
    stacked = np.asarray(params["blocks"][key])
    for index in np.ndindex(*stacked.shape[:-2]):
        slice_grads = [{"w": g["blocks"][key][index]} for g in grads_seq]
        ref = contrib_muon_runner({"w": jnp.asarray(stacked[index])}, slice_grads)
        for step, want in enumerate(ref):
            got = np.asarray(updates[step]["blocks"][key])[index]
            assert_float32_close(got, want["w"], terms=max(got.shape), depth=MUON_DEPTH, name=f"{index} {step}")


def test_muon_with_clipping_runs_and_finite() -> None:
    cfg = OptimizerConfig(name="muon", warmup_steps=0, total_steps=5, clip_norm=0.5)
    params = {"embed": jnp.ones((5, 4)), "w": jnp.eye(4), "stacked": jnp.ones((2, 4, 3)), "b": jnp.zeros(4)}
    updates = _run(make_optimizer(cfg, params), params, [_grads_like(params, 41, 10.0)])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(updates))


def test_groups_override() -> None:
    # A per-layer norm scale stacked to [L, D] looks like a matrix by rank; the caller regroups it.
    params = {"norms": jnp.ones((3, 6)), "w": 0.02 * jnp.ones((6, 6))}
    groups = {"norms": "no_decay", "w": "muon"}
    grads = [_grads_like(params, 51)]
    updates = _run(make_optimizer(MUON_CFG, params, groups), params, grads)
    ref = _run(optax.adamw(make_schedule(MUON_CFG), b1=MUON_CFG.b1, b2=MUON_CFG.b2, eps=MUON_CFG.eps, weight_decay=0.0),
               {"n": params["norms"]}, [{"n": grads[0]["norms"]}])
    assert_float32_close(updates[0]["norms"], ref[0]["n"], terms=1, depth=ADAM_DEPTH)
    with pytest.raises(ValueError, match="unknown parameter group"):
        make_optimizer(MUON_CFG, params, {"norms": "nodecay", "w": "muon"})
    with pytest.raises(ValueError, match="cannot use Muon"):
        make_optimizer(MUON_CFG, {"b": jnp.ones(3)}, {"b": "muon"})


def test_nnx_state_paths() -> None:
    nnx = pytest.importorskip("flax.nnx")

    class Tiny(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.embed_tokens = nnx.Embed(11, 6, rngs=rngs)
            self.proj = nnx.Linear(6, 6, rngs=rngs)
            self.norm = nnx.RMSNorm(6, rngs=rngs)

    # Abstract (shape-only) parameters: grouping needs only paths and ranks, and nothing has to be initialised.
    state = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), nnx.Param)
    flat = {
        "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): g
        for path, g in jax.tree_util.tree_leaves_with_path(param_groups(MUON_CFG, state))
    }
    assert flat == {
        "embed_tokens/embedding/value": "decay",
        "proj/bias/value": "no_decay",
        "proj/kernel/value": "muon",
        "norm/scale/value": "no_decay",
    }
    opt = make_optimizer(MUON_CFG, state)
    # Tracing (no compile) is enough to show the groups line up with the nnx.State structure.
    updates, _ = jax.eval_shape(opt.update, state, jax.eval_shape(opt.init, state), state)
    assert jax.tree.structure(updates) == jax.tree.structure(state)


# ---- validation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"name": "sgd"}, "name"),
        ({"schedule": "linear"}, "schedule"),
        ({"lr": -1e-3}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.5}, "b2"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": 2000, "total_steps": 1000}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"decay_fraction": -0.1}, "decay_fraction"),
        ({"schedule": "wsd", "warmup_steps": 900, "decay_fraction": 0.2}, "decay_fraction"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"muon_momentum": 1.0}, "muon_momentum"),
        ({"muon_consistent_rms": -1.0}, "muon_consistent_rms"),
        ({"adamw_path_keywords": "embed"}, "adamw_path_keywords"),
        ({"lr": float("inf")}, "lr"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"OptimizerConfig\.{field}\b"):
        OptimizerConfig(**kwargs)


def test_config_accepts_valid() -> None:
    cfg = OptimizerConfig(name="muon", schedule="wsd", lr=1, clip_norm=None, adamw_path_keywords=["embed"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.adamw_path_keywords == ("embed",)
    assert cfg.decay_steps == 200
