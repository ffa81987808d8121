"""zaya-compile: the tiny step compiled for a TPU slice and an H100 node without the hardware; the figures it
reports checked against the parameter shapes and the mesh; a program too big for the TPU refused by its compiler;
zaya-generate's prefill and decode step compiled with the cache's bytes checked against the config; the longest
sequence search; the target names and bad arguments; the HLO collective count on a hand-written program; the
context-parallel step with the Pallas kernels and with cuDNN attention compiled for an H100 node."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from sharding.rules import PARAM_AXES, path_name
from train import compile as compile_module
from train.compile import (CompileReport, compile_generate, compile_train_step, experts_within_node,
                           format_generate_report, generation_batch_axes, main, search_max_seq_len)
from train.config import load_train_config
from train.hlo_collectives import array_bytes, collective_bytes, collective_operand_shapes
from train.targets import TargetError, parse_target, target_devices
from sharding import make_mesh
from sharding.mesh import MeshConfig
from zaya_jax.model import ZayaForCausalLM
from zaya_jax.router import BalancingBias

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


# The context-parallel step of the tiny long-context preset, one layer of 256-token rows, one row per expert x
# context group: expert 2 x context 2 x tensor 2 on 8 GPUs (every axis but data splits something).
LONG = ["model.num_layers=1", "data.seq_len=256", "train.batch_size=2", "model.dtype=bfloat16",
        "model.vocab_size=264", "model.moe_impl=expert_parallel",  # 264: the embedding splits over tensor = 2
        "mesh.data=1", "mesh.expert=2", "mesh.context=2", "mesh.tensor=2"]


def _compile_with_hlo(monkeypatch, cfg, target: str) -> tuple[CompileReport, str]:
    """compile_train_step's report and the compiled program's HLO text (what it counts the collectives in)."""
    seen = []
    count = compile_module.collective_bytes
    monkeypatch.setattr(compile_module, "collective_bytes", lambda text: seen.append(text) or count(text))
    report = compile_train_step(cfg, parse_target(target))
    return report, seen[0]


def _kv_collectives(hlo: str, rows: int, seq: int, cfg) -> dict[str, list[tuple[int, ...]]]:
    """The all-gather and reduce-scatter operands of K/V shape in `hlo`: bfloat16 [rows, tokens, kv_heads,
    head_dim], the local chunks' tokens gathered, the whole sequence's scattered (size-1 dimensions left out: the
    compiler drops them)."""
    def shape(tokens: int) -> tuple[int, ...]:
        return tuple(d for d in (rows, tokens, cfg.model.kv_heads, cfg.model.head_dim) if d != 1)

    def operands(kind: str) -> list[tuple[int, ...]]:
        return [tuple(d for d in dims if d != 1) for dtype, dims in collective_operand_shapes(hlo, kind)
                if dtype == "bf16"]

    return {"gathered": [s for s in operands("all-gather") if s == shape(seq // 2)],
            "scattered": [s for s in operands("reduce-scatter") if s == shape(seq)]}


@needs_cuda
def test_context_step_compiles_the_pallas_kernels_for_an_h100_node(monkeypatch):
    """zaya-compile lowers `attention_impl: pallas` for the target, not for this CPU: the context-parallel step
    compiles for 8 H100s with every CCA kernel, forward and backward, as Triton calls inside the context shard_map,
    K and V all-gathered over context and their gradients reduce-scattered."""
    cfg = load_train_config("configs/tiny-long.yaml", [*LONG, "model.attention_impl=pallas"])
    report, hlo = _compile_with_hlo(monkeypatch, cfg, "gpu:h100x8")
    assert report.fits is True and report.mesh == {"data": 1, "fsdp": 1, "context": 2, "expert": 2, "tensor": 2}
    assert hlo.count('custom_call_target="__gpu$xla.gpu.triton"') >= 5
    for kernel in ("cca_prologue", "cca_prologue_backward", "cca_flash_forward", "cca_flash_dq", "cca_flash_dkv"):
        assert re.search(rf"\b{kernel}\b", hlo), kernel
    kv = _kv_collectives(hlo, rows=1, seq=cfg.data.seq_len, cfg=cfg)
    assert len(kv["gathered"]) == 2 and len(kv["scattered"]) == 2, kv  # K and V each way


@needs_cuda
def test_context_step_with_cudnn_compiles_for_an_h100_node_or_names_the_missing_library(monkeypatch, capsys):
    """`attention_impl: cudnn` under context parallelism, compiled for 8 H100s. jax asks the host's cuDNN library
    for its version while tracing, also for a GPU it only compiles for: with the library (pip install
    nvidia-cudnn-cu12) the step compiles with cuDNN's fused attention forward and backward, one call per local
    chunk; without it zaya-compile says so in one line."""
    cfg = load_train_config("configs/tiny-long.yaml", [*LONG, "model.attention_impl=cudnn"])
    if importlib.util.find_spec("nvidia.cudnn") is None:
        argv = ["--config", "configs/tiny-long.yaml", "--target", "gpu:h100x8",
                *[f"--set={s}" for s in LONG], "--set=model.attention_impl=cudnn"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "jax found no cuDNN library on this host" in err, err
        assert "pip install nvidia-cudnn-cu12" in err
        return
    report, hlo = _compile_with_hlo(monkeypatch, cfg, "gpu:h100x8")
    assert report.fits is True
    assert hlo.count('custom_call_target="__cudnn$fmhaScaleBiasSoftmax"') == 2  # two chunks per shard
    assert hlo.count('custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward"') == 2
    kv = _kv_collectives(hlo, rows=1, seq=cfg.data.seq_len, cfg=cfg)
    assert len(kv["gathered"]) == 2 and len(kv["scattered"]) == 2, kv


def test_cudnn_needs_bfloat16():
    with pytest.raises(ValueError, match="attention_impl 'cudnn' needs dtype bfloat16 .* got dtype float32"):
        load_train_config("configs/tiny.yaml", ["model.attention_impl=cudnn"])


# zaya-generate's programs on a tiny model: a 32-token prompt, a 64-slot cache.
PROMPT, CACHE = 32, 64


@pytest.fixture(scope="module")
def generate_cpu():
    # data=2 x fsdp=4 and 2 prompts: the batch splits over `data` only (fsdp=4 does not divide 2 rows).
    cfg = load_train_config("configs/tiny.yaml", ["mesh.data=2", "mesh.fsdp=4"])
    return cfg, compile_generate(cfg, parse_target("cpu:8"), batch=2, prompt_len=PROMPT, cache_len=CACHE)


@pytest.fixture(scope="module")
def generate_h100():
    cfg = load_train_config("configs/tiny.yaml", ["mesh.data=1", "mesh.fsdp=-1"])
    return cfg, compile_generate(cfg, parse_target("gpu:h100x8"), batch=8, prompt_len=PROMPT, cache_len=CACHE)


def _cache_bytes(config, batch: int, slots: int, batch_shards: int) -> int:
    """Per-device bytes of the decode cache from the config alone (zaya_jax/cache.py's layout): K and V
    [L, B, Hkv, T, D] in the compute dtype; conv history [L, B, (k_dw - 1) + (k_gr - 1), (Hq + Hkv) D] and the
    delayed value [L, B, Hkv D / 2] in float32; valid [B, T] int32; all split over the batch shards. Plus the
    replicated int32 length."""
    layers, kv, d = config.num_layers, config.kv_heads, config.head_dim
    kv_cache = 2 * layers * batch * kv * slots * d * np.dtype(config.dtype).itemsize
    history = (config.conv_kernel_depthwise - 1) + (config.conv_kernel_grouped - 1)
    conv = layers * batch * history * (config.query_heads + kv) * d * 4
    value = layers * batch * kv * d // 2 * 4
    valid = batch * slots * 4
    return (kv_cache + conv + value + valid) // batch_shards + 4


def _model_bytes(config, shards: int) -> int:
    """The parameters (split over `shards` as _param_bytes says) and the replicated balancing biases."""
    split, replicated = _param_bytes(config)
    biases = nnx.state(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0))), BalancingBias)
    return split // shards + replicated + sum(int(np.prod(b.shape)) * b.dtype.itemsize for b in jax.tree.leaves(biases))


def test_generate_programs_compile_for_cpu_devices_with_the_cache_split_over_the_batch(generate_cpu):
    cfg, r = generate_cpu
    assert r.mesh["data"] == 2 and r.mesh["fsdp"] == 4 and r.batch_axes == ["data"]
    assert r.cache_bytes == _cache_bytes(cfg.model, 2, CACHE, batch_shards=2)
    assert r.param_bytes == _model_bytes(cfg.model, shards=4)
    prefill, decode = r.programs
    assert (prefill.name, prefill.tokens_per_device, decode.tokens_per_device) == ("prefill", PROMPT, 1)
    assert decode.alias_bytes == r.cache_bytes  # the decode step updates the donated cache in place
    assert prefill.output_bytes >= r.cache_bytes  # the prefill returns the cache it fills
    assert r.fits is None  # host memory: no limit unless --memory-gib
    assert prefill.loop_trip_counts.count(cfg.model.num_layers) >= 1  # the layer scan
    text = format_generate_report(r)
    assert "batch split over: data" in text and "prefill: 32 tokens per device" in text
    assert text.count("fits: host memory") == text.count("compile time:") == 2


@needs_cuda
def test_generate_programs_compile_for_an_h100_node_with_exact_figures(generate_h100):
    cfg, r = generate_h100
    assert r.batch_axes == ["fsdp"] and r.fits is True
    assert r.cache_bytes == _cache_bytes(cfg.model, 8, CACHE, batch_shards=8)
    assert r.param_bytes == _model_bytes(cfg.model, shards=8)
    prefill, decode = r.programs
    key = 8  # a threefry key: two uint32
    # GPU buffers are dense: the arguments are exactly the model, the tokens (and the cache) and the key, and the
    # decode step's donated cache is aliased whole by the cache it returns.
    assert prefill.argument_bytes == r.param_bytes + prefill.input_bytes + key
    assert decode.argument_bytes == r.param_bytes + decode.input_bytes + r.cache_bytes + key
    assert decode.alias_bytes == r.cache_bytes
    assert prefill.collectives["all-gather"]["bytes_per_step"] > 0  # FSDP: each layer's weights gathered


def test_generation_batch_axes_take_the_batch_axes_that_divide_the_batch():
    devices = jax.devices()[:8]
    fsdp = make_mesh(MeshConfig(data=1, fsdp=-1), devices=devices)
    assert [generation_batch_axes(fsdp, b) for b in (1, 4, 8, 16)] == [(), (), ("fsdp",), ("fsdp",)]
    data_fsdp = make_mesh(MeshConfig(data=2, fsdp=4), devices=devices)
    assert [generation_batch_axes(data_fsdp, b) for b in (1, 2, 6, 8)] == [(), ("data",), ("data",),
                                                                           ("data", "fsdp")]


def _fake_compile(limit: int):
    """compile_train_step's stand-in: a program needs one byte per token of data.seq_len and has `limit` bytes."""
    calls = []

    def compile_step(cfg, target):
        calls.append(cfg.data.seq_len)
        fits = cfg.data.seq_len <= limit
        return CompileReport(target=target.name, devices=8, mesh={}, seq_len=cfg.data.seq_len, tokens_per_device=0,
                             remat_policy="none", loss_chunk=0, param_bytes=0, opt_state_bytes=0, batch_bytes=0,
                             other_state_bytes=0, total_bytes=cfg.data.seq_len, hbm_bytes=limit, usable_bytes=limit,
                             fits=fits)

    return compile_step, calls


@pytest.mark.parametrize("start, limit, expected, compiled", [
    (64, 700, (640, 704), [64, 128, 256, 512, 1024, 768, 640, 704]),  # doubling, then bisection in granules
    (100, 2048, (2048, None), [64, 128, 256, 512, 1024, 2048]),  # max_position_embeddings (2048) fits
    (64, 10, (None, 64), [64]),  # not even one granule
    (512, 300, (256, 320), [512, 256, 384, 320]),  # halving from a start that does not fit, then bisection
])
def test_max_seq_search_doubles_then_bisects(monkeypatch, start, limit, expected, compiled):
    compile_step, calls = _fake_compile(limit)
    monkeypatch.setattr(compile_module, "compile_train_step", compile_step)
    target = dataclasses.replace(parse_target("cpu:8"), hbm_bytes=1)
    cfg = _tiny(8)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=start))
    search = search_max_seq_len(cfg, target, granule=64)
    found = tuple(r.seq_len if r else None for r in (search.largest_fitting, search.smallest_not_fitting))
    assert found == expected and calls == compiled
    assert search.tried == [(n, n <= limit) for n in compiled]


def test_max_seq_command_line_prints_the_answer_and_its_progress(monkeypatch, capsys):
    compile_step, calls = _fake_compile(700)
    monkeypatch.setattr(compile_module, "compile_train_step", compile_step)
    argv = ["--config", "configs/tiny.yaml", "--target", "cpu:8", "--memory-gib", "1", "--max-seq", "--granule", "64",
            *[f"--set={s}" for s in TINY]]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "largest data.seq_len that fits one row per device (multiples of 64): 640" in out
    assert "smallest that does not fit: 704" in out
    assert err.count("zaya-compile: data.seq_len ") == len(calls) == 8  # one progress line per compile
    assert main([*argv, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert (found["largest_fitting"]["seq_len"], found["smallest_not_fitting"]["seq_len"]) == (640, 704)


def test_max_seq_search_finds_a_length_that_fits_next_to_one_that_does_not():
    # One CPU device given 3.25 MiB: the one-layer tiny step's total is 2.67 MiB at 64 tokens and 3.97 MiB at 128
    # (temporaries grow with the sequence), so the search compiles 64 and 128 only. The reports are
    # compile_train_step's own, at the two lengths.
    memory = int(3.25 * 2**20)
    target = dataclasses.replace(parse_target("cpu:1"), hbm_bytes=memory)
    search = search_max_seq_len(_tiny(1, "model.num_layers=1", "balancer.enabled=false"), target, granule=64)
    fit, fail = search.largest_fitting, search.smallest_not_fitting
    assert fit is not None and fail is not None
    assert fail.seq_len == fit.seq_len + 64  # one granule apart
    assert fit.tokens_per_device == fit.seq_len  # one row per device
    assert fit.fits is True and fit.total_bytes <= memory
    assert fail.fits is False and fail.total_bytes > memory


def test_max_seq_needs_a_device_memory():
    with pytest.raises(ValueError, match="--memory-gib"):
        search_max_seq_len(_tiny(8), parse_target("cpu:8"))


@pytest.mark.parametrize("flags, message", [
    (["--program", "serve"], "unknown --program 'serve': expected one of train, generate"),
    (["--program", "generate", "--prompt-len", "64", "--max-len", "64"], "must be shorter than the cache"),
    (["--batch", "4"], "--batch: settings of --program generate, not of --program train"),
    (["--program", "generate", "--max-seq"], "--max-seq searches the training step"),
])
def test_bad_program_arguments_are_one_clear_error_and_exit_2(capsys, flags, message):
    assert main(["--config", "configs/tiny.yaml", "--target", "cpu:8", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zaya-compile: error: ") and message in err and err.count("\n") == 1


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
