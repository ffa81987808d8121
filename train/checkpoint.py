"""Training checkpoints: save / restore the train state, the data iterator's state and run metadata with orbax.

`Checkpointer` wraps one `orbax.checkpoint.CheckpointManager`. Every checkpoint step holds three items:

    state       StandardSave / StandardRestore   a pytree of arrays: params, optimizer state, balancer state, step
                                                  counter, PRNG key data, ...
    data_state  JsonSave / JsonRestore           the data iterator's state (a JSON-serialisable dict)
    extra       JsonSave / JsonRestore           anything else JSON-serialisable: the run config, metrics, ...

Usage in a training loop:

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1000, keep=3)
    if (step := ckpt.latest_step()) is not None:
        step, state, data_state, extra = ckpt.restore(abstract_state)   # abstract_state: jax.ShapeDtypeStructs
    ...
    if ckpt.should_save(step):
        ckpt.save(step, state, data_state, extra)     # async: returns once the arrays are copied off the device
    ...
    ckpt.save(step, state, data_state, extra, force=True)   # final / SIGTERM save
    ckpt.close()                                      # waits for the last save to commit

Guarantees:
  * Exact: restored arrays are bitwise equal to the saved ones, dtypes included (float32, bfloat16, int32, uint32).
  * PRNG keys: store `jax.random.key_data(key)` (a uint32 array) in `state` and re-wrap it after restoring with
    `jax.random.wrap_key_data(data, impl=...)`; the key data round-trips exactly, the typed key array is not stored.
  * Interrupted writes are never restored. orbax (0.12.x, local / POSIX paths) writes a step into
    `<step>.orbax-checkpoint-tmp` and commits it by writing `commit_success.txt` and renaming the directory to
    `<step>` (orbax/checkpoint/_src/path/atomicity.py, `AtomicRenameTemporaryPath.finalize`); a killed process
    leaves only the temporary directory, which orbax's step listing skips (`_StandardNameFormat._build_metadata`
    -> `is_path_finalized`, _src/path/step.py) and which is deleted when the next `Checkpointer` opens the
    directory (`cleanup_tmp_directories`). On object stores (gs://) orbax instead writes into `<step>` directly
    and a step only counts once `commit_success.txt` exists (`CommitFileTemporaryPath`). On top of that,
    `latest_step()` checks each step's directory on disk, so a save still in flight in this process (which orbax
    already lists) is not reported until it has committed; `restore()` first waits for that save.
    Not detected: a `<step>` directory on a local disk that lacks `commit_success.txt` counts as complete, as it
    does for orbax (only the atomic rename creates that name, and orbax before 0.12 wrote no marker there).
  * Restoring into a state whose tree structure, shapes or dtypes differ from the checkpoint raises one ValueError
    naming every differing tensor, before any array is read. Dtypes must match too: no silent casts on resume.
  * Damage is named, in one line. A committed step whose files cannot be read back (a data file under
    `<step>/state/ocdbt.process_0/d/` truncated or deleted, a metadata file missing) raises
    `DamagedCheckpointError` (a ValueError) with the step and the storage layer's own cause ("Truncated
    Zstd-compressed stream", "Requested byte range ..."), not orbax's traceback. What was read is verified before it
    is returned: every array has the shape and dtype asked for and floating-point arrays are finite.
    With `on_damaged`, `restore` reports each damaged step and falls back to the newest one that restores cleanly;
    `set_aside(step)` renames a damaged step to `<step>.damaged` (kept for inspection, invisible to orbax) so a
    resumed run can write that step again. `set_aside(step, SUPERSEDED_SUFFIX)` does the same for an intact step
    newer than the one a run resumes from (zaya-train --step N): `<step>.superseded`, kept, no longer a step.
  * `restore(..., only=...)` reads only the named top-level entries of the state (e.g. the parameters for export):
    the other arrays are not read, so damage confined to them (the optimizer state) does not stop an export.

Multi-host: every process must construct the `Checkpointer` and call `save` / `restore` / `wait` / `close`
collectively; orbax coordinates the processes (directory creation and commit on the primary host, barriers) when
`jax.distributed` is initialised. `restore` shards arrays like the abstract leaves' `.sharding`; on more than one
process the abstract state must carry shardings. `latest_step()` reads the directory on every process, so call it
when no save is in flight (at start-up, or after `wait()`) for all processes to agree.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PyTree = Any

_STATE = "state"
_DATA_STATE = "data_state"
_EXTRA = "extra"
# Long mismatch lists (e.g. a whole model built with another config) are cut here to keep the message readable.
_MAX_LISTED_MISMATCHES = 40
# A damaged step is renamed to "<step>.damaged": not a step name for orbax (digits only), so it is neither listed,
# restored nor garbage-collected.
DAMAGED_SUFFIX = ".damaged"
# The same for an intact step newer than the step a run resumed from: the resumed run writes its own steps there.
SUPERSEDED_SUFFIX = ".superseded"
# tensorstore's status codes (absl): the message that carries one is the storage layer's own cause.
_STATUS_RE = re.compile(r"\b(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN|"
                        r"INTERNAL|UNAVAILABLE|PERMISSION_DENIED|RESOURCE_EXHAUSTED): ")
# tensorstore appends the spec and C++ source locations; they bury the cause.
_NOISE_RE = re.compile(r"\s*\[(source locations|tensorstore_spec)=.*?\](?=\s*(\[|$))", re.DOTALL)


class DamagedCheckpointError(ValueError):
    """A committed checkpoint step that cannot be read back, or whose contents fail verification.

    `step` is the step, `cause` the one-line reason (the storage layer's message, or the failed check)."""

    def __init__(self, directory: str, step: int, cause: str):
        self.directory, self.step, self.cause = directory, step, cause
        super().__init__(f"checkpoint step {step} in {directory!r} is damaged: {cause}")

    def suggesting_other_steps(self, steps: Iterable[int]) -> DamagedCheckpointError:
        """This error for a step that was asked for (`--step N`): the cause plus the other complete `steps`."""
        others = ", ".join(str(s) for s in steps if s != self.step) or "none"
        return DamagedCheckpointError(self.directory, self.step, f"{self.cause}; choose another step with --step N "
                                      f"(other complete steps: {others})")


class Checkpointer:
    """Periodic, asynchronous, crash-safe checkpoints of a training run in one directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        # orbax requires absolute paths (a relative one fails only when the async commit runs).
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint directory {str(self.directory)!r} exists but is not a directory")
        self.save_every = save_every
        self.keep = keep
        self.async_save = async_save
        # Our own name format (the same one orbax would default to) so that `_is_committed` asks orbax the very
        # question its step listing asks, instead of re-deriving step directory names here.
        self._name_format = ocp.step.standard_name_format()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # `should_save` is ours; orbax's interval logic is bypassed with force=True in `save`.
            save_interval_steps=1,
            step_name_format=self._name_format,
            create=True,
            # Leftovers of a killed save are never restorable; removing them (primary host only) frees their space.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        # Registering the handlers up front lets a fresh manager read `state`'s tree metadata before any restore.
        registry = ocp.handlers.create_default_handler_registry(
            **{
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA_STATE: ocp.JsonCheckpointHandler(),
                _EXTRA: ocp.JsonCheckpointHandler(),
            }
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._pending_step: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ saving

    def should_save(self, step: int) -> bool:
        """Whether `step` is a periodic checkpoint step (`step % save_every == 0`)."""
        return step % self.save_every == 0

    def save(
        self,
        step: int,
        state: PyTree,
        data_state: dict,
        extra: dict | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint for `step` if `should_save(step)` or `force`; returns whether a save was started.

        With `async_save` this returns once the arrays have been copied off the device: the caller may then donate
        or overwrite `state` while the files are written in the background. A step that is already saved (or being
        saved) is left alone and False is returned. After the save, only the newest `keep` checkpoints remain.
        """
        self._check_open()
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        typed_keys = [
            _path_str(path)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)
        ]
        if typed_keys:
            # orbax would store only the key data, which then cannot be restored into a typed-key abstract state.
            raise TypeError(
                f"typed PRNG keys in the checkpoint state ({', '.join(typed_keys)}): store jax.random.key_data(key) "
                "and re-wrap it with jax.random.wrap_key_data after restoring"
            )
        extra = {} if extra is None else extra
        # Fail here, in the caller's frame, rather than in orbax's background writer thread.
        for name, value in ((_DATA_STATE, data_state), (_EXTRA, extra)):
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"checkpoint {name} must be JSON-serialisable: {e}") from e
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(state),
                    _DATA_STATE: ocp.args.JsonSave(data_state),
                    _EXTRA: ocp.args.JsonSave(extra),
                }
            ),
            force=True,
        )
        if saved:
            self._pending_step = step
        return bool(saved)

    def wait(self) -> None:
        """Blocks until the background save (if any) has committed; raises if it did not."""
        self._manager.wait_until_finished()
        step, self._pending_step = self._pending_step, None
        if step is not None and not self._is_committed(step):
            raise RuntimeError(f"checkpoint step {step} in {str(self.directory)!r} did not commit; see orbax's log")

    def close(self) -> None:
        """Waits for the last save and releases orbax's resources. Safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._manager.close()
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --------------------------------------------------------------- restoring

    def all_steps(self) -> list[int]:
        """The steps of all complete (committed) checkpoints, ascending."""
        return sorted(s for s in self._manager.all_steps() if self._is_committed(s))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(
        self,
        abstract_state: PyTree,
        step: int | None = None,
        *,
        only: Iterable[str] | None = None,
        on_damaged: Callable[[DamagedCheckpointError], None] | None = None,
    ) -> tuple[int, PyTree, dict | None, dict | None]:
        """Restores checkpoint `step` (default: the latest complete one) into the structure of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s (with `.sharding` to place the arrays; e.g. from
        `jax.eval_shape`) or of arrays (whose shape, dtype and sharding are used). Returns
        `(step, state, data_state, extra)`.

        `only`: names of top-level entries of the saved state (a dict) to read, e.g. ("params", "biases");
        `abstract_state` then holds just those, nothing else is read, and data_state and extra are None.
        `on_damaged`: without `step`, a damaged step is passed to it and the next older step is tried; the
        returned step is the newest that restores cleanly. Without it, the damage is raised.

        Raises FileNotFoundError when there is no such complete checkpoint, ValueError when its tensors do not
        match `abstract_state` (listing all differences) and DamagedCheckpointError when the step (every step,
        with `on_damaged`) cannot be read back or fails verification.
        """
        self._check_open()
        # Our own in-flight save must land before it can be listed or read.
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {str(self.directory)!r}")
            candidates = steps[::-1] if on_damaged is not None else steps[-1:]
        elif step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {str(self.directory)!r}; complete steps: {steps}"
            )
        else:
            candidates = [step]
        abstract_state = jax.tree.map(_as_abstract, abstract_state)
        only = None if only is None else tuple(only)
        damaged = []
        for candidate in candidates:
            try:
                return (candidate, *self._restore_step(candidate, abstract_state, only))
            except DamagedCheckpointError as e:
                if on_damaged is None:
                    raise
                damaged.append(e)
                on_damaged(e)
        raise DamagedCheckpointError(
            str(self.directory), damaged[-1].step,
            f"{damaged[-1].cause}; no older step restores cleanly either (tried {[e.step for e in damaged]})",
        )

    def set_aside(self, step: int, suffix: str = DAMAGED_SUFFIX) -> str:
        """Renames step `step` to `<step><suffix>` (`<step><suffix>.2`, ... if taken): kept on disk for inspection,
        but no longer a step, so a resumed run can save that step again. Returns the new path."""
        self._check_open()
        source = self._name_format.find_step(self.directory, step).path
        target = self.directory / f"{source.name}{suffix}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{source.name}{suffix}.{n}"
        if jax.process_index() == 0:
            source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"zaya_set_aside_{step}")
        self._manager.reload()
        return str(target)

    # ---------------------------------------------------------------- internal

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Checkpointer is closed")

    def _is_committed(self, step: int) -> bool:
        try:
            self._name_format.find_step(self.directory, step)
        except ValueError:
            return False
        return True

    def _restore_step(
        self, step: int, abstract_state: PyTree, only: tuple[str, ...] | None
    ) -> tuple[PyTree, dict | None, dict | None]:
        """(state, data_state, extra) of one step, checked before and verified after reading."""
        tree_metadata = self._tree_metadata(step)
        if only is None:
            self._check_matches(step, tree_metadata, abstract_state)
            items = {_STATE: ocp.args.StandardRestore(abstract_state), _DATA_STATE: ocp.args.JsonRestore(),
                     _EXTRA: ocp.args.JsonRestore()}
        else:
            unknown = sorted(set(only) - set(tree_metadata))
            if unknown or set(abstract_state) != set(only):
                raise ValueError(f"restore(only={list(only)}): the abstract state has {sorted(abstract_state)}; "
                                 f"not in checkpoint step {step}: {unknown}")
            self._check_matches(step, {k: tree_metadata[k] for k in only}, abstract_state)
        try:
            if only is None:
                restored = self._manager.restore(step, args=ocp.args.Composite(**items))
                state, data_state, extra = restored[_STATE], restored[_DATA_STATE], restored[_EXTRA]
            else:
                state, data_state, extra = self._read_part(step, abstract_state), None, None
        except Exception as e:  # noqa: BLE001 - the tree was checked above: whatever fails now is the files
            raise DamagedCheckpointError(str(self.directory), step, _root_cause(e)) from e
        self._verify(step, state, abstract_state)
        return state, data_state, extra

    def _read_part(self, step: int, abstract_part: PyTree) -> PyTree:
        """Reads only the leaves of `abstract_part` from the step's state: orbax's standard handler has no partial
        restore, its PyTree handler does (leaves not in the item are neither read nor returned)."""
        path = self._name_format.find_step(self.directory, step).path / _STATE
        reader = ocp.PyTreeCheckpointer()
        try:
            return reader.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract_part, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_part),
                partial_restore=True))
        finally:
            reader.close()

    def _tree_metadata(self, step: int) -> PyTree:
        try:
            tree_metadata = self._manager.metadata(step).item_metadata[_STATE]
        except Exception as e:  # noqa: BLE001 - missing or unreadable metadata files
            raise DamagedCheckpointError(str(self.directory), step, _root_cause(e)) from e
        if tree_metadata is None:
            raise DamagedCheckpointError(str(self.directory), step, "the state's tree metadata is missing")
        return getattr(tree_metadata, "tree", tree_metadata)

    def _verify(self, step: int, restored: PyTree, abstract_state: PyTree) -> None:
        """Raises DamagedCheckpointError unless every restored array has the abstract leaf's shape and dtype and
        every floating-point one is finite: what training or export would go on to use is what was saved."""
        got = dict(_flat_leaves(restored))
        problems = []
        floats = []
        for path, want in _flat_leaves(abstract_state):
            leaf = got.get(path)
            if leaf is None or not hasattr(leaf, "shape"):
                problems.append(f"{path}: not restored")
            elif tuple(leaf.shape) != tuple(want.shape) or leaf.dtype != want.dtype:
                problems.append(f"{path}: read {_fmt((tuple(leaf.shape), _dtype_name(leaf.dtype)))}, "
                                f"expected {_fmt((tuple(want.shape), _dtype_name(want.dtype)))}")
            elif jnp.issubdtype(leaf.dtype, jnp.inexact):
                floats.append((path, leaf))
        if floats:
            # One check per leaf: leaves may live on different devices. The replicated result is read from the local
            # copy (on several processes the whole array is not addressable).
            problems += [f"{path}: non-finite values" for path, leaf in floats
                         if not np.asarray(_all_finite(leaf).addressable_data(0))]
        if problems:
            more = len(problems) - _MAX_LISTED_MISMATCHES
            listed = problems[:_MAX_LISTED_MISMATCHES] + ([f"... and {more} more"] if more > 0 else [])
            raise DamagedCheckpointError(str(self.directory), step,
                                         "what was read fails verification: " + "; ".join(listed))

    def _check_matches(self, step: int, tree_metadata: PyTree, abstract_state: PyTree) -> None:
        """Compares the checkpoint's tree metadata with `abstract_state`; raises one ValueError listing all diffs."""
        saved = _flat_shapes(tree_metadata)
        wanted = _flat_shapes(abstract_state)
        problems = []
        for path in sorted(saved.keys() | wanted.keys()):
            if path not in wanted:
                problems.append(f"{path}: in the checkpoint {_fmt(saved[path])}, not in the model")
            elif path not in saved:
                problems.append(f"{path}: missing from the checkpoint, model {_fmt(wanted[path])}")
            elif not _compatible(saved[path], wanted[path]):
                problems.append(f"{path}: checkpoint {_fmt(saved[path])}, model {_fmt(wanted[path])}")
        if problems:
            more = len(problems) - _MAX_LISTED_MISMATCHES
            listed = problems[:_MAX_LISTED_MISMATCHES] + ([f"... and {more} more"] if more > 0 else [])
            raise ValueError(f"checkpoint step {step} does not match the model: " + "; ".join(listed))


def _as_abstract(leaf: Any) -> Any:
    # Only a concrete array's shape, dtype and sharding matter for the restore (its buffer may even be donated).
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()


def _root_cause(error: BaseException) -> str:
    """The one line that says why orbax failed: the storage layer's status message (tensorstore's DATA_LOSS /
    NOT_FOUND / OUT_OF_RANGE ...) found anywhere in the exception's chain, without the specs and source locations
    tensorstore appends; otherwise the innermost exception's first line."""
    chain, seen, todo = [], set(), [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        chain.append(e)
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]
    for e in chain:
        match = _STATUS_RE.search(str(e))
        if match:
            text = _NOISE_RE.sub("", str(e)[match.start():])
            return " ".join(text.split())
    innermost = chain[-1]
    lines = str(innermost).strip().splitlines()
    return f"{type(innermost).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _key_name(key: Any) -> str:
    # orbax stores namedtuples (optax states) as dicts and tuples as lists, so attribute, dict and sequence keys must
    # all render alike for the checkpoint's paths to line up with the model's.
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_str(path: tuple) -> str:
    return "/".join(_key_name(k) for k in path)


def _flat_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    return [(_path_str(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _flat_shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...] | None, str | None]]:
    """{"a/b/0/c": (shape, dtype name)} for every leaf of `tree` (arrays, ShapeDtypeStructs or orbax metadata)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = getattr(leaf, "shape", None)
        dtype = getattr(leaf, "dtype", None)
        out[_path_str(path)] = (
            None if shape is None else tuple(shape),
            None if dtype is None else _dtype_name(dtype),
        )
    return out


def _dtype_name(dtype: Any) -> str:
    # Extended dtypes (typed PRNG keys: "key<fry>") are not NumPy dtypes; their str() is still unambiguous.
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _compatible(a: tuple[tuple[int, ...] | None, str | None], b: tuple[tuple[int, ...] | None, str | None]) -> bool:
    # A field only one side knows (e.g. a non-array leaf's dtype) cannot be compared, so it does not count as a diff.
    return all(x is None or y is None or x == y for x, y in zip(a, b))


def _fmt(shape_dtype: tuple[tuple[int, ...] | None, str | None]) -> str:
    shape, dtype = shape_dtype
    return f"{'?' if shape is None else shape} {dtype or '?'}"
