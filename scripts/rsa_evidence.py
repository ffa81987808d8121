"""Held-out accuracy of one sample, majority of N, and Markovian RSA at equal token budget, on the embedded synthetic
reasoning task with a model trained by zaya-train.

    python scripts/rsa_evidence.py --model runs/tiny [--problems 128] [-N 4] [-C 2] [-T 2] [--budget 96] [--tail 32]

Every method decodes the same number of rollouts per problem, N * (T + 1), each of at most `budget` new tokens:
    greedy            one greedy rollout (for reference; 1 rollout)
    one sample        mean accuracy of N * (T + 1) independent samples (the expected accuracy of a single sample)
    majority of M     majority vote over those M = N * (T + 1) samples
    Markovian RSA     population N, C candidates, T aggregation rounds; majority of the final round, and the mean
                      accuracy over the final round's rollouts (the paper's score)
    continuation      the same with C = 1 (each rollout continues from its own tail)
Tokens are the new tokens actually decoded per problem, stop tokens included.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from train.cli import load_for_inference
from train.data.synthetic import generate_problems
from zaya_jax.answers import extract_answer
from zaya_jax.rsa import RSAConfig, markovian_rsa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="zaya-train run directory or transformers-format directory")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--problems", type=int, default=128)
    parser.add_argument("--population", "-N", type=int, default=4)
    parser.add_argument("--candidates", "-C", type=int, default=2)
    parser.add_argument("--rounds", "-T", type=int, default=2)
    parser.add_argument("--budget", type=int, default=96)
    parser.add_argument("--tail", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--format", default="compact")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, tokenizer = load_for_inference(args.model, args.tokenizer)
    records = generate_problems(args.problems, seed=args.seed, split="heldout")
    questions = [r["prompt"] for r in records]
    references = [extract_answer(r["answer"]) for r in records]
    rollouts = args.population * (args.rounds + 1)
    common = dict(budget=args.budget, tail=min(args.tail, args.budget), prompt_format=args.format, seed=args.seed)

    def run(config: RSAConfig):
        start = time.perf_counter()
        result = markovian_rsa(model, tokenizer, questions, config)
        seconds = time.perf_counter() - start
        majority = np.mean([a == ref for a, ref in zip(result.answers, references)])
        mean_final = np.mean([np.mean([a == ref for a in finals])
                              for finals, ref in zip(result.final_answers, references)])
        tokens = sum(r.generated_tokens for r in result.rounds) / len(questions)
        return majority, mean_final, tokens, seconds, result

    rows = []
    greedy = run(RSAConfig(population=1, candidates=1, rounds=0, temperature=0.0, **common))
    rows.append(("greedy", 1, greedy[0], greedy[2], greedy[3]))
    sampled = run(RSAConfig(population=rollouts, candidates=1, rounds=0, temperature=args.temperature, **common))
    rows.append(("one sample (mean of M)", 1, sampled[1], sampled[2] / rollouts, sampled[3]))
    rows.append((f"majority of M={rollouts}", rollouts, sampled[0], sampled[2], sampled[3]))
    for name, c in ((f"Markovian RSA N={args.population} C={args.candidates} T={args.rounds}", args.candidates),
                    (f"continuation N={args.population} C=1 T={args.rounds}", 1)):
        majority, mean_final, tokens, seconds, result = run(RSAConfig(
            population=args.population, candidates=c, rounds=args.rounds, temperature=args.temperature, **common))
        rows.append((name + ", majority", rollouts, majority, tokens, seconds))
        rows.append((name + ", mean of final round", rollouts, mean_final, tokens, seconds))
        per_round = ", ".join(f"round {r.round}: answered {r.answered:.2f} agreement {r.agreement:.2f}"
                              for r in result.rounds)
        print(f"{name}: {per_round}")

    print(f"\n{args.problems} held-out problems, budget {args.budget} tokens per rollout, tail {common['tail']}, "
          f"temperature {args.temperature}, format {args.format}")
    print("| method | rollouts/problem | accuracy | new tokens/problem | seconds |")
    print("|---|---|---|---|---|")
    for name, n, acc, tokens, seconds in rows:
        print(f"| {name} | {n} | {acc:.3f} | {tokens:.0f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
