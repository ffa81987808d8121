"""zaya-compile --program kernels: every Pallas kernel compiled (not only lowered) for a TPU through Mosaic and for
an H100 through Triton on this CPU machine, at small shapes with ZAYA1-8B's head dim; the VMEM figures checked
against the BlockSpecs (a lower bound computed here by hand) and against the compiler (the limit just below the
figure is refused)."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest

from train.compile import main
from train.compile_kernels import (VMEM_STEP, _compile, block_bytes, compile_kernels, kernel_cases, kernel_mesh,
                                   vmem_capacity)
from train.targets import parse_target
from zaya_jax import load_preset

needs_tpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                               reason="needs libtpu: pip install -e '.[aot]'")
needs_cuda = pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                                reason="needs the CUDA plugin: pip install -e '.[aot]'")

# ZAYA1-8B's head dim and dtype (the lane-aligned shapes Mosaic and Triton take), 2 query heads per KV head; one row
# of 256 tokens (two flash tiles, four prologue tiles), a cache of 256 slots.
MODEL = dataclasses.replace(load_preset("tiny"), query_heads=4, kv_heads=2, head_dim=128, dtype="bfloat16")
SMALL = dict(seq_lens=(256,), cache_lens=(256,))


@needs_tpu
def test_every_kernel_compiles_for_a_tpu():
    report = compile_kernels(MODEL, parse_target("tpu:v5e:2x2"), **SMALL, measure_vmem=False)
    assert [c.name for c in report.cases] == ["flash forward", "flash backward", "prologue forward",
                                              "prologue backward", "decode"]
    assert all(c.compiled for c in report.cases), [(c.name, c.error) for c in report.cases]


@needs_cuda
def test_attention_kernels_compile_for_an_h100():
    """Flash attention forward and backward and decode through Triton. The prologue's Triton compile takes minutes
    (zaya-compile --program kernels reports it; docs/kernels.md), too long for the suite."""
    report = compile_kernels(MODEL, parse_target("gpu:h100x8"), **SMALL,
                             only=("flash forward", "flash backward", "decode"))
    assert [c.name for c in report.cases] == ["flash forward", "flash backward", "decode"]
    assert all(c.compiled for c in report.cases), [(c.name, c.error) for c in report.cases]
    assert all(not c.vmem for c in report.cases)  # VMEM is a TPU figure


@needs_tpu
def test_vmem_from_the_compiler_covers_the_blocks_and_is_the_smallest_limit_it_accepts():
    target = parse_target("tpu:v5e:2x2")
    report = compile_kernels(MODEL, target, **SMALL, only=("decode",))
    (case,) = report.cases
    (figure,) = case.vmem
    # Decode, one program holds: the K and V blocks [T, D] bf16, the valid row [1, T] int32, the query and output
    # blocks [G, D] bf16 (the start slot sits in scalar memory); no scratch.
    slots, d, groups = 256, MODEL.head_dim, MODEL.query_heads // MODEL.kv_heads
    blocks = 2 * slots * d * 2 + slots * 4 + 2 * groups * d * 2
    assert figure.block_bytes == blocks and figure.double_buffered_bytes == 2 * blocks
    # Every block a program reads sits in its scoped VMEM or in an operand XLA placed whole in VMEM.
    assert figure.needed_bytes is not None and figure.resident_bytes is not None
    assert figure.needed_bytes + figure.resident_bytes >= blocks
    # Independently of the bisection: Mosaic refuses one step below the figure and takes the figure itself.
    ((_, _, _, fn, args),) = [c for c in kernel_cases(MODEL, (), (256,))]
    mesh = kernel_mesh(target)
    assert _compile(fn, args, mesh, {figure.kernel: figure.needed_bytes}) is None
    refused = _compile(fn, args, mesh, {figure.kernel: figure.needed_bytes - VMEM_STEP})
    assert refused is not None and "Scoped allocation" in str(refused)


@needs_tpu
def test_the_tpu_flash_backward_holds_tiles_whatever_the_length():
    """The dk/dv kernel's TPU layout ("query_grid") holds one query tile per program: its BlockSpecs are the same at
    S = 256 and 1024, Mosaic compiles it at both within their double-buffered bytes (+ scratch), and refuses it
    below one copy (the limit binds)."""
    target = parse_target("tpu:v5e:2x2")
    mesh = kernel_mesh(target)
    backward = {n: [(fn, args) for name, _, _, fn, args in kernel_cases(MODEL, (n,), ()) if name == "flash backward"][0]
                for n in (256, 1024)}
    # One program holds: the query and output-gradient tiles [128, D] bf16, the key and value tiles and the dk and
    # dv output tiles [128, D] bf16, the query segment ids and the two row statistics as [128, 1] 32-bit columns,
    # the key segment ids as a [1, 128] int32 row; scratch: the dk and dv accumulators [128, D] float32.
    tile, d = 128, MODEL.head_dim
    held, scratch = 6 * tile * d * 2 + 4 * tile * 4, 2 * tile * d * 4
    # The program's other kernels (forward, dq) at the core's whole VMEM, as zaya-compile measures one kernel.
    capacity = vmem_capacity(mesh.devices.flat[0])
    others = {"cca_flash_forward": capacity, "cca_flash_dq": capacity}
    for n, (fn, args) in backward.items():
        assert block_bytes(fn, args, mesh)["cca_flash_dkv"] == (held, scratch), n
        assert _compile(fn, args, mesh, {**others, "cca_flash_dkv": 2 * held + scratch}) is None, n
    refused = _compile(*backward[256], mesh, {**others, "cca_flash_dkv": held // 2})
    assert refused is not None and "Scoped allocation" in str(refused)


def test_kernels_for_a_cpu_target_are_refused_in_one_line(capsys):
    assert main(["--config", "configs/tiny.yaml", "--program", "kernels", "--target", "cpu:8"]) == 2
    assert "--program kernels compiles for TPU and GPU targets" in capsys.readouterr().err
