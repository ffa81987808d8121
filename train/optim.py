"""Optimizers and learning-rate schedules for ZAYA1 training (optax).

`make_optimizer(cfg, params)` builds, for an arbitrary params pytree (in practice an `nnx.State` of `nnx.Param`s):

    clip_by_global_norm(clip_norm)                  # over the whole tree, when clip_norm is set
    -> "adamw": AdamW(schedule), decoupled weight decay on the "decay" group only
    -> "muon":  Muon(schedule) on the "muon" group, AdamW(schedule) on "decay" and "no_decay"

Parameter groups (`param_groups`), from each leaf's path and shape:
    "no_decay"  ndim <= 1: norms, scales, biases — AdamW without weight decay.
    "decay"     a path containing one of `cfg.adamw_path_keywords` (default "embed", "lm_head", "conv_depthwise"), or any ndim >= 2
                leaf under "adamw" — AdamW with weight decay. Embeddings are decayed but never go to Muon: their
                gradient rows are sparse per token and Muon's orthogonalisation assumes a dense linear map.
    "muon"      every other ndim >= 2 leaf under "muon": the hidden matrices. The LAST TWO axes are the matrix
                [fan_in, fan_out] (x @ W layout); leading axes are batch axes, so stacked per-layer weights
                [L, in, out] and stacked experts [L, E, in, out] are orthogonalised slice by slice.
    Leaves whose rank does not say what they are (e.g. per-layer norm scales stacked to [L, D]) can be regrouped by
    passing `groups=` (a pytree of group names with the params' structure, e.g. `param_groups(...)` edited).

Muon uses optax's own pieces: `optax.contrib.scale_by_muon` (Nesterov momentum + Newton–Schulz, batch axes via
`MuonDimensionNumbers`), then a shape scale, then decoupled weight decay, then -lr. We compose them rather than call
`optax.contrib.muon` because its built-in Adam branch has a single weight decay for every non-Muon leaf (it cannot
decay embeddings while sparing norms) and is a Nesterov Adam; for a 2-D matrix our Muon update equals
`optax.contrib.muon(..., consistent_rms=cfg.muon_consistent_rms)` (tested). With `muon_consistent_rms` = 0.2 (the
default; Liu et al. 2025, "Muon is Scalable") the update of an m x n slice is scaled by 0.2 * sqrt(max(m, n)), giving
it AdamW's typical RMS so that one `lr` serves both the Muon and the AdamW groups; `None` selects Keller Jordan's
sqrt(max(1, fan_out / fan_in)) scale, which wants a Muon-sized lr (~0.02) instead.

Schedules (`make_schedule`; t = optimizer update count from 0, W = warmup_steps, T = total_steps,
min = min_lr_ratio * lr):
    warmup (all schedules), t < W:   lr * (t + 1) / W      (the first update already gets lr / W, not a wasted 0)
    "cosine", t >= W:   min + (lr - min) * (1 + cos(pi * clip((t - W) / (T - W), 0, 1))) / 2
    "wsd",    t >= W:   lr until T - D, then linearly to min at t = T, D = round(decay_fraction * T); min after T
    "constant", t >= W: lr

Gradient accumulation is the train step's job (train/step.py): it sums micro-batch gradients and expert counts so
the optimizer and the balancer both see the global batch once per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sharding.rules import path_name

PyTree = Any

OPTIMIZER_NAMES = ("adamw", "muon")
_SCHEDULES = ("cosine", "wsd", "constant")
PARAM_GROUPS = ("muon", "decay", "no_decay")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, schedule and clipping settings (see the module docstring for what each one does)."""

    name: str = "adamw"  # "adamw" | "muon"
    lr: float = 3e-4  # peak learning rate
    b1: float = 0.9  # AdamW first-moment decay
    b2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay (matrices; norms, biases and scales are not decayed)
    schedule: str = "cosine"  # "cosine" | "wsd" | "constant"
    warmup_steps: int = 100  # linear warmup from 0 to lr
    total_steps: int = 1000  # length of the schedule (usually train.steps)
    min_lr_ratio: float = 0.1  # the schedule ends at min_lr_ratio * lr
    decay_fraction: float = 0.2  # "wsd": the final fraction of total_steps that decays to min_lr_ratio * lr
    clip_norm: float | None = 1.0  # global-norm gradient clipping; None disables
    muon_momentum: float = 0.95  # Muon's momentum ("muon" only)
    muon_consistent_rms: float | None = 0.2  # None: Keller Jordan's sqrt(max(1, fan_out / fan_in)) scale instead
    # Matrices kept on AdamW under "muon": embeddings (sparse rows) and the depthwise conv taps (per channel, no map).
    adamw_path_keywords: tuple[str, ...] = ("embed", "lm_head", "conv_depthwise")
    stacked_prefixes: tuple[str, ...] = ("layers",)  # top-level keys whose leaves have a leading layer axis

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"OptimizerConfig.name must be one of {OPTIMIZER_NAMES}, got {self.name!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        for name in ("lr", "b1", "b2", "eps", "weight_decay", "min_lr_ratio", "decay_fraction", "muon_momentum"):
            _set_float(self, name)
        for name in ("clip_norm", "muon_consistent_rms"):
            if getattr(self, name) is not None:
                _set_float(self, name)
        for name in ("warmup_steps", "total_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"OptimizerConfig.{name} must be an int, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"OptimizerConfig.lr must be > 0, got {self.lr}")
        for name in ("b1", "b2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimizerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"OptimizerConfig.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"OptimizerConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.total_steps < 1:
            raise ValueError(f"OptimizerConfig.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"OptimizerConfig.warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )
        for name in ("min_lr_ratio", "decay_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"OptimizerConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.schedule == "wsd" and self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"OptimizerConfig.decay_fraction: warmup_steps ({self.warmup_steps}) + decay steps "
                f"({self.decay_steps}) exceed total_steps ({self.total_steps})"
            )
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"OptimizerConfig.clip_norm must be > 0 or None, got {self.clip_norm}")
        if self.muon_consistent_rms is not None and self.muon_consistent_rms <= 0:
            raise ValueError(f"OptimizerConfig.muon_consistent_rms must be > 0 or None, got {self.muon_consistent_rms}")
        keywords = self.adamw_path_keywords
        if isinstance(keywords, str) or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(
                f"OptimizerConfig.adamw_path_keywords must be a sequence of non-empty strings, got {keywords!r}"
            )
        object.__setattr__(self, "adamw_path_keywords", tuple(keywords))
        object.__setattr__(self, "stacked_prefixes", tuple(self.stacked_prefixes))

    @property
    def decay_steps(self) -> int:
        """Length of the "wsd" schedule's final linear decay, in optimizer updates."""
        return round(self.decay_fraction * self.total_steps)


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The learning rate as a function of the optimizer update count (jit-able; see the module docstring)."""
    peak = cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    warmup, total = cfg.warmup_steps, cfg.total_steps
    decay_start = total - cfg.decay_steps

    def schedule(count: jax.Array | int) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        if cfg.schedule == "cosine":
            progress = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
            main = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "wsd" and cfg.decay_steps > 0:
            progress = jnp.clip((t - decay_start) / cfg.decay_steps, 0.0, 1.0)
            main = peak + (floor - peak) * progress
        else:
            main = jnp.full_like(t, peak)
        if warmup == 0:
            return main
        return jnp.where(t < warmup, peak * (t + 1.0) / warmup, main)

    return schedule


def param_groups(cfg: OptimizerConfig, params: PyTree) -> PyTree:
    """The group ("muon" | "decay" | "no_decay") of every leaf of `params`, as a pytree of the same structure.

    Leaves under a top-level key in `cfg.stacked_prefixes` (default "layers": the model's scanned layer stack) carry
    one leading layer axis that does not count towards their rank, so a stacked norm scale [L, D] is a vector.

    Works on any pytree whose leaves are arrays (or ShapeDtypeStructs): the path's key names — dict keys,
    attribute names, sequence indices, as `jax.tree_util.tree_map_with_path` sees them (nnx.State included) —
    are matched case-insensitively against `cfg.adamw_path_keywords`.
    """
    keywords = tuple(k.lower() for k in cfg.adamw_path_keywords)

    def group(path: tuple[Any, ...], leaf: Any) -> str:
        stacked = 1 if _path_name(path).split("/")[0] in cfg.stacked_prefixes else 0
        if _rank(leaf) - stacked <= 1:
            return "no_decay"
        if cfg.name == "adamw" or any(k in _path_name(path) for k in keywords):
            return "decay"
        return "muon"

    return jax.tree_util.tree_map_with_path(group, params)


def make_optimizer(cfg: OptimizerConfig, params: PyTree, groups: PyTree | None = None) -> optax.GradientTransformation:
    """The optimizer for `params` (used only for its structure, shapes and key names; see the module docstring).

    `groups` overrides `param_groups(cfg, params)`: a pytree with the params' structure whose leaves are group names.
    Under "adamw" a "muon" group is treated as "decay".
    """
    if groups is None:
        groups = param_groups(cfg, params)
    group_leaves = jax.tree.leaves(groups)
    if len(group_leaves) != len(jax.tree.leaves(params)):
        raise ValueError("make_optimizer: groups must have one group name per params leaf")
    bad = sorted({g for g in group_leaves if g not in PARAM_GROUPS}, key=str)
    if bad:
        raise ValueError(f"make_optimizer: unknown parameter group(s) {bad}; expected {PARAM_GROUPS}")
    if cfg.name == "adamw":
        groups = jax.tree.map(lambda g: "decay" if g == "muon" else g, groups)
    _check_muon_ranks(params, groups)

    schedule = make_schedule(cfg)

    def adamw(weight_decay: float, mask: PyTree | None = None) -> optax.GradientTransformation:
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay, mask=mask)

    if cfg.name == "adamw":
        core = adamw(cfg.weight_decay, mask=jax.tree.map(lambda g: g == "decay", groups))
    else:
        # Inside optax.partition each branch sees the full tree with MaskedNode() in place of the other groups'
        # leaves, so per-leaf specs must be derived from the tree handed in, not precomputed for the full params.
        muon = optax.chain(
            optax.contrib.scale_by_muon(
                beta=cfg.muon_momentum,
                eps=cfg.eps,
                nesterov=True,
                weight_dimension_numbers=_matrix_dimension_numbers,
            ),
            _scale_by_matrix_shape(cfg.muon_consistent_rms),
            optax.add_decayed_weights(cfg.weight_decay),
            optax.scale_by_learning_rate(schedule),
        )
        # Two AdamW instances rather than one with a mask: partition hands each branch a masked tree, and Adam is
        # elementwise with a shared step count, so the split changes nothing numerically.
        core = optax.partition(
            {"muon": muon, "decay": adamw(cfg.weight_decay), "no_decay": adamw(0.0)},
            groups,
        )

    opt = core if cfg.clip_norm is None else optax.chain(optax.clip_by_global_norm(cfg.clip_norm), core)
    return opt


def _matrix_dimension_numbers(tree: PyTree) -> PyTree:
    # The last two axes are the matrix (x @ W: reduction then output); every leading axis is a batch axis.
    return jax.tree.map(lambda x: optax.contrib.MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), tree)


def _scale_by_matrix_shape(consistent_rms: float | None) -> optax.GradientTransformation:
    """Scale each orthogonalised [..., fan_in, fan_out] update as optax.contrib.muon does, per matrix slice."""

    def scale(u: jax.Array) -> jax.Array:
        fan_in, fan_out = u.shape[-2], u.shape[-1]
        if consistent_rms is None:
            factor = math.sqrt(max(1.0, fan_out / fan_in))
        else:
            factor = consistent_rms * math.sqrt(max(fan_in, fan_out))
        return u * jnp.asarray(factor, u.dtype)

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        del params
        return jax.tree.map(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _check_muon_ranks(params: PyTree, groups: PyTree) -> None:
    def check(path: tuple[Any, ...], group: str, leaf: Any) -> None:
        if group == "muon" and _rank(leaf) < 2:
            raise ValueError(f"make_optimizer: {_path_name(path)!r} has rank {_rank(leaf)} < 2 and cannot use Muon")

    jax.tree_util.tree_map_with_path(check, groups, params)


def _rank(leaf: Any) -> int:
    return len(leaf.shape) if hasattr(leaf, "shape") else jnp.ndim(leaf)


def _path_name(path: tuple[Any, ...]) -> str:
    return path_name(path).lower()


def _set_float(cfg: OptimizerConfig, name: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"OptimizerConfig.{name} must be a finite number, got {value!r}")
    object.__setattr__(cfg, name, float(value))
