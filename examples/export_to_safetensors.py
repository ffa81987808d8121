"""Export a zaya-train run to transformers-format safetensors and check that transformers reads the same model.

    python examples/export_to_safetensors.py runs/tiny hf/tiny [--dtype bfloat16] [--max-shard-size 2GB]

Writes config.json, the safetensors shards and their index (what `zaya-export` writes), then loads the directory
with `transformers.ZayaForCausalLM.from_pretrained` (when transformers is installed) and compares its logits with
ours on random tokens.
"""

from __future__ import annotations

import argparse

import numpy as np

from train.cli import load_run_model
from zaya_jax import load_pretrained, save_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()

    model, _ = load_run_model(args.run_dir)
    save_pretrained(model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype)
    print(f"wrote {args.out}")
    ours = load_pretrained(args.out)
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 16))
    logits = np.asarray(ours(ids))
    try:
        import torch
        import transformers
    except ImportError:
        print("transformers is not installed: wrote the checkpoint, skipped the cross-check")
        return
    hf = transformers.ZayaForCausalLM.from_pretrained(args.out)
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.float().numpy()
    print(f"transformers vs zaya_jax logits: max |difference| / max |logit| = "
          f"{np.abs(theirs - logits).max() / np.abs(logits).max():.2e}")


if __name__ == "__main__":
    main()
