"""ZayaConfig: the typed, frozen, validated description of a ZAYA1 model.

One config object drives every shape in the model: hidden size, head counts, head_dim, conv kernel sizes, expert
count and widths are read from here everywhere and never assumed. Presets live in `configs/*.yaml` (our field names);
`ZayaConfig.from_hf` / `ZayaConfig.to_hf` map to and from transformers' `config.json` (`model_type: zaya`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from typing import Any, Literal

import yaml

DTypeName = Literal["float32", "bfloat16"]
_DTYPES = ("float32", "bfloat16")
_ATTENTION_IMPLS = ("xla", "pallas", "cudnn")
_MOE_IMPLS = ("sorted", "dense", "padded", "expert_parallel")
_EP_TRANSPORTS = ("all_to_all", "all_gather", "ragged_all_to_all")
_REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ZayaConfig:
    """Architecture and numerics of a ZAYA1 model.

    Field names say what a thing is; the transformers name is given where it differs.
    """

    vocab_size: int = 262272  # token ids the embedding and the tied LM head cover
    hidden_size: int = 2048  # width of the residual stream
    num_layers: int = 40  # num_hidden_layers; each layer = CCA attention + MoE
    query_heads: int = 8  # num_attention_heads (real query heads inside the compressed latent)
    kv_heads: int = 2  # KV heads, each shared by query_heads / kv_heads query heads (num_key_value_heads)
    head_dim: int = 128  # dimension of each query and KV head inside the compressed latent
    num_experts: int = 16  # real experts; the router scores num_experts + 1 classes (last = skip)
    experts_per_token: int = 1  # num_experts_per_tok; ZAYA1 routes top-1
    expert_hidden_size: int = 2048  # moe_intermediate_size (per expert; gate+up fused is twice this)
    router_hidden_size: int = 256  # width of the router MLP (the down-projection target)
    conv_kernel_depthwise: int = 2  # kernel of the depthwise causal conv over [q | k] (cca_time0)
    conv_kernel_grouped: int = 2  # kernel of the grouped (per-head) causal conv that follows (cca_time1)
    rope_theta: float = 5_000_000.0  # RoPE base frequency (5e6 for ZAYA1-8B, 1e6 for ZAYA1-base)
    rotary_fraction: float = 0.5  # partial_rotary_factor: RoPE on the first head_dim * fraction dims of each head
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    max_position_embeddings: int = 131072  # longest sequence (prompt + generated) the model accepts
    tie_word_embeddings: bool = True  # the LM head is the embedding matrix transposed
    initializer_range: float = 0.02  # standard deviation of the normal initialisation of matrices
    bos_token_id: int | None = 2  # beginning-of-sequence id (written to config.json)
    eos_token_id: int | tuple[int, ...] | None = 106  # end id(s): generate() stops on these by default
    pad_token_id: int | None = 0  # id written after a row stops in generate(); padding positions are always masked
    # Numerics and implementation choices (not part of transformers' config.json).
    param_dtype: DTypeName = "float32"  # dtype of the stored parameters (float32 master weights in training)
    dtype: DTypeName = "float32"  # compute dtype; the residual stream, softmaxes and logits stay float32
    attention_impl: str = "xla"  # "xla" (the reference) | "pallas" (GPU/TPU kernels) | "cudnn" (GPU); docs/kernels.md
    # "sorted": tokens sorted by expert + grouped matmul, each device its own tokens under a mesh (moved across the
    # expert axis by `expert_parallel_transport` when that is > 1); "dense": every expert (the reference); "padded":
    # a capacity-padded per-expert einsum (needs expert_capacity_factor; drops counted); "expert_parallel": experts
    # split over the mesh's expert axis under shard_map, tokens moved by `expert_parallel_transport`.
    moe_impl: str = "sorted"
    expert_parallel_transport: str = "all_to_all"  # "all_to_all" | "all_gather" | "ragged_all_to_all"
    # Slots per expert = ceil(factor * tokens / experts), per batch row ("padded") or per device and destination
    # shard (expert_parallel all_to_all); None = dropless; tokens over capacity are counted in dropped_tokens.
    expert_capacity_factor: float | None = None
    remat_policy: str = "none"  # rematerialisation of each layer in the backward pass: "none" | "full" | "dots" | "dots_no_batch"

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        check_field_types(self, "ZayaConfig")
        positive = (
            "vocab_size", "hidden_size", "num_layers", "query_heads", "kv_heads", "head_dim", "num_experts",
            "expert_hidden_size", "router_hidden_size", "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"ZayaConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("conv_kernel_depthwise", "conv_kernel_grouped"):
            if getattr(self, name) < 1:
                raise ValueError(f"ZayaConfig.{name}: conv kernel size must be >= 1, got {getattr(self, name)}")
        if self.query_heads % self.kv_heads:
            raise ValueError(
                f"ZayaConfig.query_heads ({self.query_heads}) must be divisible by kv_heads ({self.kv_heads}): "
                "grouped-query attention and the q-k mean give each KV head query_heads / kv_heads query heads"
            )
        if (self.kv_heads * self.head_dim) % 2:
            raise ValueError(
                "ZayaConfig.kv_heads * head_dim must be even: the value shift splits the value latent into a "
                f"current-token and a previous-token half, got {self.kv_heads} * {self.head_dim}"
            )
        if self.experts_per_token != 1:
            raise ValueError(f"ZayaConfig.experts_per_token must be 1 (ZAYA1 routes top-1), got {self.experts_per_token}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"ZayaConfig.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        rotary = self.head_dim * self.rotary_fraction
        if rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(
                f"ZayaConfig.rotary_fraction: rotary dim head_dim * rotary_fraction = {rotary} must be an even integer "
                "(NeoX RoPE rotates the two halves of the rotary dims against each other)"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"ZayaConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"ZayaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.initializer_range <= 0:
            raise ValueError(f"ZayaConfig.initializer_range must be > 0, got {self.initializer_range}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"ZayaConfig.{name} = {value} is outside the vocabulary [0, {self.vocab_size})")
        for eos in self.eos_ids:
            if not 0 <= eos < self.vocab_size:
                raise ValueError(f"ZayaConfig.eos_token_id = {eos} is outside the vocabulary [0, {self.vocab_size})")
        _check_choice("param_dtype", self.param_dtype, _DTYPES)
        _check_choice("dtype", self.dtype, _DTYPES)
        _check_choice("attention_impl", self.attention_impl, _ATTENTION_IMPLS)
        if self.attention_impl == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(f"ZayaConfig.attention_impl 'cudnn' needs dtype bfloat16 (cuDNN's fused attention has no "
                             f"{self.dtype} kernel); got dtype {self.dtype}")
        _check_choice("moe_impl", self.moe_impl, _MOE_IMPLS)
        _check_choice("remat_policy", self.remat_policy, _REMAT_POLICIES)
        _check_choice("expert_parallel_transport", self.expert_parallel_transport, _EP_TRANSPORTS)
        if self.expert_capacity_factor is not None:
            if self.expert_capacity_factor <= 0:
                raise ValueError(f"ZayaConfig.expert_capacity_factor must be > 0 or null, got {self.expert_capacity_factor}")
            if self.moe_impl not in ("padded", "expert_parallel") or (
                    self.moe_impl == "expert_parallel" and self.expert_parallel_transport != "all_to_all"):
                raise ValueError("ZayaConfig.expert_capacity_factor applies to moe_impl 'padded' and to moe_impl "
                                 "'expert_parallel' with expert_parallel_transport all_to_all only")
        elif self.moe_impl == "padded":
            raise ValueError("ZayaConfig.moe_impl 'padded' needs expert_capacity_factor (slots per expert per batch "
                             "row = ceil(factor * sequence length / num_experts))")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.query_heads // self.kv_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def conv_channels(self) -> int:
        """Channels of the packed [q | k] latent the two convolutions run over."""
        return (self.query_heads + self.kv_heads) * self.head_dim

    @property
    def conv_history(self) -> int:
        """Left padding of the conv stack, (k_depthwise - 1) + (k_grouped - 1): the pre-conv columns a decode step needs."""
        return (self.conv_kernel_depthwise - 1) + (self.conv_kernel_grouped - 1)

    @property
    def router_classes(self) -> int:
        """Experts plus the skip ("MoD") class, which is the last index."""
        return self.num_experts + 1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> "ZayaConfig":
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    # ---- our own dict / YAML form ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(out["eos_token_id"], tuple):
            out["eos_token_id"] = list(out["eos_token_id"])
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ZayaConfig":
        _check_keys(values)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ZayaConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path) as f:
            values = load_yaml(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of ZayaConfig fields, got {type(values).__name__}")
        values = values.get("model", values)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_yaml(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    # ---- transformers config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> "ZayaConfig":
        """Reads transformers' `config.json` dict for `ZayaForCausalLM`.

        Values that would change the math in a way this implementation does not follow (attention or LM-head
        biases, sliding-window layers, another activation) are errors, not silently ignored.
        """
        model_type = hf.get("model_type")
        if model_type != "zaya":
            raise ValueError(f"config.json: model_type must be 'zaya', got {model_type!r}")
        for key, supported in (("attention_bias", False), ("lm_head_bias", False), ("hidden_act", "silu")):
            if key in hf and hf[key] != supported:
                raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (ZAYA1 uses {supported!r})")
        layer_types = hf.get("layer_types")
        if layer_types is not None and any(t != "hybrid" for t in layer_types):
            raise ValueError(f"config.json: layer_types other than 'hybrid' are not supported: {sorted(set(layer_types))}")
        rope = hf.get("rope_parameters") or {}
        rope = rope.get("hybrid", rope)  # nested per layer type (native) or flat
        theta = rope.get("rope_theta", hf.get("rope_theta", cls.rope_theta))
        fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", cls.rotary_fraction))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"config.json: rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        num_layers = hf.get("num_hidden_layers", cls.num_layers)
        values: dict[str, Any] = dict(
            vocab_size=hf.get("vocab_size", cls.vocab_size),
            hidden_size=hf.get("hidden_size", cls.hidden_size),
            num_layers=num_layers,
            query_heads=hf.get("num_attention_heads", cls.query_heads),
            kv_heads=hf.get("num_key_value_heads", cls.kv_heads),
            head_dim=hf.get("head_dim", cls.head_dim),
            num_experts=hf.get("num_experts", cls.num_experts),
            experts_per_token=hf.get("num_experts_per_tok", cls.experts_per_token),
            expert_hidden_size=hf.get("moe_intermediate_size", cls.expert_hidden_size),
            router_hidden_size=hf.get("router_hidden_size", cls.router_hidden_size),
            conv_kernel_depthwise=hf.get("cca_time0", cls.conv_kernel_depthwise),
            conv_kernel_grouped=hf.get("cca_time1", cls.conv_kernel_grouped),
            rope_theta=float(theta),
            rotary_fraction=float(fraction),
            rms_norm_eps=float(hf.get("rms_norm_eps", cls.rms_norm_eps)),
            max_position_embeddings=hf.get("max_position_embeddings", cls.max_position_embeddings),
            tie_word_embeddings=hf.get("tie_word_embeddings", cls.tie_word_embeddings),
            initializer_range=float(hf.get("initializer_range", cls.initializer_range)),
            bos_token_id=hf.get("bos_token_id", cls.bos_token_id),
            eos_token_id=hf.get("eos_token_id", cls.eos_token_id),
            pad_token_id=hf.get("pad_token_id", cls.pad_token_id),
        )
        # transformers >= 4.56 writes `dtype`, older versions `torch_dtype`: either names the stored dtype.
        stored = {hf[key] for key in ("dtype", "torch_dtype") if hf.get(key) is not None}
        if len(stored) > 1:
            raise ValueError(f"config.json: dtype {hf['dtype']!r} and torch_dtype {hf['torch_dtype']!r} disagree")
        if stored and "param_dtype" not in overrides:
            (name,) = stored
            if name not in _DTYPES:
                raise ValueError(f"config.json: dtype {name!r} is not supported ({', '.join(_DTYPES)}); load it "
                                 f"with an explicit dtype, e.g. load_pretrained(path, dtype='float32')")
            values["param_dtype"] = name
            values["dtype"] = name
        values.update(overrides)
        return cls.from_dict(values)

    def to_hf(self) -> dict[str, Any]:
        """transformers' `config.json` dict; `transformers.ZayaConfig(**cfg.to_hf())` builds the same model."""
        return {
            "architectures": ["ZayaForCausalLM"],
            "model_type": "zaya",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "layer_types": ["hybrid"] * self.num_layers,
            "num_attention_heads": self.query_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "moe_intermediate_size": self.expert_hidden_size,
            "router_hidden_size": self.router_hidden_size,
            "cca_time0": self.conv_kernel_depthwise,
            "cca_time1": self.conv_kernel_grouped,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {
                "hybrid": {
                    "rope_type": "default",
                    "rope_theta": self.rope_theta,
                    "partial_rotary_factor": self.rotary_fraction,
                },
                "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
            },
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "lm_head_bias": False,
            "sliding_window": None,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike, **overrides: Any) -> "ZayaConfig":
        with open(path) as f:
            return cls.from_hf(json.load(f), **overrides)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-5` and `3e30` as strings because they lack a dot."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text_or_stream: Any, source: str | None = None) -> Any:
    """Parses YAML with YAML 1.2 float rules (see `_YamlLoader`). A syntax error is one ValueError line naming
    `source` (default: the stream's file name), the line and the column, not a parser traceback."""
    try:
        return yaml.load(text_or_stream, Loader=_YamlLoader)
    except yaml.YAMLError as e:
        where = source or getattr(text_or_stream, "name", "<yaml>")
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where += f":{mark.line + 1}:{mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: invalid YAML: {problem}") from None


def load_preset(name_or_path: str | os.PathLike) -> ZayaConfig:
    """A preset by name (`tiny`, `zaya1-8b`, `zaya1-base`, looked up in the repository's `configs/`) or a YAML path."""
    path = str(name_or_path)
    if not path.endswith((".yaml", ".yml")):
        path = os.path.join(PRESET_DIR, f"{path}.yaml")
        if not os.path.isfile(path):
            known = sorted(p[:-5] for p in os.listdir(PRESET_DIR) if p.endswith(".yaml"))
            raise ValueError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known)}")
    return ZayaConfig.from_yaml(path)


PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _check_keys(values: dict[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(ZayaConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown ZayaConfig field {key!r}{hint}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ZayaConfig.{name} must be one of {', '.join(choices)}; got {value!r}")


def check_field_types(instance: Any, prefix: str) -> None:
    """Checks every field of a config dataclass against its annotation (see `check_type`), naming it
    `prefix.field`, and stores float fields given as ints as floats."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        check_type(f"{prefix}.{f.name}", value, f.type)
        if f.type == "float" or (f.type == "float | None" and value is not None):
            object.__setattr__(instance, f.name, float(value))


def check_type(name: str, value: Any, annotation: str) -> None:
    """Rejects a value of the wrong type for a field annotated `annotation` (YAML `1e-5` arriving as a string, a
    float head count, `steps: "ten"`, ...) with one line naming the key, the value and the expected type."""
    if annotation == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif annotation == "bool":
        ok = isinstance(value, bool)
    elif annotation == "int | None":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif annotation == "float | None":
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    elif annotation.startswith("int | tuple"):
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, tuple) and all(isinstance(v, int) for v in value)
        )
    elif annotation == "tuple[str, ...]":
        ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"{name} has the wrong type: {value!r} ({type(value).__name__}), expected {annotation}")
