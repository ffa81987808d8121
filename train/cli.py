"""Command-line entry points for training.

    zaya-train  --config configs/tiny.yaml [--set section.key=value ...] [--dry-run]
    zaya-export --checkpoint RUN_DIR --out HF_DIR [--step N] [--dtype bfloat16]

Errors a user can cause (a missing file, a bad config value, an unknown key) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from sharding.multihost import WATCHDOG_EXIT_CODE, detect_settings, initialize
from train.config import TrainConfig, load_train_config
from zaya_jax.cli import BackendUnavailable, require_backend


def _fail(prog: str, error: BaseException) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-train", description="Train a ZAYA1 model (see train/loop.py).")
    parser.add_argument("--config", required=True, help="YAML preset with model/optimizer/balancer/data/train sections")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set train.steps=100")
    parser.add_argument("--coordinator", help="multi-host: coordinator host:port (or ZAYA_COORDINATOR, or SLURM)")
    parser.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, help="multi-host: this process's index")
    parser.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for all processes to join")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (every key), the parameter "
                        "counts and the memory estimate, then exit without building the model")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        settings = detect_settings(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, FileNotFoundError, TypeError) as e:
        return _fail("zaya-train", e)
    if args.dry_run:
        return dry_run(cfg, args.config)
    try:
        # The coordinator's heartbeat aborts a process without a word; give the step watchdog the first say.
        heartbeat = int(max(100, 2 * cfg.train.step_timeout_s))
        initialize(settings, init_timeout_s=args.init_timeout, heartbeat_timeout_s=heartbeat)
    except Exception as e:  # noqa: BLE001 - jax raises several types; the user needs the one line either way
        return _fail("zaya-train", f"could not join the multi-host run ({settings}): {e}")
    try:
        require_backend()  # after jax.distributed.initialize, which must come before any device query
    except BackendUnavailable as e:
        return _fail("zaya-train", e)

    from train.loop import BadStepsError, run_training

    try:
        summary = run_training(cfg, config_name=args.config)
    except (ValueError, FileNotFoundError) as e:
        return _fail("zaya-train", e)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first_line = str(e).strip().splitlines()[0]
        print(f"zaya-train: error: a collective failed on process {jax.process_index()} of {jax.process_count()}: "
              f"a peer process died or a device stalled ({first_line})", file=sys.stderr, flush=True)
        # Skip the distributed runtime's exit barrier, which would wait for the dead peer.
        os._exit(WATCHDOG_EXIT_CODE)
    except BadStepsError as e:
        return _fail("zaya-train", e)
    print(f"run directory: {summary.run_dir}")
    if summary.first_loss is None:
        print(f"the run was already complete at step {summary.steps}: nothing trained (raise train.steps to "
              "continue it, or set train.run_dir for a new run)")
    else:
        print(f"steps: {summary.steps}  first loss: {summary.first_loss:.4f}  last loss: {summary.last_loss:.4f}  "
              f"skipped steps: {summary.skipped_steps}")
    print(f"data: {summary.data_counters}")
    if summary.data_counters.get("skipped"):
        print(f"skipped {summary.data_counters['skipped']} malformed record(s) of {cfg.data.source} "
              "(data.on_error=skip)")
    if summary.heldout_accuracy is not None:
        print(f"held-out answer accuracy: {summary.heldout_accuracy:.3f} ({cfg.data.eval_samples} problems)")
    if summary.interrupted:
        print("stopped early by a signal; the checkpoint is saved, rerun the same command to resume")
    print(f"wall time: {summary.wall_time_s:.1f}s")
    return 0


def dry_run(cfg: TrainConfig, config_name: str) -> int:
    """Prints what the run would do and exits 0; allocates no parameter and writes nothing."""
    import yaml

    from sharding import make_mesh
    from train.describe import config_warnings, run_description, start_line
    from train.memory import estimate_memory, memory_shortfall

    try:
        require_backend()
        mesh = make_mesh(cfg.mesh)
        memory = estimate_memory(cfg, mesh)
    except (ValueError, BackendUnavailable) as e:
        return _fail("zaya-train", e)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print("\n".join(run_description(cfg, mesh, memory, config_name)))
    checkpoints = os.path.join(cfg.train.run_dir, "checkpoints")
    # Only looked at, not opened: orbax would clean up the temporary directories of a run writing there.
    if cfg.train.resume and os.path.isdir(checkpoints) and os.listdir(checkpoints):
        print(f"{checkpoints} holds checkpoints: the run would resume from the latest complete one")
    else:
        print(start_line(cfg.train, None))
    for warning in config_warnings(cfg):
        print(f"warning: {warning}")
    shortfall = memory_shortfall(memory)
    if shortfall is not None:
        print(f"warning: {shortfall}")
    print("dry run: nothing was built or written")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-export", description="Write a transformers-format checkpoint "
                                     "(config.json + safetensors) from a zaya-train run directory.")
    parser.add_argument("--checkpoint", required=True, help="a zaya-train run directory")
    parser.add_argument("--out", required=True, help="output directory (transformers format)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: the run's parameter dtype)")
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    try:
        require_backend()
        export_run(args.checkpoint, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size)
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail("zaya-export", e)
    print(f"wrote {args.out}")
    return 0


def export_run(run_dir: str, out: str, *, step: int | None = None, dtype: str | None = None,
               max_shard_size: str | int = "5GB") -> None:
    from zaya_jax.hf_io import save_pretrained

    model, _ = load_run_model(run_dir, step=step)
    save_pretrained(model, out, max_shard_size=max_shard_size, dtype=dtype)
    follow_umask(out)


def follow_umask(path: str) -> None:
    """Gives `path` and the files in it the modes a plain mkdir / open would (0o777 / 0o666 less the umask):
    the staging directory and the safetensors writer create them 0o700 / 0o600, private to the exporting user."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for name in os.listdir(path):
        if os.path.isfile(os.path.join(path, name)):
            os.chmod(os.path.join(path, name), 0o666 & ~umask)


def load_run_model(run_dir: str, *, step: int | None = None):
    """(model, TrainConfig) from a zaya-train run directory's checkpoint (`step`, default the latest)."""
    from flax import nnx

    from train.checkpoint import Checkpointer
    from train.loop import abstract_like, from_nested_dict, setup, to_nested_dict

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a zaya-train run directory)")
    cfg: TrainConfig = load_train_config(config_path)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=cfg.train.save_every,
                                keep=cfg.train.keep_checkpoints, async_save=False)
    try:
        if checkpointer.latest_step() is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/")
        graphdef, template, _, _ = setup(cfg)
        _, nested, _, _ = checkpointer.restore(to_nested_dict(abstract_like(template)), step=step)
    finally:
        checkpointer.close()
    state = from_nested_dict(template, nested)
    return nnx.merge(graphdef, state.params, state.biases), cfg


if __name__ == "__main__":
    sys.exit(train_main())
