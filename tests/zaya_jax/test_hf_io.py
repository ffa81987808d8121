"""transformers-format checkpoints: load, save, round trips and the errors for bad input."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from tests.tolerances import assert_float32_close, model_depth, model_terms
from tests.zaya_jax.hf_reference import random_hf_model
from tests.zaya_jax.loading_helpers import FSDP_SPECS, counted_reads, fsdp_shardings
from zaya_jax import ZayaConfig, load_pretrained, save_pretrained
from zaya_jax import hf_io

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG = ZayaConfig(vocab_size=97, hidden_size=32, num_layers=3, query_heads=4, kv_heads=2, head_dim=8,
                    num_experts=3, expert_hidden_size=16, router_hidden_size=8, rope_theta=10000.0,
                    max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A checkpoint written by transformers itself (single file)."""
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    model = random_hf_model(CONFIG, seed=1)
    model.save_pretrained(path)
    return path, model


def _logits(model, ids: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(ids)))


def test_load_transformers_checkpoint_matches_its_logits(hf_dir):
    path, hf = hf_dir
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 10))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    ours = load_pretrained(path)
    assert ours.config == CONFIG
    # Equal weights; transformers orders the float32 sums its own way (tests/tolerances.py).
    assert_float32_close(_logits(ours, ids), ref, terms=model_terms(CONFIG, 10), depth=model_depth(CONFIG.num_layers))


def test_export_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    path, _ = hf_dir
    ours = load_pretrained(path)
    save_pretrained(ours, tmp_path / "export")
    reloaded = transformers.ZayaForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (3, 7))
    with torch.no_grad():
        ref = reloaded(torch.as_tensor(ids)).logits.numpy()
    ours_logits = _logits(ours, ids)
    assert_float32_close(ours_logits, ref, terms=model_terms(CONFIG, 7), depth=model_depth(CONFIG.num_layers))


def test_load_save_load_is_bitwise_identical(hf_dir, tmp_path):
    path, _ = hf_dir
    first = load_file(os.path.join(path, "model.safetensors"))
    save_pretrained(load_pretrained(path), tmp_path / "again")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert set(first) == set(second)
    assert len(second) == 4 + 32 * CONFIG.num_layers - 1  # the native schema: 1283 for 40 layers
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    a = nnx.to_pure_dict(nnx.state(load_pretrained(path)))
    b = nnx.to_pure_dict(nnx.state(load_pretrained(tmp_path / "again")))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_bfloat16_save_round_trips_through_transformers(hf_dir, tmp_path):
    path, _ = hf_dir
    ours = load_pretrained(path, dtype="bfloat16")
    save_pretrained(ours, tmp_path / "sharded", max_shard_size="20KB")
    files = sorted(os.listdir(tmp_path / "sharded"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    hf = transformers.ZayaForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    np.testing.assert_array_equal(
        hf.model.embed_tokens.weight.detach().float().numpy(), np.asarray(ours.embed[...]).astype(np.float32)
    )
    again = load_pretrained(tmp_path / "sharded")
    assert again.config.param_dtype == "bfloat16"
    for x, y in zip(jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy_checkpoint(src, dst, edit):
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)


def test_missing_unexpected_and_misshaped_tensors_are_listed_by_name(hf_dir, tmp_path):
    path, _ = hf_dir

    def edit(t):
        del t["model.layers.1.self_attn.qk_norm.temp"]
        t["model.layers.0.mlp.gate.router_states_scale"] = np.ones(8, np.float32)  # layer 0 has no EDA scale
        t["model.layers.2.mlp.experts.down_proj"] = np.zeros((3, 32, 15), np.float32)

    _copy_checkpoint(path, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as err:
        load_pretrained(tmp_path / "bad")
    message = str(err.value)
    assert "missing tensors (1): model.layers.1.self_attn.qk_norm.temp" in message
    assert "unexpected tensors (1): model.layers.0.mlp.gate.router_states_scale" in message
    assert "model.layers.2.mlp.experts.down_proj: expected (3, 32, 16), found (3, 32, 15)" in message
    assert "\n" not in message  # one line, whatever the number of mismatches


def test_wrong_model_type_and_missing_files(hf_dir, tmp_path):
    path, _ = hf_dir
    _copy_checkpoint(path, tmp_path / "llama", lambda t: None)
    config_path = tmp_path / "llama" / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = "llama"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type must be 'zaya', got 'llama'"):
        load_pretrained(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere")
    os.makedirs(tmp_path / "config_only")
    (tmp_path / "config_only" / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_pretrained(tmp_path / "config_only")


def test_token_ids_outside_vocabulary_are_rejected(hf_dir):
    model = load_pretrained(hf_dir[0])
    with pytest.raises(ValueError, match=r"token id 97 is outside the vocabulary \[0, 97\)"):
        model(jnp.array([[1, 97]]))
    with pytest.raises(ValueError, match=r"token id -1 is outside"):
        model(jnp.array([[-1, 3]]))


def test_failed_save_leaves_nothing_half_written(hf_dir, tmp_path, monkeypatch):
    path, _ = hf_dir
    model = load_pretrained(path)
    target = tmp_path / "out"
    calls = []
    write = hf_io._write_safetensors

    def failing_write(filename, specs, tensors):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        write(filename, specs, tensors)

    monkeypatch.setattr(hf_io, "_write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target, max_shard_size="20KB")
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no staging directory left behind either

    # An existing checkpoint stays intact when overwriting it fails.
    monkeypatch.setattr(hf_io, "_write_safetensors", write)
    save_pretrained(model, target)
    before = load_file(target / "model.safetensors")
    calls.clear()
    monkeypatch.setattr(hf_io, "_write_safetensors", failing_write)
    with pytest.raises(OSError):
        save_pretrained(model, target, max_shard_size="20KB")
    after = load_file(target / "model.safetensors")
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])


# ---- damaged files: one error naming the file (and the tensor), never a traceback or a silently bad model ----

def _tensor_bytes(file, name) -> tuple[int, int]:
    """Absolute byte range of tensor `name` in a safetensors file (8-byte header length, JSON header, data)."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    begin, end = header[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


@pytest.fixture
def copied(hf_dir, tmp_path):
    path, _ = hf_dir
    _copy_checkpoint(path, tmp_path / "copy", lambda t: None)
    return tmp_path / "copy"


def test_truncated_file_is_one_error_naming_the_file(copied, capsys):
    from train.cli import generate_main

    file = copied / "model.safetensors"
    os.truncate(file, os.path.getsize(file) - 1000)
    with pytest.raises(ValueError, match=re.escape(f"{file}: not a readable safetensors file, damaged or truncated")):
        load_pretrained(copied)
    assert generate_main(["--model", str(copied), "--tokenizer", "byte", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(file) in err, err


def test_overwritten_tensor_bytes_are_refused_with_the_tensor_name(copied):
    file = copied / "model.safetensors"
    name = "model.layers.1.mlp.experts.down_proj"
    begin, end = _tensor_bytes(file, name)
    with open(file, "r+b") as f:  # 0xFF bytes: NaN in float32 (and in bfloat16)
        f.seek(begin + (end - begin) // 2)
        f.write(b"\xff" * 64)
    with pytest.raises(ValueError, match=re.escape(f"{file}: tensor {name} holds non-finite values")):
        load_pretrained(copied)


def test_header_dtypes_are_checked_before_reading(hf_dir, tmp_path):
    def edit(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    _copy_checkpoint(hf_dir[0], tmp_path / "ints", edit)
    with pytest.raises(ValueError, match=r"not a float type \(F32, BF16, F16\): model.norm.weight: I32"):
        load_pretrained(tmp_path / "ints")


def test_config_dtype_and_torch_dtype_are_both_honoured(copied):
    config_path = copied / "config.json"
    config = json.loads(config_path.read_text())
    del config["dtype"]
    config["torch_dtype"] = "bfloat16"  # as transformers < 4.56 wrote it
    config_path.write_text(json.dumps(config))
    model = load_pretrained(copied)
    assert model.config.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="dtype 'float32' and torch_dtype 'bfloat16' disagree"):
        load_pretrained(copied)


def test_bfloat16_file_loads_as_bfloat16_bitwise(hf_dir, tmp_path):
    path, _ = hf_dir
    save_pretrained(load_pretrained(path), tmp_path / "bf16", dtype="bfloat16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    model = load_pretrained(tmp_path / "bf16")
    assert model.config.param_dtype == "bfloat16"
    assert stored["model.embed_tokens.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(model.embed[...]), stored["model.embed_tokens.weight"])
    gate_up = stored["model.layers.2.mlp.experts.gate_up_proj"]  # [E, 2I, H] -> ours [L, E, H, 2I]
    np.testing.assert_array_equal(np.asarray(model.layers.moe.experts.gate_up[...])[2], gate_up.transpose(0, 2, 1))


def test_load_onto_a_mesh_reads_each_shard_once_and_matches_the_single_device_load(hf_dir):
    """Experts [L, E, H, 2I] split over H (fsdp), the embedding over H, each replicated over a second axis: every
    device's block is read straight from the file; the bytes read for a split tensor are its size times the
    replicas (no whole-stack read)."""
    path, _ = hf_dir
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    with counted_reads() as reads:
        sharded = load_pretrained(path, shardings=fsdp_shardings(mesh))
    gate_up = sharded.layers.moe.experts.gate_up[...]
    assert gate_up.sharding.spec == FSDP_SPECS["gate_up"] and len(gate_up.addressable_shards) == 8
    assert {s.data.shape for s in gate_up.addressable_shards} == {(3, 3, 32 // 4, 32)}
    # Each distinct fsdp block is read by the 2 data-axis replicas holding it: 2x the tensor, never more.
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert reads[name] == 2 * 3 * 32 * 32 * 4, reads[name]
    single = load_pretrained(path)
    for x, y in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---- memory: a checkpoint of a wide 2-layer config, loaded and exported in a fresh process ----

WIDE = ZayaConfig(vocab_size=32768, hidden_size=1024, num_layers=2, query_heads=8, kv_heads=2, head_dim=128,
                  num_experts=8, expert_hidden_size=2304, router_hidden_size=256, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, param_dtype="bfloat16", dtype="bfloat16")

# Peak RSS is the process's VmHWM: getrusage's ru_maxrss would also count the pytest parent's resident set, which
# Linux carries into the child's maximum across fork and exec.
_MEASURE = """
import json, sys
import jax
from zaya_jax import load_pretrained, save_pretrained

def status(key):  # bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

jax.devices()
baseline = status("VmRSS")  # the interpreter, jax with its CPU backend, and zaya_jax
model = load_pretrained(sys.argv[1])
load_peak = status("VmHWM")
save_pretrained(model, sys.argv[2], max_shard_size="150MB")
print(json.dumps({"baseline": baseline, "load_peak": load_peak, "export_peak": status("VmHWM")}))
"""


def _random_tensors(specs):
    """(name, values) per spec: finite bf16 bit patterns (magnitude 2^-7..2^-4, random sign) tiled from one random
    pool of a prime length at a different offset per tensor, so rows never repeat and drawing stays cheap."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 16, 8_000_009, dtype=np.uint16)
    pool = ((bits & 0x807F) | (0x3C00 + ((bits >> 7 & 3) << 7))).astype(np.uint16)
    for k, (name, file_dtype, shape) in enumerate(specs):
        if file_dtype == "F32":
            yield name, rng.normal(0, 0.05, shape).astype(np.float32)
        else:
            yield name, np.resize(np.roll(pool, 7919 * k), shape).view(ml_dtypes.bfloat16)


def test_wide_checkpoint_loads_within_1_15x_its_weights_and_exports_bitwise(tmp_path):
    specs = [(name, "F32" if name.endswith("balancing_biases") else "BF16", shape)
             for name, shape in hf_io.checkpoint_shapes(WIDE).items()]
    hf_io.write_checkpoint(tmp_path / "wide", WIDE.to_hf(), specs, _random_tensors(specs), "200MB")
    weights = sum(os.path.getsize(f) for f in (tmp_path / "wide").glob("*.safetensors"))
    assert 300e6 < weights < 1e9
    largest = max(math.prod(shape) * 2 for _, _, shape in specs)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one device, as a user's run
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "wide"), str(tmp_path / "export")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout)
    # Load: the device-resident weights (on CPU, host memory) plus 15% for the rows in flight and the files' mapped
    # pages, above the baseline measured in the same process before loading. Export: plus one tensor's host copy.
    assert got["load_peak"] <= got["baseline"] + 1.15 * weights, (got, weights)
    assert got["export_peak"] <= got["baseline"] + 1.15 * weights + largest, (got, weights, largest)
    _assert_same_tensors(tmp_path / "wide", tmp_path / "export")


def _assert_same_tensors(original_dir: pathlib.Path, exported_dir: pathlib.Path) -> None:
    """The exported directory (several shards) holds every tensor of the original, bitwise, and nothing else."""
    original = {}
    for file in original_dir.glob("*.safetensors"):
        with safe_open(file, "numpy") as f:
            original.update({name: file for name in f.keys()})
    exported = sorted(exported_dir.glob("*.safetensors"))
    assert len(exported) > 1
    seen = set()
    for file in exported:
        with safe_open(file, "numpy") as f:
            for name in f.keys():
                with safe_open(original[name], "numpy") as g:
                    a, b = g.get_tensor(name), f.get_tensor(name)
                assert a.dtype == b.dtype and a.shape == b.shape, name
                assert a.tobytes() == b.tobytes(), name
                seen.add(name)
    assert seen == set(original)


# Two processes of 4 CPU devices each, one fsdp axis of 8 over both: each process holds half of every split tensor.
_TWO_PROCESSES = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
src, dst, port, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=60)
from flax import nnx
from tests.zaya_jax.loading_helpers import counted_reads, fsdp_shardings
from zaya_jax import load_pretrained, save_pretrained

with counted_reads() as reads:
    sharded = load_pretrained(src, shardings=fsdp_shardings(jax.make_mesh((8,), ("fsdp",))))
single = load_pretrained(src)  # on this process's first device
mismatched = []
for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(nnx.state(sharded)),
                        jax.tree.leaves(nnx.state(single)), strict=True):
    for shard in x.addressable_shards:
        if not np.array_equal(np.asarray(shard.data), np.asarray(y)[shard.index]):
            mismatched.append(jax.tree_util.keystr(path))
gate_up = sharded.layers.moe.experts.gate_up[...]
save_pretrained(sharded, dst, max_shard_size="20KB")
print("RESULT", json.dumps({"reads": reads, "mismatched": mismatched, "addressable": gate_up.is_fully_addressable,
                  "local_blocks": len(gate_up.addressable_shards)}))
"""


def test_two_processes_load_their_own_blocks_and_export_one_checkpoint(hf_dir, tmp_path):
    """load_pretrained onto a mesh spanning two processes reads in each process only the blocks its devices hold;
    save_pretrained gathers one tensor at a time and process 0 writes the checkpoint: bitwise the original."""
    path, _ = hf_dir
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(path), str(tmp_path / "export"),
                               str(port), str(pid)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for pid in range(2)]
    try:
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
               for out, _ in outputs]
    name = "model.layers.1.mlp.experts.gate_up_proj"
    with safe_open(path / "model.safetensors", "numpy") as f:
        tensor_bytes = f.get_slice(name).get_shape()
    tensor_bytes = math.prod(tensor_bytes) * 4  # float32
    for got in results:
        assert got["mismatched"] == [] and not got["addressable"] and got["local_blocks"] == 4, got
        assert got["reads"][name] == tensor_bytes // 2, (got["reads"][name], tensor_bytes)  # its 4 of 8 blocks
    _assert_same_tensors(path, tmp_path / "export")
