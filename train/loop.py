"""The training run: builds model, optimizer, data and checkpoints from a TrainConfig and runs the jitted step.

Run directory layout (`train.run_dir`):
    config.yaml           the resolved configuration
    checkpoints/<step>/   orbax checkpoints: the TrainState (as a nested dict of arrays), the data iterator state
    metrics.jsonl         one line per logged step (loss, grad norm, lr, tokens/s, per-layer routing metrics)
    summary.json          first/last loss, held-out accuracy, wall time, data counters
    loss.png, expert_load.png, balancer_biases.png, routing_entropy.png

Resume: a run directory with a checkpoint continues from its latest complete checkpoint (params, optimizer,
balancer, step, rng and the data iterator), so N steps + resume + N steps equals 2N steps bitwise.
SIGTERM / SIGINT finish the current step, save a checkpoint and return normally. A non-finite loss skips its step
(the step function leaves the state unchanged); after `max_consecutive_bad_steps` in a row the run stops with
`BadStepsError`, its last good checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from sharding import batch_shards, batch_sharding, init_sharded_model, make_mesh, train_state_shardings
from sharding.multihost import StepWatchdog, allgather_json
from sharding.rules import state_shardings
from train.checkpoint import Checkpointer
from train.config import TrainConfig
from train.data import load_tokenizer, make_dataset, open_source, pipeline_counters
from train.data.hosts import HostBatches
from train.data.synthetic import answer_accuracy
from train.evaluate import greedy_completions
from train.metrics import MetricsWriter, ProgressBar
from train.optim import make_optimizer, make_schedule
from train.plots import plot_balancer_biases, plot_expert_load_heatmap, plot_loss_curve, plot_routing_entropy
from train.step import TrainState, init_train_state, make_train_step
from zaya_jax.attention import check_backend
from zaya_jax.hf_io import load_pretrained
from zaya_jax.model import parameter_counts

RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "moe_impl", "expert_parallel_transport",
                  "expert_capacity_factor", "remat_policy")
BATCH_KEYS = ("tokens", "segment_ids", "positions", "targets", "target_mask")
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
    data_counters: dict[str, int]
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
    model = load_pretrained(cfg.train.init_from, **runtime)
    if model.config != cfg.model:
        raise ValueError(
            f"train.init_from {cfg.train.init_from}: its config differs from the run's model section; "
            "set the model section to the checkpoint's architecture"
        )
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))


def setup(cfg: TrainConfig) -> tuple[nnx.GraphDef, TrainState, Callable, Mesh]:
    """-> (graphdef, initial TrainState placed on the mesh, the jitted step, the mesh)."""
    mesh = make_mesh(cfg.mesh)
    check_batch_shards(cfg, mesh)
    model = build_model(cfg, mesh)
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(cfg.optimizer, params)
    graphdef, state = init_train_state(model, optimizer, cfg.train.seed)
    shardings = train_state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    return graphdef, state, jit_train_step(cfg, graphdef, optimizer, shardings, mesh), mesh


def check_batch_shards(cfg: TrainConfig, mesh: Mesh) -> None:
    shards = batch_shards(mesh) * cfg.train.accumulation_steps
    if cfg.train.batch_size % shards or cfg.train.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the batch shards of the mesh "
            f"({batch_shards(mesh)}) x train.accumulation_steps ({cfg.train.accumulation_steps}) and by the "
            f"process count ({jax.process_count()})"
        )


def jit_train_step(cfg: TrainConfig, graphdef: nnx.GraphDef, optimizer, shardings: Any, mesh: Mesh) -> Callable:
    """The jitted step a run executes (zaya-compile compiles this same one): the state in `shardings`, donated;
    the batch split over the mesh's batch axes. Call (and lower) it under `jax.set_mesh(mesh)`."""
    step_fn = make_train_step(
        graphdef, optimizer, cfg.balancer, cfg.model.router_classes,
        accumulation_steps=cfg.train.accumulation_steps, z_loss=cfg.train.z_loss,
        learning_rate=make_schedule(cfg.optimizer), loss_chunk=cfg.train.loss_chunk,
    )
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays sharded over the batch axes of the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, local[k]) for k in BATCH_KEYS}


def abstract_like(state: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def run_training(cfg: TrainConfig, *, stream=None, stop_after: int | None = None,
                 on_log: Callable[[dict[str, list]], None] | None = None) -> RunSummary:
    """Runs (or resumes) the configured training. `stop_after` ends the run early after that many steps of this
    invocation, as a preemption would (a checkpoint is written), which the resume tests use. `on_log(history)` is
    called on the primary process after every logged step with the lists so far ("step", "loss", "expert_load"
    [L, E] per entry, "balancing_bias", "routing_entropy"): live plots in a notebook."""
    start_time = time.perf_counter()
    run = cfg.train
    check_backend(cfg.model.attention_impl)  # before the run directory is written
    os.makedirs(run.run_dir, exist_ok=True)
    primary = jax.process_index() == 0  # one process writes the run's files; every process checkpoints (orbax)

    tokenizer = load_tokenizer(None if cfg.data.tokenizer == "byte" else cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}"
        )
    graphdef, state, step_fn, mesh = setup(cfg)

    source = open_source(cfg.data.source, on_error=cfg.data.on_error, eos_id=tokenizer.eos_id, seed=run.seed)
    if len(source) == 0:
        raise ValueError(f"data.source {cfg.data.source!r} is empty")
    read_shards = cfg.data.read_shards or jax.process_count()

    def make_iterator(shard_index: int, shard_count: int, rows: int):
        return iter(make_dataset(
            source, tokenizer, cfg.data.seq_len, rows, seed=run.seed, shard_index=shard_index,
            shard_count=shard_count, completion_only=cfg.data.completion_only, trim=cfg.data.trim,
            pack_buffer_size=cfg.data.pack_buffer_size,
        ))

    data_iter = HostBatches(make_iterator, batch_size=run.batch_size, read_shards=read_shards,
                            process_index=jax.process_index(), process_count=jax.process_count())

    checkpointer = Checkpointer(
        os.path.join(run.run_dir, "checkpoints"), save_every=run.save_every, keep=run.keep_checkpoints,
        async_save=run.async_checkpoints,
    )
    start_step = 0
    if run.resume and checkpointer.latest_step() is not None:
        start_step, nested, data_state, _ = checkpointer.restore(to_nested_dict(abstract_like(state)))
        state = from_nested_dict(state, nested)
        data_iter.set_state(data_state)
    # Written only once the checkpoint is known to fit this configuration: a failed resume into a different
    # architecture must not leave a config.yaml that no longer describes the run's checkpoints.
    if primary:
        with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

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
    history: dict[str, list] = {"step": [], "loss": [], "expert_load": [], "balancing_bias": [],
                                "routing_entropy": []}
    first_loss = last_loss = None
    consecutive_bad = skipped_total = 0
    step = start_step
    step_times: list[float] = []
    interrupted = False
    try:
        while step < run.steps:
            batch = next(data_iter)
            batch = global_batch(batch, mesh)
            t0 = time.perf_counter()
            with jax.set_mesh(mesh):  # expert parallelism reads the mesh while tracing the step
                state, metrics = step_fn(state, batch)
            skipped = int(metrics["skipped"])  # one scalar sync per step: bad steps are counted exactly
            if watchdog is not None:
                watchdog.beat(step + 1)
            step_times.append(time.perf_counter() - t0)
            step += 1
            skipped_total += skipped
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            if step % run.log_every == 0 or step == run.steps or step == start_step + 1 or skipped:
                host = jax.device_get(metrics)
                loss = float(host["loss"])
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                recent = np.median(step_times[-run.log_every:]) if len(step_times) > 1 else step_times[-1]
                tokens_per_s = tokens_per_step / recent
                mfu = model_flops / recent / peak if peak else None
                record = {k: v for k, v in host.items()}
                record.update(tokens_per_s=tokens_per_s, mfu=mfu)
                if primary:
                    writer.write(step, record)
                    progress.update(step, loss, tokens_per_s, mfu)
                history["step"].append(step)
                history["loss"].append(loss)
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
        with jax.set_mesh(mesh):
            accuracy = heldout_accuracy(cfg, graphdef, state, tokenizer)
    summary = RunSummary(
        run_dir=run.run_dir, steps=step, first_loss=first_loss, last_loss=last_loss, heldout_accuracy=accuracy,
        wall_time_s=time.perf_counter() - start_time, interrupted=interrupted,
        data_counters=data_counters(data_iter), skipped_steps=skipped_total,
    )
    if primary:
        with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
            json.dump(dataclasses.asdict(summary), f, indent=2)
    if primary and history["step"]:
        write_plots(run.run_dir, history, accuracy)
    return summary


def all_data_states(data_iter: HostBatches) -> dict[str, Any]:
    """Every process's shard states merged (the checkpoint stores them all, so any process count can resume)."""
    merged: dict[str, Any] = {}
    for states in allgather_json(data_iter.get_state()):
        merged.update(states)
    return merged


def data_counters(data_iter: HostBatches) -> dict[str, int]:
    totals: dict[str, int] = {}
    for it in data_iter.iterators.values():
        for key, value in pipeline_counters(it).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def heldout_accuracy(cfg: TrainConfig, graphdef: nnx.GraphDef, state: TrainState, tokenizer) -> float:
    source = open_source(cfg.data.eval_source, seed=cfg.train.seed + 1)
    records = [source[i] for i in range(cfg.data.eval_samples)]
    model = nnx.merge(graphdef, state.params, state.biases)
    completions = greedy_completions(model, tokenizer, records, cfg.data.eval_max_new_tokens)
    return answer_accuracy(completions, records)


def write_plots(run_dir: str, history: dict[str, list], accuracy: float | None) -> None:
    steps = history["step"]
    plot_loss_curve(steps, history["loss"], os.path.join(run_dir, "loss.png"))
    plot_expert_load_heatmap(np.stack(history["expert_load"]), steps, os.path.join(run_dir, "expert_load.png"))
    plot_balancer_biases(np.stack(history["balancing_bias"]), steps, os.path.join(run_dir, "balancer_biases.png"))
    plot_routing_entropy(np.stack(history["routing_entropy"]), steps, os.path.join(run_dir, "routing_entropy.png"))
