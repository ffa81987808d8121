"""transformers-format checkpoints: streaming safetensors read/write and the name map to transformers' ZAYA schema.

A transformers directory holds `config.json` plus `model.safetensors`, or shards `model-0000k-of-0000n.safetensors`
with `model.safetensors.index.json`. ZAYA1-8B's native schema has 1283 tensors: 4 model-level ones and 32 per layer
(31 for layer 0, whose router has no EDA scale). Our parameters are stacked over layers ([L, ...]) and stored
input-major ([in, out]); transformers' are per layer and output-major. Each entry of `_LAYER_TENSORS` gives one
layer's `_Layout`: ours = hf.reshape(split).transpose(perm), so a block of ours maps to a block of rows of theirs.

Loading checks every file's header (names, shapes, dtypes) against config.json before a value is read, then builds
each parameter device shard by device shard: a shard [l0:l1, ...] of a stacked parameter reads only its rows of
layers l0..l1 from the safetensors files, at most _CHUNK_BYTES of rows per read, and goes to its device before the
next shard is read. On CPU the shard's buffer becomes the device buffer (no copy), so host memory is the weights
plus the rows in flight and the mapped pages (remapped every _REMAP_BYTES); an accelerator host holds one shard in
flight. In a multi-process run each process reads only what its devices hold. Every block read is checked for
non-finite values.

Saving writes one tensor at a time: its host copy is gathered from the shards that hold it (on CPU, views of the
device buffers), written at its offset in a size-bounded shard file, and dropped. Files go to a temporary sibling directory that is moved into place when
complete, so a failed save leaves nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Callable, Iterator, NamedTuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open

from zaya_jax.config import ZayaConfig
from zaya_jax.model import ZayaForCausalLM

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# safetensors dtype names of the floating types a checkpoint may store (each is cast to the parameter dtype).
_FILE_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16)}
_FILE_DTYPE_NAMES = {v: k for k, v in _FILE_DTYPES.items()}
_CHUNK_BYTES = 8 << 20  # rows of a tensor read or written per call: bounds the host copies in flight


class _Layout(NamedTuple):
    """One layer's tensor in transformers' layout against ours: ours = hf.reshape(split).transpose(perm).

    `split` is our dims in transformers' order; transformers' dim d merges the split dims `hf_dims[d]` (row-major,
    in increasing order; () is a size-1 dim). None: the identity permutation, one split dim per transformers dim."""

    perm: tuple[int, ...] | None = None
    hf_dims: tuple[tuple[int, ...], ...] | None = None


_SAME = _Layout()
_LINEAR = _Layout((1, 0))  # ours [in, out], theirs [out, in]
_EXPERTS = _Layout((0, 2, 1))  # ours [E, in, out], theirs [E, out, in]
_DEPTHWISE = _Layout((1, 0), ((0,), (), (1,)))  # ours [k, C], theirs [C, 1, k]
_GROUPED = _Layout((3, 0, 2, 1), ((0, 1), (2,), (3,)))  # ours [k, G, D_in, D_out], theirs [G * D_out, D_in, k]

# (transformers name under `model.layers.{i}.`, our path under `layers`, layout)
_LAYER_TENSORS: list[tuple[str, tuple[str, ...], _Layout]] = [
    ("self_attn.qkv_proj.q_proj.weight", ("attn", "q_proj"), _LINEAR),
    ("self_attn.qkv_proj.k_proj.weight", ("attn", "k_proj"), _LINEAR),
    ("self_attn.qkv_proj.v_proj_current.weight", ("attn", "v_current"), _LINEAR),
    ("self_attn.qkv_proj.v_proj_delayed.weight", ("attn", "v_delayed"), _LINEAR),
    ("self_attn.qkv_proj.conv_qk_depthwise.weight", ("attn", "conv_depthwise"), _DEPTHWISE),
    ("self_attn.qkv_proj.conv_qk_depthwise.bias", ("attn", "conv_depthwise_bias"), _SAME),
    ("self_attn.qkv_proj.conv_qk_grouped.weight", ("attn", "conv_grouped"), _GROUPED),
    ("self_attn.qkv_proj.conv_qk_grouped.bias", ("attn", "conv_grouped_bias"), _SAME),
    ("self_attn.qk_norm.temp", ("attn", "temperature"), _SAME),
    ("self_attn.o_proj.weight", ("attn", "o_proj"), _LINEAR),
    ("input_layernorm.weight", ("input_norm", "weight"), _SAME),
    ("post_attention_layernorm.weight", ("post_attn_norm", "weight"), _SAME),
    ("post_attention_residual_scale.hidden_states_scale", ("post_attn_scale", "hidden", "scale"), _SAME),
    ("post_attention_residual_scale.hidden_states_bias", ("post_attn_scale", "hidden", "bias"), _SAME),
    ("post_attention_residual_scale.residual_scale", ("post_attn_scale", "residual", "scale"), _SAME),
    ("post_attention_residual_scale.residual_bias", ("post_attn_scale", "residual", "bias"), _SAME),
    ("post_mlp_residual_scale.hidden_states_scale", ("post_moe_scale", "hidden", "scale"), _SAME),
    ("post_mlp_residual_scale.hidden_states_bias", ("post_moe_scale", "hidden", "bias"), _SAME),
    ("post_mlp_residual_scale.residual_scale", ("post_moe_scale", "residual", "scale"), _SAME),
    ("post_mlp_residual_scale.residual_bias", ("post_moe_scale", "residual", "bias"), _SAME),
    ("mlp.gate.down_proj.weight", ("moe", "router", "down_proj"), _LINEAR),
    ("mlp.gate.down_proj.bias", ("moe", "router", "down_proj_bias"), _SAME),
    ("mlp.gate.router_states_scale", ("moe", "router", "eda_scale"), _SAME),
    ("mlp.gate.router_mlp.norm.weight", ("moe", "router", "norm", "weight"), _SAME),
    ("mlp.gate.router_mlp.fc1.weight", ("moe", "router", "fc1"), _LINEAR),
    ("mlp.gate.router_mlp.fc1.bias", ("moe", "router", "fc1_bias"), _SAME),
    ("mlp.gate.router_mlp.fc2.weight", ("moe", "router", "fc2"), _LINEAR),
    ("mlp.gate.router_mlp.fc2.bias", ("moe", "router", "fc2_bias"), _SAME),
    ("mlp.gate.router_mlp.out_proj.weight", ("moe", "router", "out_proj"), _LINEAR),
    ("mlp.gate.balancing_biases", ("moe", "router", "balancing_bias"), _SAME),
    ("mlp.experts.gate_up_proj", ("moe", "experts", "gate_up"), _EXPERTS),  # all experts fused per layer
    ("mlp.experts.down_proj", ("moe", "experts", "down"), _EXPERTS),
]
_EDA_SCALE = "mlp.gate.router_states_scale"  # absent for layer 0: its router has no carried state

_MODEL_TENSORS: list[tuple[str, tuple[str, ...], _Layout]] = [
    ("model.embed_tokens.weight", ("embed",), _SAME),
    ("model.input_hidden_states_scale", ("input_affine", "scale"), _SAME),
    ("model.input_hidden_states_bias", ("input_affine", "bias"), _SAME),
    ("model.norm.weight", ("final_norm", "weight"), _SAME),
]
_LM_HEAD = ("lm_head.weight", ("lm_head",), _LINEAR)


class _Entry(NamedTuple):
    name: str  # transformers name
    path: tuple[str, ...]  # our parameter
    layer: int | None  # index into our stacked [L, ...] parameter, None for model-level tensors
    layout: _Layout


def _tensor_plan(config: ZayaConfig) -> list[_Entry]:
    """Every checkpoint tensor in transformers' order."""
    plan = [_Entry(name, path, None, layout) for name, path, layout in _MODEL_TENSORS]
    if not config.tie_word_embeddings:
        plan.append(_Entry(*_LM_HEAD[:2], None, _LM_HEAD[2]))
    for i in range(config.num_layers):
        for suffix, path, layout in _LAYER_TENSORS:
            if not (i == 0 and suffix == _EDA_SCALE):
                plan.append(_Entry(f"model.layers.{i}.{suffix}", ("layers", *path), i, layout))
    return plan


def _split_shape(layout: _Layout, ours: tuple[int, ...]) -> tuple[int, ...]:
    """Our dims in transformers' order."""
    if layout.perm is None:
        return tuple(ours)
    split = [0] * len(ours)
    for dim, source in enumerate(layout.perm):
        split[source] = ours[dim]
    return tuple(split)


def _hf_dims(layout: _Layout, ndim: int) -> tuple[tuple[int, ...], ...]:
    return layout.hf_dims if layout.hf_dims is not None else tuple((j,) for j in range(ndim))


def _hf_shape(layout: _Layout, ours: tuple[int, ...]) -> tuple[int, ...]:
    split = _split_shape(layout, ours)
    return tuple(math.prod(split[j] for j in dims) for dims in _hf_dims(layout, len(split)))


def _to_hf(layout: _Layout, ours: np.ndarray) -> np.ndarray:
    if layout.perm is None:
        return ours
    return ours.transpose(np.argsort(layout.perm)).reshape(_hf_shape(layout, ours.shape))


def _read_block(layout: _Layout, ours: tuple[int, ...], index: tuple[slice, ...],
                read: Callable[[tuple[slice, ...]], np.ndarray]) -> np.ndarray:
    """ours[index] (one unit-step slice per dim of one layer's tensor in our layout), from the transformers tensor
    through `read(hf_index)`, which returns those of its rows. A merged transformers dim is read in whole rows of
    its outer split dim; the inner split dims are sliced after the reshape."""
    split = _split_shape(layout, ours)
    perm = layout.perm if layout.perm is not None else tuple(range(len(ours)))
    wanted: list[tuple[int, int]] = [(0, 0)] * len(ours)
    for dim, source in enumerate(perm):
        start, stop, step = index[dim].indices(ours[dim])
        if step != 1:
            raise ValueError(f"strided shard index {index} is not supported")
        wanted[source] = (start, stop)
    hf_index, block_shape, inner = [], [], []
    for dims in _hf_dims(layout, len(split)):
        if not dims:
            hf_index.append(slice(None))
            continue
        row = math.prod(split[j] for j in dims[1:])
        start, stop = wanted[dims[0]]
        hf_index.append(slice(start * row, stop * row))
        block_shape.append(stop - start)
        inner.append(slice(None))
        for j in dims[1:]:
            block_shape.append(split[j])
            inner.append(slice(*wanted[j]))
    block = read(tuple(hf_index)).reshape(block_shape)[tuple(inner)]
    return block.transpose(perm) if layout.perm is not None else block


# Per file dtype: the unsigned view, the mask that drops the sign, and the smallest masked value that is not finite
# (exponent all ones: infinity, then NaN above it).
_NONFINITE_BITS = {"float32": (np.uint32, 0x7FFFFFFF, 0x7F800000), "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
                   "float16": (np.uint16, 0x7FFF, 0x7C00)}


def _check_finite(name: str, block: np.ndarray, where: str) -> None:
    """Refuses NaN and infinity, checked on the bits (an AND and a max per chunk: bfloat16's NumPy ufuncs are
    slow), in chunks that bound the temporary."""
    flat = np.ascontiguousarray(block).reshape(-1)
    if block.dtype.name not in _NONFINITE_BITS:
        bad = not np.isfinite(flat).all()
    else:
        view, mask, first_bad = _NONFINITE_BITS[block.dtype.name]
        bits = flat.view(view)
        scratch = np.empty(min(bits.size, 1 << 22), view)
        bad = False
        for start in range(0, bits.size, scratch.size):
            part = scratch[:min(scratch.size, bits.size - start)]
            np.bitwise_and(bits[start:start + part.size], view(mask), out=part)
            bad = bad or int(part.max()) >= first_bad
    if bad:
        raise ValueError(f"{where}: tensor {name} holds non-finite values (NaN or infinity): the file is "
                         f"damaged or the weights diverged")


def _copy(out: np.ndarray, block: np.ndarray) -> None:
    """out[...] = block. A transposed block (its last axis not its densest) is copied 16 columns at a time, so
    NumPy's element loop walks both arrays within a few cache lines: 5-10x faster than one strided copy. Equal
    dtypes are copied as unsigned integers of their width (NumPy has no fast strided loop for bfloat16)."""
    if out.dtype == block.dtype and out.dtype.itemsize in (2, 4):
        unsigned = np.uint16 if out.dtype.itemsize == 2 else np.uint32
        out, block = out.view(unsigned), block.view(unsigned)
    if block.ndim < 2 or block.shape[-1] <= 16 or abs(block.strides[-1]) == min(abs(s) for s in block.strides):
        out[...] = block
        return
    for first in range(0, block.shape[-1], 16):
        out[..., first:first + 16] = block[..., first:first + 16]


def _empty_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """np.empty at a 64-byte aligned address: XLA's CPU client adopts such a buffer in device_put instead of
    copying it (NumPy's large allocations sit 16 bytes past a page boundary), so a loaded shard exists once."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def checkpoint_shapes(config: ZayaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a transformers checkpoint of this config, computed without allocating."""
    ours = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))))
    shapes = {}
    for entry in _tensor_plan(config):
        shape = _get(ours, entry.path).shape
        shapes[entry.name] = _hf_shape(entry.layout, shape[1:] if entry.layer is not None else shape)
    return shapes


def _check_names_and_shapes(config: ZayaConfig, found: dict[str, tuple[int, ...]]) -> None:
    expected = checkpoint_shapes(config)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied: transformers may store it too
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - optional)
    misshaped = [
        f"{n}: expected {expected[n]}, found {tuple(found[n])}"
        for n in expected if n in found and tuple(found[n]) != tuple(expected[n])
    ]
    problems = [f"{what} ({len(items)}): {_first_few(items, sep)}" for what, items, sep in (
        ("missing tensors", missing, ", "), ("unexpected tensors", unexpected, ", "),
        ("tensors with the wrong shape", misshaped, "; ")) if items]
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def _first_few(items: list[str], sep: str, shown: int = 3) -> str:
    """The first `shown` items and how many more, so a mismatch of a whole model stays one readable line."""
    more = f"{sep}and {len(items) - shown} more" if len(items) > shown else ""
    return sep.join(items[:shown]) + more


Shardings = Any  # a pytree of jax.sharding.Sharding shaped like nnx.state(model), or a function of the abstract state
_Reader = Callable[[str, tuple[slice, ...]], np.ndarray]  # (transformers name, its index) -> those values as stored


def _fill(entry: _Entry, ours: tuple[int, ...], index: tuple[slice, ...], out: np.ndarray, read: _Reader,
          where: Callable[[str], str]) -> None:
    """out[...] = ours[index] of one checkpoint tensor (ours: one layer's shape in our layout), reading at most
    _CHUNK_BYTES of its rows at a time and refusing non-finite values."""
    def read_checked(hf_index: tuple[slice, ...]) -> np.ndarray:
        block = read(entry.name, hf_index)  # as stored: contiguous when it comes from a file
        _check_finite(entry.name, block, where(entry.name))
        return block

    perm = entry.layout.perm if entry.layout.perm is not None else tuple(range(len(ours)))
    dim = perm.index(_hf_dims(entry.layout, len(ours))[0][0])  # our dim along transformers' rows
    start, stop, _ = index[dim].indices(ours[dim])
    step = max(1, _CHUNK_BYTES // max(1, 4 * out.size // max(1, out.shape[dim])))
    for first in range(start, stop, step):
        last = min(first + step, stop)
        rows = (*index[:dim], slice(first, last), *index[dim + 1:])
        _copy(out[(slice(None),) * dim + (slice(first - start, last - start),)],
              _read_block(entry.layout, ours, rows, read_checked))


def _read_shard(entries: dict[int | None, _Entry], shape: tuple[int, ...], index: tuple[slice, ...],
                dtype: np.dtype, read: _Reader, where: Callable[[str], str]) -> np.ndarray:
    """One device's block parameter[index] (shape: the whole parameter, [L, ...] when stacked), in `dtype`; a
    stacked parameter's block reads its rows of each of its layers' tensors, not the whole stack."""
    out = _empty_aligned(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype)
    if None in entries:
        _fill(entries[None], shape, index, out, read, where)
        return out
    for j, layer in enumerate(range(*index[0].indices(shape[0]))):
        if layer in entries:
            _fill(entries[layer], shape[1:], index[1:], out[j], read, where)
        else:  # layer 0's EDA scale multiplies a zero state; 1 is transformers' init value for it
            out[j] = 1
    return out


def _assemble(config: ZayaConfig, read: _Reader, shardings: Shardings | None,
              where: Callable[[str], str]) -> ZayaForCausalLM:
    """The model with every parameter built device shard by device shard from `read`."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0))))
    target = nnx.to_pure_dict(state)
    if callable(shardings):
        shardings = shardings(state)
    if isinstance(shardings, nnx.State):
        shardings = nnx.to_pure_dict(shardings)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    by_path: dict[tuple[str, ...], dict[int | None, _Entry]] = {}
    for entry in _tensor_plan(config):
        by_path.setdefault(entry.path, {})[entry.layer] = entry
    for path, entries in by_path.items():
        shape = tuple(_get(target, path).shape)
        dtype = np.dtype(np.float32 if path[-1] == "balancing_bias" else _NP_DTYPES[config.param_dtype])
        sharding = default if shardings is None else _get(shardings, path)
        # One device's block is read, placed and dropped before the next, so the host holds one block in flight.
        placed = [jax.device_put(_read_shard(entries, shape, index, dtype, read, where), device, may_alias=True)
                  for device, index in sharding.addressable_devices_indices_map(shape).items()]
        _set(target, path, jax.make_array_from_single_device_arrays(shape, sharding, placed))
    nnx.replace_by_pure_dict(state, target)
    return nnx.merge(graphdef, state)


def model_from_hf_tensors(
    config: ZayaConfig, get_tensor: Callable[[str], np.ndarray], names: dict[str, tuple[int, ...]],
    shardings: Shardings | None = None,
) -> ZayaForCausalLM:
    """Builds the model from in-memory transformers-named tensors. `names` maps every available name to its shape
    (checked against the config before anything is read); `get_tensor(name)` returns one tensor."""
    _check_names_and_shapes(config, names)
    return _assemble(config, lambda name, index: np.asarray(get_tensor(name))[index], shardings,
                     lambda name: "tensors")


class _SafetensorsFiles:
    """A checkpoint directory's tensors. The headers are read once; values are read a block at a time through
    safetensors' memory map, which is reopened after `_REMAP_BYTES` have been read through it, so the pages of
    tensors already copied out do not stay in this process's resident memory (mapped file pages count in it)."""

    _REMAP_BYTES = 16 << 20

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path}: not a safetensors index (expected JSON with a weight_map): "
                                 f"{type(e).__name__}: {e}") from None
            filenames = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            weight_map, filenames = None, ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
        self.file_of: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for filename in filenames:
            full = os.path.join(path, filename)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{path}: shard {filename} named in the index is missing")
            with self._open(full) as handle:
                for name in handle.keys():
                    if weight_map is not None and weight_map.get(name) != filename:
                        continue  # the index decides which file holds a tensor
                    piece = handle.get_slice(name)
                    self.file_of[name] = full
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = piece.get_dtype()
        if weight_map is not None:
            absent = sorted(name for name in weight_map if name not in self.file_of)
            if absent:
                raise ValueError(f"{index_path}: {len(absent)} tensors are not in the files the index names them "
                                 f"in: " + ", ".join(f"{n} ({weight_map[n]})" for n in absent[:10]))
        self.current: tuple[str, Any] | None = None
        self.read_through = 0

    @staticmethod
    def _open(full: str) -> Any:
        try:
            return safe_open(full, framework="numpy")
        except SafetensorError as e:
            raise ValueError(f"{full}: not a readable safetensors file, damaged or truncated "
                             f"({os.path.getsize(full)} bytes): {e}") from None

    def check_dtypes(self) -> None:
        bad = [f"{n}: {d}" for n, d in sorted(self.dtypes.items()) if d not in _FILE_DTYPES]
        if bad:
            raise ValueError(f"{self.path}: tensors of a dtype that is not a float type "
                             f"({', '.join(_FILE_DTYPES)}): {'; '.join(bad)}")

    def where(self, name: str) -> str:
        return self.file_of[name]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        full = self.file_of[name]
        if self.current is None or self.current[0] != full:
            self.current, self.read_through = None, 0  # drops the previous map before mapping again
            self.current = (full, self._open(full))
        try:
            block = self.current[1].get_slice(name)[index]  # a copy: nothing refers to the map afterwards
        except SafetensorError as e:
            raise ValueError(f"{full}: tensor {name} could not be read: {e}") from None
        self.read_through += block.nbytes
        if self.read_through >= self._REMAP_BYTES:
            self.current = None
        return block

    def close(self) -> None:
        self.current = None


def read_config(path: str | os.PathLike, dtype: str | None = None, **config_overrides: Any) -> ZayaConfig:
    """The ZayaConfig of a transformers-format directory (its config.json), with `dtype` as parameter and compute
    dtype when given (default: config.json's `dtype`, or `torch_dtype` as older transformers wrote it)."""
    config_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a transformers-format checkpoint directory)")
    if dtype is not None:
        config_overrides = {"param_dtype": dtype, "dtype": dtype, **config_overrides}
    try:
        return ZayaConfig.from_hf_file(config_path, **config_overrides)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not valid JSON: {e}") from None


def load_pretrained(path: str | os.PathLike, dtype: str | None = None, *, shardings: Shardings | None = None,
                    **config_overrides: Any) -> ZayaForCausalLM:
    """Reads a transformers-format directory (config.json + model.safetensors or an index of shards).

    dtype ("float32" | "bfloat16"): parameter and compute dtype; defaults to config.json's `dtype`.
    shardings: where each parameter goes: a pytree of `jax.sharding.Sharding` shaped like `nnx.state(model)`, or a
    function from the abstract `nnx.State` to one (e.g. `lambda s: sharding.rules.state_shardings(s, mesh)`);
    default: this process's first device. Each process reads only the blocks its own devices hold.
    Errors (a damaged or truncated file, tensors that do not match config.json, non-finite values) name the file.
    """
    path = os.fspath(path)
    config = read_config(path, dtype, **config_overrides)
    files = _SafetensorsFiles(path)
    files.check_dtypes()
    try:
        _check_names_and_shapes(config, files.shapes)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        return _assemble(config, files.read, shardings, files.where)
    finally:
        files.close()


def _host_tensor(array: jax.Array, layer: int | None) -> np.ndarray:
    """A host copy of array[layer] (or of the whole array), gathered from the addressable blocks that hold it. On
    CPU the blocks are host memory, viewed without a copy; an accelerator takes the layer on the devices first
    (one compiled program per parameter shape), so only that tensor is transferred. An array spread over several
    processes is gathered to every process, one tensor at a time (a collective: every process must ask for the
    same tensors in the same order)."""
    if not array.is_fully_addressable:
        tensor = array if layer is None else _take_layer(array, np.int32(layer))
        return np.asarray(multihost_utils.process_allgather(tensor, tiled=True))
    if layer is not None and any(device.platform != "cpu" for device in array.sharding.device_set):
        array, layer = _take_layer(array, np.int32(layer)), None
    blocks = [(shard.index, np.asarray(shard.data)) for shard in array.addressable_shards if shard.replica_id == 0]
    shape = array.shape
    if layer is not None:
        shape = array.shape[1:]
        blocks = [(index[1:], data[layer - index[0].indices(array.shape[0])[0]]) for index, data in blocks
                  if layer in range(*index[0].indices(array.shape[0]))]
    if len(blocks) == 1:
        return blocks[0][1]
    out = np.empty(shape, array.dtype)
    for index, data in blocks:
        out[index] = data
    return out


@jax.jit
def _take_layer(stacked: jax.Array, layer: jax.Array) -> jax.Array:
    """stacked[layer]; the index is an argument, so one compilation serves every layer."""
    return jax.lax.dynamic_index_in_dim(stacked, layer, axis=0, keepdims=False)


def iter_hf_tensors(model: ZayaForCausalLM, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (transformers name, host array) one tensor at a time, in the checkpoint's order; parameters are cast
    to `dtype` when given (balancing biases stay float32)."""
    ours = nnx.to_pure_dict(nnx.state(model))
    for entry in _tensor_plan(model.config):
        array = _host_tensor(_get(ours, entry.path), entry.layer)
        if dtype is not None and entry.path[-1] != "balancing_bias":
            array = array.astype(_NP_DTYPES[dtype], copy=False)
        yield entry.name, _to_hf(entry.layout, array)  # may be a transposed view: written row block by row block


def save_pretrained(
    model: ZayaForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB", dtype: str | None = None
) -> None:
    """Writes config.json and safetensors shards that `transformers.ZayaForCausalLM.from_pretrained` loads, one
    tensor's host copy at a time.

    dtype ("float32" | "bfloat16"): the stored parameter dtype; defaults to the model's parameter dtype.
    In a multi-process run every process must call it: each tensor is gathered from the processes that hold it,
    process 0 writes `path` (a directory every process can see) and all return once it is complete.
    """
    config = model.config if dtype is None else model.config.replace(param_dtype=dtype, dtype=dtype)
    specs = []
    for name, shape in checkpoint_shapes(config).items():
        stored = np.float32 if name.endswith("balancing_biases") else _NP_DTYPES[config.param_dtype]
        specs.append((name, _FILE_DTYPE_NAMES[np.dtype(stored)], shape))
    tensors = iter_hf_tensors(model, dtype)
    if jax.process_index() == 0:
        write_checkpoint(path, config.to_hf(), specs, tensors, max_shard_size)
    else:
        for _ in tensors:  # the gathers are collectives: take part in each, write nothing
            pass
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"zaya_jax.save_pretrained {os.fspath(path)}")


def write_checkpoint(path: str | os.PathLike, hf_config: dict[str, Any],
                     specs: list[tuple[str, str, tuple[int, ...]]], tensors: Iterator[tuple[str, np.ndarray]],
                     max_shard_size: int | str = "5GB") -> None:
    """Writes a transformers-format directory: `hf_config` as config.json, and the tensors `specs` lists
    ((name, safetensors dtype "F32" | "BF16" | "F16", shape), in file order) into shards of at most
    `max_shard_size` bytes (one tensor larger than that gets a shard of its own) with
    model.safetensors.index.json when there are several. `tensors` yields (name, array) in the same order; each
    is written and dropped before the next is asked for."""
    path = os.path.abspath(os.fspath(path))
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    sizes = [0]
    for name, file_dtype, shape in specs:
        nbytes = math.prod(shape) * _FILE_DTYPES[file_dtype].itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((name, file_dtype, tuple(shape)))
        sizes[-1] += nbytes
    count = len(shards)
    filenames = (["model.safetensors"] if count == 1
                 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)])
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.saving-", dir=parent)
    try:
        for filename, shard in zip(filenames, shards):
            _write_safetensors(os.path.join(staging, filename), shard, tensors)
        if count > 1:
            weight_map = {name: filename for filename, shard in zip(filenames, shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_safetensors(filename: str, specs: list[tuple[str, str, tuple[int, ...]]],
                       tensors: Iterator[tuple[str, np.ndarray]]) -> None:
    """Writes one safetensors file: the header (from `specs`, known before any value), then the next len(specs)
    tensors of `tensors`, each written and dropped before the next is made."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, file_dtype, shape in specs:
        end = offset + math.prod(shape) * _FILE_DTYPES[file_dtype].itemsize
        header[name] = {"dtype": file_dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, file_dtype, shape in specs:
            got, array = next(tensors)
            if got != name or array.dtype != _FILE_DTYPES[file_dtype] or array.shape != tuple(shape):
                raise ValueError(f"{filename}: expected {name} {file_dtype} {shape}, got {got} {array.dtype} "
                                     f"{array.shape}")
            if array.flags.c_contiguous:
                f.write(array.reshape(-1).view(np.uint8).data)
                continue
            rows = max(1, _CHUNK_BYTES // max(1, array[:1].nbytes))
            for first in range(0, len(array), rows):  # `array` may be a transposed view
                block = np.empty_like(array[first:first + rows], order="C")
                _copy(block, array[first:first + rows])
                f.write(block.reshape(-1).view(np.uint8).data)


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
