"""Command-line entry point of the model package, and the backend check every entry point runs first.

`zaya-forward --config tiny`: builds a model from a preset (or YAML path), runs one jitted forward pass on a random
batch and prints the logits shape, parameter counts and timings. The smallest end-to-end check of an install.

zaya-generate and zaya-rsa live in train/cli.py: they also open zaya-train run directories, whose checkpoint layout
belongs to the training package.

Errors a user can cause (a missing path, a bad setting) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zaya_jax.config import load_preset
from zaya_jax.model import inference_jit, init_model, parameter_counts


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

    @inference_jit
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


if __name__ == "__main__":
    sys.exit(forward_main())
