"""Decode throughput of zaya_jax.generate against transformers' generate, in the same run on the same device.

    python benchmarks/bench_decode.py                                    # zaya1-8b, bf16, batch 1 16 64 (GPU)
    python benchmarks/bench_decode.py --config tiny --prompt-len 64      # a CPU smoke run of the same code

Random weights in the compute dtype. For each batch size: a prompt of --prompt-len random tokens, then
--new-tokens greedy tokens (no stop token). Decode tokens/s = batch * (new_tokens - 1) / (time of the whole
generate - time of a generate of 1 token), so prefill is excluded; each time is the median of --repeats runs
after a warm-up call (compilation excluded).

The bandwidth bound at batch 1: every decoded token reads the active weights once (attention, router, one expert
per layer, the norms and the LM head) and the K/V cache of the tokens before it, so
    bound tokens/s = measured copy bandwidth / (active weight bytes + mean cache bytes read per token),
with the copy bandwidth measured here as (bytes read + bytes written) / time of a large device-to-device copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import copy_bandwidth, median_seconds


def active_weight_bytes(config) -> int:
    from zaya_jax.model import parameter_counts

    counts = parameter_counts(config)
    head = config.vocab_size * config.hidden_size  # the (tied) LM head is read for every token
    return (counts.active_non_embedding + head) * jnp.dtype(config.param_dtype).itemsize


def bench_ours(config, batches, prompt_len, new_tokens, repeats):
    from zaya_jax import generate, init_model
    from zaya_jax.cache import init_cache, kv_bytes_per_token

    model = init_model(config, seed=0)
    rows = {}
    for batch in batches:
        ids = np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt_len)).astype(np.int32)

        def run(n):
            return lambda: generate(model, ids, n, stop_tokens=()).tokens.block_until_ready()

        full, prefill = median_seconds(run(new_tokens), repeats), median_seconds(run(1), repeats)
        rows[batch] = batch * (new_tokens - 1) / (full - prefill)
    cache_per_token = kv_bytes_per_token(init_cache(config, 1, 1))
    return rows, cache_per_token


def bench_transformers(config, batches, prompt_len, new_tokens, repeats):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[config.dtype]
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    with torch.device(device):
        model = transformers.ZayaForCausalLM(hf_config).to(dtype).eval()
    rows = {}
    for batch in batches:
        ids = torch.as_tensor(np.random.default_rng(batch).integers(3, config.vocab_size, (batch, prompt_len)),
                              device=device)

        def run(n):
            def go():
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
                if device == "cuda":
                    torch.cuda.synchronize()
            return go

        full, prefill = median_seconds(run(new_tokens), repeats), median_seconds(run(1), repeats)
        rows[batch] = batch * (new_tokens - 1) / (full - prefill)
    del model
    return rows


def main() -> None:
    from zaya_jax import load_preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="zaya1-8b")
    parser.add_argument("--layers", type=int, default=None, help="override num_layers (a shorter smoke run)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    config = load_preset(args.config)
    overrides = {"param_dtype": args.dtype, "dtype": args.dtype}
    if args.layers:
        overrides["num_layers"] = args.layers
    config = dataclasses.replace(config, **overrides)
    batches = [int(b) for b in args.batches.split(",")]
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.config} "
          f"layers={config.num_layers} {args.dtype}; prompt {args.prompt_len}, {args.new_tokens} new tokens")

    bandwidth = copy_bandwidth(args.copy_gib, args.repeats)
    ours, cache_per_token = bench_ours(config, batches, args.prompt_len, args.new_tokens, args.repeats)
    theirs = {} if args.no_transformers else bench_transformers(config, batches, args.prompt_len, args.new_tokens,
                                                                args.repeats)
    mean_context = args.prompt_len + args.new_tokens / 2
    bytes_per_token = active_weight_bytes(config) + cache_per_token * mean_context
    bound = bandwidth / bytes_per_token
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; per decoded token at batch 1: "
          f"{active_weight_bytes(config) / 1e9:.3f} GB of active weights + {cache_per_token * mean_context / 1e6:.1f} "
          f"MB of cache -> bound {bound:.1f} tokens/s")
    print("| batch | zaya_jax tokens/s | transformers tokens/s | ratio | fraction of batch-1 bound |")
    print("|---|---|---|---|---|")
    for batch in batches:
        hf = theirs.get(batch)
        ratio = f"{ours[batch] / hf:.2f}x" if hf else "n/a"
        fraction = f"{ours[batch] / bound:.2f}" if batch == 1 else ""
        print(f"| {batch} | {ours[batch]:.1f} | {hf:.1f} | {ratio} | {fraction} |" if hf else
              f"| {batch} | {ours[batch]:.1f} | n/a | {ratio} | {fraction} |")


if __name__ == "__main__":
    main()
