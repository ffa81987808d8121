"""The training run: builds model, optimizer, data and checkpoints from a TrainConfig and runs the jitted step.

Run directory layout (`train.run_dir`):
    config.yaml           the resolved configuration (one that differs from an earlier run's is reported, then
                          replaced)
    checkpoints/<step>/   orbax checkpoints: the TrainState (as a nested dict of arrays), the data iterator state
    metrics.jsonl         one line per logged step (loss, grad norm, lr, tokens/s, per-layer routing metrics; val_loss
                          every train.eval_every steps, train/evaluate.py)
    summary.json          first/last loss, held-out accuracy, wall time, data counters
    loss.png (training and validation loss, learning rate), expert_load.png, balancer_biases.png, routing_entropy.png

Start: a banner (config, parameter counts, devices and mesh, tokens per step, memory estimate, run directory, the
step it starts or resumes from), after a check that the training state fits this machine's memory (train/memory.py).
Resume: a run directory with a checkpoint continues from its latest complete checkpoint (params, optimizer,
balancer, step, rng and the data iterator), so N steps + resume + N steps equals 2N steps bitwise. A damaged newest
step is renamed `<step>.damaged` and the run falls back to the newest step that restores cleanly. `from_step`
(zaya-train --step N) resumes from an older step instead; the newer steps are renamed `<step>.superseded` (kept,
no longer listed), so the resumed run writes its own steps there, and metrics.jsonl gets the resumed steps' lines
appended after the old ones. train.resume=false starts at step 0 and moves every step aside the same way.
SIGTERM / SIGINT finish the current step, save a checkpoint and return normally. A non-finite loss skips its step
(the step function leaves the state unchanged); after `max_consecutive_bad_steps` in a row the run stops with
`BadStepsError`, its last good checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from sharding import batch_sharding, context_shards, init_sharded_model, make_mesh, use_mesh
from sharding.multihost import StepWatchdog, allgather_json
from sharding.rules import state_shardings
from train.checkpoint import DAMAGED_SUFFIX, SUPERSEDED_SUFFIX, Checkpointer, DamagedCheckpointError
from train.config import DataConfig, TrainConfig
from train.data import (
    is_empty_record,
    load_tokenizer,
    make_dataset,
    open_source,
    packing_efficiency,
    pipeline_counters,
)
from train.data.hosts import HostBatches
from train.data.synthetic import answer_accuracy
from train.describe import config_changes, config_warnings, run_description, start_line
from train.evaluate import greedy_completions, make_validation_loss, validation_batches, validation_loss
from train.memory import check_fits, estimate_memory
from train.metrics import MetricsWriter, ProgressBar
from train.plots import plot_balancer_biases, plot_expert_load_heatmap, plot_loss_curve, plot_routing_entropy
from train.state import abstract_train_state, initial_train_state, jit_train_step
from train.step import BATCH_DTYPES, TrainState, step_batch
from zaya_jax.attention import check_backend
from zaya_jax.config import load_yaml
from zaya_jax.hf_io import load_pretrained, read_config
from zaya_jax.kernels import check_tiles
from zaya_jax.model import parameter_counts

RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "moe_impl", "expert_parallel_transport",
                  "expert_capacity_factor", "remat_policy")
# Dense bf16 peak FLOP/s per device, for the MFU estimate when train.peak_flops is 0.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    steps: int
    first_loss: float | None
    last_loss: float | None
    heldout_accuracy: float | None
    wall_time_s: float
    interrupted: bool
    data_counters: dict[str, int | float | None]
    skipped_steps: int


def flops_per_token(cfg: TrainConfig) -> float:
    """Training FLOPs per token: 6 x active parameters (attention, router, one expert, LM head) plus
    6 x layers x (query heads x head_dim) x sequence length for causal attention, forward and backward."""
    m = cfg.model
    counts = parameter_counts(m)
    active = counts.active_non_embedding + m.vocab_size * m.hidden_size  # the LM head's matmul
    return 6.0 * active + 6.0 * m.num_layers * m.query_heads * m.head_dim * cfg.data.seq_len


def peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.train.peak_flops > 0:
        return cfg.train.peak_flops * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops * jax.device_count()
    return None


def to_nested_dict(tree: Any) -> dict[str, Any]:
    """Any pytree -> nested dict of its leaves keyed by path names (what the checkpoint stores)."""
    nested: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = nested
        names = [_key_name(k) for k in path]
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return nested


def from_nested_dict(template: Any, nested: dict[str, Any]) -> Any:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, _ in leaves_with_path:
        node = nested
        for key in path:
            node = node[_key_name(key)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def build_model(cfg: TrainConfig, mesh: Mesh) -> nnx.Module:
    """The model with its parameters placed on `mesh` by sharding/rules.py: freshly initialised (born sharded),
    or loaded from `train.init_from` (a transformers-format directory) for fine-tuning."""
    if not cfg.train.init_from:
        return init_sharded_model(cfg.model, mesh, seed=cfg.train.seed)
    # The checkpoint fixes the architecture; how it runs (dtypes, kernels, dispatch, remat) comes from the run.
    runtime = {k: getattr(cfg.model, k) for k in RUNTIME_FIELDS}
    if read_config(cfg.train.init_from, **runtime) != cfg.model:
        raise ValueError(
            f"train.init_from {cfg.train.init_from}: its config differs from the run's model section; "
            "set the model section to the checkpoint's architecture"
        )
    # Read straight into the mesh's shardings: each process reads only the blocks its devices hold.
    return load_pretrained(cfg.train.init_from, shardings=lambda state: state_shardings(state, mesh), **runtime)


def setup(cfg: TrainConfig) -> tuple[nnx.GraphDef, TrainState, Callable, Mesh]:
    """-> (graphdef, initial TrainState placed on the mesh, the jitted step, the mesh), built from the abstract
    state (train/state.py) that ahead-of-time compiles use, so a run executes the program they compile."""
    mesh = make_mesh(cfg.mesh)
    abstract = abstract_train_state(cfg, mesh)
    step = jit_train_step(cfg, abstract, mesh)  # checks the batch size against the mesh before anything is built
    state = initial_train_state(cfg, abstract, build_model(cfg, mesh))
    return abstract.graphdef, state, step, mesh


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch (the pipeline's arrays, in real order) -> the step's global arrays, laid
    out for the mesh's context shards (train/data/context_layout.py) and sharded over its batch and context axes."""
    sharding = batch_sharding(mesh)
    laid = step_batch(local, context_shards(mesh))
    rows, length = laid["tokens"].shape
    shape = (rows * jax.process_count(), length)  # processes hold whole rows: the batch splits by row over them
    return {k: jax.make_array_from_process_local_data(sharding, laid[k], shape) for k in BATCH_DTYPES}


def abstract_like(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def run_training(cfg: TrainConfig, *, stream=None, stop_after: int | None = None,
                 on_log: Callable[[dict[str, list]], None] | None = None,
                 config_name: str | None = None, from_step: int | None = None) -> RunSummary:
    """Runs (or resumes) the configured training. `from_step` (zaya-train --step N) resumes from that checkpoint
    step instead of the latest: it must exist and restore cleanly (no fallback), and the checkpoints newer than it
    are moved aside to `<step>.superseded` (kept) once it has restored. `stop_after` ends the run early after that
    many steps of this invocation, as a preemption would (a checkpoint is written), which the resume tests use.
    `on_log(history)` is called on the primary process after every logged step with the lists so far ("step",
    "loss", "expert_load" [L, E] per entry, "balancing_bias", "routing_entropy"): live plots in a notebook.
    `config_name` (the YAML path) is shown in the start banner. Errors before the first step (a config the
    checkpoint does not fit, a state larger than this machine's memory, an empty source) leave no empty
    run directory behind."""
    start_time = time.perf_counter()
    run = cfg.train
    check_backend(cfg.model.attention_impl)  # before the run directory is written
    check_tiles(cfg.model, jax.default_backend())
    primary = jax.process_index() == 0  # one process writes the run's files; every process checkpoints (orbax)

    tokenizer = load_tokenizer(None if cfg.data.tokenizer == "byte" else cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    mesh = make_mesh(cfg.mesh)
    memory = estimate_memory(cfg, mesh)
    check_fits(memory)  # before anything is allocated or written

    checkpoints = os.path.join(run.run_dir, "checkpoints")
    if from_step is not None:
        if not run.resume:
            raise ValueError(f"--step {from_step} resumes the run, but train.resume is false: drop one of them")
        if not os.path.isdir(checkpoints):
            raise FileNotFoundError(f"--step {from_step} resumes an existing run, but {checkpoints} does not exist "
                                    f"(train.run_dir {run.run_dir!r})")
    created = not os.path.exists(run.run_dir)
    checkpointer = None
    try:
        os.makedirs(run.run_dir, exist_ok=True)
        checkpointer = Checkpointer(checkpoints, save_every=run.save_every, keep=run.keep_checkpoints,
                                    async_save=run.async_checkpoints)
        steps = checkpointer.all_steps()
        if from_step is not None and from_step not in steps:
            raise FileNotFoundError(f"--step {from_step}: no complete checkpoint step {from_step} in {checkpoints}; "
                                    f"complete steps: {', '.join(map(str, steps)) or 'none'}")
        resumes = run.resume and bool(steps)
        if primary:
            print("\n".join(run_description(cfg, mesh, memory, config_name)), flush=True)
            for warning in config_warnings(cfg):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        graphdef, state, step_fn, mesh = setup(cfg)

        source = open_source(cfg.data.source, on_error=cfg.data.on_error, eos_id=tokenizer.eos_id, seed=run.seed)
        if len(source) == 0:
            raise ValueError(f"data.source {cfg.data.source!r} is empty")
        check_documents(cfg.data, source)
        read_shards = cfg.data.read_shards or jax.process_count()

        def make_iterator(shard_index: int, shard_count: int, rows: int):
            return iter(make_dataset(
                source, tokenizer, cfg.data.seq_len, rows, seed=run.seed, shard_index=shard_index,
                shard_count=shard_count, completion_only=cfg.data.completion_only, trim=cfg.data.trim,
                pack_buffer_size=cfg.data.pack_buffer_size, packing=cfg.data.packing,
            ))

        data_iter = HostBatches(make_iterator, batch_size=run.batch_size, read_shards=read_shards,
                                process_index=jax.process_index(), process_count=jax.process_count())

        start_step = 0
        if resumes:
            start_step, state, data_state = resume(checkpointer, state, from_step, primary)
            data_iter.set_state(data_state)
        if from_step is not None or not run.resume:  # (a default resume starts at the newest step that restores)
            set_aside_newer(checkpointer, start_step, "--step" if run.resume else "train.resume is false", primary)
        # Written only once the checkpoint is known to fit this configuration: a failed resume into a different
        # architecture must not leave a config.yaml that no longer describes the run's checkpoints.
        if primary:
            print(start_line(run, start_step if resumes else None), flush=True)
            write_config(cfg, run.run_dir)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        if created:
            remove_empty_dirs(run.run_dir)  # an early error leaves no empty run directory behind
        raise

    stop_requested = {"signal": None}

    def request_stop(signum, _frame):
        stop_requested["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    watchdog = (StepWatchdog(run.step_timeout_s, first_step_timeout_s=run.first_step_timeout_s).start()
                if run.step_timeout_s > 0 else None)
    writer = MetricsWriter(run.run_dir) if primary else None
    progress = ProgressBar(run.steps, **({"stream": stream} if stream is not None else {})) if primary else None
    tokens_per_step = run.batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg) * tokens_per_step
    peak = peak_flops(cfg)
    history: dict[str, list] = {"step": [], "loss": [], "lr": [], "expert_load": [], "balancing_bias": [],
                                "routing_entropy": [], "val_step": [], "val_loss": []}
    first_loss = last_loss = None
    validation = None  # (held-out batches, jitted loss), on the first evaluation
    consecutive_bad = skipped_total = 0
    step = start_step
    step_times: list[float] = []
    interrupted = False
    try:
        while step < run.steps:
            batch = next(data_iter)
            batch = global_batch(batch, mesh)
            t0 = time.perf_counter()
            with use_mesh(mesh):  # the model reads the mesh and its axis rules while tracing the step
                state, metrics = step_fn(state, batch)
            skipped = int(metrics["skipped"])  # one scalar sync per step: bad steps are counted exactly
            if watchdog is not None:
                watchdog.beat(step + 1)
            step_times.append(time.perf_counter() - t0)
            step += 1
            skipped_total += skipped
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            eval_due = (run.eval_every > 0 and step % run.eval_every == 0
                        and cfg.data.resolved_validation_source is not None)  # else warned at the start
            if step % run.log_every == 0 or step == run.steps or step == start_step + 1 or skipped or eval_due:
                host = jax.device_get(metrics)
                loss = float(host["loss"])
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                recent = np.median(step_times[-run.log_every:]) if len(step_times) > 1 else step_times[-1]
                tokens_per_s = tokens_per_step / recent
                mfu = model_flops / recent / peak if peak else None
                # z_loss is the term z_loss x mean(logsumexp^2): not part of the objective while its weight is 0.
                record = {k: v for k, v in host.items() if k != "z_loss" or run.z_loss > 0}
                record.update(tokens_per_s=tokens_per_s, mfu=mfu)
                if eval_due:
                    if validation is None:  # built once: the same held-out batches and one compiled loss throughout
                        validation = ([global_batch(b, mesh) for b in validation_batches(cfg, tokenizer)],
                                      make_validation_loss(graphdef, run.loss_chunk))
                    with use_mesh(mesh):
                        record["val_loss"] = validation_loss(validation[1], state.params, state.biases,
                                                             validation[0])
                    history["val_step"].append(step)
                    history["val_loss"].append(record["val_loss"])
                if primary:
                    writer.write(step, record)
                    progress.update(step, loss, tokens_per_s, mfu,
                                    {"val_loss": record["val_loss"]} if eval_due else None)
                history["step"].append(step)
                history["loss"].append(loss)
                history["lr"].append(float(host["lr"]))
                history["expert_load"].append(np.asarray(host["expert_load"]))
                history["balancing_bias"].append(np.asarray(host["balancing_bias"]))
                history["routing_entropy"].append(np.asarray(host["routing_entropy"]))
                if on_log is not None and primary:
                    on_log(history)
            if consecutive_bad >= run.max_consecutive_bad_steps:
                checkpointer.wait()
                raise BadStepsError(
                    f"{consecutive_bad} consecutive steps with a non-finite loss (last at step {step}); "
                    f"stopping with the last good checkpoint (step {checkpointer.latest_step()}) intact"
                )
            if checkpointer.should_save(step):
                checkpointer.save(step, to_nested_dict(state), all_data_states(data_iter))
            if stop_requested["signal"] is not None or (stop_after is not None and step - start_step >= stop_after):
                interrupted = step < run.steps
                break
        checkpointer.save(step, to_nested_dict(state), all_data_states(data_iter), force=True)
        checkpointer.wait()
    finally:
        if watchdog is not None:
            watchdog.stop()
        if primary:
            progress.close()
            writer.close()
        checkpointer.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    accuracy = None
    # Decoding gathers outputs on the host: single-process runs only (multi-host runs evaluate after export).
    if not interrupted and cfg.data.eval_samples > 0 and jax.process_count() == 1:
        with use_mesh(mesh):
            accuracy = heldout_accuracy(cfg, graphdef, state, tokenizer)
    summary = RunSummary(
        run_dir=run.run_dir, steps=step, first_loss=first_loss, last_loss=last_loss, heldout_accuracy=accuracy,
        wall_time_s=time.perf_counter() - start_time, interrupted=interrupted,
        data_counters=data_counters(data_iter, source), skipped_steps=skipped_total,
    )
    if primary:
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(dataclasses.asdict(summary), f, indent=2)
    if primary and history["step"]:
        write_plots(run.run_dir, history, accuracy)
    return summary


def resume(checkpointer: Checkpointer, state: TrainState, from_step: int | None,
           primary: bool) -> tuple[int, TrainState, dict]:
    """(step, state, data iterator state) restored from checkpoint `from_step`, or by default from the newest step
    that restores cleanly, whose damaged newer steps are renamed `<step>.damaged` (kept, so that this run can save
    those steps again), each said in one line."""
    abstract = to_nested_dict(abstract_like(state))
    if from_step is not None:
        try:  # the step asked for, or the error: no fallback
            step, nested, data_state, _ = checkpointer.restore(abstract, step=from_step)
        except DamagedCheckpointError as e:
            raise e.suggesting_other_steps(checkpointer.all_steps()) from None
        return step, from_nested_dict(state, nested), data_state
    damaged: list[DamagedCheckpointError] = []
    step, nested, data_state, _ = checkpointer.restore(abstract, on_damaged=damaged.append)
    kept = [checkpointer.set_aside(error.step, DAMAGED_SUFFIX) for error in damaged]
    complete = ", ".join(map(str, checkpointer.all_steps()))  # once every damaged step is aside
    for error, path in zip(damaged, kept):
        if primary:
            print(f"zaya-train: warning: {error}; resuming from step {step}, the newest step that restores cleanly; "
                  f"the damaged step is kept as {path} (choose another step with --step N; complete steps: "
                  f"{complete})", file=sys.stderr, flush=True)
    return step, from_nested_dict(state, nested), data_state


def set_aside_newer(checkpointer: Checkpointer, start_step: int, reason: str, primary: bool) -> None:
    """Renames the complete steps newer than `start_step` (those a run resumed with --step N passes over, or all of
    them for a new run, train.resume=false) to `<step>.superseded`: kept, but no longer steps, so that the run
    saves its own steps there (orbax skips saving a step that exists) and a later resume finds those. Said in one
    line."""
    newer = [s for s in checkpointer.all_steps() if s > start_step]
    kept = [checkpointer.set_aside(s, SUPERSEDED_SUFFIX) for s in newer]
    if newer and primary:
        print(f"starting from step {start_step} ({reason}): the newer checkpoint step{'s' if len(newer) > 1 else ''} "
              f"{', '.join(map(str, newer))} moved aside, kept as {', '.join(kept)}", flush=True)


def all_data_states(data_iter: HostBatches) -> dict[str, Any]:
    """Every process's shard states merged (the checkpoint stores them all, so any process count can resume)."""
    merged: dict[str, Any] = {}
    for states in allgather_json(data_iter.get_state()):
        merged.update(states)
    return merged


def data_counters(data_iter: HostBatches, source: Any) -> dict[str, int | float | None]:
    """The pipeline's counters (kept, trimmed, dropped, chunked: documents read so far; document_tokens,
    padding_tokens: of the rows emitted) summed over the reader shards; `skipped` adds the malformed records that
    data.on_error=skip left out of the source when it opened; `packing_efficiency` is the fraction of the emitted
    rows' tokens that are document tokens (None before any row)."""
    totals: dict[str, int | float | None] = {}
    for it in data_iter.iterators.values():
        for key, value in pipeline_counters(it).items():
            totals[key] = totals.get(key, 0) + value
    totals["skipped"] = totals.get("skipped", 0) + getattr(source, "skipped", 0)
    totals["packing_efficiency"] = packing_efficiency(totals)
    return totals


EMPTY_CHECK_DOCUMENTS = 256  # the first documents of a source that check_documents looks at


def check_documents(data: DataConfig, source: Any) -> None:
    """Warns (data.on_empty "warn") or raises ("raise") when most of the source's first documents are empty:
    the run would train on bos / eos alone."""
    sampled = min(len(source), EMPTY_CHECK_DOCUMENTS)
    empty = sum(is_empty_record(source[i]) for i in range(sampled))
    if 2 * empty <= sampled:
        return
    message = (f"data.source {data.source!r}: {empty} of its first {sampled} documents are empty (no text), so the "
               "model would learn little beyond bos / eos")
    if data.on_empty == "raise":
        raise ValueError(f"{message} (data.on_empty=raise)")
    print(f"warning: {message}; set data.on_empty=raise to refuse such a source", file=sys.stderr, flush=True)


def write_config(cfg: TrainConfig, run_dir: str) -> None:
    """Writes the resolved config to run_dir/config.yaml; a different one already there is reported with its
    differences before it is replaced."""
    path = os.path.join(run_dir, "config.yaml")
    new = cfg.to_dict()
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = load_yaml(f)
        except ValueError:
            old = None
        changes = config_changes(old, new) if isinstance(old, dict) else ["(the old file is not a readable config)"]
        if changes:
            print(f"warning: {path} differs from this run's settings and is replaced; changed: {'; '.join(changes)}",
                  file=sys.stderr, flush=True)
    with open(path, "w") as f:
        yaml.safe_dump(new, f, sort_keys=False)


def remove_empty_dirs(path: str) -> None:
    """Removes `path` and the directories under it, deepest first, as long as they are empty."""
    for root, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count(os.sep)):
        try:
            os.rmdir(root)
        except OSError:
            pass  # not empty: something was written there, keep it


def heldout_accuracy(cfg: TrainConfig, graphdef: nnx.GraphDef, state: TrainState, tokenizer) -> float:
    source = open_source(cfg.data.eval_source, seed=cfg.train.seed + 1)
    records = [source[i] for i in range(cfg.data.eval_samples)]
    model = nnx.merge(graphdef, state.params, state.biases)
    completions = greedy_completions(model, tokenizer, records, cfg.data.eval_max_new_tokens)
    return answer_accuracy(completions, records)


def write_plots(run_dir: str, history: dict[str, list], accuracy: float | None) -> None:
    steps = history["step"]
    plot_loss_curve(steps, history["loss"], os.path.join(run_dir, "loss.png"),
                    validation=dict(zip(history["val_step"], history["val_loss"])), learning_rates=history["lr"])
    plot_expert_load_heatmap(np.stack(history["expert_load"]), steps, os.path.join(run_dir, "expert_load.png"))
    plot_balancer_biases(np.stack(history["balancing_bias"]), steps, os.path.join(run_dir, "balancer_biases.png"))
    plot_routing_entropy(np.stack(history["routing_entropy"]), steps, os.path.join(run_dir, "routing_entropy.png"))
