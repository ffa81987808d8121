"""The training state through a step, and the abstract state that ahead-of-time compiles use (train/state.py).

- The step returns the state it takes (tree structure, shapes, dtypes) for every preset in configs/ and every
  optimizer, checked abstractly with jax.eval_shape (zaya1-8b does not fit this machine); for the tiny preset in
  bfloat16 (the dtype whose optimizer moments used to turn float32) also concretely on a data 2 x fsdp 2 x expert 2
  mesh, shardings included. One step compile serves the concrete tests: it is the costly part of this file.
- Three calls of a run's jitted step compile once, and the compiled step aliases every donated state byte.
- abstract_train_state equals the state a run builds (structure, shapes, dtypes, shardings).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sharding import make_mesh, use_mesh
from train.config import TrainConfig, load_train_config
from train.loop import abstract_like, global_batch, setup
from train.optim import OPTIMIZER_NAMES
from zaya_jax import init_model
from train.state import abstract_batch, abstract_train_state, initial_train_state, jit_train_step, shardings_of

PRESETS = sorted(os.listdir("configs"))
BF16 = ("model.param_dtype=bfloat16", "model.dtype=bfloat16")
SMALL = ("data.seq_len=32", "train.batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.context=1", "mesh.expert=2")
# Every preset with each optimizer, plus the tiny preset in bfloat16 (the full-size presets are bfloat16 already).
CASES = [(p, o, ()) for p in PRESETS for o in OPTIMIZER_NAMES] + [("tiny.yaml", o, BF16) for o in OPTIMIZER_NAMES]
CASE_IDS = [f"{p}-{o}{'-bf16' if x else ''}" for p, o, x in CASES]


def _config(preset: str, *overrides: str) -> TrainConfig:
    return load_train_config(os.path.join("configs", preset), [*SMALL, *overrides])


def _layout(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], np.dtype]]]:
    return jax.tree.structure(tree), [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree)]


def _assert_same_shardings(expected: Any, actual: Any) -> None:
    """`expected`: a pytree of shardings; `actual`: arrays or ShapeDtypeStructs with the same structure."""
    flat = jax.tree_util.tree_flatten_with_path(actual)[0]
    for sharding, (path, leaf) in zip(jax.tree.leaves(expected), flat, strict=True):
        assert sharding.is_equivalent_to(leaf.sharding, len(leaf.shape)), (jax.tree_util.keystr(path), sharding,
                                                                            leaf.sharding)


@pytest.mark.parametrize("preset,optimizer,overrides", CASES, ids=CASE_IDS)
def test_the_step_returns_the_state_it_takes(preset, optimizer, overrides):
    cfg = _config(preset, f"optimizer.name={optimizer}", *overrides)
    mesh = make_mesh(cfg.mesh)
    abstract = abstract_train_state(cfg, mesh)
    step = jit_train_step(cfg, abstract, mesh)
    with use_mesh(mesh):
        new_state, _ = jax.eval_shape(step, abstract.state, abstract_batch(cfg, mesh))
    (structure, leaves), (new_structure, new_leaves) = _layout(abstract.state), _layout(new_state)
    assert new_structure == structure
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract.state)[0]]
    changed = [(name, old, new) for name, old, new in zip(names, leaves, new_leaves, strict=True) if old != new]
    assert changed == [], f"{len(changed)} of {len(leaves)} state leaves change: {changed[:5]}"


class TinyRun(NamedTuple):
    cfg: TrainConfig
    mesh: Mesh
    initial: Any  # abstract_like of the state setup() built, before any step
    final: Any  # abstract_like of the state after three steps
    compiles: int  # programs the jitted step holds after three calls
    alias_bytes: int  # memory_analysis() of the compiled step: output bytes aliased to (donated) inputs


@pytest.fixture(scope="module")
def tiny_run() -> TinyRun:
    """The tiny preset in bfloat16 set up as zaya-train does, its step compiled ahead of time, then called three
    times (the calls reuse the ahead-of-time compile)."""
    cfg = _config("tiny.yaml", *BF16)
    _, state, _, mesh = setup(cfg)
    # The run's step without LLVM optimisation: the same program and buffers, compiled in half the time.
    step = jit_train_step(cfg, abstract_train_state(cfg, mesh), mesh,
                          compiler_options={"xla_backend_optimization_level": 0})
    rng = np.random.default_rng(0)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    tokens = rng.integers(5, cfg.model.vocab_size, (b, s + 1), dtype=np.int32)
    local = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, s), np.int32),
             "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
             "target_mask": np.ones((b, s), np.float32)}
    batch = global_batch(local, mesh)
    initial = abstract_like(state)
    with use_mesh(mesh):
        compiled = step.lower(state, batch).compile()
        for _ in range(3):
            state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped"]) == 0
    return TinyRun(cfg, mesh, initial, abstract_like(state), step._cache_size(),
                   compiled.memory_analysis().alias_size_in_bytes)


def test_three_steps_compile_once_and_keep_the_state_layout(tiny_run):
    assert tiny_run.compiles == 1
    assert _layout(tiny_run.final) == _layout(tiny_run.initial)
    _assert_same_shardings(shardings_of(tiny_run.initial), tiny_run.final)


def test_the_compiled_step_aliases_every_state_buffer(tiny_run):
    # Bytes one device holds of each leaf: the shard shape its sharding gives, times the itemsize.
    per_device = [math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                  for x in jax.tree.leaves(tiny_run.initial)]
    assert tiny_run.alias_bytes == sum(per_device)


def test_the_abstract_state_is_the_state_a_run_builds(tiny_run):
    abstract = abstract_train_state(tiny_run.cfg, tiny_run.mesh).state
    assert _layout(abstract) == _layout(tiny_run.initial)
    _assert_same_shardings(shardings_of(abstract), tiny_run.initial)
    # Not vacuous: the mesh splits parameters (fsdp, expert) and the optimizer moments that mirror them.
    for part in (tiny_run.initial.params, tiny_run.initial.opt_state):
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(part))


def test_a_model_unlike_its_config_is_refused():
    cfg = _config("tiny.yaml")
    other = abstract_train_state(_config("tiny.yaml", "model.num_layers=2"), make_mesh(cfg.mesh))
    with pytest.raises(ValueError, match="the model's structure differs from the one its config describes"):
        initial_train_state(cfg, other, init_model(cfg.model, seed=0))
