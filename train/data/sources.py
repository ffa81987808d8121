"""Random-access record sources: ``len(src)`` records, ``src[i] -> record``.

Every source is a plain sequence (``__len__`` + ``__getitem__``), which is
what ``grain.MapDataset.source`` wraps; random access is what lets the
pipeline shard by index, shuffle, and checkpoint as a single integer.

* ``JsonlSource``: one JSON object per line (``{"text"}``, reasoning records
  or ``{"turns": [...]}``, see ``formatting.py``). The files are scanned once
  at construction to validate each line and remember its byte offset; records
  are re-read and re-parsed on access, so memory holds offsets, not records.
* ``ArrayRecordSource``: each record is JSON-encoded bytes of the same kinds.
* ``NumpyTokenSource``: a ``.npy`` of token ids: 1-D int stream cut into
  documents after each eos id (eos kept at the end of its document), or 2-D
  ``[N, L]`` pre-packed rows, one record per row. Records are
  ``{"tokens": int [n]}``.
* ``SyntheticSource``: ``synthetic.problem_at`` by index; fixed-size or
  infinite (``len == sys.maxsize``).

Malformed records: ``on_error="raise"`` (default) raises ValueError naming the
file and line (JSONL, 1-based) or record index (ArrayRecord, 0-based);
``on_error="skip"`` leaves them out and counts them in ``.skipped`` (the
locations of the first 100 are in ``.skipped_locations``). A source with no
usable record raises ValueError naming it.

This module does not import grain.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from train.data.formatting import record_kind
from train.data.synthetic import aggregation_problem_at, problem_at

_MAX_LOCATIONS = 100
_SKIP_HINT = "on_error='skip' (data.on_error=skip in a training config) leaves malformed records out and counts them"
PathLike = str | os.PathLike


def _as_paths(paths: PathLike | Sequence[PathLike]) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise ValueError("no input files given")
    return out


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def _parse_record(raw: bytes | str) -> dict[str, Any]:
    rec = json.loads(raw)
    record_kind(rec)  # raises ValueError for JSON that is not a usable record
    return rec


class JsonlSource:
    """JSON-lines files as one random-access sequence of records."""

    def __init__(self, paths: PathLike | Sequence[PathLike], *, on_error: str = "raise") -> None:
        _check_on_error(on_error)
        self.paths = _as_paths(paths)
        self.on_error = on_error
        self.skipped = 0
        self.skipped_locations: list[tuple[str, int]] = []
        file_idx: list[int] = []
        offsets: list[int] = []
        lengths: list[int] = []
        for fi, path in enumerate(self.paths):
            with open(path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, start=1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue  # blank lines (e.g. a trailing newline) are not records
                    try:
                        _parse_record(line)
                    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                        if on_error == "raise":
                            raise ValueError(f"{path}:{lineno}: malformed JSONL record: {e} ({_SKIP_HINT})") from e
                        self.skipped += 1
                        if len(self.skipped_locations) < _MAX_LOCATIONS:
                            self.skipped_locations.append((path, lineno))
                        continue
                    file_idx.append(fi)
                    offsets.append(start)
                    lengths.append(len(line))
        if not offsets:
            raise ValueError(f"JSONL source {self.paths} has no valid records (skipped {self.skipped})")
        self._file_idx = np.asarray(file_idx, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        # Open per read: cheap next to JSON parsing, and safe to use from the
        # grain reader threads and after pickling into worker processes.
        with open(self.paths[self._file_idx[i]], "rb") as f:
            f.seek(int(self._offsets[i]))
            raw = f.read(int(self._lengths[i]))
        return json.loads(raw)

    def __repr__(self) -> str:
        return f"JsonlSource({self.paths}, records={len(self)}, skipped={self.skipped})"


class ArrayRecordSource:
    """ArrayRecord files whose records are JSON-encoded bytes.

    In "raise" mode records are validated when read (a bad one raises naming
    file and index). In "skip" mode every record is read once at construction
    so that the bad ones can be excluded and counted exactly; that costs one
    pass over the data.
    """

    def __init__(self, paths: PathLike | Sequence[PathLike], *, on_error: str = "raise") -> None:
        _check_on_error(on_error)
        from array_record.python.array_record_data_source import ArrayRecordDataSource  # noqa: PLC0415
        from array_record.python.array_record_module import ArrayRecordReader  # noqa: PLC0415

        self.paths = _as_paths(paths)
        self.on_error = on_error
        for p in self.paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"ArrayRecord file not found: {p!r}")
        counts = []
        for p in self.paths:
            reader = ArrayRecordReader(p)
            counts.append(reader.num_records())
            reader.close()
        # starts[k] = global index of file k's first record (for error messages).
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._ds = ArrayRecordDataSource(self.paths)
        self.skipped = 0
        self.skipped_locations: list[tuple[str, int]] = []
        self._valid: np.ndarray | None = None
        if on_error == "skip":
            valid = []
            for i in range(len(self._ds)):
                try:
                    _parse_record(self._ds[i])
                except (ValueError, UnicodeDecodeError):
                    self.skipped += 1
                    if len(self.skipped_locations) < _MAX_LOCATIONS:
                        self.skipped_locations.append(self._location(i))
                    continue
                valid.append(i)
            self._valid = np.asarray(valid, dtype=np.int64)
        if len(self) == 0:
            raise ValueError(f"ArrayRecord source {self.paths} has no valid records (skipped {self.skipped})")

    def _location(self, global_index: int) -> tuple[str, int]:
        k = int(np.searchsorted(self._starts, global_index, side="right")) - 1
        return self.paths[k], int(global_index - self._starts[k])

    def __len__(self) -> int:
        return len(self._valid) if self._valid is not None else len(self._ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        g = int(self._valid[i]) if self._valid is not None else i
        raw = self._ds[g]
        try:
            return _parse_record(raw)
        except (ValueError, UnicodeDecodeError) as e:
            path, local = self._location(g)
            raise ValueError(f"{path}: record {local}: malformed ArrayRecord record: {e} ({_SKIP_HINT})") from e

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.paths}, records={len(self)}, skipped={self.skipped})"


class NumpyTokenSource:
    """Token ids from a ``.npy``: 1-D stream split on eos, or 2-D pre-packed rows.

    ``prepacked_len`` is the row length for 2-D files (the pipeline checks it
    equals its sequence length) and None for 1-D streams.
    """

    def __init__(self, path: PathLike, *, eos_id: int | None = None) -> None:
        self.path = os.fspath(path)
        # mmap: token files can be far larger than RAM; slices are read lazily.
        arr = np.load(self.path, mmap_mode="r")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{self.path}: token file must hold integers, got dtype {arr.dtype}")
        self._arr = arr
        if arr.ndim == 1:
            if eos_id is None:
                raise ValueError(f"{self.path}: a 1-D token stream needs eos_id to be cut into documents")
            ends = np.flatnonzero(np.asarray(arr) == eos_id) + 1
            if ends.size == 0 or ends[-1] != arr.shape[0]:
                # Trailing tokens after the last eos are a final document.
                ends = np.append(ends, arr.shape[0])
            ends = ends[ends > 0]
            self._ends = ends.astype(np.int64)
            self._starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
            self.prepacked_len: int | None = None
        elif arr.ndim == 2:
            self.prepacked_len = int(arr.shape[1])
        else:
            raise ValueError(f"{self.path}: token file must be 1-D or 2-D, got shape {arr.shape}")
        if len(self) == 0 or arr.size == 0:
            raise ValueError(f"numpy token source {self.path!r} is empty")

    def __len__(self) -> int:
        if self._arr.ndim == 2:
            return int(self._arr.shape[0])
        return int(self._ends.shape[0])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = int(index)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        if self._arr.ndim == 2:
            toks = self._arr[i]
        else:
            toks = self._arr[self._starts[i] : self._ends[i]]
        return {"tokens": np.asarray(toks, dtype=np.int32)}

    def __repr__(self) -> str:
        return f"NumpyTokenSource({self.path!r}, records={len(self)})"


class SyntheticSource:
    """``synthetic.problem_at(i, seed, split)`` for i < size (size None: infinite); with ``aggregation=True``,
    ``synthetic.aggregation_problem_at`` (half plain problems, half RSA aggregation records)."""

    def __init__(self, seed: int = 0, split: str = "train", size: int | None = None,
                 aggregation: bool = False) -> None:
        if size is not None and size <= 0:
            raise ValueError(f"synthetic source size must be positive, got {size}")
        problem_at(0, seed, split)  # validates seed and split early
        self.seed = seed
        self.split = split
        self.size = size
        self.aggregation = aggregation

    @property
    def infinite(self) -> bool:
        return self.size is None

    def __len__(self) -> int:
        # grain's convention for an unbounded MapDataset.
        return sys.maxsize if self.size is None else self.size

    def __getitem__(self, index: int) -> dict[str, str]:
        i = int(index)
        if i < 0 or (self.size is not None and i >= self.size):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        return (aggregation_problem_at if self.aggregation else problem_at)(i, self.seed, self.split)

    def __repr__(self) -> str:
        return (f"SyntheticSource(seed={self.seed}, split={self.split!r}, size={self.size}, "
                f"aggregation={self.aggregation})")


def open_source(
    spec: str | PathLike, *, on_error: str = "raise", eos_id: int | None = None, seed: int = 0
) -> JsonlSource | ArrayRecordSource | NumpyTokenSource | SyntheticSource:
    """Build a source from a config string.

    ``"synthetic"`` / ``"synthetic:heldout"`` / ``"synthetic:train:1000"``
    (split and size optional), the same with ``"synthetic-rsa"`` (RSA aggregation records mixed in), or a file path ending in ``.jsonl``/``.json``,
    ``.arrayrecord``/``.array_record``, or ``.npy``.
    """
    s = os.fspath(spec)
    kind, _, rest = s.partition(":")
    if kind in ("synthetic", "synthetic-rsa"):
        parts = rest.split(":") if rest else []
        split = parts[0] if parts and parts[0] else "train"
        size = int(parts[1]) if len(parts) > 1 else None
        return SyntheticSource(seed=seed, split=split, size=size, aggregation=kind == "synthetic-rsa")
    suffix = Path(s).suffix
    if suffix in (".jsonl", ".json"):
        return JsonlSource(s, on_error=on_error)
    if suffix in (".arrayrecord", ".array_record"):
        return ArrayRecordSource(s, on_error=on_error)
    if suffix == ".npy":
        return NumpyTokenSource(s, eos_id=eos_id)
    raise ValueError(
        f"cannot tell the source type of {spec!r} (want synthetic[-rsa][:split[:size]], .jsonl, .arrayrecord, .npy)"
    )
