"""zaya-generate and zaya-rsa: what they print, and one-line errors with exit status 2."""

from __future__ import annotations

import json

import pytest

from train.cli import generate_main, rsa_main
from zaya_jax import generate_ids, init_model, load_preset, save_pretrained
from zaya_jax.tokenizers import ByteTokenizer, reasoning_prompt

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = init_model(load_preset("tiny"), seed=4)
    path = tmp_path_factory.mktemp("tiny_hf")
    save_pretrained(model, path)
    return model, str(path)


def test_generate_streams_the_same_text_that_generate_ids_returns(exported, capsys):
    model, path = exported
    prompt = "Compute 3 + 4."
    assert generate_main(["--model", path, "--tokenizer", "byte", "--prompt", prompt, "--max-new-tokens", "12",
                          "--temperature", "0.8", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    ids = generate_ids(model, [reasoning_prompt(TOK, prompt)], 12, stop_tokens=(TOK.eos_id,), temperature=0.8,
                       seed=3)[0]
    assert out == "<think>" + TOK.decode(ids) + "\n"


def test_generate_decodes_a_directory_transformers_wrote_as_transformers_does(tmp_path, capsys):
    """zaya-generate --model on a checkpoint written by transformers itself: the greedy text is transformers'."""
    import torch

    from tests.zaya_jax.hf_reference import random_hf_model

    reference = random_hf_model(load_preset("tiny"), seed=2)  # vocab 261: the byte tokenizer's
    reference.save_pretrained(tmp_path / "hf")
    prompt = "Compute 3 + 4."
    assert generate_main(["--model", str(tmp_path / "hf"), "--tokenizer", "byte", "--prompt", prompt,
                          "--max-new-tokens", "8"]) == 0
    ids = reasoning_prompt(TOK, prompt)
    with torch.no_grad():
        expected = reference.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                      eos_token_id=TOK.eos_id, pad_token_id=TOK.pad_id)[0, len(ids):].tolist()
    assert capsys.readouterr().out == "<think>" + TOK.decode(expected) + "\n"


def test_ids_the_tokenizer_does_not_have_print_as_placeholders(tmp_path, capsys):
    """A model vocabulary larger than the tokenizer's (padded, or an untrained model, as a random full-size
    checkpoint with the byte tokenizer): the ids past the tokenizer print as <id N>, with a note, not a traceback."""
    import itertools

    model = init_model(load_preset("tiny").replace(vocab_size=400), seed=5)
    save_pretrained(model, tmp_path / "wide_vocab")
    assert generate_main(["--model", str(tmp_path / "wide_vocab"), "--tokenizer", "byte", "--prompt", "hi",
                          "--max-new-tokens", "24", "--raw", "--temperature", "1.0", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    ids = generate_ids(model, [TOK.encode("hi")], 24, stop_tokens=(TOK.eos_id,), temperature=1.0, seed=1)[0]
    assert any(i >= TOK.vocab_size for i in ids), ids  # 139 of 400 ids are past the byte tokenizer
    expected = "".join(TOK.decode(list(run)) if known else "".join(f"<id {i}>" for i in run)
                       for known, run in itertools.groupby(ids, key=lambda i: i < TOK.vocab_size))
    assert captured.out == expected + "\n"
    assert "the model has 400 token ids, the tokenizer 261" in captured.err


def test_generate_batches_several_prompts(exported, capsys):
    _, path = exported
    assert generate_main(["--model", path, "--tokenizer", "byte", "--prompt", "a", "--prompt", "bb",
                          "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and "=== a\n" in out and "=== bb\n" in out


def test_rsa_prints_every_round_and_scores_synthetic_problems(exported, tmp_path, capsys):
    _, path = exported
    report = tmp_path / "rsa.json"
    assert rsa_main(["--model", path, "--tokenizer", "byte", "--synthetic", "2", "-N", "3", "-C", "2", "-T", "2",
                     "--budget", "8", "--tail", "4", "--format", "compact", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()[1:4]]
    assert [int(row[0]) for row in table] == [0, 1, 2] and all(int(row[1]) == 6 for row in table)
    assert "2 held-out problems: majority-vote accuracy" in out
    saved = json.loads(report.read_text())
    assert len(saved["rounds"]) == 3 and len(saved["answers"]) == 2
    assert 0.0 <= saved["majority_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent", "--prompt", "x"], "neither a transformers-format directory"),
    (["--model", "{hf}", "--prompt", "x"], "has no tokenizer.json: pass --tokenizer byte"),
    (["--model", "{hf}", "--tokenizer", "/nonexistent/tokenizer.json", "--prompt", "x"], "tokenizer file not found"),
    (["--model", "{hf}", "--tokenizer", "byte", "--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
])
def test_generate_errors_are_one_line_and_exit_2(exported, capsys, argv, message):
    _, path = exported
    assert generate_main([a.replace("{hf}", path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("zaya-generate: error:")


def test_a_prompt_past_the_context_prints_the_error_alone(exported, capsys):
    _, path = exported
    assert generate_main(["--model", path, "--tokenizer", "byte", "--prompt", "x" * 2100]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no "<think>" before the error
    assert captured.err.startswith("zaya-generate: error:") and captured.err.count("\n") == 1


def test_rsa_errors_are_one_line_and_exit_2(exported, capsys):
    _, path = exported
    assert rsa_main(["--model", path, "--tokenizer", "byte", "--question", "q", "-N", "2", "-C", "3"]) == 2
    err = capsys.readouterr().err
    assert "RSAConfig.candidates = 3 must be in [1, population=2]" in err and err.count("\n") == 1
