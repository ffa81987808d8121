"""What a training run is about to do, in words: zaya-train's start banner and its --dry-run report.

    run_description(cfg, mesh, memory, name) -> lines  config name, parameter counts, devices and mesh, tokens per
                                                         step, memory estimate, run directory
    start_line(run, resume_step) -> line                 the step the run starts or resumes from
    config_warnings(cfg) -> lines                        settings that are valid but probably not what was meant
    config_changes(old, new) -> lines                    "section.key: old -> new" between two config dicts
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from train.config import RunConfig, TrainConfig
from train.memory import MemoryEstimate, available_memory
from zaya_jax.model import parameter_counts


def run_description(cfg: TrainConfig, mesh: Mesh, memory: MemoryEstimate, config_name: str | None) -> list[str]:
    m, run = cfg.model, cfg.train
    counts = parameter_counts(m)
    devices = jax.devices()
    available, what = available_memory()
    fits = "" if available is None else f"; {available / 1e9:.2f} GB of {what}"
    return [
        f"config: {config_name or '(in memory)'}",
        f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.query_heads}q/{m.kv_heads}kv heads of "
        f"{m.head_dim}, {m.num_experts} experts, vocab {m.vocab_size}, {m.param_dtype} parameters",
        f"parameters: total {counts.total:,}  embedding {counts.embedding:,}  non-embedding {counts.non_embedding:,}  "
        f"active non-embedding {counts.active_non_embedding:,}",
        f"devices: {len(devices)} x {devices[0].device_kind} ({jax.process_count()} process"
        f"{'es' if jax.process_count() > 1 else ''}); mesh " + " ".join(f"{k}={v}" for k, v in mesh.shape.items()),
        f"tokens per step: {run.batch_size * cfg.data.seq_len:,} (batch {run.batch_size} x seq_len "
        f"{cfg.data.seq_len}, {run.accumulation_steps} micro-batch{'es' if run.accumulation_steps > 1 else ''})",
        f"memory: the training state needs {memory.describe()}{fits}",
        f"run directory: {run.run_dir}",
    ]


def start_line(run: RunConfig, resume_step: int | None) -> str:
    if resume_step is None:
        return f"new run from step 0 to step {run.steps}"
    return f"resuming from step {resume_step} (checkpoints/{resume_step}), training to step {run.steps}"


def config_warnings(cfg: TrainConfig) -> list[str]:
    opt, run = cfg.optimizer, cfg.train
    warnings = []
    if run.steps > opt.total_steps and opt.schedule != "constant":
        warnings.append(
            f"train.steps ({run.steps}) is past optimizer.total_steps ({opt.total_steps}): the {opt.schedule} schedule "
            f"has ended there, so steps {opt.total_steps + 1}..{run.steps} train at its floor learning rate "
            f"(min_lr_ratio x lr = {opt.min_lr_ratio * opt.lr:.3g}); raise optimizer.total_steps to stretch the "
            "schedule over the run"
        )
    if run.eval_every > 0 and cfg.data.resolved_validation_source is None:
        warnings.append(
            f"train.eval_every ({run.eval_every}) asks for a validation loss, but data.source {cfg.data.source!r} has "
            "no held-out split and data.validation_source is empty: no validation loss is computed; set "
            "data.validation_source to a held-out file (or train.eval_every=0)"
        )
    return warnings


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changes = []
    for section in dict.fromkeys([*old, *new]):
        before, after = old.get(section) or {}, new.get(section) or {}
        for key in dict.fromkeys([*before, *after]):
            if before.get(key, "(absent)") != after.get(key, "(absent)"):
                changes.append(f"{section}.{key}: {before.get(key, '(absent)')!r} -> {after.get(key, '(absent)')!r}")
    return changes
