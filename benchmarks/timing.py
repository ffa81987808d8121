"""Shared measurement helpers for the benchmarks: medians after a warm-up, and the device's own ceilings.

    median_seconds(fn, repeats)   fn() is called once to warm up (compile), then `repeats` times; it must block
    matmul_peak(size, repeats)    FLOP/s of a bf16 [size, size] @ [size, size] product
    copy_bandwidth(gib, repeats)  bytes/s of a device-to-device copy, counting bytes read plus bytes written
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(size: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    product = jax.jit(lambda x, y: x @ y)
    return 2 * size**3 / median_seconds(lambda: product(a, b).block_until_ready(), repeats)


def copy_bandwidth(gib: float, repeats: int) -> float:
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)  # a multiply, so XLA cannot alias the output to the input
    return 2 * x.size * 4 / median_seconds(lambda: copy(x).block_until_ready(), repeats)
