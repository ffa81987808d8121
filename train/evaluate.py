"""Held-out answer accuracy: greedy decoding of reasoning prompts and `\\boxed{}` answer matching.

For each record {"prompt", "thinking", "answer"} the model sees `<bos> prompt \\n <think>` (the training format of
train/data/formatting.py up to the start of the reasoning), decodes greedily until `<eos>` or `max_new_tokens`,
and the last `\\boxed{...}` of the decoded text is compared with the record's.

Decoding here recomputes the full forward over a fixed [B, prompt + max_new_tokens] buffer at every step (left-padded
prompts, one compiled `lax.fori_loop`): position t only reads positions <= t, so the not-yet-written tail never
changes what is decoded. O(length^2) but cache-free, which is enough for short synthetic answers.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.data.tokenizers import Tokenizer


def prompt_ids(record: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(record["prompt"] + "\n"), tokenizer.think_id]


def make_greedy_decoder(graphdef: nnx.GraphDef, max_new_tokens: int):
    """-> jitted fn(params, biases, tokens [B, P + N] int32, mask [B, P + N] int32, prompt_len) -> tokens."""

    @jax.jit
    def decode(params, biases, tokens, mask, prompt_len):
        model = nnx.merge(graphdef, params, biases)

        def body(i, carry):
            tokens, mask = carry
            pos = prompt_len + i - 1
            logits = model(tokens, attention_mask=mask)
            next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, pos, axis=1, keepdims=False), axis=-1)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_token.astype(tokens.dtype), pos + 1, axis=1)
            mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones_like(mask[:, 0]), pos + 1, axis=1)
            return tokens, mask

        return jax.lax.fori_loop(0, max_new_tokens, body, (tokens, mask))[0]

    return decode


def greedy_completions(
    decoder, params, biases, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Decodes every record's prompt; returns the generated text (up to the first <eos>)."""
    prompts = [prompt_ids(r, tokenizer) for r in records]
    prompt_len = max(len(p) for p in prompts)
    completions = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - rows)  # one compiled shape for every batch
        tokens = np.full((batch_size, prompt_len + max_new_tokens), tokenizer.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for row, ids in enumerate(chunk):
            tokens[row, prompt_len - len(ids):prompt_len] = ids
            mask[row, prompt_len - len(ids):prompt_len] = 1
        out = np.asarray(decoder(params, biases, jnp.asarray(tokens), jnp.asarray(mask), prompt_len))
        for row in range(rows):
            generated = out[row, prompt_len:].tolist()
            if tokenizer.eos_id in generated:
                generated = generated[: generated.index(tokenizer.eos_id)]
            completions.append(tokenizer.decode(generated))
    return completions
