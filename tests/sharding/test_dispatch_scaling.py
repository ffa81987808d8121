"""Expert dispatch stays local to each device's tokens: at a fixed per-device batch, the compiled per-device
temporary memory of a one-MoE-layer program (forward and backward) and of a tiny training step does not grow from 8
to 64 devices (FSDP over all of them), and no all-gather in either program produces the global token count.

Compiling for 64 devices needs 64 (virtual CPU) devices, which this process does not have (tests/conftest.py gives
it 8), so `measure` runs for 64 in a subprocess started with --xla_force_host_platform_device_count=64, and for 8
here meanwhile. It compiles, never runs, the programs for FSDP meshes over 8 and 64 devices.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROWS_PER_DEVICE, SEQ = 1, 96  # 96 tokens per device; 96 * n is no run of dimensions of any weight of the preset
DEVICE_COUNTS = (8, 64)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def token_gathers(hlo: str, global_tokens: int) -> list[dict[str, str]]:
    """The all-gathers in `hlo` whose result has the global token count as one dimension or as the product of
    consecutive dimensions (e.g. [B, S, H] gathered over the batch): {"shape": result, "op": op_name} each."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) all-gather(?:-start)?\(", line)
        if not match:
            continue
        for dims in re.findall(r"\[([\d,]+)\]", match.group(1)):
            sizes = [int(d) for d in dims.split(",")]
            products = [_prod(sizes[i:j]) for i in range(len(sizes)) for j in range(i + 1, len(sizes) + 1)]
            if global_tokens in products:
                op = re.search(r'op_name="([^"]*)"', line)
                found.append({"shape": match.group(1), "op": op.group(1) if op else ""})
                break
    return found


def _prod(sizes: list[int]) -> int:
    out = 1
    for size in sizes:
        out *= size
    return out


def measure(device_counts: tuple[int, ...] = DEVICE_COUNTS) -> dict[str, dict[int, dict]]:
    """{"moe" | "step": {devices: {"temp_bytes", "token_gathers"}}} for FSDP meshes over the first `devices`
    devices, at ROWS_PER_DEVICE x SEQ tokens per device. Compiles only."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from sharding import MeshConfig, batch_sharding, make_mesh, partition_spec, train_state_shardings, use_mesh
    from sharding.rules import path_name
    from train.balancer import BalancerConfig
    from train.config import load_train_config
    from train.optim import OptimizerConfig, make_optimizer
    from train.step import BATCH_DTYPES, init_train_state, make_train_step
    from zaya_jax import BalancingBias, ZayaForCausalLM
    from zaya_jax.moe import MoE

    config = load_train_config(os.path.join(ROOT, "configs", "tiny.yaml")).model.replace(num_layers=1)
    s = jax.ShapeDtypeStruct

    def with_shardings(tree, shardings):
        return jax.tree.map(lambda leaf, sh: s(leaf.shape, leaf.dtype, sharding=sh), tree, shardings)

    def moe_program(mesh, rows):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(config, rngs=nnx.Rngs(0))))

        def sharding(path, leaf):  # the rules' layout of the stacked parameter, less its layer axis
            spec = partition_spec("layers/moe/" + path_name(path), (1, *leaf.shape), mesh)
            return s(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec[1:])))

        state = jax.tree_util.tree_map_with_path(sharding, state)
        tokens = batch_sharding(mesh)  # [B, ...] split over the batch axes
        x = s((rows, SEQ, config.hidden_size), jnp.float32, sharding=tokens)
        router_state = s((rows, SEQ, config.router_hidden_size), jnp.float32, sharding=tokens)

        def loss(state, x, router_state):
            y, new_state, _, _ = nnx.merge(graphdef, state)(x, router_state)
            return jnp.sum(y * y) + jnp.sum(new_state * new_state)

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(state, x, router_state)

    def step_program(mesh, rows):
        model = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
        optimizer = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, total_steps=10),
                                   nnx.state(model, nnx.Param))
        graphdef = nnx.split(model, nnx.Param, BalancingBias)[0]
        state = jax.eval_shape(lambda: init_train_state(ZayaForCausalLM(config, rngs=nnx.Rngs(0)), optimizer, 0)[1])
        shardings = train_state_shardings(state, mesh)
        tokens = batch_sharding(mesh)
        batch = {k: s((rows, SEQ), dtype, sharding=tokens) for k, dtype in BATCH_DTYPES.items()}
        step = make_train_step(graphdef, optimizer, BalancerConfig(lr=1e-2), config.router_classes)
        return jax.jit(step, in_shardings=(shardings, tokens), out_shardings=(shardings, None),
                       donate_argnums=0).lower(with_shardings(state, shardings), batch)

    figures: dict[str, dict[int, dict]] = {"moe": {}, "step": {}}
    for n in device_counts:
        mesh = make_mesh(MeshConfig(data=1, fsdp=n), devices=jax.devices()[:n])
        rows = ROWS_PER_DEVICE * n
        for name, program in (("moe", moe_program), ("step", step_program)):
            with use_mesh(mesh):
                compiled = program(mesh, rows).compile({"xla_backend_optimization_level": 0})
            figures[name][n] = {"temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                                "token_gathers": token_gathers(compiled.as_text(), rows * SEQ)}
    return figures


@pytest.fixture(scope="module")
def figures() -> dict[str, dict[int, dict]]:
    """The 64-device figures from a subprocess, the 8-device ones from this process meanwhile (it has 8 devices)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(DEVICE_COUNTS)}"}
    code = ("import json, tests.sharding.test_dispatch_scaling as t; "
            f"print(json.dumps(t.measure(({max(DEVICE_COUNTS)},))))")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        here = measure(tuple(n for n in DEVICE_COUNTS if n != max(DEVICE_COUNTS)))
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    there = json.loads(out.strip().splitlines()[-1])
    return {name: {**here[name], **{int(n): f for n, f in there[name].items()}} for name in here}


@pytest.mark.parametrize("program", ["moe", "step"])
def test_per_device_memory_does_not_grow_with_the_device_count(figures, program):
    temps = {n: f["temp_bytes"] for n, f in figures[program].items()}
    print(f"\n{program}: per-device temporary bytes by device count {temps}")
    assert max(temps.values()) <= 1.1 * min(temps.values()), temps


def test_no_all_gather_of_the_global_tokens(figures):
    """The MoE program gathers no tokens. The step's only gather of the global token count is of the int32 token
    ids of the embedding lookup (`jnp.take` on a table whose embed dimension is FSDP-sharded: GSPMD gathers the
    4-byte ids rather than the table), n / H of one activation's bytes per device."""
    for n, f in figures["moe"].items():
        assert f["token_gathers"] == [], f"the MoE layer on {n} devices gathers every device's tokens"
    for n, f in figures["step"].items():
        others = [g for g in f["token_gathers"] if not (g["shape"].startswith("s32[") and "(_take)" in g["op"])]
        assert others == [], f"the step on {n} devices gathers every device's tokens"
