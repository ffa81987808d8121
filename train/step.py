"""The pure training step: (state, batch) -> (new state, metrics), jitted once.

    TrainState = (params, biases, opt_state, balancer, step, rng)
        params    nnx.State of nnx.Param in the model's param_dtype (the model computes in its config's dtype)
        biases    nnx.State of BalancingBias: [L, E + 1] float32, the router's selection biases
        opt_state optax state over params only (biases are invisible to the optimizer); moments in the params' dtype
        balancer  BalancerState: the AdamW moments of the PID bias balancer
        step      int32 []
        rng       uint32 [2] PRNG key (the model is deterministic; kept so stochastic additions stay reproducible)
    batch (from train/data/pipeline.py, laid out by train/data/context_layout.py), all [B, S]:
        tokens, segment_ids, positions (int32), sequence_index (int32: each token's real index; the tokens are in
        the dual-chunk layout of the mesh's context shards), targets (int32), target_mask (float32)

One step: the batch is split into `accumulation_steps` micro-batches scanned in sequence; each contributes the
gradient of its *summed* token loss and its expert-choice counts, so the accumulated gradient, divided by the
global count of target tokens, equals the gradient of one big batch; it reaches the optimizer in each parameter's
dtype. Then global-norm clipping and the optimizer update the params, and the balancer updates the biases from the
counts of the whole (global) batch. A non-finite loss or gradient norm skips the update (params, optimizer and
balancer unchanged) and reports `skipped = 1`.

The state the step returns has the structure, shapes and dtypes of the state it takes (checked while tracing), so
the jitted step compiles once and a donated state is reused buffer for buffer.

Loss: next-token cross-entropy in float32 over target_mask, plus optional z-loss z * mean(logsumexp(logits)^2).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train.balancer import BalancerConfig, BalancerState, balancer_update, expert_counts, init_balancer
from train.data.context_layout import context_layout
from zaya_jax.router import BalancingBias

Batch = dict[str, jax.Array]
# The batch's arrays, each [B, S] (what train/data/pipeline.py yields for the step).
BATCH_DTYPES = {"tokens": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                "sequence_index": jnp.int32, "targets": jnp.int32, "target_mask": jnp.float32}


def step_batch(arrays: dict[str, Any], context_shards: int = 1) -> dict[str, Any]:
    """The step's batch from a pipeline batch (real order; extra arrays such as loss_mask are left out): the
    BATCH_DTYPES arrays in the dual-chunk layout of `context_shards` shards, with sequence_index (numpy)."""
    return context_layout({k: np.asarray(arrays[k]) for k in BATCH_DTYPES if k != "sequence_index"}, context_shards)


class TrainState(NamedTuple):
    params: Any
    biases: Any
    opt_state: Any
    balancer: BalancerState
    step: jax.Array
    rng: jax.Array


def token_losses(
    graphdef: nnx.GraphDef, params: Any, biases: Any, batch: Batch, loss_chunk: int = 0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """-> (nll [B, S] float32, logsumexp [B, S] float32, Routing: choices [L, B, S], dropped tokens [L]).

    loss_chunk > 0 computes the LM head and the cross-entropy `loss_chunk` positions at a time under
    jax.checkpoint, so the [B, S, V] logits never exist whole, in the forward or the backward (for ZAYA1's 262k
    vocabulary they would be 8.6 GB in float32 for 8192 tokens); the numbers are those of the whole computation.
    """
    model = nnx.merge(graphdef, params, biases)
    hidden, routing = model.hidden_states(
        batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
        sequence_index=batch["sequence_index"],
    )
    targets = batch["targets"]

    def losses(hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        with jax.named_scope("lm_head_loss"):
            logits = model.logits(hidden)
            log_z = jax.nn.logsumexp(logits, axis=-1)
            target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return log_z - target_logit, log_z

    seq = targets.shape[1]
    if loss_chunk <= 0 or loss_chunk >= seq:
        nll, log_z = losses(hidden, targets)
        return nll, log_z, routing
    chunks = -(-seq // loss_chunk)
    pad = chunks * loss_chunk - seq
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[0], chunks, loss_chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    nll, log_z = jax.lax.map(lambda args: jax.checkpoint(losses)(*args), (split(hidden), split(targets)))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)[:, :seq]  # noqa: E731
    return merge(nll), merge(log_z), routing


def make_train_step(
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    balancer_config: BalancerConfig,
    num_router_classes: int,
    *,
    accumulation_steps: int = 1,
    z_loss: float = 0.0,
    learning_rate: Callable[[jax.Array], jax.Array] | None = None,
    loss_chunk: int = 0,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure step function; jit it (with `donate_argnums=0` to reuse the state's buffers)."""

    def summed_loss(params, biases, micro):
        nll, log_z, routing = token_losses(graphdef, params, biases, micro, loss_chunk)
        mask = micro["target_mask"]
        nll_sum = jnp.sum(nll * mask)
        z_sum = jnp.sum(jnp.square(log_z) * mask)
        # Padding (segment 0) is not routed work the balancer should count.
        counts = expert_counts(routing.choices, num_router_classes, micro["segment_ids"] > 0)
        return nll_sum + z_loss * z_sum, (nll_sum, z_sum, jnp.sum(mask), counts, routing.dropped_tokens)

    grad_fn = jax.grad(summed_loss, has_aux=True)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        micro_batches = jax.tree.map(
            lambda x: x.reshape(accumulation_steps, x.shape[0] // accumulation_steps, *x.shape[1:]), batch
        )

        def accumulate(carry, micro):
            grads, nll_sum, z_sum, count, counts, dropped = carry
            g, (n, z, c, k, d) = grad_fn(state.params, state.biases, micro)
            return (jax.tree.map(jnp.add, grads, g), nll_sum + n, z_sum + z, count + c, counts + k, dropped + d), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        num_layers = jax.tree.leaves(state.biases)[0].shape[0]
        init = (zeros, 0.0, 0.0, 0.0, jnp.zeros((num_layers, num_router_classes), jnp.float32),
                jnp.zeros((num_layers,), jnp.int32))
        (grads, nll_sum, z_sum, count, counts, dropped), _ = jax.lax.scan(accumulate, init, micro_batches)
        denom = jnp.maximum(count, 1.0)
        mean_grads = jax.tree.map(lambda g: g / denom, grads)  # float32: denom is a float32 token count
        loss = nll_sum / denom
        grad_norm = optax.tree.norm(mean_grads)
        # optax gives new moments the dtype of the updates (AdamW's and Muon's `mu` have no fixed dtype), so a
        # float32 gradient would turn bfloat16 moments into float32 ones after one step: the gradient must come in
        # its parameter's dtype.
        grads = jax.tree.map(lambda m, g: m.astype(g.dtype), mean_grads, grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(z_sum)

        with jax.named_scope("optimizer"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        bias_leaves, bias_def = jax.tree.flatten(state.biases)
        with jax.named_scope("balancer"):
            new_bias, balancer, bal_metrics = balancer_update(balancer_config, state.balancer, bias_leaves[0],
                                                              counts)
        biases = jax.tree.unflatten(bias_def, [new_bias])

        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            params=keep(params, state.params),
            biases=keep(biases, state.biases),
            opt_state=keep(opt_state, state.opt_state),
            balancer=keep(balancer, state.balancer),
            step=state.step + 1,
            rng=jax.random.fold_in(state.rng, state.step),
        )
        # A state that changed dtype or shape would make the next call retrace and recompile, and its donated
        # buffers could not be reused: refuse it while tracing.
        changed = layout_differences(state, new_state)
        if changed:
            raise TypeError(f"train step: the state changes layout in one step ({len(changed)} leaves): "
                            + "; ".join(changed))
        totals = counts.sum(axis=-1, keepdims=True)
        metrics = {
            "loss": loss,
            "z_loss": z_sum / denom,
            "grad_norm": grad_norm,
            "target_tokens": count,
            "skipped": (~finite).astype(jnp.int32),
            "dropped_tokens": dropped,  # [L] tokens over an expert capacity (zero when dropless)
            "expert_load": counts[:, :-1] / jnp.maximum(totals, 1.0),  # [L, E]
            "balancing_bias": keep(new_bias, bias_leaves[0])[:, :-1],  # [L, E]
            **bal_metrics,
        }
        if learning_rate is not None:
            metrics["lr"] = learning_rate(state.step)
        return new_state, metrics

    return step_fn


def layout_differences(expected: Any, actual: Any, *, shardings: bool = False) -> list[str]:
    """One line per leaf of `actual` whose shape or dtype (and, with `shardings`, sharding) differs from the same
    leaf of `expected` (arrays, tracers or ShapeDtypeStructs), or one line when the tree structures differ.
    Empty when the two are laid out alike."""
    expected_leaves, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    actual_leaves, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    if expected_def != actual_def:
        return [f"tree structure {actual_def} != {expected_def}"]
    out = []
    for (path, e), (_, a) in zip(expected_leaves, actual_leaves):
        same = (e.shape, e.dtype) == (a.shape, a.dtype)
        if shardings:
            same = same and e.sharding.is_equivalent_to(a.sharding, len(e.shape))
        if not same:
            where = f" {a.sharding} != {e.sharding}" if shardings else ""
            out.append(f"{jax.tree_util.keystr(path)}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}{where}")
    return out


def new_train_state(params: Any, biases: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """The state before the first step: `params` and `biases` (nnx.States) with fresh optimizer and balancer state,
    step 0 and the PRNG key of `seed`. Pure, so it can run under jit (born sharded) or jax.eval_shape."""
    bias = jax.tree.leaves(biases)[0]
    return TrainState(
        params=params,
        biases=biases,
        opt_state=optimizer.init(params),
        balancer=init_balancer(*bias.shape),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )


def init_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, seed: int) -> tuple[
    nnx.GraphDef, TrainState
]:
    """Splits a model into (graphdef, TrainState) with fresh optimizer and balancer state."""
    graphdef, params, biases = nnx.split(model, nnx.Param, BalancingBias)
    return graphdef, new_train_state(params, biases, optimizer, seed)
