"""Markovian RSA: prompt format, tails, candidate selection, majority vote, and memory bounded over rounds."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from zaya_jax import init_model, load_preset
from zaya_jax.rsa import RSAConfig, aggregation_prompt, markovian_rsa, reasoning_tail
from zaya_jax.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
# The package re-exports functions named `generate` (and `rsa` is kept parallel): the modules themselves.
generate_module = importlib.import_module("zaya_jax.generate")
rsa = importlib.import_module("zaya_jax.rsa")


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(load_preset("tiny"), seed=0)


def test_paper_format_aggregation_prompt_reads_as_the_reference_proxy_writes_it():
    tails = [TOK.encode("so 3 + 4 = 7"), TOK.encode("hence 12")]
    text = TOK.decode(aggregation_prompt("  Compute 3 + 4.  ", tails, TOK))
    # Written out from Zyphra's rsa_proxy_server.py create_aggregation_prompt (parts joined with "\n"),
    # wrapped in the training format <bos> message \n <think>.
    expected = (
        "You are given a math problem and several candidate solutions. Some candidates may be incorrect or contain "
        "errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason carefully; if "
        "candidates disagree, choose the correct path. If all are incorrect, then attempt a different strategy. Do "
        "not restate the problem or the candidate solutions.\n"
        "[[ Problem ]]:\n\n"
        "Compute 3 + 4.\n\n"
        "[[ Candidate solutions (may contain mistakes) ]]:\n\n"
        "---- Solution 1 ----\nso 3 + 4 = 7\n\n"
        "---- Solution 2 ----\nhence 12\n\n"
        "Now write a single improved solution. Provide clear reasoning and end with the final answer in \\boxed{}."
        "\n<think>"
    )
    assert text == expected
    one = TOK.decode(aggregation_prompt("Compute 3 + 4.", tails[:1], TOK))
    assert one.startswith("You are given a math problem and a candidate solution. The candidate may be incomplete")
    assert "[[ Candidate solutions (may contain mistakes) ]]\n\n---- Candidate ----\nso 3 + 4 = 7\n" in one
    assert one.endswith("please provide your own comprehensive solution.\n<think>")


def test_reasoning_tail_is_the_end_of_the_reasoning_before_end_think():
    ids = [*TOK.encode("abcdef"), TOK.end_think_id, *TOK.encode("\\boxed{1}"), TOK.eos_id]
    assert TOK.decode(reasoning_tail(ids, TOK, 3)) == "def"
    assert TOK.decode(reasoning_tail(ids, TOK, 100)) == "abcdef"
    unfinished = [*TOK.encode("xyz12"), TOK.eos_id]  # no </think>: the tail of everything generated
    assert TOK.decode(reasoning_tail(unfinished, TOK, 2)) == "12"
    assert reasoning_tail([TOK.end_think_id], TOK, 4) == []


class FakeDecoder:
    """Stands in for generate_ids: records every round's prompts, answers with a scripted text per row."""

    def __init__(self, script):
        self.script, self.prompts, self.pad_to = script, [], []

    def __call__(self, model, prompts, max_new_tokens, *, pad_to, **_):
        round_index = len(self.prompts)
        self.prompts.append([list(p) for p in prompts])
        self.pad_to.append(pad_to)
        return [TOK.encode(self.script(round_index, row)) + [TOK.eos_id] for row in range(len(prompts))]


def test_rounds_build_prompts_from_the_previous_population_and_vote(tiny_model, monkeypatch):
    # Question 0 rows say "r{round}q0x{row}" then answer row % 2; question 1 rows always answer 5.
    def script(round_index, row):
        question, i = divmod(row, 3)
        answer = 5 if question else i % 2
        return f"r{round_index}q{question}x{i}</think>\\boxed{{{answer}}}"

    fake = FakeDecoder(script)
    monkeypatch.setattr(rsa, "generate_ids", fake)
    config = RSAConfig(population=3, candidates=2, rounds=2, budget=32, tail=6, prompt_format="compact", seed=1)
    result = markovian_rsa(tiny_model, TOK, ["Q zero", "Q one"], config)

    assert len(fake.prompts) == 3 and all(len(p) == 6 for p in fake.prompts)
    for round_index in (1, 2):
        for row, prompt in enumerate(fake.prompts[round_index]):
            question = row // 3
            text = TOK.decode(prompt)
            assert f"Q {['zero', 'one'][question]}" in text
            carried = [f"r{round_index - 1}q{question}x{i}" for i in range(3)
                       if f"r{round_index - 1}q{question}x{i}" in text]
            assert len(carried) == 2  # C distinct tails, all from this question's previous population
            assert f"q{1 - question}x" not in text
    assert len(set(fake.pad_to)) == 1 and all(len(p) <= fake.pad_to[0] for r in fake.prompts for p in r)

    assert result.final_answers == [["0", "1", "0"], ["5", "5", "5"]]
    assert result.answers == ["0", "5"]
    last = result.rounds[-1]
    assert last.agreement == pytest.approx((2 / 3 + 1) / 2)
    assert last.answered == 1.0 and last.finished == 1.0
    assert last.generated_tokens == sum(len(TOK.encode(script(2, r))) + 1 for r in range(6))


def test_one_candidate_continues_each_row_from_its_own_tail(tiny_model, monkeypatch):
    fake = FakeDecoder(lambda round_index, row: f"row{row}round{round_index}")
    monkeypatch.setattr(rsa, "generate_ids", fake)
    markovian_rsa(tiny_model, TOK, ["Q"], RSAConfig(population=4, candidates=1, rounds=2, budget=16, tail=16,
                                              prompt_format="compact"))
    for round_index in (1, 2):
        for row, prompt in enumerate(fake.prompts[round_index]):
            text = TOK.decode(prompt)
            assert text.startswith("Refine:") and f"row{row}round{round_index - 1}" in text
            assert sum(f"row{other}round" in text for other in range(4)) == 1


def test_peak_cache_is_the_same_for_one_and_eight_rounds(tiny_model, monkeypatch):
    """Records every cache generate() allocates (its shapes at trace time) over whole RSA runs."""
    allocated, real_init_cache = [], generate_module.init_cache

    def recording_init_cache(config, batch, max_len, dtype=None):
        cache = real_init_cache(config, batch, max_len, dtype)
        allocated.append(sum(x.size * x.dtype.itemsize for x in (cache.layers.k, cache.layers.v)))
        return cache

    monkeypatch.setattr(generate_module, "init_cache", recording_init_cache)
    question, n, c, tail, budget = "Compute 3 + 4.", 4, 2, 6, 10
    peaks, rounds_seen = {}, {}
    for rounds in (1, 8):
        generate_module._compiled.cache_clear()  # retrace, so the allocation is recorded for this run
        allocated.clear()
        config = RSAConfig(population=n, candidates=c, rounds=rounds, budget=budget, tail=tail,
                           prompt_format="compact", seed=3)
        result = markovian_rsa(tiny_model, TOK, [question], config)
        peaks[rounds], rounds_seen[rounds] = max(allocated), len(result.rounds)
        assert all(r.prompt_tokens_max <= r.cache_slots // n - budget for r in result.rounds)
    generate_module._compiled.cache_clear()

    assert rounds_seen == {1: 2, 8: 9}
    assert peaks[1] == peaks[8]
    # The bound |prompt| + C * tau + beta, counted from the prompt text: the byte tokenizer has one id per byte,
    # plus <bos>, the newline before <think>, and <think>.
    message = "\n".join(["Aggregate:", "Problem:", question + "\n", "-- 1 --" + "x" * tail + "\n",
                         "-- 2 --" + "x" * tail + "\n", "Solve:"])
    slots = len(message.encode()) + 3 + budget
    cfg = tiny_model.config
    assert peaks[8] == 2 * cfg.num_layers * n * cfg.kv_heads * slots * cfg.head_dim * 4  # K and V, float32


def test_invalid_settings_name_the_field(tiny_model):
    with pytest.raises(ValueError, match="RSAConfig.candidates"):
        RSAConfig(population=2, candidates=3)
    with pytest.raises(ValueError, match="RSAConfig.tail"):
        RSAConfig(budget=8, tail=9)
    with pytest.raises(ValueError, match="RSAConfig.prompt_format"):
        RSAConfig(prompt_format="chatml")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        markovian_rsa(tiny_model, TOK, ["Q"], RSAConfig(population=2, candidates=2, budget=2000, tail=1000))


def test_streamed_tokens_are_the_generated_tokens(tiny_model):
    seen = []
    ids = np.asarray([[1, 40, 41, 42], [0, 1, 50, 51]], np.int32)
    mask = (ids != 0).astype(np.int32)
    out = generate_module.generate(tiny_model, ids, 6, attention_mask=mask, temperature=1.0, seed=2,
                                   stop_tokens=(), on_tokens=lambda t, d: seen.append((t.copy(), d.copy())))
    assert len(seen) == 6
    np.testing.assert_array_equal(np.stack([t for t, _ in seen], axis=1), np.asarray(out.tokens))
