"""A damaged checkpoint step of a real run (the Checkpointer's own damage tests are in test_checkpoint.py): zaya-train
names it in one line with its cause, resumes from the newest step that restores cleanly and keeps the damaged one
(suggesting --step N); zaya-train --step N resumes from an older step and keeps the newer ones aside, and a step
that is not there, or damaged, is one line;
zaya-export and zaya-generate read only the parameters, say which step they used and name a damaged --step in one
line; the exported folder carries a tokenizer that zaya-generate and transformers load without flags.

One tiny 4-step run (checkpoints at steps 2 and 4) is trained once; every test damages a copy of it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train.checkpoint import Checkpointer
from train.cli import export_main, generate_main, train_main
from train.metrics import read_metrics

SMALL = ["data.seq_len=64", "train.batch_size=8", "train.log_every=1", "data.eval_samples=0",
         "optimizer.warmup_steps=1", "optimizer.total_steps=4", "train.steps=4", "train.save_every=2",
         "train.keep_checkpoints=2", "model.num_layers=2"]


def _train_args(run_dir: Path) -> list[str]:
    args = ["--config", "configs/tiny.yaml"]
    for setting in [*SMALL, f"train.run_dir={run_dir}"]:
        args += ["--set", setting]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert train_main(_train_args(run_dir)) == 0
    return run_dir


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A fresh copy of the trained run, to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _state_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / str(step) / "state"


def _data_files(run_dir: Path, step: int) -> list[Path]:
    return sorted((_state_dir(run_dir, step) / "ocdbt.process_0" / "d").iterdir())


def _abstract_state(run_dir: Path, step: int):
    """The saved tree's shapes and dtypes, read with orbax directly (independent of the code under test)."""
    metadata = ocp.StandardCheckpointer().metadata(_state_dir(run_dir, step)).item_metadata
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def _truncate_data_files(run_dir: Path) -> None:
    # Cut to 16 bytes, not half: what survives a halving depends on the order of orbax's concurrent writes
    # (tests/train/test_checkpoint.py).
    for path in _data_files(run_dir, 4):
        path.write_bytes(path.read_bytes()[:16])


# Which array's read fails first varies with orbax's concurrent reads: a cut before a chunk's byte range is an OCDBT
# range error, one inside it a zstd error (tests/train/test_checkpoint.py).
CAUSES = "(Requested byte range .* is not valid|Truncated Zstd-compressed stream)"


def test_resume_falls_back_to_the_newest_intact_step_and_keeps_the_damaged_one(trained, run, capsys):
    _truncate_data_files(run)
    damaged_bytes = {p.name: p.read_bytes() for p in _data_files(run, 4)}
    assert train_main(_train_args(run)) == 0
    captured = capsys.readouterr()
    # (The copy's config.yaml names the original run directory: that change is reported too, on its own line.)
    warnings = [line for line in captured.err.splitlines() if "checkpoint step" in line]
    assert len(warnings) == 1, captured.err
    assert warnings[0].startswith("zaya-train: warning: checkpoint step 4 in ") and re.search(CAUSES, warnings[0])
    assert "resuming from step 2, the newest step that restores cleanly" in warnings[0]
    assert "resuming from step 2 (checkpoints/2), training to step 4" in captured.out
    kept = run / "checkpoints" / "4.damaged"
    assert warnings[0].endswith(f"the damaged step is kept as {kept} (choose another step with --step N; complete "
                                "steps: 2)")
    assert {p.name: p.read_bytes() for p in sorted((kept / "state" / "ocdbt.process_0" / "d").iterdir())} == \
        damaged_bytes
    # Steps 3 and 4 were trained again from step 2's state: bitwise the losses of the original run (resume is exact).
    original = {r["step"]: r["loss"] for r in read_metrics(trained)}
    again = [r for r in read_metrics(run)][len(original):]
    assert [(r["step"], r["loss"]) for r in again] == [(3, original[3]), (4, original[4])]
    with Checkpointer(run / "checkpoints", save_every=2, keep=2, async_save=False) as ckpt:
        assert ckpt.all_steps() == [2, 4]
        ckpt.restore(_abstract_state(run, 4))  # the new step 4 is whole


def test_export_and_generate_fall_back_and_a_damaged_step_asked_for_is_one_line(run, tmp_path, capsys):
    _truncate_data_files(run)
    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("warning: checkpoint step 4 in ") and re.search(CAUSES, err[0])
    assert err[0].endswith("; using step 2, the newest step that restores cleanly (choose another with --step N)")
    assert err[1] == f"loaded the parameters of checkpoint step 2 of {run}"
    # The weights are step 2's: the same files as an export of --step 2.
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "hf2"), "--step", "2"]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()
    capsys.readouterr()

    for main, argv in ((export_main, ["--checkpoint", str(run), "--out", str(tmp_path / "hf4")]),
                       (generate_main, ["--model", str(run), "--prompt", "1+1", "--max-new-tokens", "2"])):
        assert main([*argv, "--step", "4"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "checkpoint step 4 in " in err and re.search(CAUSES, err)
        assert err.rstrip().endswith("choose another step with --step N (other complete steps: 2)")
        assert "older step" not in err  # no fallback was tried: the step was asked for


def test_the_exported_folder_carries_the_tokenizer(run, tmp_path, capsys):
    import transformers

    from zaya_jax.tokenizers import ByteTokenizer

    out = tmp_path / "hf"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    text = "Compute (3 + 4) * 5. <think>é</think>"
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    capsys.readouterr()
    # Without --tokenizer: the folder's own tokenizer.json; the same text as from the run directory.
    assert generate_main(["--model", str(out), "--prompt", "1+1", "--max-new-tokens", "3"]) == 0
    from_export = capsys.readouterr().out
    assert generate_main(["--model", str(run), "--prompt", "1+1", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out == from_export


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _data_state(step_dir: Path) -> dict:
    # orbax's JSON handler stores the item as a plain JSON file: read without the code under test.
    return json.loads((step_dir / "data_state" / "metadata").read_text())


def _saved_state(run_dir: Path, step: int) -> dict:
    return ocp.StandardCheckpointer().restore(_state_dir(run_dir, step), _abstract_state(run_dir, step))


def test_step_resumes_from_an_older_step_and_keeps_the_newer_ones_aside(trained, run, capsys):
    original_4 = _files(trained / "checkpoints" / "4")
    assert train_main([*_train_args(run), "--step", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    kept = run / "checkpoints" / "4.superseded"
    assert f"starting from step 2 (--step): the newer checkpoint step 4 moved aside, kept as {kept}" in out
    assert "resuming from step 2 (checkpoints/2), training to step 4" in out
    assert _files(kept) == original_4  # kept as it was, byte for byte
    # The resumed run continued from step 2's checkpoint: its first step follows that checkpoint's own step counter,
    # its losses are the original run's (resume is exact) ...
    saved_step = int(_saved_state(trained, 2)["step"])
    original = {r["step"]: r["loss"] for r in read_metrics(trained)}
    again = read_metrics(run)[len(original):]
    assert [r["step"] for r in again] == list(range(saved_step + 1, 5))
    assert [r["loss"] for r in again] == [original[s] for s in range(saved_step + 1, 5)]
    # ... and its new step 4 is the original step 4: the same data position (iterator state) and, bitwise, the same
    # arrays (parameters, optimizer and balancer state, step counter, rng).
    assert _data_state(run / "checkpoints" / "4") == _data_state(trained / "checkpoints" / "4") != \
        _data_state(trained / "checkpoints" / "2")
    new, old = _saved_state(run, 4), _saved_state(trained, 4)
    assert jax.tree.structure(new) == jax.tree.structure(old)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def test_a_new_run_over_old_checkpoints_keeps_them_aside_and_saves_its_own(trained, run, capsys):
    # train.resume=false in a directory with checkpoints: Checkpointer.save skips a step that exists, so without
    # moving them aside the new run's checkpoints would be lost and a later resume would pick up the old run.
    assert train_main([*_train_args(run), "--set", "train.resume=false", "--set", "train.steps=2"]) == 0
    out = capsys.readouterr().out.splitlines()
    kept = [run / "checkpoints" / "2.superseded", run / "checkpoints" / "4.superseded"]
    assert (f"starting from step 0 (train.resume is false): the newer checkpoint steps 2, 4 moved aside, kept as "
            f"{kept[0]}, {kept[1]}") in out
    assert "new run from step 0 to step 2" in out
    assert [_files(k) for k in kept] == [_files(trained / "checkpoints" / s) for s in ("2", "4")]
    # The new run's own step 2 was saved: a fresh run with the same seed and data is the original's first 2 steps.
    assert _data_state(run / "checkpoints" / "2") == _data_state(trained / "checkpoints" / "2")
    new, old = _saved_state(run, 2), _saved_state(trained, 2)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)))


def test_step_that_is_not_there_or_damaged_is_one_line_and_changes_nothing(run, tmp_path, capsys):
    # The complete steps as on disk (digit-only directory names), not as the code under test lists them.
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    before = _files(run)
    assert train_main([*_train_args(run), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert err == (f"zaya-train: error: --step 3: no complete checkpoint step 3 in {run}/checkpoints; complete "
                   f"steps: {', '.join(map(str, steps))}\n")
    assert _files(run) == before

    missing = tmp_path / "no-such-run"
    assert train_main([*_train_args(missing), "--step", "2"]) == 2
    assert capsys.readouterr().err == (f"zaya-train: error: --step 2 resumes an existing run, but "
                                       f"{missing}/checkpoints does not exist (train.run_dir '{missing}')\n")
    assert not missing.exists()
    assert train_main([*_train_args(run), "--set", "train.resume=false", "--step", "2"]) == 2
    assert capsys.readouterr().err == ("zaya-train: error: --step 2 resumes the run, but train.resume is false: drop "
                                       "one of them\n")

    # The dry run says what --step (or train.resume=false) would do to the checkpoints, and does nothing.
    assert train_main([*_train_args(run), "--step", "3", "--dry-run"]) == 0
    assert (f"the run would resume from checkpoint step 3 of {run}/checkpoints (--step; checked when it starts) and "
            "move the newer steps aside") in capsys.readouterr().out.splitlines()
    assert train_main([*_train_args(run), "--set", "train.resume=false", "--dry-run"]) == 0
    assert (f"new run from step 0 to step 4; the checkpoints in {run}/checkpoints would be moved aside "
            "(train.resume is false)") in capsys.readouterr().out.splitlines()
    assert _files(run) == before

    # A damaged step asked for is the error (no fallback), with the other steps named; nothing is moved aside.
    _truncate_data_files(run)
    damaged = _files(run)
    assert train_main([*_train_args(run), "--step", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(CAUSES, err)
    assert err.startswith(f"zaya-train: error: checkpoint step 4 in '{run}/checkpoints' is damaged: ")
    assert err.endswith("choose another step with --step N (other complete steps: 2)\n")
    assert _files(run) == damaged
