"""Command-line entry points of the model package.

`zaya-forward --config tiny`: builds a model from a preset (or YAML path), runs one jitted forward pass on a random
batch and prints the logits shape, parameter counts and timings. The smallest end-to-end check of an install.

`zaya-generate --model PATH --prompt TEXT`: loads a transformers-format directory (config.json + safetensors) or a
zaya-train run directory (its latest checkpoint) and decodes with the cache, streaming the text of a single prompt
as it is generated.

`zaya-rsa --model PATH --question TEXT` (or `--synthetic K`: K held-out problems of the embedded task, scored):
Markovian RSA with per-round statistics.

Errors a user can cause (a missing path, a bad setting) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zaya_jax.config import load_preset
from zaya_jax.model import ZayaForCausalLM, init_model, parameter_counts
from zaya_jax.tokenizers import Tokenizer, load_tokenizer, reasoning_prompt


def forward_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-forward", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", default="tiny", help="preset name (tiny, zaya1-8b, zaya1-base) or a YAML path")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config = load_preset(args.config)
        if not 1 <= args.seq <= config.max_position_embeddings:
            raise ValueError(f"--seq {args.seq} must be in [1, max_position_embeddings = "
                             f"{config.max_position_embeddings}], the longest sequence {args.config} accepts")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        require_backend()
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        return _fail("zaya-forward", e)

    counts = parameter_counts(config)
    print(f"config: {args.config}  layers={config.num_layers} hidden={config.hidden_size} "
          f"heads={config.query_heads}q/{config.kv_heads}kv experts={config.num_experts}")
    print(f"parameters: total {counts.total:,}  embedding {counts.embedding:,}  "
          f"non-embedding {counts.non_embedding:,}  active non-embedding {counts.active_non_embedding:,}")
    model = init_model(config, seed=args.seed)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids, return_choices=True)

    ids = jnp.asarray(np.random.default_rng(args.seed).integers(0, config.vocab_size, (args.batch, args.seq)))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, ids))
    compile_and_run = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(state, ids))
    run = time.perf_counter() - start
    loads = np.bincount(np.asarray(out.choices).ravel(), minlength=config.router_classes) / out.choices.size
    print(f"logits: shape {tuple(out.logits.shape)} dtype {out.logits.dtype}  finite={bool(jnp.isfinite(out.logits).all())}")
    print(f"expert load (all layers, last = skip): {np.round(loads, 3).tolist()}")
    print(f"first call (compile + run) {compile_and_run:.2f}s, second call {run * 1e3:.1f} ms on {jax.devices()[0].platform}")
    return 0


class BackendUnavailable(RuntimeError):
    """JAX cannot start the backend the environment asks for (e.g. JAX_PLATFORMS=cuda on a machine without one)."""


def require_backend() -> None:
    """Starts JAX's backend, or raises BackendUnavailable with one line naming what was asked for."""
    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 - a RuntimeError, or for a missing plugin a bare AssertionError
        asked = os.environ.get("JAX_PLATFORMS", "")
        wanted = f"JAX_PLATFORMS={asked!r}" if asked else "the default platform"
        detail = f" ({type(e).__name__}: {e})" if str(e) else ""
        raise BackendUnavailable(
            f"JAX could not start a backend for {wanted}: this machine has no such device or its plugin is not "
            f"installed{detail}; unset JAX_PLATFORMS to run on what is here, or install jax[cuda12] / jax[tpu]"
        ) from None


def _fail(prog: str, error: BaseException) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


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
        from train.cli import load_run_model  # training runs need the training package's checkpoint layout

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
    return model, tokenizer


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="transformers-format directory or zaya-train run directory")
    parser.add_argument("--step", type=int, default=None, help="run directory: checkpoint step (default: latest)")
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
        text = self.tokenizer.decode(self.ids)
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
        print(stream.prefix + tokenizer.decode(generated[0])[len(stream.printed):])
    else:
        for prompt, ids in zip(args.prompt, generated):
            print(f"=== {prompt}\n{tokenizer.decode(ids)}")
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
    sys.exit(forward_main())
