"""grain input pipeline: records -> formatted, trimmed, packed, batched numpy arrays.

``make_dataset(...)`` returns a ``grain.IterDataset`` whose elements are dicts::

    tokens      int32   [B, L]
    segment_ids int32   [B, L]   1, 2, ... per document in a row, 0 = padding
    positions   int32   [B, L]   0.. within each document, 0 on padding
    loss_mask   float32 [B, L]   1 where the token is a training target
    targets     int32   [B, L]   tokens shifted left by one      (with_targets)
    target_mask float32 [B, L]   loss weight of targets[t]        (with_targets)

(``targets``/``target_mask`` follow ``packing.next_token_targets``: position t
predicts token t+1 only inside one segment.)

Stages, in order::

    source (random access)
      -> MapDataset slice [shard_index::shard_count]   per-host sharding by record
      -> shuffle(seed) -> repeat(num_epochs)           finite sources only
      -> map: tokenize + trim / chunk                  pure, runs in reader threads
      -> to_iter_dataset(ReadOptions)                  ordered prefetch
      -> PackIterDataset                               custom, checkpointable
      -> map(next_token_targets) -> batch(B)

Checkpointing: ``it = iter(ds); state = it.get_state()`` is a JSON-serialisable
dict; ``it2 = iter(make_dataset(<same args>)); it2.set_state(state)`` continues
with exactly the batches ``it`` would have produced. The packer's state is
the upstream position at which its current buffer started, the counters at
that point, and how many rows of that buffer were already emitted; restoring
re-reads the buffer and re-packs it (packing is deterministic) instead of
storing buffered tokens in the checkpoint.

Counters (kept/trimmed/dropped from trimming; chunked = plain-text documents
longer than L split into L-token pieces; skipped = ``None`` records; document_tokens /
padding_tokens = the two kinds of token in the rows emitted so far) live in
the packer's state, so they are restored with it; read them with
``pipeline_counters(it)`` or ``trim_counters(it)``, and the fraction of
emitted row tokens that are document tokens with ``packing_efficiency``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from train.data.formatting import tokenize_record
from train.data.packing import _check_length, check_packing, next_token_targets, pack_examples
from zaya_jax.tokenizers import Tokenizer
from train.data.trimming import TrimCounters, trim_sample

RECORD_COUNTERS = ("kept", "trimmed", "dropped", "chunked", "skipped")  # per record read, when its buffer fills
ROW_COUNTERS = ("document_tokens", "padding_tokens")  # per row emitted: its document tokens and its padding tokens
COUNTER_KEYS = RECORD_COUNTERS + ROW_COUNTERS


class _FormatAndTrim:
    """record -> {"examples": [example, ...], "outcome": str}.

    A class rather than a closure so the stage pickles (grain worker processes).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, completion_only: bool, trim: bool) -> None:
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.completion_only = completion_only
        self.trim = trim

    def __call__(self, record: Any) -> dict[str, Any]:
        if record is None:
            return {"examples": [], "outcome": "skipped"}
        sample = tokenize_record(record, self.tokenizer)
        if not self.trim or len(sample) <= self.seq_len:
            # Untrimmed over-long samples are rejected by the packer with an
            # error that points at trim=True.
            return {"examples": [sample.to_example(self.completion_only)], "outcome": "kept"}
        if sample.is_text:
            # Plain text has no answer to protect; splitting it loses no tokens,
            # which dropping (the only trimming outcome for text) would.
            ex = sample.to_example(self.completion_only)
            n, L = len(sample), self.seq_len
            chunks = [
                {"tokens": ex["tokens"][i : i + L], "loss_mask": ex["loss_mask"][i : i + L]}
                for i in range(0, n, L)
            ]
            return {"examples": chunks, "outcome": "chunked"}
        trimmed, outcome = trim_sample(sample, self.seq_len)
        examples = [] if trimmed is None else [trimmed.to_example(self.completion_only)]
        return {"examples": examples, "outcome": outcome}


class _PackIterator(grain.DatasetIterator):
    """Fills a buffer of examples, packs it (first or best fit, longest first), emits the rows."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, buffer_size: int, packing: str) -> None:
        super().__init__(parent)
        self._seq_len = seq_len
        self._buffer_size = buffer_size
        self._packing = packing
        self._counters = dict.fromkeys(COUNTER_KEYS, 0)
        self._rows: list[dict[str, np.ndarray]] = []
        self._next_row = 0
        self._exhausted = False
        self._buffer_start_state: dict[str, Any] | None = None
        self._buffer_start_counters: dict[str, int] | None = None

    def _fill(self) -> None:
        self._buffer_start_state = self._parent.get_state()
        self._buffer_start_counters = dict(self._counters)
        examples = []
        # Count records pulled, not examples kept, so a run of dropped samples
        # cannot make one fill unbounded.
        for _ in range(self._buffer_size):
            try:
                item = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            self._counters[item["outcome"]] += 1
            for ex in item["examples"]:
                records_read = sum(self._counters[k] for k in RECORD_COUNTERS)
                _check_length(len(ex["tokens"]), self._seq_len, records_read - 1)
                examples.append(ex)
        self._rows = pack_examples(examples, self._seq_len, self._packing) if examples else []
        self._next_row = 0

    def _count_row(self, row: dict[str, np.ndarray]) -> None:
        documents = int(np.count_nonzero(row["segment_ids"]))
        self._counters["document_tokens"] += documents
        self._counters["padding_tokens"] += self._seq_len - documents

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        while self._next_row >= len(self._rows):
            if self._exhausted:
                raise StopIteration
            self._fill()
        row = self._rows[self._next_row]
        self._next_row += 1
        self._count_row(row)
        return row

    def get_state(self) -> dict[str, Any]:
        if self._next_row < len(self._rows):
            return {
                "parent": self._buffer_start_state,
                "counters": dict(self._buffer_start_counters),
                "rows_emitted": self._next_row,
            }
        # Between buffers: nothing pending, so the upstream position suffices.
        return {"parent": self._parent.get_state(), "counters": dict(self._counters), "rows_emitted": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        missing = [k for k in COUNTER_KEYS if k not in state["counters"]]
        if missing:
            raise ValueError(f"data iterator state has no counter(s) {missing}: it was saved by an older "
                             f"pipeline (counters {sorted(state['counters'])})")
        self._parent.set_state(state["parent"])
        self._counters = {k: int(state["counters"][k]) for k in COUNTER_KEYS}
        self._exhausted = False
        self._rows, self._next_row = [], 0
        if state["rows_emitted"]:
            # The saved counters are those at the buffer's start: re-packing recounts its records, and the rows
            # already emitted from it are counted again here.
            self._fill()
            self._next_row = int(state["rows_emitted"])
            for row in self._rows[: self._next_row]:
                self._count_row(row)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def __str__(self) -> str:
        return f"PackIterator(seq_len={self._seq_len}, buffer_size={self._buffer_size}, packing={self._packing})"


class PackIterDataset(grain.IterDataset):
    """grain transformation: ``{"examples", "outcome"}`` items -> packed rows of length ``seq_len``."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, buffer_size: int = 256,
                 packing: str = "first_fit") -> None:
        super().__init__(parent)
        if seq_len <= 0 or buffer_size <= 0:
            raise ValueError(f"seq_len and buffer_size must be positive, got {seq_len}, {buffer_size}")
        check_packing(packing)
        self._seq_len = seq_len
        self._buffer_size = buffer_size
        self._packing = packing

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._buffer_size, self._packing)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, buffer_size={self._buffer_size}, packing={self._packing})"


def _add_targets(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    targets, target_mask = next_token_targets(row["tokens"], row["segment_ids"], row["loss_mask"])
    return {**row, "targets": targets, "target_mask": target_mask}


def make_dataset(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    completion_only: bool = True,
    trim: bool = True,
    *,
    shuffle: bool = True,
    num_epochs: int | None = None,
    pack_buffer_size: int = 256,
    packing: str = "first_fit",
    drop_remainder: bool = True,
    with_targets: bool = True,
    num_threads: int = 2,
    prefetch_buffer_size: int = 64,
) -> grain.IterDataset:
    """Build the batched, packed training dataset (see module docstring).

    ``source``: any random-access sequence of records (``sources.py`` classes,
    or a list of dicts). ``num_epochs=None`` repeats a finite source forever,
    reshuffling each epoch; infinite sources (``len == sys.maxsize``) are read
    in order, unshuffled. Shard ``k`` of ``n`` reads records ``k, k+n, ...``
    of the source, so shards are disjoint and together cover it.
    ``trim=False`` disables trimming and text chunking: an example longer
    than ``seq_len`` then raises. ``packing`` ("first_fit" or "best_fit",
    ``packing.PACKINGS``) is how each buffer of ``pack_buffer_size`` records
    is packed into rows. ``num_threads``/``prefetch_buffer_size``
    configure grain's ordered reader prefetch (0 threads = read inline).
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    prepacked = getattr(source, "prepacked_len", None)
    if prepacked is not None and prepacked != seq_len:
        raise ValueError(f"pre-packed rows of {source!r} have length {prepacked}, but seq_len is {seq_len}")
    n = len(source)
    if n == 0:
        raise ValueError(f"source {source!r} is empty")
    infinite = n == sys.maxsize

    ds = grain.MapDataset.source(source)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"shard {shard_index}/{shard_count} of {source!r} ({n} records) is empty")
    if not infinite:
        if shuffle:
            ds = ds.shuffle(seed=seed)
        if num_epochs != 1:
            # reseed_each_epoch: each pass is shuffled differently, deterministically.
            ds = ds.repeat(num_epochs)
    ds = ds.map(_FormatAndTrim(tokenizer, seq_len, completion_only, trim))
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    it_ds = PackIterDataset(it_ds, seq_len, pack_buffer_size, packing)
    if with_targets:
        it_ds = it_ds.map(_add_targets)
    return it_ds.batch(batch_size, drop_remainder=drop_remainder)


def _find_pack_iterator(it: grain.DatasetIterator) -> _PackIterator:
    todo = [it]
    while todo:
        cur = todo.pop()
        if isinstance(cur, _PackIterator):
            return cur
        # DatasetIterator keeps its upstream iterators in _parents; grain
        # offers no public traversal.
        todo.extend(getattr(cur, "_parents", ()))
    raise ValueError(f"{it} was not produced by make_dataset (no packing stage found)")


def pipeline_counters(it: grain.DatasetIterator) -> dict[str, int]:
    """Counts of kept/trimmed/dropped/chunked/skipped records read so far by ``it``, and of the document
    tokens / padding tokens in the rows it has emitted.

    Records sitting in the packing buffer count as read, so the record counts
    can run up to ``pack_buffer_size`` ahead of the rows consumed.
    """
    return _find_pack_iterator(it).counters()


def packing_efficiency(counters: dict[str, int]) -> float | None:
    """Document tokens / all tokens of the emitted rows, from ``pipeline_counters`` (possibly summed over
    shards); None before any row."""
    total = counters["document_tokens"] + counters["padding_tokens"]
    return counters["document_tokens"] / total if total else None


def trim_counters(it: grain.DatasetIterator) -> TrimCounters:
    """The kept/trimmed/dropped part of ``pipeline_counters`` as a ``TrimCounters``."""
    return TrimCounters.from_dict(pipeline_counters(it))
