"""Held-out answer accuracy: greedy decoding of reasoning prompts and `\\boxed{}` answer matching.

For each record {"prompt", "thinking", "answer"} the model sees `<bos> prompt \\n <think>` (the training format of
train/data/formatting.py up to the start of the reasoning) and decodes greedily with the cache
(`zaya_jax.generate`) until `<eos>` or `max_new_tokens`; train.data.synthetic.answer_accuracy compares the last
`\\boxed{...}` of the completion with the record's.
"""

from __future__ import annotations

from typing import Any, Sequence

from zaya_jax.generate import generate_ids
from zaya_jax.model import ZayaForCausalLM
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
