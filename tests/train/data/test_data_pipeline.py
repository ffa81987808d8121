"""Tests for train/data/pipeline.py: batch layout, determinism, sharding, checkpoint/restore, trimming, packing
(best fit at a long window) and its efficiency counters."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from tests.train.data.test_data_packing import reference_best_fit_decreasing
from train.data.pipeline import make_dataset, packing_efficiency, pipeline_counters, trim_counters
from train.data.sources import JsonlSource, NumpyTokenSource, SyntheticSource
from zaya_jax.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
KEYS = {"tokens", "segment_ids", "positions", "loss_mask", "targets", "target_mask"}


def take(it, n):
    return list(itertools.islice(it, n))


def segments(row):
    """(tokens, loss_mask) of each document in a packed row, by segment id."""
    out = []
    for s in np.unique(row["segment_ids"][row["segment_ids"] > 0]):
        idx = np.flatnonzero(row["segment_ids"] == s)
        out.append((row["tokens"][idx], row["loss_mask"][idx]))
    return out


def packer_state(state):
    """The packing stage's part of a pipeline state, wherever grain nests it (the dict with "rows_emitted")."""
    if isinstance(state, dict):
        if "rows_emitted" in state:
            return state
        for value in state.values():
            found = packer_state(value)
            if found is not None:
                return found
    return None


def test_shapes_dtypes_and_internal_consistency():
    ds = make_dataset(SyntheticSource(seed=0), TOK, seq_len=128, batch_size=3, seed=0)
    batches = take(iter(ds), 2)
    for b in batches:
        assert set(b) == KEYS
        for k in KEYS:
            assert b[k].shape == (3, 128), k
        for k in ("tokens", "segment_ids", "positions", "targets"):
            assert b[k].dtype == np.int32, k
        assert b["loss_mask"].dtype == np.float32 and b["target_mask"].dtype == np.float32
        # Check targets against a direct loop over positions.
        for r in range(3):
            seg, tok, lm = b["segment_ids"][r], b["tokens"][r], b["loss_mask"][r]
            for t in range(127):
                same = seg[t] != 0 and seg[t] == seg[t + 1]
                assert b["target_mask"][r, t] == (lm[t + 1] if same else 0.0)
                if same:
                    assert b["targets"][r, t] == tok[t + 1]
            assert b["target_mask"][r, 127] == 0
            # Positions restart at 0 at each segment start, padding is masked.
            starts = np.flatnonzero(np.diff(np.concatenate([[0], seg])) != 0)
            assert all(b["positions"][r, s] == 0 for s in starts)
            assert (lm[seg == 0] == 0).all()


def test_documents_decode_and_completion_only_mask():
    records = [
        {"prompt": "What is 2 + 3?", "thinking": "2 + 3 = 5", "answer": "\\boxed{5}"},
        {"prompt": "Say hi", "thinking": "easy", "answer": "hi"},
    ]
    ds = make_dataset(records, TOK, seq_len=64, batch_size=1, shuffle=False, num_epochs=1, drop_remainder=False)
    rows = [b for batch in iter(ds) for b in [{k: v[0] for k, v in batch.items()}]]
    docs = [seg for r in rows for seg in segments(r)]
    texts = sorted(TOK.decode(t) for t, _ in docs)
    assert texts == sorted(
        ["What is 2 + 3?\n<think>2 + 3 = 5</think>\n\\boxed{5}", "Say hi\n<think>easy</think>\nhi"]
    )
    for toks, mask in docs:
        # Trained part = think block + answer + eos; prompt part is masked.
        assert TOK.decode(toks[mask == 1]) in ("<think>2 + 3 = 5</think>\n\\boxed{5}", "<think>easy</think>\nhi")
        assert toks[mask == 1][-1] == TOK.eos_id
        assert toks[0] == TOK.bos_id and mask[0] == 0


def test_same_seed_same_batches_other_seed_differs():
    def first(seed):
        return take(iter(make_dataset(SyntheticSource(seed=1, size=300), TOK, 128, 2, seed=seed)), 4)

    a, b, c = first(5), first(5), first(6)
    for x, y in zip(a, b):
        for k in KEYS:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


def test_shards_are_disjoint_and_cover_everything(tmp_path):
    names = [f"doc-{i:03d}" for i in range(50)]
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"text": n}) + "\n" for n in names))
    src = JsonlSource(p)
    per_shard = []
    for shard in range(3):
        ds = make_dataset(
            src, TOK, seq_len=32, batch_size=1, seed=9, shard_index=shard, shard_count=3,
            num_epochs=1, drop_remainder=False,
        )
        got = [TOK.decode(t) for batch in iter(ds) for t, _ in segments({k: v[0] for k, v in batch.items()})]
        per_shard.append(got)
    for i in range(3):
        assert len(per_shard[i]) == len(set(per_shard[i]))
        for j in range(i + 1, 3):
            assert not set(per_shard[i]) & set(per_shard[j])
    assert sorted(sum(per_shard, [])) == names
    assert sorted(len(s) for s in per_shard) == [16, 17, 17]


@pytest.mark.parametrize("k, packing", [(0, "first_fit"), (1, "first_fit"), (3, "first_fit"), (8, "first_fit"),
                                        (3, "best_fit")])
def test_checkpoint_restore_is_exact(k, packing):
    def build():
        # Small buffers so k lands before, on and after buffer boundaries;
        # size 60 with repeat makes the run cross epochs too.
        return make_dataset(SyntheticSource(seed=2, size=60), TOK, 128, 2, seed=4, pack_buffer_size=12,
                            packing=packing)

    it = iter(build())
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = take(it, 6)
    counters_after = pipeline_counters(it)

    it2 = iter(build())
    it2.set_state(state)
    got = take(it2, 6)
    for x, y in zip(expected, got):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert pipeline_counters(it2) == counters_after


def test_trimming_in_pipeline_counts_and_preserves_answers():
    long_think = "step " * 40  # 200 bytes
    records = [
        {"prompt": "P1", "thinking": long_think, "answer": "\\boxed{1}"},  # trimmed
        {"prompt": "P2", "thinking": "ok", "answer": "\\boxed{2}"},  # kept
        {"prompt": "P3", "thinking": "x", "answer": "A" * 80},  # answer alone > 64: dropped
        {"text": "t" * 150},  # plain text > 64: chunked
    ]
    ds = make_dataset(records, TOK, seq_len=64, batch_size=1, shuffle=False, num_epochs=1, drop_remainder=False)
    it = iter(ds)
    rows = [{k: v[0] for k, v in b.items()} for b in it]
    c = pipeline_counters(it)
    # Documents: P1 trimmed to 64, P2 of 19 (bos + "P2\n" + <think> + "ok" + "</think>\n" + "\boxed{2}" + eos), the
    # text's 152 tokens (bos + 150 + eos) in chunks 64, 64, 24: 235 tokens in rows [64] [64] [64] [24 + 19].
    assert c == {"kept": 1, "trimmed": 1, "dropped": 1, "chunked": 1, "skipped": 0,
                 "document_tokens": 235, "padding_tokens": 4 * 64 - 235}
    assert packing_efficiency(c) == 235 / 256
    tc = trim_counters(it)
    assert (tc.kept, tc.trimmed, tc.dropped) == (1, 1, 1)
    texts = [TOK.decode(t) for r in rows for t, _ in segments(r)]
    p1 = [t for t in texts if t.startswith("P1")]
    # bos + "P1\n" (3) + <think> (1) + </think>\n (2) + "\boxed{1}" (9) + eos = 17 fixed; 47 reasoning left.
    assert p1 == ["P1\n<think>" + long_think[:47] + "</think>\n\\boxed{1}"]
    assert "P2\n<think>ok</think>\n\\boxed{2}" in texts
    assert not any(t.startswith("P3") for t in texts)
    # Chunks of the text document reassemble to the full text (bos/eos decode to "").
    assert "".join(t for t in texts if t.startswith("t")) == "t" * 150


def test_infinite_synthetic_source_shards_differ():
    def prompts(shard):
        ds = make_dataset(SyntheticSource(seed=0), TOK, 128, 2, shard_index=shard, shard_count=2)
        rows = [{k: v[r] for k, v in b.items()} for b in take(iter(ds), 3) for r in range(2)]
        return {TOK.decode(t).split("\n")[0] for row in rows for t, _ in segments(row)}

    a, b = prompts(0), prompts(1)
    assert len(a) > 5 and len(b) > 5
    assert not a & b


def test_errors():
    long = [{"prompt": "p", "thinking": "z" * 100, "answer": "a"}]
    with pytest.raises(ValueError, match="trim"):
        take(iter(make_dataset(long, TOK, 32, 1, trim=False, num_epochs=1)), 1)
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset(long, TOK, 32, 1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="empty"):
        make_dataset([], TOK, 32, 1)
    with pytest.raises(ValueError, match="packing must be one of"):
        make_dataset(long, TOK, 32, 1, packing="next_fit")
    for key in ("document_tokens", "padding_tokens"):
        state = iter(make_dataset(long, TOK, 32, 1)).get_state()
        del packer_state(state)["counters"][key]
        with pytest.raises(ValueError, match=rf"no counter\(s\) \['{key}'\]: it was saved by an older pipeline"):
            iter(make_dataset(long, TOK, 32, 1)).set_state(state)


def test_numpy_prepacked_rows_pass_through(tmp_path):
    p = tmp_path / "rows.npy"
    rows = np.arange(5, 5 + 4 * 16, dtype=np.int32).reshape(4, 16)
    np.save(p, rows)
    src = NumpyTokenSource(p)
    with pytest.raises(ValueError, match="length 16"):
        make_dataset(src, TOK, 32, 2)
    ds = make_dataset(src, TOK, 16, 2, shuffle=False, num_epochs=1)
    batches = take(iter(ds), 2)
    got = np.concatenate([b["tokens"] for b in batches])
    np.testing.assert_array_equal(got, rows)
    assert (np.concatenate([b["segment_ids"] for b in batches]) == 1).all()


def test_best_fit_at_a_long_window_trims_at_the_stage_length_and_counts_its_padding():
    """A stage's window packs whole documents best fit, longest first; a reasoning sample longer than the window is
    trimmed to it keeping its answer, and the same sample fits whole at a longer stage."""
    rng = np.random.default_rng(27)  # lengths whose best-fit rows differ from first fit's at both windows
    records = [{"prompt": "Long", "thinking": "a" * 3000, "answer": "\\boxed{42}"}]
    records += [{"prompt": f"Q{i}", "thinking": "b" * int(rng.integers(50, 700)), "answer": f"\\boxed{{{i}}}"}
                for i in range(12)]
    records.append({"text": "t" * 1500})
    # Tokens of a reasoning sample: bos, prompt, "\n", <think>, thinking, </think>, "\n", answer, eos.
    length = [len(r["prompt"]) + len(r["thinking"]) + len(r["answer"]) + 6 for r in records[:-1]]
    fixed = length[0] - 3000  # what trimming may not cut from the long sample
    for window, outcome in ((1024, "trimmed"), (4096, "kept")):
        ds = make_dataset(records, TOK, seq_len=window, batch_size=1, shuffle=False, num_epochs=1,
                          drop_remainder=False, packing="best_fit")
        it = iter(ds)
        rows = [{k: v[0] for k, v in b.items()} for b in it]
        documents = [[TOK.decode(t) for t, _ in segments(r)] for r in rows]
        long_doc = [d for row in documents for d in row if d.startswith("Long")]
        kept = 3000 if outcome == "kept" else window - fixed
        assert long_doc == ["Long\n<think>" + "a" * kept + "</think>\n\\boxed{42}"]
        # Every other document once, whole; the text is cut into window-sized chunks only when it is longer.
        texts = sorted(d for row in documents for d in row if not d.startswith("Long"))
        expected = [f"Q{i}\n<think>{r['thinking']}</think>\n{r['answer']}" for i, r in enumerate(records[1:-1])]
        assert sorted(t for t in texts if t.startswith("Q")) == sorted(expected)
        assert "".join(t for t in texts if t.startswith("t")) == "t" * 1500
        # Rows are the best-fit-decreasing bins of the documents in arrival order (one buffer holds them all).
        lengths = [min(n, window) for n in length]
        lengths += [min(1502 - start, window) for start in range(0, 1502, window)]
        by_index = [[lengths[i] for i in b] for b in reference_best_fit_decreasing(lengths, window)]
        assert [[len(t) for t, _ in segments(r)] for r in rows] == by_index
        c = pipeline_counters(it)
        assert (c["kept"], c["trimmed"], c["chunked"]) == ((14, 0, 0) if outcome == "kept" else (12, 1, 1))
        document_tokens = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
        assert document_tokens == sum(lengths)
        assert (c["document_tokens"], c["padding_tokens"]) == (document_tokens, len(rows) * window - document_tokens)
        assert packing_efficiency(c) == document_tokens / (len(rows) * window)
