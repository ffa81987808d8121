"""Loading, first logits, batch-1 decoding and export of a transformers-format checkpoint: zaya_jax against
transformers, each framework in its own fresh process, in the same run.

    python benchmarks/bench_load.py                          # full-size ZAYA1-8B (17.7 GB of bf16), written once
    python benchmarks/bench_load.py --layers 2 --scale 0.5   # a reduced checkpoint of the same layout (~1 GB)

The checkpoint is written once into --dir (default benchmarks/checkpoints/<size>, ignored by git) from
`transformers.ZayaConfig()` defaults (--layers overrides num_hidden_layers; --scale multiplies hidden_size,
moe_intermediate_size and vocab_size): tensor names and shapes from transformers' model built on the meta device,
random finite bf16 values (balancing biases float32), written to safetensors shards tensor by tensor.

Each framework runs two child processes: (1) load, time to the first logits of an 8-token prompt (compilation
included: it is what a user waits for), greedy decoding of --new-tokens tokens at batch 1 after a warm-up call
(tokens/s, prefill included; the warm-up compiles our program for the same length, transformers decodes two
tokens); (2) load, then export to a new directory. Peak RSS is the child's own peak (VmHWM) after load and at the
end of the export child (load included).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hf_config_dict(layers: int | None, scale: float) -> dict:
    import transformers

    defaults = transformers.ZayaConfig()
    overrides = {}
    if layers:
        overrides["num_hidden_layers"] = layers
    if scale != 1.0:
        for key in ("hidden_size", "moe_intermediate_size", "vocab_size"):
            overrides[key] = max(128, round(getattr(defaults, key) * scale / 128) * 128)
    config = transformers.ZayaConfig(**overrides).to_dict()
    config["dtype"] = "bfloat16"
    return config


def random_values(rng: np.random.Generator, shape: tuple[int, ...], file_dtype: str) -> np.ndarray:
    """Random finite values drawn as bit patterns (cheap at 8.8B values): magnitude 2^-7..2^-4, random sign."""
    import ml_dtypes

    if file_dtype == "F32":
        return rng.normal(0, 0.05, shape).astype(np.float32)
    bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)
    return ((bits & 0x807F) | (0x3C00 + ((bits >> 7 & 3) << 7))).astype(np.uint16).view(ml_dtypes.bfloat16)


def write_checkpoint(directory: pathlib.Path, config: dict, max_shard_size: str) -> None:
    import torch
    import transformers

    from zaya_jax.hf_io import write_checkpoint as write

    with torch.device("meta"):
        model = transformers.ZayaForCausalLM(transformers.ZayaConfig(**config))
    tied = set(model._tied_weights_keys) if config.get("tie_word_embeddings", True) else set()
    specs = [(name, "F32" if tensor.dtype == torch.float32 and name.endswith("balancing_biases") else "BF16",
              tuple(tensor.shape)) for name, tensor in model.state_dict().items() if name not in tied]
    rng = np.random.default_rng(0)
    write(directory, config, specs, ((n, random_values(rng, shape, dt)) for n, dt, shape in specs), max_shard_size)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes. Not getrusage's ru_maxrss: Linux carries the parent's
    resident set at fork into the child's maximum across exec, which would count the parent's torch import."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


# ---- children: one framework, one phase, a JSON line on stdout ---------------------------------------------------

def child_ours(directory: str, phase: str, prompt_len: int, new_tokens: int, out_dir: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zaya_jax import generate, load_pretrained, save_pretrained
    from zaya_jax.model import inference_jit

    start = time.perf_counter()
    model = load_pretrained(directory, dtype="bfloat16")
    jax.block_until_ready(nnx.state(model))
    result = {"load_s": time.perf_counter() - start, "load_rss": peak_rss()}
    if phase == "export":
        start = time.perf_counter()
        save_pretrained(model, out_dir, max_shard_size="4GB")
        return {**result, "export_s": time.perf_counter() - start, "export_rss": peak_rss()}
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, prompt_len)).astype(np.int32)
    graphdef, state = nnx.split(model)
    forward = inference_jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    start = time.perf_counter()
    jax.block_until_ready(forward(state, jnp.asarray(ids)))
    result["first_logits_s"] = time.perf_counter() - start
    generate(model, ids, new_tokens, stop_tokens=()).tokens.block_until_ready()  # compiles
    start = time.perf_counter()
    tokens = generate(model, ids, new_tokens, stop_tokens=()).tokens.block_until_ready()
    result["decode_tokens_per_s"] = new_tokens / (time.perf_counter() - start)
    result["tokens"] = np.asarray(tokens)[0].tolist()  # [B, N]: the generated tokens only
    return result


def child_transformers(directory: str, phase: str, prompt_len: int, new_tokens: int, out_dir: str) -> dict:
    import torch
    import transformers

    start = time.perf_counter()
    model = transformers.ZayaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    result = {"load_s": time.perf_counter() - start, "load_rss": peak_rss()}
    if phase == "export":
        start = time.perf_counter()
        model.save_pretrained(out_dir, max_shard_size="4GB")
        return {**result, "export_s": time.perf_counter() - start, "export_rss": peak_rss()}
    ids = torch.as_tensor(np.random.default_rng(0).integers(3, model.config.vocab_size, (1, prompt_len)))
    with torch.no_grad():
        start = time.perf_counter()
        model(ids).logits.float()
        result["first_logits_s"] = time.perf_counter() - start

        def decode(tokens: int):
            return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)

        decode(2)  # warm-up: torch compiles nothing, so two tokens touch every code path (and every weight page)
        start = time.perf_counter()
        tokens = decode(new_tokens)
        result["decode_tokens_per_s"] = new_tokens / (time.perf_counter() - start)
    result["tokens"] = tokens[0, prompt_len:].tolist()
    return result


def run_child(framework: str, phase: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's run
    out_dir = str(pathlib.Path(args.dir).with_name(pathlib.Path(args.dir).name + f"-export-{framework}"))
    command = [sys.executable, __file__, "--child", framework, "--phase", phase, "--dir", args.dir,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--out", out_dir]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{framework} {phase} child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: transformers' 40)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies hidden_size, moe_intermediate_size and vocab_size (rounded to 128)")
    parser.add_argument("--dir", default=None, help="checkpoint cache (default benchmarks/checkpoints/<size>)")
    parser.add_argument("--max-shard-size", default="4GB")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--child", choices=("ours", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("run", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = child_ours if args.child == "ours" else child_transformers
        print(json.dumps(child(args.dir, args.phase, args.prompt_len, args.new_tokens, args.out)))
        return

    size = f"layers{args.layers or 'default'}-scale{args.scale:g}"
    args.dir = args.dir or str(ROOT / "benchmarks" / "checkpoints" / f"zaya1-8b-random-{size}")
    directory = pathlib.Path(args.dir)
    if not (directory / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(directory, hf_config_dict(args.layers, args.scale), args.max_shard_size)
        print(f"wrote {directory} in {time.perf_counter() - start:.1f} s")
    weights = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    print(f"machine: {machine()}; checkpoint {directory}: {weights / 1e9:.2f} GB in "
          f"{len(list(directory.glob('*.safetensors')))} files, {config['num_hidden_layers']} layers, hidden "
          f"{config['hidden_size']}, {config['num_experts']} experts of {config['moe_intermediate_size']}, vocab "
          f"{config['vocab_size']}; prompt {args.prompt_len} tokens, {args.new_tokens} greedy tokens at batch 1")

    results = {}
    for framework in ("transformers", "ours"):
        results[framework] = {**run_child(framework, "run", args),
                              **{f"x_{k}": v for k, v in run_child(framework, "export", args).items()}}
    theirs, ours = results["transformers"], results["ours"]
    rows = [
        ("load (s)", "load_s", "{:.2f}"),
        ("load peak RSS (GB)", "load_rss", "{:.2f}"),
        ("first logits, 8 tokens (s)", "first_logits_s", "{:.2f}"),
        ("decode batch 1 (tokens/s)", "decode_tokens_per_s", "{:.2f}"),
        ("export (s)", "x_export_s", "{:.2f}"),
        ("export peak RSS, load included (GB)", "x_export_rss", "{:.2f}"),
    ]
    print("| | transformers | zaya_jax | zaya_jax / transformers |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        scale = 1e9 if key.endswith("rss") else 1
        a, b = theirs[key] / scale, ours[key] / scale
        print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |")
    same = sum(x == y for x, y in zip(theirs["tokens"], ours["tokens"]))
    print(f"weights {weights / 1e9:.2f} GB; zaya_jax load peak RSS / weights = {ours['load_rss'] / weights:.2f}, "
          f"export peak / weights = {ours['x_export_rss'] / weights:.2f}; greedy tokens equal in both: "
          f"{same}/{args.new_tokens}")


if __name__ == "__main__":
    main()
