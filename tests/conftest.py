"""Test setup: 8 virtual CPU devices (for the sharding tests), exact float32 matmuls on CPU, and one compilation
cache for the whole run.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here. The suite builds the same tiny
programs many times over (each test's fresh jit, the CLIs and examples it runs in subprocesses, the two pytest-xdist
workers): a persistent compilation cache, new for every run and shared by all its processes through the
environment, compiles each of them once. A cache hit returns the executable XLA compiled for the identical program,
so results are unchanged. Set JAX_COMPILATION_CACHE_DIR yourself to keep (or to inspect) the cache.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set in the first process (pytest-xdist's controller, or the only one), inherited by workers and subprocesses.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="zaya-jax-test-compilations-")
    os.environ["ZAYA_TEST_OWNS_COMPILATION_CACHE"] = str(os.getpid())
# Cache every program, however quick to compile: the tiny test programs are many and each takes 0.1-2 s.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_unconfigure(config):
    if os.environ.get("ZAYA_TEST_OWNS_COMPILATION_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The slowest files on 2 cores (CI's slowest-durations list) run first. pytest-xdist hands whole files (--dist
# loadfile) to whichever worker is free, in collection order, so a long file that starts near the end keeps one worker
# busy while the other idles; longest first leaves only short files for the end.
_SLOW_FILES_FIRST = (
    "tests/test_quickstart_notebook.py", "tests/sharding/test_context.py", "tests/sharding/test_multihost.py",
    "tests/sharding/test_meshes.py", "tests/zaya_jax/test_kernels.py", "tests/test_benchmarks.py",
    "tests/train/test_damaged_checkpoint.py", "tests/train/test_step.py", "tests/train/test_loop.py",
    "tests/test_examples.py", "tests/zaya_jax/test_generate.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
