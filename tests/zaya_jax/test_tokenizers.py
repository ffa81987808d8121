"""Tests for zaya_jax/tokenizers.py: byte tokenizer ids, round trips, HF wrapper, loader, saved tokenizer files."""

from __future__ import annotations

import pytest

from zaya_jax.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, save_tokenizer


def test_byte_ids_are_the_documented_layout():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.think_id, tok.end_think_id) == (0, 1, 2, 3, 4)
    assert tok.vocab_size == 261
    # 'a' = 0x61 = 97 -> 102; 'b' -> 103.
    assert tok.encode("ab") == [102, 103]
    # 'é' is UTF-8 c3 a9 -> 195+5, 169+5.
    assert tok.encode("é") == [200, 174]
    # byte 0x00 -> 5; id 260 is byte 0xff, never valid UTF-8 on its own.
    assert tok.encode("\x00") == [5]
    assert tok.decode([260]) == "\ufffd"
    # 'x' = 120 -> 125.
    assert tok.encode("<think>x</think>") == [3, 125, 4]
    assert tok.encode("") == []


def test_byte_special_strings_only_as_exact_literals():
    tok = ByteTokenizer()
    # "<thi" is not the special string: 7 ordinary bytes ('<'=60 -> 65).
    assert tok.encode("<thi") == [65, 121, 109, 110]
    # "<<think>>": '<' byte, <think> id, '>' byte (62 -> 67).
    assert tok.encode("<<think>>") == [65, 3, 67]


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "",
        "日本語 <think>step 1\nstep 2</think>\n\\boxed{7} 🙂",
        "</think><think></think>",
        "tabs\tand\r\nnewlines",
        "<thinking> is not a tag",
    ],
)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_byte_decode_skips_pad_bos_eos_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    assert tok.decode([1, 102, 0, 0, 2]) == "a"
    # 0xc3 alone is a truncated 2-byte sequence.
    assert tok.decode([200]) == "\ufffd"
    # Multi-byte char split by a special id is broken on both sides.
    assert tok.decode([200, 3, 174]) == "\ufffd<think>\ufffd"
    with pytest.raises(ValueError, match="261"):
        tok.decode([261])


def _build_hf_tokenizer(path, with_think=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<pad>", "<s>", "</s>"])
    tok.train_from_iterator(["hello world", "the cat sat", "hello cat"], trainer)
    if with_think:
        tok.add_special_tokens(["<think>", "</think>"])
    tok.save(str(path))
    return tok


def test_hf_tokenizer_ids_encode_decode(tmp_path):
    path = tmp_path / "tokenizer.json"
    ref = _build_hf_tokenizer(path)
    tok = HFTokenizer(path)
    assert tok.bos_id == ref.token_to_id("<s>")
    assert tok.eos_id == ref.token_to_id("</s>")
    assert tok.pad_id == ref.token_to_id("<pad>")
    assert tok.think_id == ref.token_to_id("<think>")
    assert tok.end_think_id == ref.token_to_id("</think>")
    assert tok.vocab_size == 11  # 4 specials + 5 words + 2 think tokens
    hello, cat, world = (ref.token_to_id(w) for w in ("hello", "cat", "world"))
    assert tok.encode("hello cat") == [hello, cat]
    assert tok.encode("hello <think> cat </think> world") == [hello, tok.think_id, cat, tok.end_think_id, world]
    # bos/eos/pad dropped, think tags kept (WordLevel decode joins with spaces).
    ids = [tok.bos_id, hello, tok.think_id, cat, tok.end_think_id, world, tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hello <think> cat </think> world"


def test_hf_tokenizer_explicit_tokens_and_errors(tmp_path):
    path = tmp_path / "tokenizer.json"
    ref = _build_hf_tokenizer(path)
    tok = HFTokenizer(path, bos_token="hello", eos_token=ref.token_to_id("cat"))
    assert tok.bos_id == ref.token_to_id("hello")
    assert tok.eos_id == ref.token_to_id("cat")
    with pytest.raises(ValueError, match="nope"):
        HFTokenizer(path, bos_token="nope")
    with pytest.raises(ValueError, match="outside vocab"):
        HFTokenizer(path, eos_token=99)


def test_hf_tokenizer_without_think_raises_only_when_asked(tmp_path):
    path = tmp_path / "plain.json"
    _build_hf_tokenizer(path, with_think=False)
    tok = HFTokenizer(path)
    assert tok.encode("hello world") != []
    with pytest.raises(ValueError, match="<think>"):
        _ = tok.think_id
    with pytest.raises(ValueError, match="</think>"):
        _ = tok.end_think_id


def test_hf_tokenizer_missing_and_corrupt_file(tmp_path):
    missing = tmp_path / "nothere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nothere"):
        HFTokenizer(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("this is not a tokenizer")
    with pytest.raises(ValueError, match="bad.json"):
        HFTokenizer(bad)


def test_load_tokenizer(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    path = tmp_path / "tokenizer.json"
    _build_hf_tokenizer(path)
    assert isinstance(load_tokenizer(str(path)), HFTokenizer)
    assert isinstance(load_tokenizer(tmp_path), HFTokenizer)  # directory holding tokenizer.json
    with pytest.raises(ValueError, match="gpt-17"):
        load_tokenizer("gpt-17")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        load_tokenizer(str(tmp_path / "absent.json"))


# Every code point below 256 (one- and two-byte UTF-8), both tags, a literal "<bos>" (plain bytes for
# ByteTokenizer), three- and four-byte characters.
SAVED_TEXTS = ["".join(map(chr, range(256))), "日本語 <think>step 1\nstep 2</think> <bos>\\boxed{7} 🙂", ""]


@pytest.mark.parametrize("text", SAVED_TEXTS, ids=["code points below 256", "tags and multi-byte", "empty"])
def test_saved_byte_tokenizer_has_the_same_ids_in_tokenizers_and_transformers(tmp_path, text):
    import tokenizers
    import transformers

    save_tokenizer(ByteTokenizer(), tmp_path)
    byte = ByteTokenizer()
    ids = byte.encode(text)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == ids
    ours = load_tokenizer(str(tmp_path))  # what zaya-generate uses for a directory with tokenizer.json
    assert isinstance(ours, HFTokenizer) and ours.encode(text) == ids
    framed = [byte.bos_id, *ids, byte.eos_id, byte.pad_id]
    assert ours.decode(framed) == byte.decode(framed) == text
    assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.think_id, ours.end_think_id, ours.vocab_size) == (
        byte.pad_id, byte.bos_id, byte.eos_id, byte.think_id, byte.end_think_id, byte.vocab_size)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (byte.bos_id, byte.eos_id, byte.pad_id)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.decode(framed, skip_special_tokens=True) == text


def test_saved_byte_tokenizer_decodes_broken_utf8_like_the_byte_tokenizer(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path)
    ours, byte = load_tokenizer(str(tmp_path)), ByteTokenizer()
    # a lone lead byte, a cut 3-byte sequence, a stray continuation byte, 0xff, and a sequence cut by <think>
    for ids in ([200], [235, 156], [5 + 0x80, 102], [260, 102], [200, 3, 174]):
        assert ours.decode(ids) == byte.decode(ids), ids


def test_saved_hf_tokenizer_is_a_copy_with_its_token_names(tmp_path):
    source = tmp_path / "source.json"
    _build_hf_tokenizer(source)
    out = tmp_path / "out"
    out.mkdir()
    save_tokenizer(HFTokenizer(source), out)
    assert (out / "tokenizer.json").read_bytes() == source.read_bytes()
    import json

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<s>", "</s>", "<pad>")
