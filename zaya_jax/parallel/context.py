"""Context parallelism: a sequence split over the mesh axis the logical "length" axis maps to (`context`).

The dual-chunk layout. With N context shards a row of S tokens is cut into 2N chunks of c = S / (2N) tokens and
shard i holds real chunks i and 2N-1-i, so every shard gets the same causal attention work (the sum of its two
chunks' key prefixes is (2N + 1) c for every i). `dual_chunk_order(S, N)` is that order: layout position p holds
real token order[p]; the data path lays every [B, S] batch array out in it (`to_dual_chunks`, exact; its inverse
`from_dual_chunks`), and the batch carries each token's real index (`sequence_index`), its RoPE positions and
segment ids, so the model undoes nothing. In the mesh's layout order, shard i's [B, 2c] slice is its two chunks.

Inside `jax.shard_map` over the context axis (manual over it and the batch's axes, so each device holds its own
rows of its two chunks; the other axes stay with the compiler):

    exchange_halo(tails [B, 2, ...])  -> [B, 2, ...]   each local chunk receives the tail of the chunk that precedes
        it in the real sequence (zeros for chunk 0): chunk i's from shard i-1 (one ppermute i -> i+1), chunk
        2N-1-i's from shard i+1 (one ppermute i+1 -> i), except chunk N, whose predecessor N-1 is on its own shard.
        Only the tails move; the backward of each ppermute is the reverse permutation.
    attend_chunks(q [B, 2c, Hq, D], k, v [B, 2c, Hkv, D], segments [B, 2c], sequence_index [B, 2c], impl)
        -> [B, 2c, Hq, D]: all-gathers K, V and the key segment ids over the axis (CCA's compressed K/V are an
        eighth of multi-head attention's, so gathering beats a ring), puts them back in real order, and attends
        each local chunk to them with its real start as the query start (`zaya_jax.attention.attend`, any impl).
        The backward of the all-gather is a reduce-scatter of dK and dV.

`context_split()` says whether the model runs context-parallel: the installed rules map "length" to one mesh axis
of size > 1 (sharding/rules.py maps it to `context`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.attention import attend
from zaya_jax.axis_rules import mesh_axes


def dual_chunk_order(seq_len: int, shards: int) -> np.ndarray:
    """[S] int: the real index of the token at each position of the dual-chunk layout over `shards` shards."""
    if shards < 1:
        raise ValueError(f"dual-chunk layout: the number of context shards must be >= 1, got {shards}")
    if shards == 1:
        return np.arange(seq_len)
    if seq_len % (2 * shards):
        raise ValueError(f"dual-chunk layout: a sequence of {seq_len} tokens does not split into 2 x {shards} = "
                         f"{2 * shards} equal chunks (context {shards}); use a length divisible by {2 * shards}")
    c = seq_len // (2 * shards)
    chunks = [j for i in range(shards) for j in (i, 2 * shards - 1 - i)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def to_dual_chunks(x: Any, shards: int, axis: int = 1) -> Any:
    """x in real order along `axis` -> the dual-chunk layout (numpy or jax arrays; a pure gather, exact)."""
    return _take(x, dual_chunk_order(x.shape[axis], shards), axis)


def from_dual_chunks(x: Any, shards: int, axis: int = 1) -> Any:
    """The inverse of `to_dual_chunks`: the dual-chunk layout along `axis` -> real order."""
    return _take(x, np.argsort(dual_chunk_order(x.shape[axis], shards)), axis)


def _take(x: Any, order: np.ndarray, axis: int) -> Any:
    if isinstance(x, np.ndarray):
        return np.take(x, order, axis=axis)
    return jnp.take(x, jnp.asarray(order), axis=axis)


def context_split() -> tuple[Any, str] | None:
    """(mesh, context axis) when the model is traced under a mesh whose "length" rule splits the sequence; else
    None (one device, or a mesh with context 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    axes = mesh_axes(("length",), mesh)
    if not axes:
        return None
    if len(axes) > 1:
        raise ValueError(f"context parallelism: the sequence is split over several mesh axes {axes}; one is "
                         f"supported")
    return mesh, axes[0]


def exchange_halo(tails: Any, axis: str, shards: int) -> Any:
    """Inside shard_map over `axis`: tails, a pytree of [B, 2, ...] (per local chunk, what the next chunk of the
    real sequence needs from it) -> per local chunk, the tail of its real predecessor (zeros for real chunk 0)."""
    me = jax.lax.axis_index(axis)
    up = [(i, i + 1) for i in range(shards - 1)]  # chunk i's tail -> chunk i + 1 (first local chunk)
    down = [(i + 1, i) for i in range(shards - 1)]  # chunk 2N-1-(i+1)'s tail -> chunk 2N-1-i (second local chunk)

    def one(tail: jax.Array) -> jax.Array:
        first = jax.lax.ppermute(tail[:, 0], axis, up)
        second = jax.lax.ppermute(tail[:, 1], axis, down)
        # Real chunk N (the last shard's second) follows real chunk N-1, its own first.
        second = jnp.where(me == shards - 1, tail[:, 0], second)
        return jnp.stack([first, second], axis=1)

    return jax.tree.map(one, tails)


def attend_chunks(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array, sequence_index: jax.Array,
                  impl: str, axis: str, shards: int) -> jax.Array:
    """Inside shard_map over `axis` (module docstring): this shard's two chunks attend to the whole sequence."""
    b, local, hq, d = q.shape
    c = local // 2
    gather = lambda x: from_dual_chunks(jax.lax.all_gather(x, axis, axis=1, tiled=True), shards)  # noqa: E731
    k_all, v_all, kv_segments = gather(k), gather(v), gather(segments)
    outs = []
    for j in range(2):
        chunk = slice(j * c, (j + 1) * c)
        # Every row shares the layout, so row 0's first real index is the chunk's start in every row.
        outs.append(attend(q[:, chunk], k_all, v_all, segments[:, chunk], kv_segments, sequence_index[0, j * c],
                           impl))
    return jnp.concatenate(outs, axis=1)


def over_context(fn, mesh: Any, axis: str, args: tuple, sequence_args: tuple[bool, ...], out_ndims: tuple[int, ...],
                 every_axis_manual: bool = False):
    """Runs fn(*args) in shard_map, manual over `axis` and the mesh axes of the logical "batch" axis (so that each
    device runs on its own rows; the other mesh axes, `tensor`, stay with the compiler): args flagged in
    `sequence_args` are [B, S, ...] arrays split on B over the batch axes and on S over `axis`, the others
    replicated; every output is split like the flagged args.

    The mesh's size-1 axes are manual too: they split nothing. `every_axis_manual` makes `tensor` manual as well,
    for what runs only in a program manual over the whole mesh: the host callbacks the Pallas interpreter
    (ZAYA_PALLAS_INTERPRET=1) lowers its kernels to, and cuDNN's fused attention, whose custom partitioning fails
    inside a shard_map with automatic axes. On a mesh with tensor > 1 each tensor device then computes every head
    of its rows (the replicated args are gathered whole): the same numbers without the tensor split. The compiled
    Pallas kernels and xla keep `tensor` with the compiler.
    check_vma=False: a pallas_call's out_shape does not say over which manual axes its output varies, which the
    varying-axes check requires of every value; fn's outputs all vary over the batch and context axes, as the
    out_specs say, and the gradients are unchanged (tests/sharding/test_context.py compares them, xla and pallas)."""
    batch = mesh_axes(("batch",), mesh)
    P = jax.sharding.PartitionSpec
    seq = lambda ndim: P(batch or None, axis, *([None] * (ndim - 2)))  # noqa: E731
    in_specs = tuple(jax.tree.map(lambda x: seq(x.ndim) if split else P(), a) for a, split in zip(args, sequence_args))
    out_specs = tuple(seq(n) for n in out_ndims)
    if every_axis_manual:
        manual = set(mesh.axis_names)
    else:
        manual = {*batch, axis, *(a for a, size in mesh.shape.items() if size == 1)}
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual,
                         check_vma=False)(*args)
