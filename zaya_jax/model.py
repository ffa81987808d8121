"""The ZAYA1 decoder: embedding affine, a scan over stacked CCA + MoE layers, final norm, tied LM head.

    ids [B, S] -> e = (embed[ids] + b_in) * s_in                      float32 residual stream r [B, S, H]
    per layer l (stacked parameters, one `jax.lax.scan`, so compile time does not grow with depth):
        r = ResScale_attn(CCA(RMSNorm(r)), r)
        h, router_state = MoE(RMSNorm(r), router_state)               # EDA: router_state flows layer to layer
        r = ResScale_moe(h, r)
    logits = RMSNorm(r) @ embed^T                                     [B, S, V] float32

`segment_ids` [B, S] keep packed documents (and left padding, from `attention_mask`) apart in attention, in the CCA
convolutions and in the value shift; `positions` [B, S] are the RoPE positions (default 0..S-1, as transformers'
forward uses even with left padding). The forward can also return the expert choice of every token in every
layer, `choices` [L, B, S] int32 (0..E-1, E = skip), which the balancer counts.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zaya_jax.cache import Cache, LayerCache
from zaya_jax.cca import CCAttention
from zaya_jax.config import ZayaConfig
from zaya_jax.layers import Affine, RMSNorm, ResidualScaling, compute_dtype, constrain, dense_init, matmul
from zaya_jax.moe import MoE

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nnx.Module):
    """One ZAYA1 layer (CCA + MoE with learned residual scaling); the residual stream is float32."""

    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.input_norm = RMSNorm(config, config.hidden_size)
        self.attn = CCAttention(config, rngs=rngs)
        self.post_attn_scale = ResidualScaling(config)
        self.post_attn_norm = RMSNorm(config, config.hidden_size)
        self.moe = MoE(config, rngs=rngs)
        self.post_moe_scale = ResidualScaling(config)

    def __call__(
        self, residual: jax.Array, router_state: jax.Array, segment_ids: jax.Array, positions: jax.Array,
        sequence_index: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """residual [B, S, H] f32, router_state [B, S, R] -> (residual, router_state, (choice [B, S], dropped []))."""
        dtype = compute_dtype(self.config)
        # Named scopes label the profile (benchmarks/bench_train.py splits step time by them).
        with jax.named_scope("attention"):
            h = self.attn(self.input_norm(residual.astype(dtype)), segment_ids, positions, sequence_index)
        residual = self.post_attn_scale(h, residual)
        h, router_state, choice, dropped = self.moe(self.post_attn_norm(residual.astype(dtype)), router_state)
        return constrain(self.post_moe_scale(h, residual), "residual"), router_state, (choice, dropped)

    def cached(
        self, residual: jax.Array, router_state: jax.Array, positions: jax.Array, valid: jax.Array,
        cache: LayerCache, start: jax.Array,
    ) -> tuple[jax.Array, jax.Array, LayerCache]:
        """The layer for S new tokens at cache slots start.. (see CCAttention.cached)."""
        dtype = compute_dtype(self.config)
        h, cache = self.attn.cached(self.input_norm(residual.astype(dtype)), positions, valid, cache, start)
        residual = self.post_attn_scale(h, residual)
        h, router_state, _, _ = self.moe(self.post_attn_norm(residual.astype(dtype)), router_state)
        return self.post_moe_scale(h, residual), router_state, cache


class Routing(NamedTuple):
    choices: jax.Array  # [L, B, S] int32, 0..E (E = skip class)
    dropped_tokens: jax.Array  # [L] int32: tokens over an expert capacity (always 0 when dropless)


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, S, V] float32
    choices: jax.Array  # [L, B, S] int32, 0..E (E = skip class)
    dropped_tokens: jax.Array  # [L] int32


class ZayaForCausalLM(nnx.Module):
    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = dense_init(config, rngs, (config.vocab_size, config.hidden_size))
        self.input_affine = Affine(config, config.hidden_size)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config, config.hidden_size)
        if not config.tie_word_embeddings:
            self.lm_head = dense_init(config, rngs, (config.hidden_size, config.vocab_size))

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        sequence_index: jax.Array | None = None,
        return_choices: bool = False,
    ) -> jax.Array | ForwardOutput:
        """input_ids [B, S] -> logits [B, S, V] float32 (or `ForwardOutput` with the per-layer expert choices).

        attention_mask [B, S] (1 = token, 0 = padding) is transformers' convention; segment_ids [B, S] (equal ids
        = same document) is the packed-data one. Give one or the other.
        """
        hidden, routing = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                             sequence_index=sequence_index)
        logits = self.logits(hidden)
        return ForwardOutput(logits, *routing) if return_choices else logits

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        sequence_index: jax.Array | None = None,
    ) -> tuple[jax.Array, Routing]:
        """input_ids [B, S] -> (final-normed hidden [B, S, H] in the compute dtype, Routing of every layer).

        sequence_index [B, S]: the real index of every token, needed under a context-parallel mesh, where the
        tokens (and every other [B, S] input) come in the dual-chunk layout (zaya_jax/parallel/context.py);
        without a context split the tokens are in order and it is not needed."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        input_ids = jnp.asarray(input_ids)
        check_token_ids(input_ids, cfg.vocab_size)
        if attention_mask is not None and segment_ids is not None:
            raise ValueError("give attention_mask (padding) or segment_ids (packed documents), not both")
        if segment_ids is None:
            segment_ids = (
                jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
                else jnp.asarray(attention_mask).astype(jnp.int32)
            )
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)

        residual = self._embed(input_ids)
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, state):
            residual, router_state = carry
            layer = nnx.merge(graphdef, state)
            residual, router_state, routing = layer(residual, router_state, segment_ids, positions, sequence_index)
            return (residual, router_state), routing

        if cfg.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        router_state = jnp.zeros((*input_ids.shape, cfg.router_hidden_size), dtype)
        (residual, _), (choices, dropped) = jax.lax.scan(body, (residual, router_state), layer_state)
        return self.final_norm(residual.astype(dtype)), Routing(choices, dropped)

    def cached_forward(
        self, input_ids: jax.Array, positions: jax.Array, new_valid: jax.Array, cache: Cache, *,
        last_only: bool = False,
    ) -> tuple[jax.Array, Cache]:
        """Runs S new tokens against the cache: input_ids, positions, new_valid [B, S] (new_valid 0 marks left
        padding) -> (logits [B, S, V] float32, the cache with the S tokens appended).

        last_only: logits of the last new token only, [B, 1, V], which is all a prefill needs (prompts are
        left-padded, so the last token is every row's last real one); [B, S, V] float32 would be 69 GB for
        ZAYA1's 262,272-token vocabulary at batch 8 and an 8K prompt."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, new_valid.astype(jnp.int32), cache.length, axis=1)
        residual = self._embed(input_ids)
        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, layer_inputs):
            residual, router_state = carry
            state, layer_cache = layer_inputs
            layer = nnx.merge(graphdef, state)
            residual, router_state, layer_cache = layer.cached(
                residual, router_state, positions, valid, layer_cache, cache.length)
            return (residual, router_state), layer_cache

        router_state = jnp.zeros((*input_ids.shape, cfg.router_hidden_size), dtype)
        (residual, _), layers = jax.lax.scan(body, (residual, router_state), (layer_state, cache.layers))
        if last_only:
            residual = residual[:, -1:]
        logits = self.logits(self.final_norm(residual.astype(dtype)))
        return logits, Cache(layers, valid, cache.length + input_ids.shape[1])

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        """ids [B, S] -> the float32 residual stream (embedding and its learned affine)."""
        embedded = jnp.take(self.embed[...], constrain(input_ids, "tokens"), axis=0).astype(compute_dtype(self.config))
        return constrain(self.input_affine(embedded).astype(jnp.float32), "residual")

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., H] -> logits [..., V] float32 (tied: against the embedding)."""
        hidden = hidden.astype(compute_dtype(self.config))
        if self.config.tie_word_embeddings:
            logits = matmul(hidden, self.embed[...], transpose_w=True, out_dtype=jnp.float32)
        else:
            logits = matmul(hidden, self.lm_head[...], out_dtype=jnp.float32)
        return constrain(logits, "logits") if logits.ndim == 3 else logits


def check_token_ids(input_ids: jax.Array, vocab_size: int) -> None:
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got {input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
    if isinstance(input_ids, jax.core.Tracer):
        return  # values unknown while tracing; eager calls are checked below
    values = np.asarray(input_ids)  # numpy, so a concrete array captured inside a jit trace is still checked
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def init_model(config: ZayaConfig, seed: int = 0) -> ZayaForCausalLM:
    """A freshly initialised model. Initialisation runs as one compiled program, cached per config, because
    eager per-parameter random draws cost a compile each (seconds for even the tiny preset on CPU)."""
    graphdef, create = _compiled_init(config)
    return nnx.merge(graphdef, create(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _compiled_init(config: ZayaConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0))))
    # Initialisation runs once and is memory-bound: skipping backend optimisation cuts its compile ~5x on CPU.
    return graphdef, jax.jit(
        lambda key: nnx.state(ZayaForCausalLM(config, rngs=nnx.Rngs(key))),
        compiler_options={"xla_backend_optimization_level": 0},
    )


def inference_jit(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` for a program that runs the layer scan without differentiating it (a forward,
    a prefill, a decode loop). On CPU it turns off XLA's while-loop-invariant code motion: XLA:CPU computes a
    bfloat16 matmul in float32, and that pass hoists the float32 conversion of every stacked weight out of the
    scan, a float32 copy of all the layers (2x the bfloat16 weights: 35 GB for ZAYA1-8B, which then does not fit
    a 24 GB machine). Without it each layer's weights are converted inside the loop, one layer at a time."""
    if jax.default_backend() != "cpu":
        return jax.jit(fn, **jit_kwargs)
    return _CPUInferenceProgram(fn, jit_kwargs)


class _CPUInferenceProgram:
    """Called at the top level: compiled with the option above. Called inside another trace (a caller's jit,
    make_jaxpr), where JAX refuses compiler options: a plain nested jit, and the outer program decides."""

    def __init__(self, fn, jit_kwargs: dict):
        options = {**(jit_kwargs.pop("compiler_options", None) or {}),
                   "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
        self._top = jax.jit(fn, compiler_options=options, **jit_kwargs)
        self._nested = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return (self._nested if traced else self._top)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._top.lower(*args, **kwargs)


class ParameterCounts(NamedTuple):
    total: int  # every checkpoint parameter, the (tied) embedding included; balancing biases are buffers, not counted
    embedding: int
    non_embedding: int
    active_non_embedding: int  # what one token uses: attention, router, norms, scales and one expert per layer


def parameter_counts(config: ZayaConfig) -> ParameterCounts:
    """Counts parameters from shapes alone (`nnx.eval_shape`): nothing is allocated, so the 8B preset is cheap."""
    abstract = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    total = sum(int(x.size) for x in jax.tree.leaves(params))
    total -= config.router_hidden_size  # layer 0's EDA scale multiplies a zero state; not a checkpoint parameter
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    experts = params["layers"]["moe"]["experts"]
    expert_params = sum(int(x.size) for x in jax.tree.leaves(experts))
    inactive = expert_params * (config.num_experts - config.experts_per_token) // config.num_experts
    non_embedding = total - embedding
    return ParameterCounts(total, embedding, non_embedding, non_embedding - inactive)
