"""The training run end to end: exact resume, signals, bad steps, fine-tuning, export, CLI errors."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from sharding import make_mesh
from tests.tolerances import EPS32, assert_float32_close, float32_bound, model_depth, model_terms
from train.checkpoint import Checkpointer
from train.cli import export_main, train_main
from train.config import load_train_config
from train.loop import BadStepsError, build_model, run_training
from train.metrics import read_metrics
from zaya_jax import load_pretrained

SMALL = ["data.seq_len=64", "train.batch_size=8", "train.log_every=1", "data.eval_samples=0",
         "optimizer.warmup_steps=2", "optimizer.total_steps=6"]


def _config(run_dir, *extra):
    return load_train_config("configs/tiny.yaml", [*SMALL, f"train.run_dir={run_dir}", *extra])


def _final_state(run_dir):
    with Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=10) as ckpt:
        step = ckpt.latest_step()
    return step


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    summary = run_training(_config(run_dir, "train.steps=6", "train.save_every=3"))
    return run_dir, summary


def test_resume_is_bitwise_identical_to_a_straight_run(straight_run, tmp_path, capsys):
    straight_dir, straight = straight_run
    resumed_dir = str(tmp_path / "resumed")
    cfg = _config(resumed_dir, "train.steps=6", "train.save_every=3")
    first = run_training(cfg, stop_after=3, config_name="configs/tiny.yaml")
    assert first.interrupted and first.steps == 3
    out = capsys.readouterr().out
    assert "config: configs/tiny.yaml" in out and "new run from step 0 to step 6" in out
    # The resumed run keeps one more checkpoint (a harmless change that config.yaml's rewrite must report) and
    # computes the validation loss every 2 steps, which must not change its trajectory.
    second_cfg = _config(resumed_dir, "train.steps=6", "train.save_every=3", "train.keep_checkpoints=3",
                         "train.eval_every=2")
    second = run_training(second_cfg)
    assert second.steps == 6 and not second.interrupted
    captured = capsys.readouterr()
    assert "resuming from step 3 (checkpoints/3), training to step 6" in captured.out
    assert (f"warning: {resumed_dir}/config.yaml differs from this run's settings and is replaced; changed: "
            "train.keep_checkpoints: 2 -> 3; train.eval_every: 50 -> 2") in captured.err
    assert load_train_config(os.path.join(resumed_dir, "config.yaml")).train.keep_checkpoints == 3

    losses = {r["step"]: r["loss"] for r in read_metrics(straight_dir)}
    resumed = {r["step"]: r["loss"] for r in read_metrics(resumed_dir)}
    assert sorted(losses) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert all(losses[s] == resumed[s] for s in losses), (losses, resumed)  # bitwise: == on floats
    assert losses[6] < losses[1]
    validation = {r["step"]: r["val_loss"] for r in read_metrics(resumed_dir) if "val_loss" in r}
    assert sorted(validation) == [4, 6] and all("val_loss" not in r for r in read_metrics(straight_dir))

    a, b = load_pretrained_run(straight_dir), load_pretrained_run(resumed_dir)
    for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    _assert_validation_loss(b, second_cfg, validation[6])


def _assert_validation_loss(model, cfg, logged: float) -> None:
    """The logged validation loss is the final model's mean next-token cross-entropy over the held-out batches'
    target tokens, recomputed here from its logits in float64."""
    from train.data import load_tokenizer
    from train.evaluate import validation_batches

    total = count = scale = 0.0
    for batch in validation_batches(cfg, load_tokenizer(None)):
        logits = np.asarray(model(jnp.asarray(batch["tokens"]), segment_ids=jnp.asarray(batch["segment_ids"]),
                                  positions=jnp.asarray(batch["positions"])), np.float64)
        scale = max(scale, float(np.abs(logits).max()))
        top = logits.max(-1, keepdims=True)
        log_z = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
        nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        total, count = total + float((nll * batch["target_mask"]).sum()), count + float(batch["target_mask"].sum())
    want = total / count
    # Both sides use the same float32 logits up to summation order (the model's bound, tests/tolerances.py); each
    # token's loss moves by at most 2 x that logit error, and the jitted sum of `count` float32 terms adds
    # count x eps relative.
    logit_error = float32_bound(model_terms(model.config, cfg.data.seq_len), model_depth(model.config.num_layers))
    assert abs(logged - want) <= 2 * logit_error * scale + count * EPS32 * want, (logged, want)


def load_pretrained_run(run_dir):
    out = os.path.join(run_dir, "export")
    assert export_main(["--checkpoint", run_dir, "--out", out]) == 0
    return load_pretrained(out)


def test_export_loads_in_transformers_with_the_same_logits(straight_run):
    run_dir, _ = straight_run
    ours = load_pretrained_run(run_dir)
    umask = os.umask(0)
    os.umask(umask)
    out = os.path.join(run_dir, "export")
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # what mkdir gives, not a private 0o700
    assert {os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)} == {0o666 & ~umask}
    hf = transformers.ZayaForCausalLM.from_pretrained(os.path.join(run_dir, "export"), attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    # Equal weights; transformers orders the float32 sums its own way (tests/tolerances.py).
    assert_float32_close(got, ref, terms=model_terms(ours.config, 20), depth=model_depth(ours.config.num_layers))


def test_z_loss_is_not_logged_while_its_weight_is_0(straight_run):
    run_dir, _ = straight_run
    records = read_metrics(run_dir)
    assert records and all("z_loss" not in r and "loss" in r for r in records)


def test_skipped_records_are_counted_and_mostly_empty_sources_are_named(tmp_path, capsys):
    from train.data import load_tokenizer, make_dataset, open_source
    from train.data.hosts import HostBatches
    from train.loop import check_documents, data_counters

    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "a document"}\n{"text": \n{"text": "another one"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: malformed JSONL record: .*data.on_error=skip"):
        open_source(str(path))
    source = open_source(str(path), on_error="skip")
    tokenizer = load_tokenizer(None)
    batches = HostBatches(lambda i, n, rows: iter(make_dataset(source, tokenizer, 32, rows, shard_index=i,
                                                               shard_count=n)),
                          batch_size=2, read_shards=1, process_index=0, process_count=1)
    batch = next(batches)
    counters = data_counters(batches, source)
    assert counters["skipped"] == 1 and counters["kept"] >= 2
    # The packer has emitted exactly this batch's rows: their share of document tokens is the efficiency.
    assert counters["document_tokens"] == int((batch["segment_ids"] > 0).sum())
    assert counters["packing_efficiency"] == counters["document_tokens"] / batch["segment_ids"].size

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n' * 3 + '{"text": "words"}\n')
    cfg = _config(str(tmp_path / "unused"), f"data.source={empty}").data
    check_documents(cfg, open_source(str(empty)))
    assert ("warning: data.source '" + str(empty) + "': 3 of its first 4 documents are empty (no text)"
            in capsys.readouterr().err)
    with pytest.raises(ValueError, match=r"3 of its first 4 documents are empty .*\(data.on_empty=raise\)"):
        check_documents(dataclasses.replace(cfg, on_empty="raise"), open_source(str(empty)))
    check_documents(cfg, source)  # none empty: silent
    assert capsys.readouterr().err == ""


def test_fine_tuning_starts_from_the_pretrained_weights(straight_run):
    run_dir, _ = straight_run
    exported = load_pretrained_run(run_dir)
    cfg = _config(run_dir + "-ft", f"train.init_from={os.path.join(run_dir, 'export')}")
    model = build_model(cfg, make_mesh(cfg.mesh))
    for x, y in zip(jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resuming_into_a_different_architecture_names_the_tensors(straight_run):
    run_dir, _ = straight_run
    with pytest.raises(ValueError, match=r"does not match the model: .*attn/q_proj"):
        run_training(_config(run_dir, "train.steps=8", "model.hidden_size=32"))


def test_consecutive_non_finite_losses_stop_the_run_with_the_last_good_checkpoint(tmp_path):
    run_dir = str(tmp_path / "diverge")
    # An absurd learning rate sends the weights to inf after the first update; every later loss is NaN.
    cfg = _config(run_dir, "train.steps=20", "train.save_every=1", "optimizer.lr=1e30", "optimizer.clip_norm=null",
                  "optimizer.warmup_steps=0", "train.max_consecutive_bad_steps=3")
    with pytest.raises(BadStepsError, match="3 consecutive steps with a non-finite loss"):
        run_training(cfg)
    records = read_metrics(run_dir)
    assert [r["skipped"] for r in records][-3:] == [1, 1, 1]
    good = max(r["step"] for r in records if r["skipped"] == 0)
    with Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=10) as ckpt:
        assert ckpt.latest_step() >= good  # skipped steps leave the state as it was: still the good one


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
    run_dir = str(tmp_path / "sig")
    cmd = [sys.executable, "-m", "train.cli", "--config", "configs/tiny.yaml", *sum((["--set", s] for s in SMALL), []),
           "--set", f"train.run_dir={run_dir}", "--set", "train.steps=5000", "--set", "optimizer.total_steps=5000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped early by a signal" in out
    with Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=1, keep=10) as ckpt:
        step = ckpt.latest_step()
    assert step is not None and 1 <= step < 5000


def test_cli_errors_are_one_line_and_exit_2(capsys, tmp_path):
    assert train_main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert train_main(["--config", "configs/tiny.yaml", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'train.stepz'; closest valid keys: train.steps" in err
    assert train_main(["--config", "configs/tiny.yaml", "--set", "model.kv_heads=3"]) == 2
    assert "query_heads (4) must be divisible by kv_heads (3)" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a zaya-train run directory" in capsys.readouterr().err
    # A kernel this machine cannot run: one line, and no run directory left behind.
    run_dir = tmp_path / "gpu_run"
    assert train_main(["--config", "configs/tiny.yaml", "--set", "model.attention_impl=cudnn",
                       "--set", "model.dtype=bfloat16", "--set", f"train.run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "attention_impl 'cudnn' needs a CUDA GPU; this process runs on cpu" in err
    assert not run_dir.exists()


def test_heldout_greedy_completions_equal_an_uncached_argmax_loop(straight_run):
    from train.data import ByteTokenizer, generate_problems
    from train.evaluate import greedy_completions
    from zaya_jax.tokenizers import reasoning_prompt

    run_dir, _ = straight_run
    model = load_pretrained_run(run_dir)
    tokenizer = ByteTokenizer()
    records = generate_problems(3, seed=5, split="heldout")
    got = greedy_completions(model, tokenizer, records, max_new_tokens=12, batch_size=2)
    width = max(len(reasoning_prompt(tokenizer, r["prompt"])) for r in records) + 12
    # The reference: the full forward over the whole sequence, right-padded to one width (causal: the padding
    # after position t never changes logits at t), argmax at the last real position.
    forward = jax.jit(lambda ids: model(ids))
    for record, completion in zip(records, got):
        ids = reasoning_prompt(tokenizer, record["prompt"])
        new = []
        for _ in range(12):
            row = np.zeros((1, width), np.int32)
            row[0, :len(ids) + len(new)] = ids + new
            token = int(np.argmax(np.asarray(forward(jnp.asarray(row)))[0, len(ids) + len(new) - 1]))
            if token == tokenizer.eos_id:
                break
            new.append(token)
        assert completion == tokenizer.decode(new)
