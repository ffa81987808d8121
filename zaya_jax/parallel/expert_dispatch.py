"""Token dispatch for the top-1 SwiGLU MoE under a mesh: each device dispatches only the tokens it holds.

What it computes (the same y as `zaya_jax.experts.experts_dense`, just distributed):

    x [T, H], expert [T] int, weight [T]              sharded on dim 0 over `token_axes` (e.g. ("data", "expert"))
    gate_up [E, H, 2I], down [E, I, H]
    y_t = weight_t * FFN_{expert_t}(x_t)               y [T, H], sharded like x

The mesh axes are arguments (the model passes those its logical "batch" and "length" axes map to), so that a
global batch is never gathered: each device sorts and groups its own t = T / (product of the token-axis sizes)
tokens, and tokens cross only the expert axis. `experts_sharded` is the entry point the model calls:

- No expert axis: every device runs `experts_sorted` on its t tokens with all E experts' weights (the compiler
  gathers them from wherever they live, e.g. FSDP shards: that is what FSDP does with every weight). No token
  leaves its device; the weights' gradients are summed over the token axes.
- An expert axis of size n > 1: `expert_parallel_ffn`, experts split over that axis, tokens exchanged across it only
  by one of the transports below.

Expert parallelism (`expert_parallel_ffn`): gate_up and down are sharded on dim 0 over `expert_axis`. Inside
`jax.shard_map` each device holds t tokens and E / n experts, where n = size of `expert_axis`. Expert e lives on
expert-shard e // (E / n) as local expert e % (E / n). Tokens are split over the expert axis too (the usual EP
layout), so every device of an expert group both sends and serves.
Tokens of the skip class arrive with weight 0 and a valid expert index: they are moved and computed like any other
token, because d y / d weight_t = FFN(x_t) is needed for the router's gradient even where weight_t = 0.

Transports (b = bytes per activation element; forward pass, per device, per MoE layer; the backward pass moves
the same again, since the transpose of each collective is its mirror: all_to_all <-> all_to_all,
all_gather <-> psum_scatter, ragged_all_to_all <-> ragged_all_to_all):

- "all_to_all": each device packs its tokens into a fixed buffer [n, C, H] (one row of C slots per destination
  expert-shard, slots filled first-come by local token position), `all_to_all` dispatch, grouped matmul over the
  received rows, `all_to_all` combine back into the same slots, unpack, times weight.
      sent = received = 2 * (n - 1) * C * H * b   (+ (n - 1) * C * 4 bytes of int32 local expert ids)
  Dropless (default): C = t, since in the worst case all t local tokens go to one shard -> 2 (n - 1) t H b, i.e. as
  much as "all_gather", and the receive buffer is n * t rows (only ~t of them real; padding rows cost no FLOPs,
  see `_local_ffn`). With `capacity_factor` cf: C = ceil(cf * t / n) -> about 2 cf (n - 1) / n * t H b, and the
  tokens of a (source device, destination shard) pair beyond its C slots are dropped: their output is zero and
  they are counted in the returned `dropped`.
- "all_gather": all-gather x and the expert ids over the expert axis (n * t rows per device), each device runs
  its own experts on the rows routed to them, `psum_scatter` returns each device's rows summed over the shards
  (exactly one shard contributed a nonzero row), times the local weight. Dropless.
      received by all_gather  (n - 1) * t * (H * b + 4)  +  reduce-scatter (n - 1) * t * H * b
  = about 2 (n - 1) t H b, plus an n * t * H activation buffer per device. Simple and robust; fine for small n.
- "ragged_all_to_all": like "all_to_all" but with exact sizes (`jax.lax.ragged_all_to_all`): tokens sorted by
  global expert id (hence by destination shard), only the real rows move. Dropless.
      2 * (t - t_self) * H * b  (+ int32 ids and n^2 int32 sizes), where t_self = tokens whose expert is local:
  about 2 (n - 1) / n * t H b for balanced routing, at most 2 t H b. The receive buffer is still n * t rows (the
  worst case; shapes are static). XLA implements it on GPU and TPU only: on CPU it raises a ValueError.

The per-device FLOPs are those of the tokens actually routed to the device's experts in all three (rows that are
padding or belong to another shard are excluded from the grouped matmul's groups).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from zaya_jax.experts import bucket_slots, capacity_slots, experts_sorted

TRANSPORTS = ("all_to_all", "all_gather", "ragged_all_to_all")
# Platforms whose XLA backend has no ragged_all_to_all (module-level so that a test can emulate the collective).
RAGGED_UNSUPPORTED_PLATFORMS = frozenset({"cpu"})


def _local_ffn(
    x: jax.Array, local_expert: jax.Array, valid: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """Unweighted FFN of the valid rows of x [R, H] on this shard's experts gate_up [El, H, 2I] -> [R, H].

    Invalid rows (padding slots, tokens of other shards) get the out-of-range expert id El: `experts_sorted`
    sorts them last and its bincount(length=El) leaves them out of every group, so the grouped matmul does no
    work for them (with a valid id they would cost up to n times the FLOPs in the dropless buffers). Rows past
    sum(group_sizes) are not guaranteed to be zero by every ragged_dot backend, so they are masked on the way in
    (which also zeroes their cotangent into x) and on the way out.
    """
    num_local = gate_up.shape[0]
    ids = jnp.where(valid, local_expert, num_local).astype(jnp.int32)
    x = jnp.where(valid[:, None], x, jnp.zeros((), x.dtype))
    y = experts_sorted(x, ids, valid.astype(x.dtype), gate_up, down)
    return jnp.where(valid[:, None], y, jnp.zeros((), y.dtype))


def _all_to_all_body(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array, *,
    axis: str, num_shards: int, capacity: int, token_axes: tuple[str, ...],
) -> tuple[jax.Array, jax.Array]:
    t, h = x.shape
    num_local = gate_up.shape[0]
    dest = expert // num_local
    local_expert = expert % num_local
    # Slot of each token in its destination's row of C (first come by position; past C it is dropped). Dropped
    # tokens go to one extra trash row that is sliced off, so the scatter/gather pair stays in bounds and dropped
    # tokens get exactly zero output and zero cotangent.
    slot, kept = bucket_slots(dest, num_shards, capacity)
    trash = num_shards * capacity

    # Scatter-add (not set): slots are unique except the trash row, and add transposes to a plain gather.
    send_x = jnp.zeros((trash + 1, h), x.dtype).at[slot].add(x)[:trash]
    # Local expert id per slot, -1 marks padding (the receiver needs no other metadata: results return to the
    # same slot, and the sender keeps `slot`, i.e. the original position, to itself).
    send_id = jnp.full((trash + 1,), -1, jnp.int32).at[slot].set(local_expert.astype(jnp.int32))[:trash]

    # tiled all_to_all on [n * C, ...]: block d goes to shard d; block s of the result came from shard s.
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)
    recv_id = jax.lax.all_to_all(send_id, axis, 0, 0, tiled=True)
    recv_y = _local_ffn(recv_x, recv_id, recv_id >= 0, gate_up, down)
    back_y = jax.lax.all_to_all(recv_y, axis, 0, 0, tiled=True)

    y = jnp.concatenate([back_y, jnp.zeros((1, h), back_y.dtype)])[slot]
    dropped = jax.lax.psum(jnp.sum(~kept).astype(jnp.int32), token_axes)
    return y * weight[:, None].astype(y.dtype), dropped


def _all_gather_body(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array, *,
    axis: str,
) -> tuple[jax.Array, jax.Array]:
    num_local = gate_up.shape[0]
    # The weight stays local: the reduce-scatter returns unweighted FFN rows, so it need not travel.
    x_all = jax.lax.all_gather(x, axis, axis=0, tiled=True)            # [n * t, H], block s from shard s
    expert_all = jax.lax.all_gather(expert, axis, axis=0, tiled=True)  # [n * t]
    mine = expert_all // num_local == jax.lax.axis_index(axis)
    y_all = _local_ffn(x_all, expert_all % num_local, mine, gate_up, down)
    # Each row is nonzero on exactly one shard, so the sum is that shard's result; block s returns to shard s.
    y = jax.lax.psum_scatter(y_all, axis, scatter_dimension=0, tiled=True)
    return y * weight[:, None].astype(y.dtype), jnp.zeros((), jnp.int32)  # dropless


def _ragged_all_to_all_body(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array, *,
    axis: str, num_shards: int,
) -> tuple[jax.Array, jax.Array]:
    t, h = x.shape
    num_local = gate_up.shape[0]
    me = jax.lax.axis_index(axis)
    # Sorting by global expert id sorts by destination shard (contiguous send slices) and, within each slice,
    # by local expert.
    order = jnp.argsort(expert, stable=True)
    dest_sorted = expert[order] // num_local
    x_sorted = x[order]
    id_sorted = (expert[order] % num_local).astype(jnp.int32)

    send_sizes = jnp.bincount(dest_sorted, length=num_shards).astype(jnp.int32)    # [n] to shard d
    input_offsets = jnp.cumsum(send_sizes) - send_sizes                            # where slice d starts here
    # sizes[s, d] = tokens shard s sends to shard d; tiny [n, n], known to every shard of the group.
    sizes = jax.lax.all_gather(send_sizes, axis, axis=0, tiled=False)
    recv_sizes = sizes[:, me]                                                      # [n] from shard s
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes                             # where s's slice lands here
    # Where my slice lands on receiver d: after the slices of shards s < me.
    output_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]
    # On the way back, my slice for source s lands where s cut it out: s's input offset for me.
    all_input_offsets = jax.lax.all_gather(input_offsets, axis, axis=0, tiled=False)
    back_offsets = all_input_offsets[:, me]

    rows = num_shards * t  # worst case: every token of every shard routed here (static shape)
    recv_x = jax.lax.ragged_all_to_all(x_sorted, jnp.zeros((rows, h), x.dtype), input_offsets, send_sizes,
                                       output_offsets, recv_sizes, axis_name=axis)
    recv_id = jax.lax.ragged_all_to_all(id_sorted, jnp.full((rows,), -1, jnp.int32), input_offsets, send_sizes,
                                        output_offsets, recv_sizes, axis_name=axis)
    valid = jnp.arange(rows) < jnp.sum(recv_sizes)
    recv_y = _local_ffn(recv_x, recv_id, valid, gate_up, down)
    y_sorted = jax.lax.ragged_all_to_all(recv_y, jnp.zeros((t, h), recv_y.dtype), recv_offsets, recv_sizes,
                                         back_offsets, send_sizes, axis_name=axis)
    y = y_sorted[jnp.argsort(order)]  # unsort with a gather (its transpose is a scatter-add)
    return y * weight[:, None].astype(y.dtype), jnp.zeros((), jnp.int32)  # dropless


def expert_parallel_ffn(
    x: jax.Array,
    expert: jax.Array,
    weight: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    mesh: Mesh,
    expert_axis: str = "expert",
    token_axes: tuple[str, ...] = ("data", "expert"),
    transport: str = "all_to_all",
    capacity_factor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """y [T, H] = weight * FFN_expert(x) with experts sharded over `expert_axis`; returns (y, dropped).

    x [T, H], expert [T] int, weight [T]: global arrays, dim 0 split over `token_axes` (which must include
    `expert_axis` unless that has size 1). gate_up [E, H, 2I], down [E, I, H]: dim 0 split over `expert_axis` (other shardings are
    resharded on entry). y is sharded like x. `dropped` is the int32 number of tokens (over all devices) whose
    output was zeroed for lack of capacity; it is 0 unless transport="all_to_all" with a `capacity_factor`.
    Kept-token rule: on each device, tokens bound for one expert-shard take its C slots in order of position.
    Differentiable w.r.t. x, weight, gate_up and down. See the module docstring for the transports' costs.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown expert-parallel transport {transport!r}; valid: {', '.join(TRANSPORTS)}")
    token_axes = tuple(token_axes)
    for name in (expert_axis, *token_axes):
        if name not in mesh.axis_names:
            raise ValueError(f"expert parallelism: axis {name!r} is not in the mesh axes {mesh.axis_names}")
    if expert_axis not in token_axes and mesh.shape[expert_axis] > 1:
        # Tokens replicated over the expert axis would be dispatched once per replica.
        raise ValueError(f"expert parallelism: token_axes {token_axes} must include the expert axis {expert_axis!r}")
    if capacity_factor is not None:
        if transport != "all_to_all":
            raise ValueError(f"capacity_factor applies to transport 'all_to_all' only; {transport!r} is dropless")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    if transport == "ragged_all_to_all":
        # An abstract mesh names its device only when one lowers for another platform; else it is the default's.
        if isinstance(mesh, Mesh):
            platform = mesh.devices.flat[0].platform
        else:
            platform = mesh.abstract_device.platform if mesh.abstract_device else jax.default_backend()
        if platform in RAGGED_UNSUPPORTED_PLATFORMS:
            raise ValueError(f"expert-parallel transport 'ragged_all_to_all' is not supported on the {platform!r} "
                             f"backend (XLA has no ragged_all_to_all there); use 'all_to_all' or 'all_gather'")

    num_shards = mesh.shape[expert_axis]
    num_experts = gate_up.shape[0]
    if num_experts % num_shards:
        raise ValueError(f"expert parallelism: {num_experts} experts do not split over {expert_axis}={num_shards}")
    token_shards = math.prod(mesh.shape[a] for a in token_axes)
    if x.shape[0] % token_shards:
        raise ValueError(f"expert parallelism: {x.shape[0]} tokens do not split over {token_axes} "
                         f"({token_shards} shards)")
    local_tokens = x.shape[0] // token_shards

    body: Callable[..., tuple[jax.Array, jax.Array]]
    if transport == "all_to_all":
        # Slots per (source device, destination shard); room for all t local tokens is dropless.
        capacity = (local_tokens if capacity_factor is None
                    else capacity_slots(local_tokens, num_shards, capacity_factor))

        def body(*args):
            return _all_to_all_body(*args, axis=expert_axis, num_shards=num_shards, token_axes=token_axes,
                                    capacity=capacity)
    elif transport == "all_gather":
        def body(*args):
            return _all_gather_body(*args, axis=expert_axis)
    else:
        def body(*args):
            return _ragged_all_to_all_body(*args, axis=expert_axis, num_shards=num_shards)

    tok = P(token_axes)
    experts = P(expert_axis)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(token_axes, None), tok, tok, experts, experts),
        out_specs=(P(token_axes, None), P()),
    )(x, expert, weight, gate_up, down)


def experts_sharded(
    x: jax.Array,
    expert: jax.Array,
    weight: jax.Array,
    gate_up: jax.Array,
    down: jax.Array,
    *,
    mesh: Mesh,
    token_axes: tuple[str, ...],
    expert_axis: str | None = None,
    transport: str = "all_to_all",
    capacity_factor: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """y [T, H] = weight * FFN_expert(x) with every device dispatching only its own tokens; returns (y, dropped).

    x [T, H], expert [T] int, weight [T]: global arrays whose dim 0 is split over the mesh axes `token_axes`.
    gate_up [E, H, 2I], down [E, I, H]. With `expert_axis` None, each device runs the sorted grouped matmul on its
    tokens with every expert's weights; with an expert axis, `expert_parallel_ffn` (experts split over it, tokens
    exchanged across it by `transport`, `capacity_factor` as there). A token count that does not split over
    `token_axes` (decoding a few rows on many devices) is padded with zero-weight tokens, which take no capacity
    only when dispatch is dropless, so a capacity factor then is an error. `dropped` is as in `expert_parallel_ffn`.
    """
    token_axes = tuple(token_axes)
    for name in token_axes:
        if name not in mesh.axis_names:
            raise ValueError(f"expert dispatch: token axis {name!r} is not in the mesh axes {mesh.axis_names}")
    num_tokens = x.shape[0]
    pad = -num_tokens % math.prod(mesh.shape[a] for a in token_axes)
    if pad:
        if capacity_factor is not None:
            raise ValueError(f"expert dispatch: {num_tokens} tokens do not split over {token_axes}; padding them "
                             f"would take capacity, so a capacity_factor needs a token count that splits")
        x = jnp.pad(x, ((0, pad), (0, 0)))
        expert, weight = jnp.pad(expert, (0, pad)), jnp.pad(weight, (0, pad))
    if expert_axis is None:
        if capacity_factor is not None:
            raise ValueError("expert dispatch: capacity_factor needs an expert axis (local dispatch is dropless)")
        tok = P(token_axes or None)
        y = jax.shard_map(experts_sorted, mesh=mesh, in_specs=(P(token_axes or None, None), tok, tok, P(), P()),
                          out_specs=P(token_axes or None, None))(x, expert, weight, gate_up, down)
        dropped = jnp.zeros((), jnp.int32)
    else:
        y, dropped = expert_parallel_ffn(x, expert, weight, gate_up, down, mesh=mesh, expert_axis=expert_axis,
                                         token_axes=token_axes, transport=transport, capacity_factor=capacity_factor)
    return (y[:num_tokens] if pad else y), dropped
