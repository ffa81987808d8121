"""transformers-format checkpoints: safetensors read/write and the name map to transformers' native ZAYA schema.

A transformers directory holds `config.json` plus `model.safetensors`, or shards `model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`. ZAYA1-8B's native schema has 1283 tensors: 4 model-level ones and 32 per layer
(31 for layer 0, whose router has no EDA scale). Our parameters are stacked over layers ([L, ...]) and stored
input-major ([in, out]); transformers' are per layer and output-major, so each entry of `_LAYER_TENSORS` says how
one layer's slice converts.

Loading streams tensor by tensor into preallocated stacked arrays (peak host memory about one copy of the
weights); every name and shape is checked against the config before a single value is read. Saving writes into a
temporary sibling directory and moves the finished files into place, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from zaya_jax.config import ZayaConfig
from zaya_jax.model import ZayaForCausalLM

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _linear(ours: np.ndarray) -> np.ndarray:  # [in, out] <-> [out, in]
    return ours.T


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _experts(x: np.ndarray) -> np.ndarray:  # [E, in, out] <-> [E, out, in]
    return np.swapaxes(x, 1, 2)


def _depthwise_to_hf(ours: np.ndarray) -> np.ndarray:  # [k, C] -> [C, 1, k]
    return ours.T[:, None, :]


def _depthwise_from_hf(hf: np.ndarray) -> np.ndarray:
    return hf[:, 0, :].T


def _grouped_to_hf(ours: np.ndarray) -> np.ndarray:  # [k, G, D_in, D_out] -> [G * D_out, D_in, k]
    k, g, d_in, d_out = ours.shape
    return ours.transpose(1, 3, 2, 0).reshape(g * d_out, d_in, k)


def _grouped_from_hf_fn(groups: int) -> Callable[[np.ndarray], np.ndarray]:
    def convert(hf: np.ndarray) -> np.ndarray:
        c_out, d_in, k = hf.shape
        return hf.reshape(groups, c_out // groups, d_in, k).transpose(3, 0, 2, 1)

    return convert


# (transformers name under `model.layers.{i}.`, our path under `layers`, to_hf, from_hf or None = same as to_hf)
_LAYER_TENSORS: list[tuple[str, tuple[str, ...], Callable, Callable | None]] = [
    ("self_attn.qkv_proj.q_proj.weight", ("attn", "q_proj"), _linear, None),
    ("self_attn.qkv_proj.k_proj.weight", ("attn", "k_proj"), _linear, None),
    ("self_attn.qkv_proj.v_proj_current.weight", ("attn", "v_current"), _linear, None),
    ("self_attn.qkv_proj.v_proj_delayed.weight", ("attn", "v_delayed"), _linear, None),
    ("self_attn.qkv_proj.conv_qk_depthwise.weight", ("attn", "conv_depthwise"), _depthwise_to_hf, _depthwise_from_hf),
    ("self_attn.qkv_proj.conv_qk_depthwise.bias", ("attn", "conv_depthwise_bias"), _identity, None),
    ("self_attn.qkv_proj.conv_qk_grouped.weight", ("attn", "conv_grouped"), _grouped_to_hf, "grouped"),
    ("self_attn.qkv_proj.conv_qk_grouped.bias", ("attn", "conv_grouped_bias"), _identity, None),
    ("self_attn.qk_norm.temp", ("attn", "temperature"), _identity, None),
    ("self_attn.o_proj.weight", ("attn", "o_proj"), _linear, None),
    ("input_layernorm.weight", ("input_norm", "weight"), _identity, None),
    ("post_attention_layernorm.weight", ("post_attn_norm", "weight"), _identity, None),
    ("post_attention_residual_scale.hidden_states_scale", ("post_attn_scale", "hidden", "scale"), _identity, None),
    ("post_attention_residual_scale.hidden_states_bias", ("post_attn_scale", "hidden", "bias"), _identity, None),
    ("post_attention_residual_scale.residual_scale", ("post_attn_scale", "residual", "scale"), _identity, None),
    ("post_attention_residual_scale.residual_bias", ("post_attn_scale", "residual", "bias"), _identity, None),
    ("post_mlp_residual_scale.hidden_states_scale", ("post_moe_scale", "hidden", "scale"), _identity, None),
    ("post_mlp_residual_scale.hidden_states_bias", ("post_moe_scale", "hidden", "bias"), _identity, None),
    ("post_mlp_residual_scale.residual_scale", ("post_moe_scale", "residual", "scale"), _identity, None),
    ("post_mlp_residual_scale.residual_bias", ("post_moe_scale", "residual", "bias"), _identity, None),
    ("mlp.gate.down_proj.weight", ("moe", "router", "down_proj"), _linear, None),
    ("mlp.gate.down_proj.bias", ("moe", "router", "down_proj_bias"), _identity, None),
    ("mlp.gate.router_states_scale", ("moe", "router", "eda_scale"), _identity, None),
    ("mlp.gate.router_mlp.norm.weight", ("moe", "router", "norm", "weight"), _identity, None),
    ("mlp.gate.router_mlp.fc1.weight", ("moe", "router", "fc1"), _linear, None),
    ("mlp.gate.router_mlp.fc1.bias", ("moe", "router", "fc1_bias"), _identity, None),
    ("mlp.gate.router_mlp.fc2.weight", ("moe", "router", "fc2"), _linear, None),
    ("mlp.gate.router_mlp.fc2.bias", ("moe", "router", "fc2_bias"), _identity, None),
    ("mlp.gate.router_mlp.out_proj.weight", ("moe", "router", "out_proj"), _linear, None),
    ("mlp.gate.balancing_biases", ("moe", "router", "balancing_bias"), _identity, None),
    ("mlp.experts.gate_up_proj", ("moe", "experts", "gate_up"), _experts, None),
    ("mlp.experts.down_proj", ("moe", "experts", "down"), _experts, None),
]
_EDA_SCALE = "mlp.gate.router_states_scale"  # absent for layer 0: its router has no carried state

_MODEL_TENSORS: list[tuple[str, tuple[str, ...], Callable]] = [
    ("model.embed_tokens.weight", ("embed",), _identity),
    ("model.input_hidden_states_scale", ("input_affine", "scale"), _identity),
    ("model.input_hidden_states_bias", ("input_affine", "bias"), _identity),
    ("model.norm.weight", ("final_norm", "weight"), _identity),
]
_LM_HEAD = ("lm_head.weight", ("lm_head",), _linear)


def _tensor_plan(config: ZayaConfig) -> list[tuple[str, tuple[str, ...], int | None, Callable, Callable]]:
    """Every checkpoint tensor in transformers' order: (name, our path, layer index or None, to_hf, from_hf)."""
    groups = config.query_heads + config.kv_heads
    plan = [(name, path, None, fn, fn) for name, path, fn in _MODEL_TENSORS]
    if not config.tie_word_embeddings:
        plan.append((_LM_HEAD[0], _LM_HEAD[1], None, _LM_HEAD[2], _LM_HEAD[2]))
    for i in range(config.num_layers):
        for suffix, path, to_hf, from_hf in _LAYER_TENSORS:
            if i == 0 and suffix == _EDA_SCALE:
                continue
            if from_hf == "grouped":
                from_hf = _grouped_from_hf_fn(groups)
            plan.append((f"model.layers.{i}.{suffix}", ("layers", *path), i, to_hf, from_hf or to_hf))
    return plan


def checkpoint_shapes(config: ZayaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a transformers checkpoint of this config, computed without allocating."""
    abstract = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
    ours = nnx.to_pure_dict(nnx.state(abstract))
    shapes = {}
    for name, path, layer, to_hf, _ in _tensor_plan(config):
        leaf = _get(ours, path)
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        shapes[name] = to_hf(np.empty(shape, np.bool_)).shape
    return shapes


def iter_hf_tensors(model: ZayaForCausalLM, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers name, array) one tensor at a time, in the checkpoint's order; parameters are cast to
    `dtype` when given (balancing biases stay float32)."""
    ours = nnx.to_pure_dict(nnx.state(model))
    for name, path, layer, to_hf, _ in _tensor_plan(model.config):
        array = _get(ours, path)
        if layer is not None:
            array = array[layer]
        array = np.asarray(array)
        if dtype is not None and path[-1] != "balancing_bias":
            array = array.astype(_NP_DTYPES[dtype])
        yield name, np.ascontiguousarray(to_hf(array))


def model_from_hf_tensors(
    config: ZayaConfig, get_tensor: Callable[[str], np.ndarray], names: dict[str, tuple[int, ...]]
) -> ZayaForCausalLM:
    """Builds the model from transformers-named tensors. `names` maps every available name to its shape (checked
    against the config before anything is read); `get_tensor(name)` returns one tensor."""
    expected = checkpoint_shapes(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: transformers may store it too
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected) - optional)
    misshaped = [
        f"{n}: expected {expected[n]}, found {tuple(names[n])}"
        for n in expected if n in names and tuple(names[n]) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape ({len(misshaped)}): {'; '.join(misshaped)}")
    if problems:
        raise ValueError("checkpoint does not match the config:\n  " + "\n  ".join(problems))

    abstract = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    target = nnx.to_pure_dict(state)
    plan = _tensor_plan(config)
    for path in {p for _, p, _, _, _ in plan}:
        leaf = _get(target, path)
        np_dtype = np.float32 if path[-1] == "balancing_bias" else _NP_DTYPES[config.param_dtype]
        # Layer 0's EDA scale multiplies a zero state; 1 is transformers' init value for it.
        _set(target, path, np.ones(leaf.shape, np_dtype) if path[-1] == "eda_scale" else np.empty(leaf.shape, np_dtype))
    for name, path, layer, _, from_hf in plan:
        host = _get(target, path)
        value = from_hf(np.asarray(get_tensor(name)))
        if layer is None:
            host[...] = value.astype(host.dtype)
        else:
            host[layer] = value.astype(host.dtype)
    for path in {p for _, p, _, _, _ in plan}:
        _set(target, path, jnp.asarray(_get(target, path)))
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state)


def load_pretrained(path: str | os.PathLike, dtype: str | None = None, **config_overrides: Any) -> ZayaForCausalLM:
    """Reads a transformers-format directory (config.json + model.safetensors or an index of shards).

    dtype ("float32" | "bfloat16"): parameter and compute dtype; defaults to config.json's `dtype`.
    """
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers-format checkpoint directory)")
    if dtype is not None:
        config_overrides = {"param_dtype": dtype, "dtype": dtype, **config_overrides}
    config = ZayaConfig.from_hf_file(config_path, **config_overrides)

    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
    elif os.path.isfile(single_path):
        weight_map = None
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")

    files: dict[str, Any] = {}

    def open_file(filename: str):
        if filename not in files:
            full = os.path.join(path, filename)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{path}: shard {filename} named in the index is missing")
            files[filename] = safe_open(full, framework="np")
        return files[filename]

    if weight_map is None:
        handle = open_file("model.safetensors")
        weight_map = {name: "model.safetensors" for name in handle.keys()}
    names = {name: tuple(open_file(fn).get_slice(name).get_shape()) for name, fn in weight_map.items()}
    return model_from_hf_tensors(config, lambda name: open_file(weight_map[name]).get_tensor(name), names)


def save_pretrained(
    model: ZayaForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB", dtype: str | None = None
) -> None:
    """Writes config.json and safetensors shards that `transformers.ZayaForCausalLM.from_pretrained` loads.

    dtype ("float32" | "bfloat16"): the stored parameter dtype; defaults to the model's parameter dtype.
    """
    path = os.path.abspath(os.fspath(path))
    config = model.config if dtype is None else model.config.replace(param_dtype=dtype, dtype=dtype)
    limit = _parse_size(max_shard_size)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.saving-", dir=parent)
    try:
        shards: list[list[str]] = [[]]
        sizes = [0]
        shapes = checkpoint_shapes(config)
        for name, shape in shapes.items():
            nbytes = int(np.prod(shape)) * (4 if name.endswith("balancing_biases") else _itemsize(config))
            if shards[-1] and sizes[-1] + nbytes > limit:
                shards.append([])
                sizes.append(0)
            shards[-1].append(name)
            sizes[-1] += nbytes
        count = len(shards)
        filenames = (
            ["model.safetensors"] if count == 1
            else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
        )
        shard_of = {name: k for k, names in enumerate(shards) for name in names}
        tensors = iter_hf_tensors(model, dtype)
        weight_map = {}
        for k, filename in enumerate(filenames):
            block = {}
            for name in shards[k]:
                got_name, array = next(tensors)
                assert got_name == name and shard_of[name] == k
                block[name] = array
                weight_map[name] = filename
            save_file(block, os.path.join(staging, filename), metadata={"format": "pt"})
            del block
        if count > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config.to_hf(), f, indent=2)
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: str, path: str) -> None:
    if not os.path.exists(path):
        os.rename(staging, path)
        return
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a directory")
    stale = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json)$")
    for name in os.listdir(path):
        if stale.match(name):
            os.remove(os.path.join(path, name))
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(path, name))


def _itemsize(config: ZayaConfig) -> int:
    return np.dtype(_NP_DTYPES[config.param_dtype]).itemsize


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB' or '500MiB'")
    units = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    return int(float(match.group(1)) * units[(match.group(2) or "b").lower()])


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
