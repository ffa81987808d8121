"""Tests for train/data/sources.py: JSONL (both error modes), ArrayRecord, numpy tokens, synthetic."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from train.data.sources import ArrayRecordSource, JsonlSource, NumpyTokenSource, SyntheticSource, open_source
from train.data.synthetic import generate_problems

GOOD = [
    {"text": "plain document"},
    {"prompt": "1+1?", "thinking": "1+1=2", "answer": "\\boxed{2}"},
    {"turns": [{"prompt": "hi", "answer": "hello"}, {"prompt": "é?", "thinking": "x", "answer": "y"}]},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_good_records(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [json.dumps(r, ensure_ascii=False) for r in GOOD] + [""])
    src = JsonlSource(p)
    assert len(src) == 3
    assert [src[i] for i in range(3)] == GOOD
    assert src.skipped == 0
    with pytest.raises(IndexError):
        src[3]


def test_jsonl_multiple_files_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD[0])])
    b = write_jsonl(tmp_path / "b.jsonl", [json.dumps(GOOD[1]), json.dumps(GOOD[2])])
    src = JsonlSource([a, b])
    assert [src[i] for i in range(len(src))] == GOOD


def _mixed(tmp_path):
    lines = [
        json.dumps(GOOD[0]),
        '{"text": "unterminated',  # line 2: bad JSON
        json.dumps({"foo": 1}),  # line 3: JSON but not a record
        json.dumps(GOOD[1]),
    ]
    return write_jsonl(tmp_path / "mixed.jsonl", lines)


def test_jsonl_malformed_raise_names_file_and_line(tmp_path):
    p = _mixed(tmp_path)
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2:"):
        JsonlSource(p)
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2:"):
        JsonlSource(p, on_error="raise")


def test_jsonl_malformed_skip_counts(tmp_path):
    p = _mixed(tmp_path)
    src = JsonlSource(p, on_error="skip")
    assert src.skipped == 2
    assert src.skipped_locations == [(str(p), 2), (str(p), 3)]
    assert [src[i] for i in range(len(src))] == [GOOD[0], GOOD[1]]


def test_jsonl_empty_and_all_bad(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        JsonlSource(empty)
    bad = write_jsonl(tmp_path / "allbad.jsonl", ["nope", "{"])
    with pytest.raises(ValueError, match="allbad.jsonl"):
        JsonlSource(bad, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        JsonlSource(bad, on_error="ignore")


def write_arrayrecord(path, payloads):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(path), "group_size:1")
    for b in payloads:
        w.write(b)
    w.close()
    return path


def test_arrayrecord_round_trip(tmp_path):
    p = write_arrayrecord(tmp_path / "d.arrayrecord", [json.dumps(r).encode() for r in GOOD])
    src = ArrayRecordSource(p)
    assert len(src) == 3
    assert [src[i] for i in range(3)] == GOOD
    # Two files are one index space.
    q = write_arrayrecord(tmp_path / "e.arrayrecord", [json.dumps(GOOD[0]).encode()])
    both = ArrayRecordSource([p, q])
    assert [both[i] for i in range(4)] == GOOD + [GOOD[0]]


def test_arrayrecord_malformed_both_modes(tmp_path):
    good = write_arrayrecord(tmp_path / "ok.arrayrecord", [json.dumps(GOOD[0]).encode()])
    p = write_arrayrecord(
        tmp_path / "bad.arrayrecord",
        [json.dumps(GOOD[1]).encode(), b"\xff not json", json.dumps(GOOD[2]).encode()],
    )
    src = ArrayRecordSource([good, p])  # raise mode validates on read
    assert src[1] == GOOD[1]
    with pytest.raises(ValueError, match=r"bad\.arrayrecord: record 1"):
        src[2]
    skip = ArrayRecordSource([good, p], on_error="skip")
    assert skip.skipped == 1
    assert skip.skipped_locations == [(str(p), 1)]
    assert [skip[i] for i in range(len(skip))] == [GOOD[0], GOOD[1], GOOD[2]]


def test_arrayrecord_empty_and_missing(tmp_path):
    p = write_arrayrecord(tmp_path / "none.arrayrecord", [])
    with pytest.raises(ValueError, match="none.arrayrecord"):
        ArrayRecordSource(p)
    with pytest.raises(FileNotFoundError, match="ghost"):
        ArrayRecordSource(tmp_path / "ghost.arrayrecord")


def test_numpy_stream_split_on_eos(tmp_path):
    p = tmp_path / "s.npy"
    np.save(p, np.array([5, 6, 2, 7, 2, 8, 9], dtype=np.uint16))
    src = NumpyTokenSource(p, eos_id=2)
    assert src.prepacked_len is None
    docs = [src[i]["tokens"].tolist() for i in range(len(src))]
    assert docs == [[5, 6, 2], [7, 2], [8, 9]]
    assert src[0]["tokens"].dtype == np.int32
    with pytest.raises(ValueError, match="eos_id"):
        NumpyTokenSource(p)


def test_numpy_prepacked_rows(tmp_path):
    p = tmp_path / "rows.npy"
    arr = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.save(p, arr)
    src = NumpyTokenSource(p)
    assert len(src) == 3 and src.prepacked_len == 4
    assert src[2]["tokens"].tolist() == [8, 9, 10, 11]


def test_numpy_bad_files(tmp_path):
    e = tmp_path / "e.npy"
    np.save(e, np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="e.npy"):
        NumpyTokenSource(e, eos_id=2)
    f = tmp_path / "f.npy"
    np.save(f, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="integers"):
        NumpyTokenSource(f, eos_id=2)


def test_synthetic_source():
    fixed = SyntheticSource(seed=3, size=5)
    assert len(fixed) == 5
    assert [fixed[i] for i in range(5)] == generate_problems(5, seed=3)
    with pytest.raises(IndexError):
        fixed[5]
    inf = SyntheticSource(seed=3, split="heldout")
    assert len(inf) == sys.maxsize
    assert inf[2] == generate_problems(3, seed=3, split="heldout")[2]
    with pytest.raises(ValueError):
        SyntheticSource(split="dev")


def test_open_source(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [json.dumps(GOOD[0])])
    assert isinstance(open_source(p), JsonlSource)
    s = open_source("synthetic:heldout:7", seed=1)
    assert isinstance(s, SyntheticSource) and (s.split, s.size, s.seed) == ("heldout", 7, 1)
    with pytest.raises(ValueError, match="data.parquet"):
        open_source("data.parquet")
