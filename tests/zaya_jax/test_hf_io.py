"""transformers-format checkpoints: load, save, round trips and the errors for bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from tests.tolerances import assert_float32_close, model_depth, model_terms
from tests.zaya_jax.hf_reference import random_hf_model
from zaya_jax import ZayaConfig, load_pretrained, save_pretrained
from zaya_jax import hf_io

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

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, target, max_shard_size="20KB")
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no staging directory left behind either

    # An existing checkpoint stays intact when overwriting it fails.
    monkeypatch.setattr(hf_io, "save_file", save_file)
    save_pretrained(model, target)
    before = load_file(target / "model.safetensors")
    calls.clear()
    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(OSError):
        save_pretrained(model, target, max_shard_size="20KB")
    after = load_file(target / "model.safetensors")
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
