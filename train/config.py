"""The training run's configuration: one YAML file with a section per concern, plus `--set a.b=value` overrides.

    model:      ZayaConfig fields (zaya_jax/config.py)
    mesh:       MeshConfig fields (sharding/mesh.py): data, fsdp, context, expert, tensor axis sizes (-1 = the rest)
    optimizer:  OptimizerConfig fields (train/optim.py)
    balancer:   BalancerConfig fields (train/balancer.py)
    data:       DataConfig fields (below)
    train:      RunConfig fields (below)

A YAML preset may hold only some sections (the model presets hold `model:` alone); missing sections take their
defaults, except `model`: a file without a model section (an empty file included) is an error, since the model's
defaults are the full 8B ZAYA1. Every key is checked: an unknown key is an error that lists the closest valid keys,
and a value of the wrong type (`steps: "ten"`, `--set train.batch_size=x`) one that names the key, the value and the
expected type. A YAML syntax error names the file, line and column.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

from sharding.mesh import MeshConfig
from train.balancer import BalancerConfig
from train.data.packing import PACKINGS
from train.optim import OptimizerConfig
from zaya_jax.config import ZayaConfig, check_field_types, check_type, load_yaml
from zaya_jax.parallel.context import dual_chunk_order


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic[:split[:size]]", a .jsonl / .arrayrecord / .npy path
    tokenizer: str = "byte"  # "byte" (built in) or a path to a tokenizer.json
    seq_len: int = 256  # tokens per packed row
    completion_only: bool = True  # loss on thinking + answer only (False: on every token)
    trim: bool = True  # answer-preserving trimming of samples longer than seq_len
    on_error: str = "raise"  # malformed records: "raise" or "skip" (counted, reported at the end and in summary.json)
    on_empty: str = "warn"  # most of the source's first 256 documents empty (bos/eos alone): "warn" or "raise"
    pack_buffer_size: int = 256  # documents buffered and packed together into rows (more: less padding)
    packing: str = "first_fit"  # longest document first into the first ("first_fit") or fullest ("best_fit") row it fits
    read_shards: int = 0  # independent reader pipelines making up the global batch; 0 = one per process
    eval_source: str = "synthetic:heldout"  # held-out source for the end-of-run answer accuracy
    eval_samples: int = 64  # held-out problems decoded greedily at the end of the run; 0 = no evaluation
    eval_max_new_tokens: int = 96  # decode budget per held-out problem
    # Held-out data for the validation loss (train.eval_every): a source spec like data.source. "" = the synthetic
    # held-out split of a synthetic data.source; a file data.source has none: without a file here, no validation
    # loss (a start-up warning says so).
    validation_source: str = ""
    validation_batches: int = 2  # batches (train.batch_size x seq_len) the validation loss averages over

    def __post_init__(self) -> None:
        check_field_types(self, "data")
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.on_empty not in ("warn", "raise"):
            raise ValueError(f"data.on_empty must be 'warn' or 'raise', got {self.on_empty!r}")
        if self.packing not in PACKINGS:
            raise ValueError(f"data.packing must be one of {PACKINGS}, got {self.packing!r}")
        if self.read_shards < 0:
            raise ValueError(f"data.read_shards must be >= 0, got {self.read_shards}")
        for name in ("pack_buffer_size", "eval_max_new_tokens", "validation_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise ValueError(f"data.eval_samples must be >= 0, got {self.eval_samples}")

    @property
    def resolved_validation_source(self) -> str | None:
        """The validation loss's source: data.validation_source, else the synthetic source's held-out split; None
        for a file source without one."""
        if self.validation_source:
            return self.validation_source
        kind = self.source.split(":")[0]
        return f"{kind}:heldout" if kind in ("synthetic", "synthetic-rsa") else None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 300  # optimizer steps of the run
    batch_size: int = 16  # global batch (rows of seq_len tokens), split over accumulation_steps micro-batches
    accumulation_steps: int = 1  # micro-batches per step (gradient accumulation)
    seed: int = 0  # seed of the initialisation and of the data order
    run_dir: str = "runs/tiny"  # where config.yaml, metrics.jsonl, the plots and checkpoints/ go
    log_every: int = 10  # steps between metric records and progress updates
    save_every: int = 100  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # newest checkpoints kept on disk
    async_checkpoints: bool = True  # write checkpoints in the background while training continues
    z_loss: float = 0.0  # weight of mean(logsumexp^2); 0 disables
    loss_chunk: int = 0  # positions per LM-head + cross-entropy chunk (never the whole [B, S, V] logits); 0 = all
    max_consecutive_bad_steps: int = 5  # non-finite loss: skip the step; stop after this many in a row
    init_from: str = ""  # a transformers-format directory to fine-tune from (load_pretrained)
    # Continue from the run directory's latest checkpoint when there is one (zaya-train --step N: from step N);
    # false: start at step 0 and move its checkpoints aside (checkpoints/N -> N.superseded, kept).
    resume: bool = True
    step_timeout_s: float = 600.0  # watchdog: exit (status 3) when no step completes for this long; 0 = off
    first_step_timeout_s: float = 3600.0  # the same for the first step, which includes compilation
    peak_flops: float = 0.0  # per-device peak FLOP/s for the MFU estimate; 0 = look up the device kind
    # Steps between validation losses on data.validation_source (at every multiple: metrics.jsonl "val_loss",
    # TensorBoard, loss.png); 0 = off.
    eval_every: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, "train")
        for name in ("steps", "batch_size", "accumulation_steps", "log_every", "save_every", "keep_checkpoints",
                     "max_consecutive_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.accumulation_steps:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) must be divisible by train.accumulation_steps "
                f"({self.accumulation_steps})"
            )
        if self.step_timeout_s < 0:
            raise ValueError(f"train.step_timeout_s must be >= 0, got {self.step_timeout_s}")
        if self.z_loss < 0:
            raise ValueError(f"train.z_loss must be >= 0, got {self.z_loss}")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every must be >= 0 (0 = no validation loss), got {self.eval_every}")
        if self.loss_chunk < 0:
            raise ValueError(f"train.loss_chunk must be >= 0 (0 = the whole sequence at once), got {self.loss_chunk}")


SECTIONS: dict[str, type] = {
    "model": ZayaConfig,
    "mesh": MeshConfig,
    "optimizer": OptimizerConfig,
    "balancer": BalancerConfig,
    "data": DataConfig,
    "train": RunConfig,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ZayaConfig
    mesh: MeshConfig
    optimizer: OptimizerConfig
    balancer: BalancerConfig
    data: DataConfig
    train: RunConfig

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) is longer than model.max_position_embeddings "
                             f"({self.model.max_position_embeddings}), the longest sequence the model accepts")
        context = self.mesh.context
        if context > 1:
            dual_chunk_order(self.data.seq_len, context)  # the dual-chunk layout's error names the sizes
            chunk = self.data.seq_len // (2 * context)
            if chunk < max(self.model.conv_history, 1):
                raise ValueError(f"data.seq_len ({self.data.seq_len}) over mesh.context ({context}) gives chunks of "
                                 f"{chunk} tokens, shorter than the convolution history ({self.model.conv_history})")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            out[name] = section.to_dict() if hasattr(section, "to_dict") else _plain(dataclasses.asdict(section))
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        unknown = [k for k in values if k not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown config section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        built = {}
        for name, section_cls in SECTIONS.items():
            section = values.get(name) or {}
            if not isinstance(section, dict):
                raise ValueError(f"config section {name!r} must be a mapping, got {type(section).__name__}")
            _check_section_keys(name, section_cls, section)
            section = {k: _tuple_lists(v) for k, v in section.items()}
            annotations = {f.name: f.type for f in dataclasses.fields(section_cls)}
            for key, value in section.items():
                check_type(f"{name}.{key}", value, annotations[key])
            built[name] = section_cls(**section)
        return cls(**built)


def load_train_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Reads a YAML preset and applies `section.key=value` overrides (values parsed as YAML scalars)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        values = load_yaml(f, source=os.fspath(path))
    if values is None or values == {}:
        raise ValueError(f"{path}: the config is empty; it needs a model section (the model's defaults are the full "
                         f"8B ZAYA1, see configs/*.yaml) and may hold {', '.join(s for s in SECTIONS if s != 'model')}")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(values).__name__}")
    if "model" not in values and any(k in ZayaConfig.__dataclass_fields__ for k in values):
        values = {"model": values}  # a bare model preset
    if not values.get("model"):
        raise ValueError(f"{path}: no model section; name the architecture (see configs/*.yaml) rather than fall back "
                         "to the defaults, which are the full 8B ZAYA1")
    for name, section in values.items():
        if section is not None and not isinstance(section, dict):
            raise ValueError(f"{path}: config section {name!r} must be a mapping, got {type(section).__name__}")
    values = {k: dict(v or {}) for k, v in values.items()}
    for override in overrides:
        section, key, value = _parse_override(override)
        values.setdefault(section, {})[key] = value
    return TrainConfig.from_dict(values)


def valid_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _parse_override(override: str) -> tuple[str, str, Any]:
    if "=" not in override:
        raise ValueError(f"--set {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    keys = valid_keys()
    if dotted not in keys:
        close = difflib.get_close_matches(dotted, keys, n=3, cutoff=0.5)
        hint = f"; closest valid keys: {', '.join(close)}" if close else f"; valid sections: {', '.join(SECTIONS)}"
        raise ValueError(f"--set: unknown key {dotted!r}{hint}")
    section, key = dotted.split(".", 1)
    return section, key, load_yaml(raw, source=f"--set {override}") if raw != "" else ""


def _check_section_keys(name: str, cls: type, section: dict[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in section:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"; did you mean {', '.join(f'{name}.{c}' for c in close)}?" if close else ""
            raise ValueError(f"unknown key {name}.{key}{hint}")


def _tuple_lists(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def config_reference() -> list[tuple[str, str, str, str, str]]:
    """(section, key, type, default, description) for every key of every section, read from the dataclasses'
    source: a field's trailing comment, else the comment lines right above it. The source of docs/configuration.md
    (scripts/config_docs.py writes it; a test fails when the two differ or a key has no description)."""
    import inspect
    import re

    field_line = re.compile(r"^    (\w+): ([^=]+?) = (.+?)(?:\s+#\s*(.*))?$")
    rows = []
    for section, cls in SECTIONS.items():
        defaults = {f.name: f for f in dataclasses.fields(cls)}
        above: list[str] = []
        for line in inspect.getsource(cls).splitlines():
            stripped = line.strip()
            if line.startswith("    #"):
                above.append(stripped.lstrip("# "))
                continue
            match = field_line.match(line)
            if match and match.group(1) in defaults:
                name, type_name, default, trailing = match.groups()
                description = trailing or " ".join(above)
                rows.append((section, name, type_name.strip(), default.strip(), description))
            above = [] if not line.startswith("    #") else above
    return rows
