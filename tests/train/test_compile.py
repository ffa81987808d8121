"""zaya-compile: the tiny step compiled for a TPU slice and an H100 node without the hardware; the figures it
reports checked against the parameter shapes and the mesh; a program too big for the TPU refused by its compiler;
the target names; the HLO collective count on a hand-written program with a loop."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

from sharding.rules import PARAM_AXES, path_name
from train.compile import compile_train_step, experts_within_node, main
from train.config import load_train_config
from train.hlo_collectives import array_bytes, collective_bytes
from train.targets import TargetError, parse_target, target_devices
from sharding import make_mesh
from sharding.mesh import MeshConfig
from zaya_jax.model import ZayaForCausalLM

HAVE_TPU = importlib.util.find_spec("libtpu") is not None
HAVE_CUDA = importlib.util.find_spec("jax_cuda12_plugin") is not None
needs_tpu = pytest.mark.skipif(not HAVE_TPU, reason="needs libtpu: pip install -e '.[aot]'")
needs_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs the CUDA plugin: pip install -e '.[aot]'")

# FSDP over every device, one row of 64 tokens per device.
TINY = ["mesh.data=1", "mesh.fsdp=-1", "data.seq_len=64"]


def _tiny(devices: int, *extra: str):
    return load_train_config("configs/tiny.yaml", [*TINY, f"train.batch_size={devices}", *extra])


def _param_bytes(config) -> tuple[int, int]:
    """(bytes of the parameters FSDP splits, bytes of those it replicates), from the shapes alone: under FSDP every
    parameter with an "embed" dimension (the one logical axis the rules map to fsdp) is split, the rest is not."""
    params = nnx.state(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0))), nnx.Param)
    split = replicated = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        if "embed" in PARAM_AXES[path_name(path)]:
            split += nbytes
        else:
            replicated += nbytes
    return split, replicated


@pytest.fixture(scope="module")
def tpu_report():
    cfg = _tiny(4)
    return cfg, compile_train_step(cfg, parse_target("tpu:v5e:2x2"))


@pytest.fixture(scope="module")
def h100_report():
    cfg = _tiny(8)
    return cfg, compile_train_step(cfg, parse_target("gpu:h100x8"))


@needs_tpu
def test_tiny_step_compiles_for_a_tpu_slice_with_consistent_figures(tpu_report):
    cfg, r = tpu_report
    assert r.devices == 4 and r.mesh["fsdp"] == 4 and r.fits is True
    split, replicated = _param_bytes(cfg.model)
    assert r.param_bytes == split // 4 + replicated
    # AdamW: mu and nu mirror the float32 parameters and their shardings, plus two int32 step counts.
    assert r.opt_state_bytes == 2 * r.param_bytes + 2 * 4
    # [B, S] int32 / float32 batch arrays, six of them, split 4 ways.
    assert r.batch_bytes == 6 * cfg.train.batch_size * cfg.data.seq_len * 4 // 4
    # TPU layouts pad small dimensions to (8, 128) tiles, so the compiler's argument bytes are at least ours.
    assert r.argument_bytes >= r.param_bytes + r.opt_state_bytes + r.batch_bytes + r.other_state_bytes
    assert r.total_bytes <= r.hbm_bytes
    assert r.loop_trip_counts.count(cfg.model.num_layers) >= 2  # the forward and backward layer scans
    assert r.collectives["all-gather"]["bytes_per_step"] > 0


@needs_cuda
def test_tiny_step_compiles_for_an_h100_node_with_consistent_figures(h100_report):
    cfg, r = h100_report
    assert r.devices == 8 and r.mesh["fsdp"] == 8 and r.fits is True
    assert r.hbm_bytes == 84942979072  # device_memory_size of XLA's h100_sxm description
    split, replicated = _param_bytes(cfg.model)
    assert r.param_bytes == split // 8 + replicated
    state_bytes = r.param_bytes + r.opt_state_bytes + r.other_state_bytes
    # GPU buffers are dense: the compiler's arguments are exactly the state and the batch, and the donated state
    # is aliased by the new one whole. Of the batch's six arrays the program takes five: sequence_index is read
    # only under context parallelism, and jit drops an argument it does not read.
    assert r.argument_bytes == state_bytes + r.batch_bytes * 5 // 6
    assert r.alias_bytes == state_bytes
    # The layer scans (forward and backward) are loops whose collectives run once per layer.
    assert r.loop_trip_counts.count(cfg.model.num_layers) >= 2
    assert r.collectives["reduce-scatter"]["bytes_per_step"] > 0  # FSDP's gradient reduction
    assert r.collectives_unknown_trip_count == []
    assert r.model_flops_per_step > 0


@needs_tpu
def test_a_program_that_does_not_fit_is_refused_with_the_compilers_message(capsys):
    # Tiny made wide, a big batch and no remat: tens of GiB of saved activations per v5e chip (16 GiB).
    argv = ["--config", "configs/tiny.yaml", "--target", "tpu:v5e:2x2",
            *[f"--set={s}" for s in TINY], "--set=data.seq_len=4096", "--set=model.max_position_embeddings=4096",
            "--set=train.batch_size=64",
            "--set=model.hidden_size=1024", "--set=model.expert_hidden_size=1024"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out
    assert "RESOURCE_EXHAUSTED" in out  # the compiler's own words follow


def test_target_names():
    v5p = parse_target("tpu:v5p-128")
    assert (v5p.num_devices, v5p.topology, v5p.wrap) == (64, "v5:4x4x4", (True, True, True))
    assert parse_target("tpu:v5p-8").topology == "v5:2x2x1"
    v5e = parse_target("tpu:v5e-256")
    assert (v5e.num_devices, v5e.topology, v5e.wrap) == (256, "v5e:16x16", (True, True, False))
    assert parse_target("tpu:v5p:2x2x4").num_devices == 16
    h100 = parse_target("gpu:h100x64")
    assert (h100.num_devices, h100.topology, h100.devices_per_node) == (64, "1x8x8", 8)
    assert parse_target("gpu:h200x8").hbm_bytes == 151397597184
    for bad in ("tpu:v9-8", "tpu:v5p-12", "gpu:h100x12", "gpu:a100x8", "cpu:0", "v5p-8", "tpu:v5p:2x2"):
        with pytest.raises(TargetError):
            parse_target(bad)


def test_an_unknown_target_is_one_clear_error_and_exit_2(capsys):
    assert main(["--config", "configs/tiny.yaml", "--target", "tpu:v9-8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zaya-compile: error: unknown TPU target 'tpu:v9-8'") and err.count("\n") == 1


def test_a_missing_compiler_names_what_to_install(monkeypatch):
    from jax.experimental import topologies

    def no_plugin(*args, **kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as if not installed
    with pytest.raises(TargetError, match=r"needs the CUDA plugin: pip install -e '\.\[aot\]'"):
        target_devices(parse_target("gpu:h100x8"))


@needs_cuda
def test_a_multi_node_gpu_mesh_keeps_expert_groups_inside_a_node():
    target = parse_target("gpu:h100x64")
    devices = target_devices(target)
    inside = make_mesh(MeshConfig(data=1, fsdp=-1, expert=8), devices=devices)
    assert experts_within_node(inside, target) is True
    # The same devices with the fsdp and expert axes swapped would spread each expert group over 8 nodes.
    fsdp, expert = inside.axis_names.index("fsdp"), inside.axis_names.index("expert")
    order = list(range(len(inside.axis_names)))
    order[fsdp], order[expert] = expert, fsdp
    across = jax.sharding.Mesh(np.asarray(inside.devices).transpose(order), inside.axis_names)
    assert experts_within_node(across, target) is False


# A compiled module as jax prints it (operands by name only): a 40-iteration loop with an all-gather and a
# reduce-scatter, then an async all-reduce and one more all-gather outside it.
HLO = """HloModule m, entry_computation_layout={(f32[8]{0}, bf16[16]{0})->f32[32]{0}}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %rs = f32[8]{0} reduce-scatter(%ag), channel_id=2, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %rs)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %n = s32[] constant(40)
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (x: f32[8], y: bf16[16]) -> f32[32] {
  %x = f32[8]{0} parameter(0)
  %y = bf16[16]{0} parameter(1)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"40"}}
  %ars = bf16[16]{0} all-reduce-start(%y), channel_id=3, to_apply=%add
  %ard = bf16[16]{0} all-reduce-done(%ars)
  ROOT %g = f32[32]{0} all-gather(%x), channel_id=4, dimensions={0}
}
"""


def test_collective_bytes_count_loop_bodies_once_per_iteration():
    report = collective_bytes(HLO)
    by_kind = report.by_kind
    assert by_kind["all-gather"] == (2, 40 * 32 + 32)  # 40 iterations of an 8-float shard, plus one outside
    assert by_kind["reduce-scatter"] == (1, 40 * 128)  # its whole 32-float input, 40 times
    assert by_kind["all-reduce"] == (1, 32)  # the async pair counts once: 16 bf16
    assert by_kind["all-to-all"] == (0, 0) and report.unknown_trip_count == []
    # Without XLA's annotation (TPU programs) the trip count is the loop condition's constant.
    unannotated = HLO.replace(', backend_config={"known_trip_count":{"n":"40"}}', "")
    assert collective_bytes(unannotated) == report and report.loop_trip_counts == [40]
    # A condition that is not "counter < constant" is not guessed.
    unknown = collective_bytes(unannotated.replace("%n = s32[] constant(40)", "%n = s32[] parameter(1)"))
    assert unknown.unknown_trip_count == ["all-gather in body", "reduce-scatter in body"]
    assert array_bytes("(bf16[4,8]{1,0}, s32[])") == 68
