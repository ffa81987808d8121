"""Fine-tune from transformers-format weights (e.g. Zyphra/ZAYA1-8B, or a zaya-export of your own run).

    python examples/finetune.py --base hf/tiny --data my_data.jsonl --run-dir runs/finetune --steps 200
    python examples/finetune.py --base /models/ZAYA1-8B --config configs/zaya1-8b.yaml \
        --tokenizer /models/ZAYA1-8B/tokenizer.json --data sft.jsonl --set mesh.fsdp=8

The model section comes from the checkpoint (its architecture) and the config file (how it runs: dtypes, remat,
MoE dispatch); optimizer, data and run settings come from the config file and the flags. The result is a normal
zaya-train run directory: resume it with zaya-train --config RUN_DIR/config.yaml, export it with zaya-export.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from train.config import load_train_config
from train.loop import RUNTIME_FIELDS, run_training
from zaya_jax.config import ZayaConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="transformers-format directory with the starting weights")
    parser.add_argument("--config", default="configs/tiny.yaml", help="optimizer / data / train settings")
    parser.add_argument("--data", required=True, help="data.source: a .jsonl, .arrayrecord or .npy path, or synthetic")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    parser.add_argument("--run-dir", default="runs/finetune")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)

    try:
        summary = finetune(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"finetune: error: {e}") from None
    print(summary)


def finetune(args: argparse.Namespace):
    cfg = load_train_config(args.config, [
        f"data.source={args.data}", f"data.tokenizer={args.tokenizer}", f"train.run_dir={args.run_dir}",
        f"train.steps={args.steps}", f"optimizer.total_steps={args.steps}", f"optimizer.lr={args.lr}",
        f"train.init_from={args.base}", *args.overrides,
    ])
    config_json = os.path.join(args.base, "config.json")
    if not os.path.isfile(config_json):
        raise FileNotFoundError(f"{args.base} has no config.json (not a transformers-format directory)")
    with open(config_json) as f:
        architecture = ZayaConfig.from_hf(json.load(f))
    model = dataclasses.replace(architecture, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})
    return run_training(dataclasses.replace(cfg, model=model))


if __name__ == "__main__":
    main()
