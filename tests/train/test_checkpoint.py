"""Tests for train/checkpoint.py: exact round trips (mixed dtypes, optax state, PRNG key data), async saves, retention,
interrupted writes, shape / structure mismatch errors, verification of what is read back, and the save / restore step
rules. (Damaged files of a real run: tests/train/test_damaged_checkpoint.py.)

Every restored value is compared bit for bit with a host copy taken before the save."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.checkpoint import Checkpointer, DamagedCheckpointError

# orbax's marker for a step directory that has not been committed yet (`<step>.orbax-checkpoint-tmp`).
TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX


def make_state(seed: int) -> dict:
    """A small train state: float32 / bfloat16 params, an adamw state after one update, int32 counters, key data."""
    k = jax.random.split(jax.random.key(seed), 6)
    params = {
        "embed": jax.random.normal(k[0], (32, 8), jnp.float32),
        "layers": {
            "attn": {"q_proj": jax.random.normal(k[1], (4, 8, 16), jnp.float32)},
            "norm": {"scale": (1.0 + jax.random.normal(k[2], (4, 8))).astype(jnp.bfloat16)},
        },
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jax.random.normal(k[3], p.shape, p.dtype), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-zero moments and count=1, so zeros cannot pass
    return {
        "params": params,
        "opt_state": opt_state,
        "balancer": {"biases": jax.random.normal(k[4], (2, 5), jnp.float32), "step": jnp.int32(seed + 3)},
        "step": jnp.int32(100 * seed + 7),
        "rng": jax.random.key_data(k[5]),
    }


def host_copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def assert_bitwise_equal(restored, expected) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    for (path, r), e in zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(expected)):
        r = np.asarray(r)
        name = jax.tree_util.keystr(path)
        assert r.dtype == e.dtype, name
        assert r.shape == e.shape, name
        assert r.tobytes() == e.tobytes(), name


def step_dirs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def test_round_trip_is_exact(tmp_path):
    state = make_state(1)
    expected = host_copy(state)
    data_state = {"shard": 3, "offset": 12345, "epoch": 0, "files": ["a.parquet", "b.parquet"]}
    extra = {"config": {"lr": 1e-3, "model": "tiny", "layers": 4}, "metrics": {"loss": 2.5}}
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=10, keep=3, async_save=False)
    assert ckpt.save(10, state, data_state, extra) is True
    ckpt.close()

    fresh = Checkpointer(tmp_path / "ckpt", save_every=10, keep=3, async_save=False)
    assert fresh.latest_step() == 10
    step, restored, restored_data, restored_extra = fresh.restore(abstract_of(state))
    fresh.close()
    assert step == 10
    assert_bitwise_equal(restored, expected)
    assert restored_data == data_state
    assert restored_extra == extra
    assert restored["params"]["layers"]["norm"]["scale"].dtype == jnp.bfloat16
    assert restored["rng"].dtype == jnp.uint32
    # The PRNG key round-trips through its key data: re-wrapped, it draws the same numbers as the original key.
    original_key = jax.random.wrap_key_data(state["rng"])
    restored_key = jax.random.wrap_key_data(restored["rng"])
    assert np.array_equal(jax.random.normal(original_key, (16,)), jax.random.normal(restored_key, (16,)))


def test_extra_defaults_to_empty_dict(tmp_path):
    state = make_state(2)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {"offset": 1})
        _, _, data_state, extra = ckpt.restore(abstract_of(state))
    assert data_state == {"offset": 1}
    assert extra == {}


def test_async_save_survives_donated_buffers_and_restores_after_wait(tmp_path):
    state = make_state(3)
    expected = host_copy(state)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=2, async_save=True)
    assert ckpt.save(5, state, {"offset": 5}) is True
    # What a training loop with donated buffers does right after save() returns: the device arrays are gone.
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait()
    assert step_dirs(tmp_path) == ["5"]
    assert not any(TMP_SUFFIX in p.name for p in tmp_path.iterdir())
    step, restored, data_state, _ = ckpt.restore(abstract_of(expected))
    ckpt.close()
    assert step == 5
    assert data_state == {"offset": 5}
    assert_bitwise_equal(restored, expected)


def test_save_in_flight_is_not_the_latest_step(tmp_path, monkeypatch):
    # Hold orbax's commit (write marker + rename) until released, so the save is deterministically still in flight.
    release = threading.Event()
    original_finalize = ocp.path.atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
        await asyncio.to_thread(release.wait, 30)
        return await original_finalize(self, *args, **kwargs)

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
    state = make_state(12)
    expected = host_copy(state)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2, async_save=True)
    try:
        assert ckpt.save(1, state, {"offset": 1}) is True
        assert ckpt.latest_step() is None  # orbax already lists step 1, but it has not committed
        assert ckpt.save(1, state, {"offset": 1}) is False  # nor is the in-flight step saved twice
    finally:
        release.set()
    ckpt.wait()
    assert ckpt.latest_step() == 1
    _, restored, _, _ = ckpt.restore(abstract_of(expected))
    ckpt.close()
    assert_bitwise_equal(restored, expected)


def test_keep_only_newest(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=2, async_save=True)
    expected = {}
    for step in range(1, 6):
        state = make_state(step)
        expected[step] = host_copy(state)
        assert ckpt.save(step, state, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert step_dirs(tmp_path) == ["4", "5"]
    step, restored, data_state, _ = ckpt.restore(abstract_of(expected[4]), step=4)
    ckpt.close()
    assert (step, data_state) == (4, {"step": 4})
    assert_bitwise_equal(restored, expected[4])


def test_save_every_force_and_duplicate_steps(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=3, keep=5, async_save=False)
    assert [s for s in range(10) if ckpt.should_save(s)] == [0, 3, 6, 9]
    first, second = make_state(4), make_state(5)
    first_host = host_copy(first)

    assert ckpt.save(4, first, {"v": 1}) is False  # not a multiple of save_every
    assert ckpt.latest_step() is None and step_dirs(tmp_path) == []
    assert ckpt.save(4, first, {"v": 1}, force=True) is True  # e.g. the final / SIGTERM save
    assert ckpt.save(4, second, {"v": 2}, force=True) is False  # same step again: a no-op, not an error
    assert ckpt.save(6, second, {"v": 2}) is True
    assert ckpt.save(6, first, {"v": 1}) is False

    step, restored, data_state, _ = ckpt.restore(abstract_of(first), step=4)
    assert (step, data_state) == (4, {"v": 1})
    assert_bitwise_equal(restored, first_host)
    assert ckpt.all_steps() == [4, 6]
    ckpt.close()


def test_restore_specific_and_latest_step(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=3, async_save=False)
    expected = {}
    for step in (1, 2, 3):
        state = make_state(10 + step)
        expected[step] = host_copy(state)
        ckpt.save(step, state, {"step": step}, {"note": f"s{step}"})
    abstract = abstract_of(expected[1])
    for step in (2, 1):
        got_step, restored, data_state, extra = ckpt.restore(abstract, step=step)
        assert (got_step, data_state, extra) == (step, {"step": step}, {"note": f"s{step}"})
        assert_bitwise_equal(restored, expected[step])
    got_step, restored, _, _ = ckpt.restore(abstract)
    assert got_step == 3
    assert_bitwise_equal(restored, expected[3])
    with pytest.raises(FileNotFoundError, match="step 7"):
        ckpt.restore(abstract, step=7)
    ckpt.close()


def test_empty_directory(tmp_path):
    with Checkpointer(tmp_path / "new", save_every=1, keep=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore(abstract_of(make_state(0)))


def _interrupt_step_3(directory: Path, tmp_name: str, corrupt: bool) -> None:
    """Turns the committed step 3 into what a process killed mid-write leaves: the uncommitted temporary directory
    (data written, commit marker not yet written, rename not done), optionally with truncated / garbage files."""
    tmp_dir = directory / tmp_name
    (directory / "3").rename(tmp_dir)
    markers = list(tmp_dir.rglob("commit_success.txt"))
    assert markers, "orbax 0.12 writes commit_success.txt before the rename; the simulation relies on it"
    for marker in markers:
        marker.unlink()
    if corrupt:
        files = [p for p in (tmp_dir / "state").rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])  # a half-written file
        (tmp_dir / "state" / "_METADATA").write_bytes(b"\x00garbage{")


@pytest.mark.parametrize(
    "tmp_name, corrupt",
    [
        (f"3{TMP_SUFFIX}", False),  # the name orbax 0.12 uses
        (f"3{TMP_SUFFIX}-1700000000", True),  # older orbax: timestamped temporary name
    ],
)
def test_interrupted_write_is_ignored(tmp_path, tmp_name, corrupt):
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
    expected = {}
    for step in (1, 2, 3):
        state = make_state(20 + step)
        expected[step] = host_copy(state)
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    _interrupt_step_3(tmp_path, tmp_name, corrupt)

    resumed = Checkpointer(tmp_path, save_every=1, keep=5, async_save=True)
    assert resumed.latest_step() == 2
    assert resumed.all_steps() == [1, 2]
    abstract = abstract_of(expected[1])
    step, restored, data_state, _ = resumed.restore(abstract)
    assert (step, data_state) == (2, {"step": 2})
    assert_bitwise_equal(restored, expected[2])
    with pytest.raises(FileNotFoundError, match="step 3"):
        resumed.restore(abstract, step=3)

    # Training resumes from step 2 and saves step 3 again: the new step 3 is the one restored.
    new_state = make_state(99)
    new_expected = host_copy(new_state)
    assert resumed.save(3, new_state, {"step": "3b"}) is True
    resumed.wait()
    step, restored, data_state, _ = resumed.restore(abstract)
    resumed.close()
    assert (step, data_state) == (3, {"step": "3b"})
    assert_bitwise_equal(restored, new_expected)
    assert not any(TMP_SUFFIX in p.name for p in tmp_path.iterdir())


def test_shape_mismatch_names_tensors_before_restoring(tmp_path, monkeypatch):
    state = make_state(6)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
    ckpt.save(2, state, {})

    def no_restore(*args, **kwargs):
        raise AssertionError("orbax restore must not run when the checkpoint does not match")

    monkeypatch.setattr(ckpt._manager, "restore", no_restore)
    model = make_state(6)
    model["params"]["layers"]["attn"]["q_proj"] = jnp.zeros((4, 8, 32), jnp.float32)
    model["opt_state"] = optax.adamw(1e-3).init(model["params"])
    model["balancer"]["biases"] = jnp.zeros((2, 5), jnp.bfloat16)
    with pytest.raises(ValueError) as info:
        ckpt.restore(abstract_of(model))
    message = str(info.value)
    assert message.startswith("checkpoint step 2 does not match the model: ")
    assert "params/layers/attn/q_proj: checkpoint (4, 8, 16) float32, model (4, 8, 32) float32" in message
    assert "opt_state/0/mu/layers/attn/q_proj: checkpoint (4, 8, 16) float32, model (4, 8, 32) float32" in message
    assert "opt_state/0/nu/layers/attn/q_proj: checkpoint (4, 8, 16) float32, model (4, 8, 32) float32" in message
    assert "balancer/biases: checkpoint (2, 5) float32, model (2, 5) bfloat16" in message
    assert "embed" not in message  # matching tensors are not listed
    assert message.count(": checkpoint ") == 4
    ckpt.close()


def test_non_finite_values_read_back_are_refused_naming_each_tensor(tmp_path):
    state = make_state(8)
    state["params"]["embed"] = state["params"]["embed"].at[3, 1].set(jnp.nan)
    state["balancer"]["biases"] = state["balancer"]["biases"].at[1, 4].set(-jnp.inf)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {})
        with pytest.raises(DamagedCheckpointError) as info:
            ckpt.restore(abstract_of(state))
    message = str(info.value)
    assert message.startswith("checkpoint step 1 in ") and "\n" not in message
    assert message.endswith("is damaged: what was read fails verification: balancer/biases: non-finite values; "
                            "params/embed: non-finite values")


@pytest.mark.parametrize("fault", ["shape", "dtype"])
def test_an_array_read_back_with_another_shape_or_dtype_is_refused(tmp_path, monkeypatch, fault):
    state = make_state(9)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
    ckpt.save(1, state, {})
    read = ckpt._manager.restore

    def faulty_read(step, args):  # a storage layer that hands back something else than what was asked for
        restored = read(step, args=args)
        q = restored["state"]["params"]["layers"]["attn"]["q_proj"]
        q = q[:, :, :8] if fault == "shape" else q.astype(jnp.bfloat16)
        restored["state"]["params"]["layers"]["attn"]["q_proj"] = q
        return restored

    monkeypatch.setattr(ckpt._manager, "restore", faulty_read)
    with pytest.raises(DamagedCheckpointError) as info:
        ckpt.restore(abstract_of(state))
    ckpt.close()
    got = "(4, 8, 8) float32" if fault == "shape" else "(4, 8, 16) bfloat16"
    assert str(info.value).endswith(f"params/layers/attn/q_proj: read {got}, expected (4, 8, 16) float32")


def test_only_reads_the_named_entries(tmp_path, monkeypatch):
    state = make_state(10)
    expected = host_copy(state)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {"offset": 1})
        read = ocp.PyTreeCheckpointer.restore
        asked = []

        def recording_read(self, directory, args):
            asked.append(args.item)
            return read(self, directory, args=args)

        monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", recording_read)
        monkeypatch.setattr(ckpt._manager, "restore", None)  # the whole-step restore is not used
        wanted = {"params": abstract_of(state["params"]), "rng": abstract_of(state["rng"])}
        step, restored, data_state, extra = ckpt.restore(wanted, only=["params", "rng"])
    assert (step, data_state, extra) == (1, None, None)
    assert_bitwise_equal(restored, {"params": expected["params"], "rng": expected["rng"]})
    # Only the named entries were asked for: the optimizer and balancer arrays were not read.
    assert len(asked) == 1 and sorted(asked[0]) == ["params", "rng"]


def _truncate(path: Path) -> None:
    # Cut to its first 16 bytes: halving it can leave every chunk this restore reads intact (the file's layout
    # depends on the order of orbax's concurrent writes), which made the test depend on the run.
    path.write_bytes(path.read_bytes()[:16])


# A cut before a chunk's byte range is an OCDBT range error, a cut inside it a zstd error; a deleted data file reads
# as empty (tensorstore: FAILED_PRECONDITION ... Truncated Zstd-compressed stream; at byte 0).
# Which array's read fails first varies with orbax's concurrent reads, so either cause may be reported.
CAUSES = "(Requested byte range .* is not valid|Truncated Zstd-compressed stream|NOT_FOUND)"


@pytest.mark.parametrize("damage", [_truncate, Path.unlink], ids=["truncated", "deleted"])
def test_a_damaged_step_is_named_in_one_line_restore_falls_back_and_set_aside_keeps_it(tmp_path, damage):
    older, newer = make_state(11), make_state(12)
    expected = host_copy(older)
    with Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
        ckpt.save(1, older, {"offset": 1})
        ckpt.save(2, newer, {"offset": 2})
    for data_file in (tmp_path / "2" / "state" / "ocdbt.process_0" / "d").iterdir():
        damage(data_file)
    with Checkpointer(tmp_path, save_every=1, keep=3, async_save=False) as ckpt:
        with pytest.raises(DamagedCheckpointError) as info:
            ckpt.restore(abstract_of(newer))
        reported = []
        step, restored, data_state, _ = ckpt.restore(abstract_of(newer), on_damaged=reported.append)
        kept = ckpt.set_aside(2)
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, newer, {"offset": 2}) is True  # the step can be written again
    message = str(info.value)
    assert message.startswith(f"checkpoint step 2 in {str(tmp_path)!r} is damaged: ") and "\n" not in message
    assert re.search(CAUSES, message) and len(message) < 600, message
    assert [e.step for e in reported] == [2] and re.search(CAUSES, str(reported[0]))
    assert (step, data_state) == (1, {"offset": 1})
    assert_bitwise_equal(restored, expected)
    assert kept == str(tmp_path / "2.damaged") and (tmp_path / "2.damaged" / "state").is_dir()


def test_structure_mismatch_lists_missing_and_extra(tmp_path):
    state = make_state(7)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=1, async_save=False)
    ckpt.save(4, state, {})
    model = host_copy(state)
    del model["params"]["embed"]
    model["params"]["lm_head"] = np.zeros((8, 32), np.float32)
    model["balancer"]["extra_bias"] = np.zeros((3,), np.int32)
    with pytest.raises(ValueError) as info:
        ckpt.restore(abstract_of(model))
    message = str(info.value)
    assert message.startswith("checkpoint step 4 does not match the model: ")
    assert "params/embed: in the checkpoint (32, 8) float32, not in the model" in message
    assert "params/lm_head: missing from the checkpoint, model (8, 32) float32" in message
    assert "balancer/extra_bias: missing from the checkpoint, model (3,) int32" in message
    assert "q_proj" not in message
    ckpt.close()


def test_restore_into_shardings(tmp_path):
    devices = jax.devices()
    assert len(devices) >= 2, "tests/conftest.py provides 8 virtual CPU devices"
    mesh = Mesh(np.array(devices[:2]), ("x",))
    state = make_state(8)
    expected = host_copy(state)
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        ckpt.save(1, state, {})
        abstract = abstract_of(state)
        sharded = NamedSharding(mesh, PartitionSpec("x"))
        q = abstract["params"]["layers"]["attn"]["q_proj"]
        abstract["params"]["layers"]["attn"]["q_proj"] = jax.ShapeDtypeStruct(q.shape, q.dtype, sharding=sharded)
        _, restored, _, _ = ckpt.restore(abstract)
    assert restored["params"]["layers"]["attn"]["q_proj"].sharding == sharded
    assert_bitwise_equal(restored, expected)


def test_directory_is_created_and_file_rejected(tmp_path):
    target = tmp_path / "a" / "b" / "ckpt"
    Checkpointer(target, save_every=1, keep=1).close()
    assert target.is_dir()
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not_a_dir"):
        Checkpointer(a_file, save_every=1, keep=1)


def test_unserialisable_data_state_is_rejected_before_writing(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="data_state"):
            ckpt.save(1, make_state(9), {"bad": object()})
        assert ckpt.latest_step() is None
    assert step_dirs(tmp_path) == []


def test_typed_prng_keys_are_rejected(tmp_path):
    state = {"w": jnp.ones(3), "rng": {"train": jax.random.key(0)}}
    with Checkpointer(tmp_path, save_every=1, keep=1, async_save=False) as ckpt:
        with pytest.raises(TypeError, match=r"rng/train.*key_data"):
            ckpt.save(1, state, {})
        assert ckpt.latest_step() is None


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0, keep=1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, save_every=1, keep=0)


def test_relative_directory_works(tmp_path, monkeypatch):
    """orbax rejects relative paths only when an async commit runs; the default run_dir is relative."""
    monkeypatch.chdir(tmp_path)
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with Checkpointer("runs/rel/checkpoints", save_every=1, keep=2, async_save=True) as ckpt:
        assert ckpt.save(1, state, {"pos": 1})
        ckpt.wait()
        step, restored, data_state, _ = ckpt.restore(state)
    assert step == 1 and data_state == {"pos": 1}
    np.testing.assert_array_equal(np.asarray(restored["w"]), state["w"])
