"""Evaluation on held-out data: the validation loss during training, and the answer accuracy at the end.

Validation loss (train.eval_every): `validation_batches(cfg, tokenizer)` packs data.validation_batches fixed batches
of this process's rows [train.batch_size / processes, seq_len] from the held-out source (the same batches at every
evaluation); `make_validation_loss(graphdef, loss_chunk)` jits (params, biases, batch) -> (summed token loss [],
target tokens []) once, and `validation_loss` averages it over the batches: the training loss's quantity (mean
next-token cross-entropy over target_mask, z-loss excluded) on data the run does not train on. It reads the state
and changes nothing, so a run's trajectory is the same with or without it.

Held-out answer accuracy: greedy decoding of reasoning prompts and `\\boxed{}` answer matching.

For each record {"prompt", "thinking", "answer"} the model sees `<bos> prompt \\n <think>` (the training format of
train/data/formatting.py up to the start of the reasoning) and decodes greedily with the cache
(`zaya_jax.generate`) until `<eos>` or `max_new_tokens`; train.data.synthetic.answer_accuracy compares the last
`\\boxed{...}` of the completion with the record's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.config import TrainConfig
from train.data import make_dataset, open_source
from train.step import Batch, token_losses
from zaya_jax.generate import generate_ids
from zaya_jax.model import ZayaForCausalLM, inference_jit
from zaya_jax.tokenizers import Tokenizer, reasoning_prompt


def greedy_completions(
    model: ZayaForCausalLM, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Decodes every record's prompt; returns the generated text up to the first <eos>."""
    prompts = [reasoning_prompt(tokenizer, r["prompt"]) for r in records]
    generated = generate_ids(model, prompts, max_new_tokens, batch_size=min(batch_size, len(prompts)),
                             pad_id=tokenizer.pad_id, stop_tokens=(tokenizer.eos_id,))
    return [tokenizer.decode(ids) for ids in generated]  # decode drops the <eos>


def validation_batches(cfg: TrainConfig, tokenizer: Tokenizer) -> list[dict[str, np.ndarray]]:
    """This process's rows of the fixed validation batches, packed like the training data."""
    rows = cfg.train.batch_size // jax.process_count()
    source = open_source(cfg.data.resolved_validation_source, on_error=cfg.data.on_error, eos_id=tokenizer.eos_id,
                         seed=cfg.train.seed + 1)
    dataset = make_dataset(source, tokenizer, cfg.data.seq_len, rows, seed=cfg.train.seed,
                           shard_index=jax.process_index(), shard_count=jax.process_count(),
                           completion_only=cfg.data.completion_only, trim=cfg.data.trim,
                           pack_buffer_size=cfg.data.pack_buffer_size, num_threads=0)
    iterator = iter(dataset)
    return [next(iterator) for _ in range(cfg.data.validation_batches)]


def make_validation_loss(graphdef: nnx.GraphDef, loss_chunk: int = 0) -> Callable[[Any, Any, Batch], Any]:
    """The jitted (params, biases, batch) -> (sum of the target tokens' losses, number of target tokens)."""

    def summed(params: Any, biases: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        nll, _, _ = token_losses(graphdef, params, biases, batch, loss_chunk)
        mask = batch["target_mask"]
        return jnp.sum(nll * mask), jnp.sum(mask)

    return inference_jit(summed)


def validation_loss(loss_fn: Callable[[Any, Any, Batch], Any], params: Any, biases: Any,
                    batches: Sequence[Batch]) -> float:
    """Mean token loss over all `batches` (sums accumulated in float64 on the host)."""
    total = count = 0.0
    for batch in batches:
        loss_sum, tokens = jax.device_get(loss_fn(params, biases, batch))
        total, count = total + float(loss_sum), count + float(tokens)
    if count == 0:
        raise ValueError("the validation batches hold no target tokens (data.validation_source)")
    return total / count
