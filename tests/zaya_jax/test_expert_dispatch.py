"""Expert dispatch on 8 CPU devices equals the single-device dense reference, values and gradients: the
expert-parallel transports, and the dispatch local to each device's tokens (FSDP, FSDP x expert, a token count that
does not split over the devices).

ragged_all_to_all has no CPU implementation: the real call must refuse clearly, and its offset/size bookkeeping
is checked against an all_gather-based emulation of the collective that follows its documented semantics.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import zaya_jax.parallel.expert_dispatch as ep
from tests.tolerances import EXPERT_GRAD_DEPTH, assert_float32_close
from zaya_jax.experts import experts_dense
from zaya_jax.parallel.expert_dispatch import expert_parallel_ffn, experts_sharded

T, H, I = 64, 16, 8
TOKEN_AXES = ("data", "expert")
MESHES = {"data2_expert4": (2, 4), "expert8": (1, 8), "data4_expert2": (4, 2)}
NUM_EXPERTS = {"data2_expert4": 8, "expert8": 16, "data4_expert2": 8}  # expert8: two experts per shard


def _mesh(name: str) -> jax.sharding.Mesh:
    return jax.make_mesh(MESHES[name], TOKEN_AXES, axis_types=(AxisType.Auto,) * 2)


def _inputs(num_experts: int, routing: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if routing == "uniform":
        expert = rng.integers(0, num_experts, T)
    else:  # skewed: ~3/4 of the tokens to expert 3, the rest anywhere
        expert = np.where(rng.random(T) < 0.75, 3, rng.integers(0, num_experts, T))
    weight = rng.uniform(0.1, 1.0, T) * (rng.random(T) > 0.2)  # ~20% zeros (skip class)
    return {
        "x": rng.normal(size=(T, H)).astype(np.float32),
        "expert": expert.astype(np.int32),
        "weight": weight.astype(np.float32),
        "gate_up": (rng.normal(size=(num_experts, H, 2 * I)) / math.sqrt(H)).astype(np.float32),
        "down": (rng.normal(size=(num_experts, I, H)) / math.sqrt(I)).astype(np.float32),
    }


def _value_and_grads(ffn):
    """jit(value_and_grad) of sum(sin(y)) w.r.t. x, weight, gate_up, down; aux = (y, dropped)."""
    def loss(x, weight, gate_up, down, expert):
        y, dropped = ffn(x, expert, weight, gate_up, down)
        return jnp.sum(jnp.sin(y)), (y, dropped)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


_dense = _value_and_grads(lambda x, e, w, gu, d: (experts_dense(x, e, w, gu, d), jnp.zeros((), jnp.int32)))


def _reference(inp: dict[str, np.ndarray], weight: np.ndarray | None = None):
    (_, (y, _)), grads = _dense(inp["x"], inp["weight"] if weight is None else weight, inp["gate_up"],
                                inp["down"], inp["expert"])
    return np.asarray(y), [np.asarray(g) for g in grads]


def _run_sharded(mesh, inp: dict[str, np.ndarray], **kwargs):
    tok, exp = NamedSharding(mesh, P(TOKEN_AXES)), NamedSharding(mesh, P("expert"))
    args = [jax.device_put(inp[k], s) for k, s in
            (("x", tok), ("weight", tok), ("gate_up", exp), ("down", exp), ("expert", tok))]
    fn = _value_and_grads(lambda x, e, w, gu, d: expert_parallel_ffn(x, e, w, gu, d, mesh=mesh, **kwargs))
    (_, (y, dropped)), grads = fn(*args)
    return np.asarray(y), int(dropped), [np.asarray(g) for g in grads]


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name, axis_index_groups=None):
    """jax.lax.ragged_all_to_all per its docstring (one slice per peer), built from all_gather; CPU-capable.

    A receiver whose recv_sizes disagree with what the senders send gets NaNs, so inconsistent bookkeeping
    fails the comparison instead of passing by accident.
    """
    assert axis_index_groups is None
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)          # [n, N, ...]
    in_off = jax.lax.all_gather(input_offsets, axis_name)  # [n, n]: [s, d] = s's slice for d starts here
    sizes = jax.lax.all_gather(send_sizes, axis_name)
    out_off = jax.lax.all_gather(output_offsets, axis_name)
    rows = jnp.arange(output.shape[0])
    result = output
    for s in range(ops.shape[0]):
        start, size, dst = in_off[s, me], sizes[s, me], out_off[s, me]
        hit = (rows >= dst) & (rows < dst + size)
        src = jnp.clip(start + rows - dst, 0, operand.shape[0] - 1)
        hit = hit.reshape(hit.shape + (1,) * (output.ndim - 1))
        result = jnp.where(hit, ops[s][src], result)
    if jnp.issubdtype(output.dtype, jnp.floating):
        result = jnp.where(jnp.any(recv_sizes != sizes[:, me]), jnp.nan, result)
    return result


def _max_err(got, want) -> float:
    return float(np.max(np.abs(got - want)))


def _check_close(name: str, got: np.ndarray, want: np.ndarray) -> float:
    # The experts' sums (over H, I, and the tokens in the weights' gradients) in another order, and the transports'
    # partial sums over the expert shards (tests/tolerances.py). Returns the max abs error.
    assert_float32_close(got, want, terms=T, depth=EXPERT_GRAD_DEPTH, name=name)
    return _max_err(got, want)


CASES = [(m, t, r) for m in MESHES for t in ("all_to_all", "all_gather", "ragged_emulated")
         for r in ("uniform", "skewed")]


@pytest.mark.parametrize("mesh_name,transport,routing", CASES)
def test_matches_dense_reference(mesh_name, transport, routing, monkeypatch):
    if transport == "ragged_emulated":
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
        monkeypatch.setattr(ep, "RAGGED_UNSUPPORTED_PLATFORMS", frozenset())
        transport = "ragged_all_to_all"
    inp = _inputs(NUM_EXPERTS[mesh_name], routing)
    y_ref, grads_ref = _reference(inp)
    y, dropped, grads = _run_sharded(_mesh(mesh_name), inp, transport=transport)
    assert dropped == 0
    errs = [_check_close("y", y, y_ref)]
    for name, g, g_ref in zip(("x", "weight", "gate_up", "down"), grads, grads_ref):
        errs.append(_check_close(f"d/d{name}", g, g_ref))
    print(f"\n[{mesh_name} {transport} {routing}] max abs err y {errs[0]:.2e} "
          f"grads x {errs[1]:.2e} weight {errs[2]:.2e} gate_up {errs[3]:.2e} down {errs[4]:.2e}")


def _expected_drops(expert: np.ndarray, num_experts: int, mesh_name: str, capacity_factor: float) -> np.ndarray:
    """Documented rule: per (token shard, destination expert-shard), the first C tokens by position are kept."""
    n_data, n_ep = MESHES[mesh_name]
    t = T // (n_data * n_ep)
    cap = max(1, min(t, math.ceil(capacity_factor * t / n_ep)))
    dest = expert // (num_experts // n_ep)
    dropped = np.zeros(T, bool)
    for start in range(0, T, t):  # token shards are consecutive blocks of t
        seen: dict[int, int] = {}
        for i in range(start, start + t):
            seen[dest[i]] = seen.get(dest[i], 0) + 1
            dropped[i] = seen[dest[i]] > cap
    return dropped


@pytest.mark.parametrize("mesh_name", ["data2_expert4", "expert8"])
def test_capacity_drops_are_counted_and_zeroed(mesh_name):
    num_experts = NUM_EXPERTS[mesh_name]
    inp = _inputs(num_experts, "skewed", seed=1)
    want_dropped = _expected_drops(inp["expert"], num_experts, mesh_name, 0.5)
    assert 0 < want_dropped.sum() < T
    y, dropped, grads = _run_sharded(_mesh(mesh_name), inp, transport="all_to_all", capacity_factor=0.5)
    assert dropped == int(want_dropped.sum())
    assert np.all(y[want_dropped] == 0.0)
    # Kept tokens match the reference; so do all gradients of the reference with the dropped tokens' weight zeroed,
    # except d/dweight of a dropped token, which is 0 (its output no longer depends on its weight).
    kept = ~want_dropped
    y_ref, grads_ref = _reference(inp, weight=inp["weight"] * kept)
    _check_close("y kept", y[kept], y_ref[kept])
    grads_ref[1] = grads_ref[1] * kept
    for name, g, g_ref in zip(("x", "weight", "gate_up", "down"), grads, grads_ref):
        _check_close(f"d/d{name}", g, g_ref)


def test_large_capacity_factor_is_dropless():
    inp = _inputs(8, "skewed")
    y, dropped, _ = _run_sharded(_mesh("data2_expert4"), inp, transport="all_to_all", capacity_factor=100.0)
    assert dropped == 0
    _check_close("y", y, _reference(inp)[0])


def test_ragged_all_to_all_refuses_cpu():
    inp = _inputs(8, "uniform")
    with pytest.raises(ValueError, match=r"'ragged_all_to_all' is not supported on the 'cpu' backend"):
        expert_parallel_ffn(inp["x"], inp["expert"], inp["weight"], inp["gate_up"], inp["down"],
                            mesh=_mesh("data2_expert4"), transport="ragged_all_to_all")


@pytest.mark.parametrize("platform,device", [("cuda", ("NVIDIA H100 80GB HBM3", "gpu")), ("tpu", ("TPU v5p", "tpu"))])
def test_ragged_all_to_all_lowers_for_gpu_and_tpu(platform, device):
    """Where XLA has the collective: the transport, forward and backward, lowers for the platform (on the CPU, for
    an abstract data=2 x expert=4 mesh), and every ragged_all_to_all runs within an expert group."""
    from jax import export

    kind, device_platform = device
    abstract = jax.sharding.AbstractDevice(device_kind=kind, num_cores=1, platform=device_platform)
    mesh = jax.sharding.AbstractMesh((2, 4), ("data", "expert"), abstract_device=abstract)
    s = jax.ShapeDtypeStruct
    args = (s((T, H), jnp.float32), s((T,), jnp.int32), s((T,), jnp.float32), s((8, H, 2 * I), jnp.float32),
            s((8, I, H), jnp.float32))
    ffn = lambda *a: expert_parallel_ffn(*a, mesh=mesh, transport="ragged_all_to_all")[0]  # noqa: E731
    grads = jax.grad(lambda *a: jnp.sum(ffn(*a) ** 2), argnums=(0, 2, 3, 4))
    unchecked = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    # Forward: tokens and their ids out, results back; the backward adds the transposes of the two float ones.
    for fn, calls in ((ffn, 3), (grads, 5)):
        with jax.sharding.use_abstract_mesh(mesh):
            module = export.export(jax.jit(fn), platforms=[platform], disabled_checks=unchecked)(*args).mlir_module()
        collectives = [line for line in module.splitlines() if "custom_call @ragged_all_to_all" in line]
        assert len(collectives) == calls
        assert all("replica_groups = dense<[[0, 1, 2, 3], [4, 5, 6, 7]]>" in line for line in collectives)


@pytest.mark.parametrize("kwargs,match", [
    ({"transport": "alltoall"}, "valid: all_to_all, all_gather, ragged_all_to_all"),
    ({"transport": "all_gather", "capacity_factor": 1.0}, "capacity_factor applies to transport 'all_to_all'"),
    ({"capacity_factor": 0.0}, "must be > 0"),
    ({"token_axes": ("data",)}, "must include the expert axis"),
    ({"expert_axis": "model", "token_axes": ("data", "model")}, "not in the mesh axes"),
])
def test_bad_arguments(kwargs, match):
    inp = _inputs(8, "uniform")
    with pytest.raises(ValueError, match=match):
        expert_parallel_ffn(inp["x"], inp["expert"], inp["weight"], inp["gate_up"], inp["down"],
                            mesh=_mesh("data2_expert4"), **kwargs)


# Local dispatch: (data, fsdp, expert) mesh, the experts' axis (None: every device holds every expert), tokens.
LOCAL_CASES = {
    "fsdp8": ((1, 8, 1), None, T),
    "fsdp8_uneven": ((1, 8, 1), None, T - 4),  # 60 tokens: padded to 64 inside, 8 per device
    "fsdp2_expert4": ((1, 2, 4), "expert", T),
}


@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_sharded_dispatch_matches_dense_reference(case):
    """`experts_sharded`, the dispatch the model runs under a mesh: tokens split over every axis, weights FSDP-sharded
    on their hidden dimension (and over `expert` when it is > 1), as sharding/rules.py lays them out."""
    shape, expert_axis, tokens = LOCAL_CASES[case]
    mesh = jax.make_mesh(shape, ("data", "fsdp", "expert"), axis_types=(AxisType.Auto,) * 3)
    token_axes = ("data", "fsdp", "expert")
    inp = {k: v[:tokens] if v.shape[0] == T else v for k, v in _inputs(8, "skewed", seed=2).items()}
    want_y, want_grads = _reference(inp)
    tok = NamedSharding(mesh, P(token_axes) if tokens % 8 == 0 else P())  # uneven: handed over unsplit
    placed = {k: jax.device_put(inp[k], tok) for k in ("x", "expert", "weight")}
    placed["gate_up"] = jax.device_put(inp["gate_up"], NamedSharding(mesh, P(expert_axis, "fsdp", None)))
    placed["down"] = jax.device_put(inp["down"], NamedSharding(mesh, P(expert_axis, None, "fsdp")))
    fn = _value_and_grads(lambda x, e, w, gu, d: experts_sharded(x, e, w, gu, d, mesh=mesh, token_axes=token_axes,
                                                                 expert_axis=expert_axis))
    (_, (y, dropped)), grads = fn(placed["x"], placed["weight"], placed["gate_up"], placed["down"],
                                  placed["expert"])
    assert int(dropped) == 0
    _check_close("y", np.asarray(y), want_y)
    for name, g, g_ref in zip(("x", "weight", "gate_up", "down"), grads, want_grads):
        _check_close(f"d/d{name}", np.asarray(g), g_ref)


def test_sharded_dispatch_refuses_bad_arguments():
    mesh = _mesh("data2_expert4")
    inp = _inputs(8, "uniform")
    args = [inp[k] for k in ("x", "expert", "weight", "gate_up", "down")]
    with pytest.raises(ValueError, match="token axis 'fsdp' is not in the mesh axes"):
        experts_sharded(*args, mesh=mesh, token_axes=("data", "fsdp"))
    with pytest.raises(ValueError, match="capacity_factor needs an expert axis"):
        experts_sharded(*args, mesh=mesh, token_axes=TOKEN_AXES, capacity_factor=1.0)
    with pytest.raises(ValueError, match="62 tokens do not split"):
        experts_sharded(*[a[:62] if a.shape[0] == T else a for a in args], mesh=mesh, token_axes=TOKEN_AXES,
                        expert_axis="expert", capacity_factor=1.0)
