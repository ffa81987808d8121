"""Training throughput: this project's step and transformers' on the same config, batch and device, in one run.

    python benchmarks/bench_train.py --profile /tmp/zaya_profile      # H100: zaya1-8b width, 8 layers, 2 x 4096
    python benchmarks/bench_train.py --config tiny --layers 2 --seq 128 --batch 2 --steps 3 --dtype float32
                                                                      # a CPU smoke run of the same code

The workload (issue defaults): the zaya1-8b preset at full width with --layers layers, --batch x --seq tokens,
bf16 compute with float32 master weights, AdamW, the PID balancer on, real routing from random tokens, dropless.
transformers: `ZayaForCausalLM` with grouped_mm experts and sdpa attention, float32 weights under bf16 autocast,
torch AdamW, the same tokens.

MFU = model FLOPs / (step time x the bf16 matmul peak measured here), with model FLOPs per token =
6 x (active parameters per token: attention, router, one expert, LM head) + 6 x layers x (query heads x head_dim)
x sequence length (train.loop.flops_per_token). Step times: the median of --steps steps after --warmup steps.

--profile DIR also traces 3 steps of ours with the JAX profiler and splits the device time by the model's named
scopes (attention, router, experts, lm_head_loss, optimizer, balancer), collectives (communication) and the rest.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import time
from collections import defaultdict

import jax
import numpy as np
from timing import matmul_peak

from sharding import use_mesh
from train.config import load_train_config
from train.loop import flops_per_token, global_batch, setup
from zaya_jax.config import PRESET_DIR

SCOPES = ("attention", "router", "experts", "lm_head_loss", "optimizer", "balancer")
COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute", "ragged-all-to-all")


def train_config(args):
    overrides = [
        f"model.num_layers={args.layers}", f"model.dtype={args.dtype}", "model.param_dtype=float32",
        f"model.remat_policy={args.remat}", f"model.attention_impl={args.attention}", f"model.moe_impl={args.moe}",
        f"model.expert_capacity_factor={'null' if args.capacity is None else args.capacity}",
        f"data.seq_len={args.seq}", f"train.batch_size={args.batch}", f"train.loss_chunk={args.loss_chunk}",
        "optimizer.name=adamw", "optimizer.warmup_steps=0", "optimizer.total_steps=1000", "balancer.enabled=true",
        "mesh.data=-1",
    ]
    return load_train_config(os.path.join(PRESET_DIR, f"{args.config}.yaml"), overrides)


def random_batch(cfg, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, s = cfg.train.batch_size, cfg.data.seq_len
    tokens = rng.integers(3, cfg.model.vocab_size, (b, s + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, s), np.int32),
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
            "target_mask": np.ones((b, s), np.float32)}


def bench_ours(cfg, steps: int, warmup: int, profile_dir: str | None):
    graphdef, state, step_fn, mesh = setup(cfg)
    batch = global_batch(random_batch(cfg, 0), mesh)
    times = []
    with use_mesh(mesh):
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
        stats = jax.devices()[0].memory_stats() or {}
        breakdown = profile(step_fn, state, batch, profile_dir) if profile_dir else None
    dropped = int(np.asarray(metrics["dropped_tokens"]).sum()) if "dropped_tokens" in metrics else 0
    return float(np.median(times)), stats.get("peak_bytes_in_use"), breakdown, dropped


def profile(step_fn, state, batch, directory: str, steps: int = 3) -> dict[str, float]:
    """Seconds per step by bucket, from the profiler's XLA op events mapped to their HLO op_name metadata."""
    from jax.profiler import ProfileData

    hlo = step_fn.lower(state, batch).compile().as_text()
    bucket_of = {}
    for match in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^\n]*?\b([a-z\-]+)\([^\n]*?op_name=\"([^\"]*)\"", hlo,
                             re.M):
        name, opcode, op_name = match.groups()
        scope = next((s for s in SCOPES if f"/{s}/" in f"/{op_name}/" or f"({s})" in op_name), None)
        if any(c in opcode or c in name for c in COLLECTIVES):
            scope = "communication"
        bucket_of[name] = scope or "other"
    with jax.profiler.trace(directory):
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics["loss"])
    path = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1]
    totals: dict[str, float] = defaultdict(float)
    device_planes = [p for p in ProfileData.from_file(path).planes if p.name.startswith("/device:")]
    planes = device_planes or [p for p in ProfileData.from_file(path).planes if p.name == "/host:CPU"]
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                op = stats.get("hlo_op") or event.name
                if op in bucket_of and "step" in str(stats.get("hlo_module", "step")):
                    totals[bucket_of[op]] += event.duration_ns / 1e9 / steps
    return dict(totals)


def bench_transformers(cfg, steps: int, warmup: int):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.AutoConfig.for_model(**cfg.model.to_hf())
    hf_config._experts_implementation = "grouped_mm"
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.ZayaForCausalLM(hf_config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    batch = random_batch(cfg, 0)
    ids = torch.as_tensor(batch["tokens"], device=device, dtype=torch.long)
    labels = ids  # transformers shifts the labels itself
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.model.dtype == "bfloat16")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return float(np.median(times)), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="zaya1-8b", help="a preset name from configs/")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--remat", default="none", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--attention", default="xla", choices=("xla", "pallas", "cudnn"))
    parser.add_argument("--moe", default="sorted", choices=("sorted", "padded"),
                        help="expert compute: ragged_dot grouped matmul, or the capacity-padded per-expert einsum")
    parser.add_argument("--capacity", type=float, default=None, help="expert_capacity_factor (needed by --moe padded)")
    parser.add_argument("--loss-chunk", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--profile", default=None, metavar="DIR")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()

    cfg = train_config(args)
    device = jax.devices()[0]
    peak = matmul_peak(args.peak_size, 5)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg) * tokens
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; {args.config} "
          f"{cfg.model.num_layers} layers, batch {cfg.train.batch_size} x {cfg.data.seq_len}, {args.dtype} compute; "
          f"measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; {flops_per_token(cfg) / 1e9:.2f} GFLOP per token")
    ours, our_memory, breakdown, dropped = bench_ours(cfg, args.steps, args.warmup, args.profile)
    rows = [("zaya_jax", ours, our_memory)]
    if not args.no_transformers:
        theirs, their_memory = bench_transformers(cfg, args.steps, args.warmup)
        rows.append(("transformers", theirs, their_memory))
    print("| implementation | step ms | tokens/s | MFU | peak memory GB |")
    print("|---|---|---|---|---|")
    for name, seconds, memory in rows:
        gb = f"{memory / 1e9:.1f}" if memory else "n/a"
        print(f"| {name} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {100 * model_flops / seconds / peak:.1f}% "
              f"| {gb} |")
    if len(rows) == 2:
        print(f"zaya_jax / transformers tokens/s: {rows[1][1] / rows[0][1]:.2f}x; dropped tokens: {dropped}")
    if breakdown:
        total = sum(breakdown.values())
        print("| part of our step | ms per step | share |")
        print("|---|---|---|")
        for name, seconds in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {seconds * 1e3:.2f} | {100 * seconds / total:.0f}% |")


if __name__ == "__main__":
    main()
