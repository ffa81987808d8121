"""Multi-host training: 2 processes x 4 CPU devices on localhost against 1 process x 8 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sharding import MeshConfig, make_mesh, train_state_shardings
from sharding.multihost import WATCHDOG_EXIT_CODE, detect_settings, first_slurm_host
from tests.tolerances import float32_bound
from train.checkpoint import Checkpointer
from train.config import load_train_config
from train.loop import abstract_like, from_nested_dict, run_training, setup, to_nested_dict
from train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = ["data.seq_len=64", "train.batch_size=8", "train.log_every=1", "data.eval_samples=0",
            "data.read_shards=2", "optimizer.warmup_steps=1", "optimizer.total_steps=4", "train.save_every=2",
            "train.async_checkpoints=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: str, steps: int, port: int, extra: list[str] = ()) -> list[subprocess.Popen]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = []
    for pid in range(2):
        sets = [*SETTINGS, f"train.run_dir={run_dir}", f"train.steps={steps}", *extra]
        cmd = [sys.executable, "-m", "train.cli", "--config", "configs/tiny.yaml", *sum((["--set", s] for s in sets), []),
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid),
               "--init-timeout", "60"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("mh") / "run")
    start = time.time()
    procs = _launch(run_dir, 4, _free_port())
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return run_dir, time.time() - start


def test_two_processes_train_like_one_process_with_eight_devices(two_process_run, tmp_path):
    run_dir, wall = two_process_run
    single = str(tmp_path / "single")
    run_training(load_train_config("configs/tiny.yaml", [*SETTINGS, f"train.run_dir={single}", "train.steps=4"]))
    multi = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    one = {r["step"]: r["loss"] for r in read_metrics(single)}
    assert sorted(multi) == sorted(one) == [1, 2, 3, 4]
    for step in multi:
        # Each process runs the one-process program on its devices; only the cross-device sums of the loss and the
        # gradients (8 terms) are ordered otherwise, once more at every step (tests/tolerances.py).
        assert abs(multi[step] - one[step]) <= float32_bound(terms=8, depth=step) * abs(one[step]), step
    print(f"2 x 4 devices vs 1 x 8: losses {multi} vs {one}; 2-process wall time {wall:.1f}s")


def test_two_process_checkpoint_restores_on_one_process_with_another_mesh(two_process_run):
    run_dir, _ = two_process_run
    restored = []
    for mesh_cfg in (MeshConfig(data=8), MeshConfig(data=2, expert=4)):
        cfg = load_train_config(os.path.join(run_dir, "config.yaml"), [
            f"mesh.data={mesh_cfg.data}", f"mesh.expert={mesh_cfg.expert}"])
        graphdef, template, _, _ = setup(cfg)
        with Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=2, keep=3) as ckpt:
            step, nested, data_state, _ = ckpt.restore(to_nested_dict(abstract_like(template)))
        assert step == 4 and set(data_state) == {"0", "1"}  # both processes' data shards were saved
        state = from_nested_dict(template, nested)
        expected = train_state_shardings(template, make_mesh(mesh_cfg))
        for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected.params)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        restored.append(jax.device_get(state.params))
    for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_dead_peer_makes_the_survivor_exit_nonzero_instead_of_hanging(tmp_path):
    run_dir = str(tmp_path / "kill")
    procs = _launch(run_dir, 10_000, _free_port(), ["train.step_timeout_s=15", "train.first_step_timeout_s=300",
                                                    "optimizer.total_steps=10000", "train.save_every=10000"])
    metrics = os.path.join(run_dir, "metrics.jsonl")
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            time.sleep(0.2)
        assert os.path.getsize(metrics) > 0, "the two processes never completed a step"
        procs[1].kill()
        killed = time.time()
        _, err = procs[0].communicate(timeout=120)
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == WATCHDOG_EXIT_CODE, err[-3000:]
    assert waited < 120
    last_line = err.strip().splitlines()[-1]
    assert "a peer process died or a device stalled" in last_line, err[-3000:]
    print(f"survivor exited with status {procs[0].returncode} {waited:.1f}s after its peer was killed: {last_line}")


def test_settings_from_arguments_environment_and_slurm():
    assert detect_settings(environ={}) is None
    s = detect_settings("10.0.0.1:1234", 4, 3, environ={})
    assert (s.coordinator, s.num_processes, s.process_id, s.source) == ("10.0.0.1:1234", 4, 3, "arguments")
    s = detect_settings(environ={"ZAYA_COORDINATOR": "h:1", "ZAYA_NUM_PROCESSES": "2", "ZAYA_PROCESS_ID": "1"})
    assert (s.coordinator, s.process_id, s.source) == ("h:1", 1, "environment")
    s = detect_settings(environ={"SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_STEP_NODELIST": "gpu[012-015]"})
    assert (s.coordinator, s.num_processes, s.process_id, s.source) == ("gpu012:12355", 16, 5, "slurm")
    assert first_slurm_host("node7,node8") == "node7"
    with pytest.raises(ValueError, match="give all three"):
        detect_settings("h:1", None, 0, environ={})
    with pytest.raises(ValueError, match="process id 4 is not in"):
        detect_settings("h:1", 4, 4, environ={})
