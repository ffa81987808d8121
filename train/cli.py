"""Command-line entry points that read or write zaya-train runs.

    zaya-train    --config configs/tiny.yaml [--set section.key=value ...] [--step N] [--dry-run]
    zaya-export   --checkpoint RUN_DIR --out HF_DIR [--step N] [--dtype bfloat16]
    zaya-generate --model PATH --prompt TEXT [--prompt TEXT ...]
    zaya-rsa      --model PATH --question TEXT | --synthetic K

zaya-generate loads a transformers-format directory (config.json + safetensors) or a zaya-train run directory (the
parameters of its newest intact checkpoint) and decodes with the cache, streaming the text of a single prompt as it
is generated. zaya-rsa runs Markovian RSA with per-round statistics, on given questions or on K held-out problems of
the embedded synthetic task (scored). Both live here, not in zaya_jax/cli.py, because run directories need the
training package.

Errors a user can cause (a missing file, a bad config value, an unknown key) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from sharding.multihost import WATCHDOG_EXIT_CODE, detect_settings, initialize
from train.config import TrainConfig, load_train_config
from zaya_jax.cli import BackendUnavailable, require_backend
from zaya_jax.model import ZayaForCausalLM
from zaya_jax.tokenizers import Tokenizer, load_tokenizer, reasoning_prompt


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
    parser.add_argument("--step", type=int, default=None,
                        help="resume from this checkpoint step of train.run_dir instead of the newest; the newer "
                        "steps are moved aside to checkpoints/<step>.superseded (kept)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config (every key), the parameter "
                        "counts and the memory estimate, then exit without building the model")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        settings = detect_settings(args.coordinator, args.num_processes, args.process_id)
    except (ValueError, FileNotFoundError, TypeError) as e:
        return _fail("zaya-train", e)
    if args.dry_run:
        return dry_run(cfg, args.config, args.step)
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
        summary = run_training(cfg, config_name=args.config, from_step=args.step)
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


def dry_run(cfg: TrainConfig, config_name: str, step: int | None = None) -> int:
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
    has_checkpoints = os.path.isdir(checkpoints) and bool(os.listdir(checkpoints))
    if step is not None:
        print(f"the run would resume from checkpoint step {step} of {checkpoints} (--step; checked when it starts) "
              "and move the newer steps aside")
    elif has_checkpoints and cfg.train.resume:
        print(f"{checkpoints} holds checkpoints: the run would resume from the latest complete one")
    elif has_checkpoints:
        print(f"{start_line(cfg.train, None)}; the checkpoints in {checkpoints} would be moved aside "
              "(train.resume is false)")
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
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest intact one)")
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
    """Writes the run's parameters (config.json + safetensors) and its tokenizer (tokenizer.json +
    tokenizer_config.json), so `out` works with zaya-generate and transformers without further flags."""
    from zaya_jax.hf_io import save_pretrained
    from zaya_jax.tokenizers import save_tokenizer

    model, cfg = load_run_model(run_dir, step=step)
    tokenizer = load_tokenizer(cfg.data.tokenizer)  # before writing anything: a missing tokenizer file stops here
    save_pretrained(model, out, max_shard_size=max_shard_size, dtype=dtype)
    save_tokenizer(tokenizer, out)
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
    """(model, TrainConfig) from a zaya-train run directory's checkpoint `step` (default: the newest step that
    restores cleanly). Only the parameters and routing biases are read; the step used, and any newer damaged step
    passed over, are reported on stderr."""
    from flax import nnx

    from train.checkpoint import Checkpointer, DamagedCheckpointError
    from train.loop import abstract_like, from_nested_dict, setup, to_nested_dict

    config_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{run_dir}: no config.yaml (not a zaya-train run directory)")
    cfg: TrainConfig = load_train_config(config_path)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=cfg.train.save_every,
                                keep=cfg.train.keep_checkpoints, async_save=False)
    damaged: list[DamagedCheckpointError] = []
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/")
        graphdef, template, _, _ = setup(cfg)
        wanted = ("params", "biases")
        abstract = {k: v for k, v in to_nested_dict(abstract_like(template)).items() if k in wanted}
        # Falling back is for the default step only: a damaged --step N is the error, with the other steps named.
        used, nested, _, _ = checkpointer.restore(abstract, step=step, only=wanted,
                                                  on_damaged=damaged.append if step is None else None)
    except DamagedCheckpointError as e:
        if step is None:  # every step was tried
            raise
        raise e.suggesting_other_steps(steps) from None
    finally:
        checkpointer.close()
    for e in damaged:
        print(f"warning: {e}; using step {used}, the newest step that restores cleanly (choose another with "
              f"--step N)", file=sys.stderr)
    print(f"loaded the parameters of checkpoint step {used} of {run_dir}", file=sys.stderr)
    params = from_nested_dict(template.params, nested["params"])
    biases = from_nested_dict(template.biases, nested["biases"])
    return nnx.merge(graphdef, params, biases), cfg


def load_for_inference(path: str, tokenizer_spec: str | None = None,
                       step: int | None = None) -> tuple[ZayaForCausalLM, Tokenizer]:
    """The model and tokenizer behind `path`: a transformers-format directory or a zaya-train run directory.

    The tokenizer is `tokenizer_spec` ("byte" or a tokenizer.json path) when given; otherwise the run's
    data.tokenizer, or the directory's own tokenizer.json. Nothing is guessed: without either it is an error."""
    if os.path.isfile(os.path.join(path, "config.json")):
        from zaya_jax.hf_io import load_pretrained

        model = load_pretrained(path)
        own_tokenizer = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
    elif os.path.isfile(os.path.join(path, "config.yaml")):
        model, cfg = load_run_model(path, step=step)
        own_tokenizer = cfg.data.tokenizer
    else:
        raise FileNotFoundError(f"{path}: neither a transformers-format directory (config.json) nor a zaya-train "
                                f"run directory (config.yaml)")
    spec = tokenizer_spec or own_tokenizer
    if spec is None:
        raise ValueError(f"{path} has no tokenizer.json: pass --tokenizer byte or --tokenizer PATH/tokenizer.json")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: wrong --tokenizer?")
    if tokenizer.vocab_size < model.config.vocab_size:  # a padded vocabulary, or an untrained model's ids
        print(f"note: the model has {model.config.vocab_size} token ids, the tokenizer {tokenizer.vocab_size}: "
              f"generated ids the tokenizer does not have print as <id N>", file=sys.stderr)
    return model, tokenizer


def decode_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """tokenizer.decode(ids), with each id the tokenizer does not have (a model's vocabulary can be larger)
    written as <id N> in its place."""
    parts, run = [], []
    for i in ids:
        if i < tokenizer.vocab_size:
            run.append(i)
            continue
        parts.append(tokenizer.decode(run) + f"<id {i}>")
        run = []
    return "".join(parts) + tokenizer.decode(run)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="transformers-format directory or zaya-train run directory")
    parser.add_argument("--step", type=int, default=None,
                        help="run directory: checkpoint step (default: the newest intact one)")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a tokenizer.json path (default: the run's, or the directory's own)")


def _sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = all tokens")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)


class _TextStream:
    """Prints row 0's text as tokens arrive; decodes the whole prefix each time so multi-token characters print
    once they are complete. `prefix` (the prompt's trailing `<think>`) is printed with the first token, so an
    error before decoding starts prints nothing."""

    def __init__(self, tokenizer: Tokenizer, prefix: str = ""):
        self.tokenizer, self.out, self.ids, self.printed, self.prefix = tokenizer, sys.stdout, [], "", prefix

    def __call__(self, tokens: np.ndarray, done: np.ndarray) -> None:
        if self.prefix:
            self.out.write(self.prefix)
            self.out.flush()
            self.prefix = ""
        if done[0]:
            return
        self.ids.append(int(tokens[0]))
        text = decode_text(self.tokenizer, self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text


def generate_main(argv: list[str] | None = None) -> int:
    from zaya_jax.generate import generate_ids

    parser = argparse.ArgumentParser(prog="zaya-generate", description="Decode text with a ZAYA1 model (cached).")
    _model_arguments(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: one batch)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--raw", action="store_true",
                        help="feed the prompt as is (default: the reasoning format <bos> prompt \\n <think>)")
    _sampling_arguments(parser, temperature=0.0)
    args = parser.parse_args(argv)
    try:
        require_backend()
        model, tokenizer = load_for_inference(args.model, args.tokenizer, args.step)
        prompts = [tokenizer.encode(p) if args.raw else reasoning_prompt(tokenizer, p) for p in args.prompt]
        stream = _TextStream(tokenizer, prefix="" if args.raw else "<think>") if len(prompts) == 1 else None
        start = time.perf_counter()
        generated = generate_ids(model, prompts, args.max_new_tokens, pad_id=tokenizer.pad_id,
                                 stop_tokens=(tokenizer.eos_id,), temperature=args.temperature, top_k=args.top_k,
                                 top_p=args.top_p, seed=args.seed,
                                 **({"on_tokens": stream} if stream is not None else {}))
        seconds = time.perf_counter() - start
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail("zaya-generate", e)
    if stream is not None:
        print(stream.prefix + decode_text(tokenizer, generated[0])[len(stream.printed):])
    else:
        for prompt, ids in zip(args.prompt, generated):
            print(f"=== {prompt}\n{decode_text(tokenizer, ids)}")
    tokens = sum(len(ids) for ids in generated)
    print(f"[{tokens} tokens in {seconds:.2f}s (compile included) on {jax.devices()[0].platform}]", file=sys.stderr)
    return 0


def rsa_main(argv: list[str] | None = None) -> int:
    from zaya_jax.answers import extract_answer
    from zaya_jax.rsa import FORMATS, RSAConfig, markovian_rsa

    parser = argparse.ArgumentParser(prog="zaya-rsa", description="Markovian RSA test-time compute (zaya_jax.rsa).")
    _model_arguments(parser)
    questions = parser.add_mutually_exclusive_group(required=True)
    questions.add_argument("--question", action="append", help="question text (repeatable)")
    questions.add_argument("--synthetic", type=int, metavar="K",
                           help="the first K held-out problems of the embedded synthetic task, scored")
    parser.add_argument("--population", "-N", type=int, default=16)
    parser.add_argument("--candidates", "-C", type=int, default=4)
    parser.add_argument("--rounds", "-T", type=int, default=2)
    parser.add_argument("--budget", type=int, default=8192, help="beta: max new tokens per rollout")
    parser.add_argument("--tail", type=int, default=4096, help="tau: carried tail tokens")
    parser.add_argument("--format", choices=sorted(FORMATS), default="paper", help="aggregation prompt format")
    parser.add_argument("--answer-pattern", default=None, help="regex with one group (default: last \\boxed{})")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per decode call (default: a round)")
    parser.add_argument("--json", default=None, help="also write the per-round statistics and answers here")
    _sampling_arguments(parser, temperature=1.0)
    args = parser.parse_args(argv)
    try:
        config = RSAConfig(population=args.population, candidates=args.candidates, rounds=args.rounds,
                           budget=args.budget, tail=args.tail, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, prompt_format=args.format, answer_pattern=args.answer_pattern,
                           batch_size=args.batch_size, seed=args.seed)
        require_backend()
        model, tokenizer = load_for_inference(args.model, args.tokenizer, args.step)
        if args.synthetic is not None:
            from train.data.synthetic import generate_problems

            records = generate_problems(args.synthetic, seed=args.seed, split="heldout")
            texts = [r["prompt"] for r in records]
            references = [extract_answer(r["answer"]) for r in records]
        else:
            texts, references = args.question, None
        result = markovian_rsa(model, tokenizer, texts, config)
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail("zaya-rsa", e)
    print("round  rows  prompt_max  generated  finished  answered  agreement  cache_slots  seconds")
    for r in result.rounds:
        print(f"{r.round:5d} {r.rows:5d} {r.prompt_tokens_max:11d} {r.generated_tokens:10d} {r.finished:9.2f} "
              f"{r.answered:9.2f} {r.agreement:10.2f} {r.cache_slots:12d} {r.seconds:8.2f}")
    report = {"config": vars(args), "rounds": [r._asdict() for r in result.rounds], "answers": result.answers}
    if references is None:
        for question, answer in zip(texts, result.answers):
            print(f"{question} -> {answer}")
    else:
        majority = float(np.mean([a == ref for a, ref in zip(result.answers, references)]))
        mean_final = float(np.mean([np.mean([a == ref for a in finals])
                                    for finals, ref in zip(result.final_answers, references)]))
        report.update(majority_accuracy=majority, mean_final_accuracy=mean_final)
        print(f"{len(texts)} held-out problems: majority-vote accuracy {majority:.3f}, "
              f"mean final-round accuracy {mean_final:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
