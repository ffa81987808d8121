"""Context parallelism on 8 CPU devices: a sequence split over the `context` axis (dual-chunk layout, CCA halo by
ppermute, all-gathered K/V) computes what the unsplit model computes: logits, loss, every parameter gradient (with
xla attention, and with the Pallas kernels in their interpreter) and one full training step (with gradient
accumulation and the chunked loss), with packed documents, a document starting on a chunk boundary and left
padding."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sharding import (MeshConfig, batch_sharding, init_sharded_model, make_mesh, train_state_shardings,
                      use_mesh)
from sharding.rules import state_shardings
from tests.tolerances import ADAM_DEPTH, assert_float32_close, model_depth, model_terms
from train.balancer import BalancerConfig
from train.checkpoint import Checkpointer
from train.config import load_train_config
from train.hlo_collectives import collective_operand_shapes
from train.loop import to_nested_dict
from train.optim import OptimizerConfig, make_optimizer
from train.state import abstract_batch, abstract_train_state, initial_train_state, jit_train_step
from train.step import init_train_state, make_train_step, step_batch
from zaya_jax import ZayaForCausalLM, init_model
from zaya_jax.parallel.context import dual_chunk_order, from_dual_chunks, to_dual_chunks

# A vocabulary of 264 (tiny.yaml's 261 + 3) splits over tensor = 2, which shards the embedding over it.
BASE = load_train_config("configs/tiny.yaml").model.replace(num_layers=1, vocab_size=264)
ROWS, SEQ = 4, 32
# The CPU backend's LLVM passes at their lowest: the HLO (SPMD partitioning, collectives, fusion) is the one the
# default level gives and the numbers are within the same float32 bounds, at about half the compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# (mesh, conv kernels (depthwise, grouped), moe_impl, attention_impl): kernels 1, 2 and 3, halo widths K = 3 and 2
# (each under xla and K = 3 under pallas too); at context 8 the chunks are 2 tokens, so the halo is a whole chunk.
# Cases with equal kernels share their unsplit reference, which runs xla attention. "pallas" runs the Pallas
# kernels in the interpreter on this CPU: the fused prologue on each local chunk after its received conv history,
# flash attention once per local chunk with its real query start. Every mesh axis splits something in some case:
# expert and tensor with the interpreter (whose host callbacks make the context shard_map manual over every axis),
# fsdp and tensor with xla (tensor left to the compiler inside the shard_map, the parameters gathered over fsdp).
CASES = {
    "expert2_context2_tensor2_pallas": (MeshConfig(data=1, expert=2, context=2, tensor=2), (2, 3), "expert_parallel",
                                        "pallas"),
    "context4": (MeshConfig(data=-1, context=4), (3, 1), "sorted", "xla"),
    "context8": (MeshConfig(data=1, context=8), (3, 1), "sorted", "xla"),
    "data2_context2_expert2": (MeshConfig(data=2, expert=2, context=2), (2, 3), "expert_parallel", "xla"),
    "fsdp2_context2_tensor2": (MeshConfig(data=1, fsdp=2, context=2, tensor=2), (3, 1), "sorted", "xla"),
}
PALLAS_KERNELS = ("cca_prologue", "cca_prologue_backward", "cca_flash_forward", "cca_flash_dq", "cca_flash_dkv")


def _config(case: str):
    _, (k_dw, k_gr), moe_impl, attention_impl = CASES[case]
    return BASE.replace(conv_kernel_depthwise=k_dw, conv_kernel_grouped=k_gr, moe_impl=moe_impl,
                        attention_impl=attention_impl)


def _documents() -> np.ndarray:
    """[ROWS, SEQ] segment ids (0 = padding): left padding and documents crossing every chunk size's boundaries,
    one starting exactly on the boundary of the 2-, 4-, 8- and 16-token chunks (index 16), many short ones."""
    seg = np.zeros((ROWS, SEQ), np.int32)
    seg[0, 3:] = 1                                                   # 3 tokens of left padding, one document
    seg[1, :16], seg[1, 16:] = 1, 2                                  # a document starts on a boundary
    seg[2] = np.repeat(np.arange(1, 12), 3)[:SEQ]                    # 3-token documents: cross every boundary
    seg[3, :5], seg[3, 5:27], seg[3, 27:] = 1, 2, 3
    return seg


@pytest.fixture(scope="module")
def batch():
    return _make_batch(seed=0)


def _make_batch(seed: int) -> dict[str, np.ndarray]:
    """The [ROWS, SEQ] arrays of a pipeline batch over `_documents()`, with tokens drawn from `seed`."""
    rng = np.random.default_rng(seed)
    seg = _documents()
    tokens = np.where(seg > 0, rng.integers(5, BASE.vocab_size, (ROWS, SEQ)), 0).astype(np.int32)
    starts = np.concatenate([np.ones((ROWS, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    index = np.broadcast_to(np.arange(SEQ), (ROWS, SEQ))
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = np.where(seg > 0, index - start_index, 0).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((ROWS, 1), np.int32)], axis=1)
    target_mask = np.concatenate([(seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0), np.zeros((ROWS, 1), bool)], 1)
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "targets": targets,
            "target_mask": target_mask.astype(np.float32)}


def init_model_abstract(config):
    return nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))


def _loss_and_logits(graphdef, params, rest, batch):
    """Mean next-token cross-entropy over target_mask, and the logits [B, S, V] (aux)."""
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                   sequence_index=batch["sequence_index"])
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    mask = batch["target_mask"]
    return jnp.sum(nll * mask) / jnp.sum(mask), logits


_grad = jax.value_and_grad(_loss_and_logits, argnums=1, has_aux=True)


@pytest.fixture(scope="module")
def compiled_cases(batch):
    """Per case: the unsplit reference (loss, logits, grads), the split run's (logits back in real order), and
    the compiled split program's HLO text."""
    out, references = {}, {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("ZAYA_PALLAS_INTERPRET", "1")  # the pallas case's kernels, in the interpreter
        for case, (mesh_config, kernels, _, _) in CASES.items():
            config = _config(case)
            # The unsplit reference runs on one device, where the experts are dispatched "sorted", with xla attention.
            model = init_model(config.replace(moe_impl="sorted", attention_impl="xla"), seed=0)
            if kernels not in references:
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)
                unsplit = {k: jnp.asarray(v) for k, v in step_batch(batch).items()}
                compiled = jax.jit(_grad, static_argnums=0).lower(graphdef, params, rest, unsplit).compile(
                    FAST_COMPILE)
                references[kernels] = jax.device_get(compiled(params, rest, unsplit))
            got, hlo = _split_run(model, config, mesh_config, batch)
            out[case] = {"ref": references[kernels], "got": got, "hlo": hlo, "config": config}
    return out


def _split_run(model, config, mesh_config: MeshConfig, batch):
    """(loss, logits back in real order, grads) of `model`'s weights run as `config` on the split mesh, and the
    compiled program's HLO text."""
    mesh = make_mesh(mesh_config)
    shards = mesh_config.context
    state = nnx.state(model)
    graphdef, params, rest = nnx.split(nnx.merge(nnx.graphdef(init_model_abstract(config)),
                                                 jax.device_put(state, state_shardings(state, mesh))),
                                       nnx.Param, ...)
    laid = jax.device_put(step_batch(batch, shards), batch_sharding(mesh))
    with use_mesh(mesh):
        compiled = jax.jit(_grad, static_argnums=0).lower(graphdef, params, rest, laid).compile(FAST_COMPILE)
    (loss, logits), grads = compiled(params, rest, laid)
    return jax.device_get((loss, from_dual_chunks(np.asarray(logits), shards), grads)), compiled.as_text()


@pytest.mark.parametrize("case", list(CASES))
def test_split_sequence_equals_unsplit(case, compiled_cases):
    """Logits, loss and every parameter gradient at context 4, 8, data2 x context2 x expert2 (expert parallelism:
    tokens of every context shard go through one dispatch), fsdp2 x context2 x tensor2 and, with pallas attention,
    expert2 x context2 x tensor2 equal the unsplit xla run's."""
    run = compiled_cases[case]
    config = run["config"]
    # The pallas program holds every kernel, forward and backward (their pallas_call names in its metadata); the
    # xla programs none.
    for kernel in PALLAS_KERNELS:
        assert bool(re.search(rf"\b{kernel}\b", run["hlo"])) == (config.attention_impl == "pallas"), kernel
    (ref_loss, ref_logits), ref_grads = run["ref"]
    loss, logits, grads = run["got"]
    # The split program sums the same terms in another order (per chunk, per shard): tolerances.py's bound for the
    # forward's chained sums; the gradients add the backward's chain and the sums over the batch's tokens.
    terms = max(model_terms(config, SEQ), ROWS * SEQ)
    assert_float32_close(logits, ref_logits, terms=terms, depth=model_depth(config.num_layers), name="logits")
    assert_float32_close(loss, ref_loss, terms=max(terms, config.vocab_size), depth=model_depth(config.num_layers) + 2,
                         name="loss")
    for (path, got_grad), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads),
                                      strict=True):
        if np.abs(want).max() > 0:
            assert_float32_close(got_grad, want, terms=terms, depth=model_depth(config.num_layers, backward=True) + 2,
                                 name=jax.tree_util.keystr(path))
        else:  # layer 0's EDA scale multiplies a zero router state: no gradient either way
            np.testing.assert_array_equal(got_grad, want)


def _shapes(hlo: str, kind: str) -> list[tuple[int, ...]]:
    """The shapes of every operand of every `kind` collective in the compiled HLO."""
    return [dims for _, dims in collective_operand_shapes(hlo, kind)]


def test_halo_moves_only_the_convolution_history(compiled_cases):
    """At context 4 (data 2: 2 rows per device; chunks of 4 tokens; kernels 3 and 1: K = 2) the only
    collective-permutes are the halo's: a chunk's K pre-convolution columns [rows, K, C], its delayed value
    [rows, Hkv*D/2] and its last segment id [rows], two each (one per direction) forward, and the float ones again
    in the backward."""
    run = compiled_cases["context4"]
    config, rows = run["config"], ROWS // 2
    k = config.conv_history
    assert k == 2
    shapes = _shapes(run["hlo"], "collective-permute")
    assert sorted(shapes) == sorted([(rows,)] * 2 + [(rows, config.kv_heads * config.head_dim // 2)] * 4
                                    + [(rows, k, config.conv_channels)] * 4), shapes


def test_keys_and_values_are_all_gathered_and_their_gradients_reduce_scattered(compiled_cases):
    """The forward all-gathers each shard's [rows, 2c, Hkv, D] keys and values over the context axis; the backward
    returns dK and dV with a reduce-scatter of the gathered [rows, S, Hkv, D], never an all-reduce of them."""
    run = compiled_cases["context4"]
    config, rows = run["config"], ROWS // 2
    local = (rows, SEQ // 4, config.kv_heads, config.head_dim)
    whole = (rows, SEQ, config.kv_heads, config.head_dim)
    assert sorted(_shapes(run["hlo"], "all-gather")) == sorted([local, local, local[:2]])  # K, V, key segments
    assert _shapes(run["hlo"], "reduce-scatter") == [whole, whole]  # dK and dV
    assert whole not in _shapes(run["hlo"], "all-reduce")


def test_dual_chunk_reorder_is_exact_and_checks_the_length():
    order = dual_chunk_order(16, 4)  # 8 chunks of 2: shard i holds chunks i and 7 - i
    np.testing.assert_array_equal(order, [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9])
    x = np.random.default_rng(0).standard_normal((3, 48, 5)).astype(np.float32)
    for shards in (1, 2, 3, 4, 8):
        laid = to_dual_chunks(x, shards)
        assert sorted(map(tuple, laid[0])) == sorted(map(tuple, x[0]))  # a permutation
        np.testing.assert_array_equal(from_dual_chunks(laid, shards), x)  # bitwise inverse
        np.testing.assert_array_equal(np.asarray(from_dual_chunks(jnp.asarray(laid), shards)), x)
    with pytest.raises(ValueError, match=r"30 tokens does not split into 2 x 4 = 8 equal chunks \(context 4\)"):
        dual_chunk_order(30, 4)


def test_training_step_equals_unsplit_step():
    """One full step (AdamW, balancer included) at data2 x context2 x expert2, with 2 accumulated micro-batches and
    the loss in chunks of 12 positions (chunks that straddle the context shards, the last one padded), equals the
    unsplit step without either: the loss, the token count and the balancer's expert counts are sums over every
    context shard and micro-batch."""
    # Two micro-batches of ROWS rows (one per device of the 4 batch shards), with different tokens.
    batch = {k: np.concatenate([a, b]) for (k, a), b in zip(_make_batch(0).items(), _make_batch(1).values())}
    config = _config("data2_context2_expert2")
    model = init_model(config.replace(moe_impl="sorted"), seed=0)
    graphdef, state, step = _step_parts(model)
    unsplit = {k: jnp.asarray(v) for k, v in step_batch(batch).items()}
    ref_state, ref_metrics = jax.device_get(jax.jit(step, compiler_options=FAST_COMPILE)(state, unsplit))

    mesh = make_mesh(CASES["data2_context2_expert2"][0])
    _, _, step = _step_parts(nnx.merge(nnx.graphdef(init_model_abstract(config)), nnx.state(model)),
                             accumulation_steps=2, loss_chunk=12)
    shardings = train_state_shardings(state, mesh)
    laid = jax.device_put(step_batch(batch, 2), batch_sharding(mesh))
    with use_mesh(mesh):
        new_state, metrics = jax.device_get(jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                                                    out_shardings=(shardings, None), compiler_options=FAST_COMPILE)(
            jax.device_put(state, shardings), laid))
    assert float(metrics["target_tokens"]) == float(ref_metrics["target_tokens"]) == batch["target_mask"].sum()
    # The expert counts are integers summed over shards and micro-batches: exactly those of the unsplit batch.
    np.testing.assert_array_equal(metrics["expert_load"], ref_metrics["expert_load"])
    terms = max(model_terms(config, SEQ), 2 * ROWS * SEQ, config.vocab_size)
    depth = model_depth(config.num_layers, backward=True) + 2
    assert_float32_close(metrics["loss"], ref_metrics["loss"], terms=terms, depth=depth, name="loss")
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(new_state)[0], jax.tree.leaves(ref_state),
                                 strict=True):
        got, want = np.asarray(got), np.asarray(want)
        if got.dtype.kind == "f" and np.abs(want).max() > 0:  # AdamW's state and step on those gradients
            assert_float32_close(got, want, terms=terms, depth=depth + ADAM_DEPTH, name=jax.tree_util.keystr(path))
        else:  # counters, and zeros (the skip class's untouched bias moments)
            np.testing.assert_array_equal(got, want)


def _step_parts(model, **step_options):
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, total_steps=10), params)
    graphdef, state = init_train_state(model, optimizer, seed=0)
    return graphdef, state, make_train_step(graphdef, optimizer, BalancerConfig(lr=1e-2), model.config.router_classes,
                                            **step_options)


def _long_config(*overrides: str):
    """The tiny long-context preset with one row and one layer (what these tests measure grows with the tokens per
    device and does not need depth; a layer less is a compile less)."""
    return load_train_config("configs/tiny-long.yaml", ["train.batch_size=1", "model.num_layers=1", *overrides])


def test_temporary_memory_falls_with_the_context_size():
    """The tiny long-context step (one 1024-token row) compiled on one device (context 1) and split over 8
    (context 8): each device's temporaries, which grow with its tokens (activations, logits, attention scores),
    fall by at least 4x."""
    temp = {}
    for context, devices in ((1, jax.devices()[:1]), (8, jax.devices())):
        cfg = _long_config("mesh.data=1", f"mesh.context={context}")
        mesh = make_mesh(cfg.mesh, devices=devices)
        setup = abstract_train_state(cfg, mesh)
        step = jit_train_step(cfg, setup, mesh, compiler_options={"xla_backend_optimization_level": 0})
        with use_mesh(mesh):
            compiled = step.lower(setup.state, abstract_batch(cfg, mesh)).compile()
        temp[context] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[1] >= 4 * temp[8], temp


def test_presets_validate():
    """The 32K midtraining and 131K SFT presets (reference sections 7.1 and 7.5) load and are consistent; an
    indivisible length is refused with the sizes named."""
    for name, seq, theta, context in (("zaya1-8b-32k", 32768, 1e6, 2), ("zaya1-8b-131k", 131072, 5e6, 8)):
        cfg = load_train_config(f"configs/{name}.yaml")
        assert (cfg.data.seq_len, cfg.model.rope_theta, cfg.mesh.context) == (seq, theta, context)
        assert cfg.mesh.resolve(8 * context)["context"] == context
    with pytest.raises(ValueError, match=r"1000 tokens does not split into 2 x 8 = 16 equal chunks"):
        _long_config("data.seq_len=1000")


def test_resume_onto_another_context_size(tmp_path):
    """A state saved from a context-4 mesh restores onto a context-2 mesh with bitwise-equal parameters."""
    saved = {}
    for context in (4, 2):
        cfg = _long_config("mesh.data=-1", f"mesh.context={context}")
        mesh = make_mesh(cfg.mesh)
        setup = abstract_train_state(cfg, mesh)
        with Checkpointer(tmp_path, save_every=1, keep=1) as checkpointer:
            if context == 4:
                state = initial_train_state(cfg, setup, init_sharded_model(cfg.model, mesh, seed=3))
                saved = jax.device_get(to_nested_dict(state))
                checkpointer.save(1, to_nested_dict(state), {}, force=True)
            else:
                _, restored, _, _ = checkpointer.restore(to_nested_dict(setup.state))
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
