"""Held-out answer accuracy: greedy decoding of reasoning prompts and `\\boxed{}` answer matching.

For each record {"prompt", "thinking", "answer"} the model sees `<bos> prompt \\n <think>` (the training format of
train/data/formatting.py up to the start of the reasoning) and decodes greedily with the cache
(`zaya_jax.generate`) until `<eos>` or `max_new_tokens`; train.data.synthetic.answer_accuracy compares the last
`\\boxed{...}` of the completion with the record's.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from train.data.tokenizers import Tokenizer
from zaya_jax.generate import generate
from zaya_jax.model import ZayaForCausalLM


def prompt_ids(record: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(record["prompt"] + "\n"), tokenizer.think_id]


def greedy_completions(
    model: ZayaForCausalLM, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], max_new_tokens: int,
    batch_size: int = 64,
) -> list[str]:
    """Decodes every record's prompt; returns the generated text up to the first <eos>."""
    prompts = [prompt_ids(r, tokenizer) for r in records]
    prompt_len = max(len(p) for p in prompts)
    completions = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - rows)  # one compiled shape for every batch
        tokens = np.full((batch_size, prompt_len), tokenizer.pad_id, np.int32)
        mask = np.zeros_like(tokens)
        for row, ids in enumerate(chunk):
            tokens[row, prompt_len - len(ids):] = ids
            mask[row, prompt_len - len(ids):] = 1
        out = generate(model, tokens, max_new_tokens, attention_mask=mask, stop_tokens=(tokenizer.eos_id,))
        generated, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(rows):
            ids = generated[row, :lengths[row]].tolist()
            completions.append(tokenizer.decode([t for t in ids if t != tokenizer.eos_id]))
    return completions
