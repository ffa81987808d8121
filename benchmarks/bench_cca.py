"""CCA attention speed: the XLA reference, cuDNN (the anchor) and the Pallas kernels on the same inputs, one run.

    python benchmarks/bench_cca.py                                  # H100: S = 4k, 16k, 32k at 64k tokens per batch
    ZAYA_PALLAS_INTERPRET=1 python benchmarks/bench_cca.py --seqs 64 --tokens 128 --heads 4 2 --head-dim 16
                                                                    # a CPU smoke run of the same code

Shapes: ZAYA1-8B's compressed attention, 8 query heads sharing 2 KV heads of 128, bf16, causal, one segment.
For each sequence length S (batch = tokens / S): attention forward, and forward + backward (gradients of q, k, v),
for each implementation; then the whole CCA block (`zaya_jax.cca.CCAttention`: projections, the convolution
prologue, attention, output projection) forward + backward with attention_impl xla and pallas.

FLOPs (FlashAttention-2's convention): forward = 4 * B * Hq * S^2 * D / 2 (causal), forward + backward = 3.5 x
forward. The percentage is of the bf16 matmul peak measured here (an 8192^3 product), not the datasheet's.
Times: median of --repeats after a warm-up call (compilation excluded); "OOM" when the implementation runs out of
memory at that size.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from timing import matmul_peak, median_seconds
from zaya_jax.attention import attend


def median_ms(fn, repeats: int) -> float:
    return median_seconds(lambda: jax.block_until_ready(fn()), repeats) * 1e3


def attention_case(impl, q, k, v, segments):
    forward = jax.jit(lambda q, k, v: attend(q, k, v, segments, segments, 0, impl))
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, segments, segments, 0, impl)
                                                     .astype(jnp.float32)), argnums=(0, 1, 2)))
    return (lambda: forward(q, k, v)), (lambda: grads(q, k, v))


def timed(fn, repeats):
    try:
        return median_ms(fn, repeats)
    except Exception as e:  # noqa: BLE001 - report the size that failed and go on with the others
        message = str(e)
        return "OOM" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower() else f"error: {message[:80]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per batch (batch = tokens / seq)")
    parser.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("QUERY", "KV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--impls", nargs="+", default=["xla", "cudnn", "pallas"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-size", type=int, default=8192)
    args = parser.parse_args()

    device = jax.devices()[0]
    peak = matmul_peak(args.peak_size, args.repeats)
    print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}; measured bf16 matmul peak "
          f"{peak / 1e12:.1f} TFLOP/s")
    hq, hkv = args.heads
    d = args.head_dim
    rows = []
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        keys = jax.random.split(jax.random.key(seq), 3)
        q = jax.random.normal(keys[0], (batch, seq, hq, d), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, seq, hkv, d), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, seq, hkv, d), jnp.bfloat16)
        segments = jnp.ones((batch, seq), jnp.int32)
        forward_flops = 4 * batch * hq * seq * seq * d / 2
        for impl in args.impls:
            fwd, fwd_bwd = attention_case(impl, q, k, v, segments)
            for mode, fn, flops in (("forward", fwd, forward_flops), ("forward+backward", fwd_bwd, 3.5 * forward_flops)):
                rows.append((f"attention {impl}", seq, batch, mode, timed(fn, args.repeats), flops))

    from zaya_jax.cca import CCAttention
    from zaya_jax.config import load_preset
    from flax import nnx

    base = dataclasses.replace(load_preset("zaya1-8b"), query_heads=hq, kv_heads=hkv, head_dim=d,
                               param_dtype="bfloat16", dtype="bfloat16")
    for seq in args.seqs:
        batch = max(1, args.tokens // seq)
        x = jax.random.normal(jax.random.key(seq + 1), (batch, seq, base.hidden_size), jnp.bfloat16)
        segments = jnp.ones((batch, seq), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        for impl in ("xla", "pallas"):
            if impl not in args.impls:
                continue
            block = CCAttention(dataclasses.replace(base, attention_impl=impl), rngs=nnx.Rngs(0))
            graphdef, state = nnx.split(block)
            loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, segments, positions).astype(jnp.float32))  # noqa: E731
            step = jax.jit(jax.grad(loss, argnums=(0, 1)))
            rows.append((f"CCA block {impl}", seq, batch, "forward+backward", timed(lambda: step(state, x), args.repeats),
                         None))

    print("| what | seq | batch | pass | ms | TFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|")
    for what, seq, batch, mode, ms, flops in rows:
        if isinstance(ms, float) and flops:
            rate = flops / (ms / 1e3)
            print(f"| {what} | {seq} | {batch} | {mode} | {ms:.2f} | {rate / 1e12:.1f} | {100 * rate / peak:.0f}% |")
        else:
            print(f"| {what} | {seq} | {batch} | {mode} | {ms if isinstance(ms, str) else f'{ms:.2f}'} | | |")


if __name__ == "__main__":
    main()
