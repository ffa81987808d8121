"""Tokenizers for the data pipeline: text <-> 1-D lists of int token ids.

Two implementations share one small interface (``encode(str) -> list[int]``,
``decode(Sequence[int]) -> str`` and the id properties ``pad_id, bos_id,
eos_id, think_id, end_think_id, vocab_size``):

* ``ByteTokenizer``: built in, no files. Ids 0..4 are ``pad, bos, eos,
  <think>, </think>``; ids 5..260 are the UTF-8 bytes 0..255, so
  ``vocab_size == 261``. It is what the tiny offline runs use.
* ``HFTokenizer``: a ``tokenizer.json`` loaded through the ``tokenizers``
  package (imported lazily so this module imports without it).

``load_tokenizer(spec)`` picks one from a config string. ``save_tokenizer(tokenizer, directory)`` writes
either as ``tokenizer.json`` + ``tokenizer_config.json`` (the byte tokenizer as an equivalent byte-level BPE without
merges), which ``tokenizers``, transformers' ``AutoTokenizer`` and ``load_tokenizer(directory)`` read back with the
same ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Protocol

THINK_TOKEN = "<think>"
END_THINK_TOKEN = "</think>"

# Matches either special string; the capture group makes re.split keep them.
_SPECIAL_RE = re.compile(f"({re.escape(THINK_TOKEN)}|{re.escape(END_THINK_TOKEN)})")


class Tokenizer(Protocol):
    """The interface the rest of ``train.data`` relies on."""

    @property
    def pad_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def think_id(self) -> int: ...
    @property
    def end_think_id(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Byte-level tokenizer: 5 special ids followed by the 256 byte values."""

    PAD = 0
    BOS = 1
    EOS = 2
    THINK = 3
    END_THINK = 4
    BYTE_OFFSET = 5
    VOCAB_SIZE = BYTE_OFFSET + 256  # 261
    # Names of ids 0..4 in the exported tokenizer.json; bos/eos/pad are among HFTokenizer's candidate names.
    SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", THINK_TOKEN, END_THINK_TOKEN)

    @property
    def pad_id(self) -> int:
        return self.PAD

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def think_id(self) -> int:
        return self.THINK

    @property
    def end_think_id(self) -> int:
        return self.END_THINK

    @property
    def vocab_size(self) -> int:
        return self.VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """UTF-8 byte ids, with the literal ``<think>``/``</think>`` as single ids.

        No bos/eos is added: the formatter decides where those go.
        """
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(text):
            if piece == THINK_TOKEN:
                ids.append(self.THINK)
            elif piece == END_THINK_TOKEN:
                ids.append(self.END_THINK)
            elif piece:
                ids.extend(b + self.BYTE_OFFSET for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of ``encode``; pad/bos/eos are skipped.

        Bytes are gathered across a whole run before decoding because one
        character can span several ids; broken UTF-8 becomes U+FFFD rather
        than raising, since model samples are often cut mid-character.
        """
        out: list[str] = []
        run = bytearray()

        def flush() -> None:
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run.clear()

        for raw in ids:
            i = int(raw)
            if i in (self.PAD, self.BOS, self.EOS):
                continue
            if i == self.THINK:
                flush()
                out.append(THINK_TOKEN)
            elif i == self.END_THINK:
                flush()
                out.append(END_THINK_TOKEN)
            elif self.BYTE_OFFSET <= i < self.VOCAB_SIZE:
                run.append(i - self.BYTE_OFFSET)
            else:
                raise ValueError(f"token id {i} outside ByteTokenizer vocab [0, {self.VOCAB_SIZE})")
        flush()
        return "".join(out)


# Candidate names tried, in order, when the caller does not name the token.
_BOS_CANDIDATES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]", "[CLS]")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "[EOS]", "[SEP]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` behind the ``Tokenizer`` interface.

    ``bos_token``/``eos_token``/``pad_token`` may be a token string (looked up
    in the vocab) or an int id. When omitted, a list of common names is tried;
    pad falls back to eos because padding positions are always masked out, so
    which id sits there does not matter. A missing bos/eos/think id raises
    only when it is asked for, so a tokenizer without ``<think>`` still works
    for plain-text data.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bos_token: str | int | None = None,
        eos_token: str | int | None = None,
        pad_token: str | int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        try:
            import tokenizers  # noqa: PLC0415  (lazy: optional dependency)
        except ImportError as e:  # pragma: no cover - depends on environment
            raise ImportError(
                f"loading tokenizer {self.path!r} needs the 'tokenizers' package (pip install tokenizers)"
            ) from e
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer file not found: {self.path!r}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises a bare Exception on parse errors
            raise ValueError(f"could not read tokenizer file {self.path!r}: {e}") from e
        self._bos = self._resolve(bos_token, _BOS_CANDIDATES, "bos")
        self._eos = self._resolve(eos_token, _EOS_CANDIDATES, "eos")
        pad = self._resolve(pad_token, _PAD_CANDIDATES, "pad")
        self._pad = pad if pad is not None else self._eos

    def _resolve(self, spec: str | int | None, candidates: Sequence[str], what: str) -> int | None:
        if isinstance(spec, int):
            if not 0 <= spec < self.vocab_size:
                raise ValueError(f"{what} id {spec} outside vocab of {self.path!r} (size {self.vocab_size})")
            return spec
        if isinstance(spec, str):
            tid = self._tok.token_to_id(spec)
            if tid is None:
                raise ValueError(f"{what} token {spec!r} not in vocab of {self.path!r}")
            return tid
        for name in candidates:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        return None

    def _require(self, value: int | None, what: str) -> int:
        if value is None:
            raise ValueError(
                f"tokenizer {self.path!r} has no {what} token; pass {what}_token= to HFTokenizer"
            )
        return value

    @property
    def pad_id(self) -> int:
        return self._require(self._pad, "pad")

    @property
    def bos_id(self) -> int:
        return self._require(self._bos, "bos")

    @property
    def eos_id(self) -> int:
        return self._require(self._eos, "eos")

    @property
    def think_id(self) -> int:
        tid = self._tok.token_to_id(THINK_TOKEN)
        if tid is None:
            raise ValueError(f"tokenizer {self.path!r} has no {THINK_TOKEN!r} token (needed for reasoning data)")
        return tid

    @property
    def end_think_id(self) -> int:
        tid = self._tok.token_to_id(END_THINK_TOKEN)
        if tid is None:
            raise ValueError(f"tokenizer {self.path!r} has no {END_THINK_TOKEN!r} token (needed for reasoning data)")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_name(self, token_id: int) -> str:
        """The vocabulary string of ``token_id``."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: post-processors would otherwise insert
        # their own bos/eos, and the formatter places those itself.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        # Filter bos/eos/pad by id rather than skip_special_tokens=True, which
        # would also delete <think>/</think> when they are registered special.
        skip = {x for x in (self._pad, self._bos, self._eos) if x is not None}
        return self._tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """``None``/``"byte"`` -> ``ByteTokenizer``; a path to a ``.json`` file -> ``HFTokenizer``.

    A directory containing ``tokenizer.json`` is accepted as well.
    """
    if spec is None or (isinstance(spec, str) and spec == "byte"):
        return ByteTokenizer()
    path = os.fspath(spec)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(os.path.join(path, "tokenizer.json"))
    if path.endswith(".json"):
        # HFTokenizer raises FileNotFoundError naming the path if it is absent.
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer spec {spec!r}: expected None, 'byte' or a path to tokenizer.json")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte: the alphabet of the `tokenizers` ByteLevel
    pre-tokenizer and decoder (printable Latin-1 bytes stand for themselves, the other 68 map to U+0100..U+0143)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def byte_tokenizer_json() -> dict:
    """``ByteTokenizer`` as a ``tokenizer.json`` document: a byte-level BPE with no merges (so every byte is its own
    token, id = byte + 5) whose pre-tokenizer keeps the text whole; ``<think>``/``</think>`` are added tokens
    (matched in text, as ByteTokenizer does), while pad/bos/eos are plain vocabulary entries that text never
    produces (ByteTokenizer encodes a literal "<bos>" as its bytes too)."""
    vocab = {name: i for i, name in enumerate(ByteTokenizer.SPECIAL_TOKENS)}
    vocab.update({char: byte + ByteTokenizer.BYTE_OFFSET for byte, char in _byte_to_unicode().items()})
    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [{"id": ByteTokenizer.SPECIAL_TOKENS.index(t), "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": False} for t in (THINK_TOKEN, END_THINK_TOKEN)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level}, "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def save_tokenizer(tokenizer: ByteTokenizer | HFTokenizer, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` (the byte tokenizer's document, or a copy of the HFTokenizer's file) and a
    ``tokenizer_config.json`` naming the bos/eos/pad tokens for transformers' ``AutoTokenizer``."""
    path = os.path.join(directory, "tokenizer.json")
    # Without tokenizer_class, AutoTokenizer would pick the class registered for model_type "zaya" (Gemma's).
    config: dict[str, str | bool] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if isinstance(tokenizer, ByteTokenizer):
        with open(path, "w") as f:
            json.dump(byte_tokenizer_json(), f, ensure_ascii=False)
        names = ByteTokenizer.SPECIAL_TOKENS
        bos, eos, pad = names[tokenizer.bos_id], names[tokenizer.eos_id], names[tokenizer.pad_id]
        # transformers registers bos/eos/pad as special tokens and would match "<bos>" in text; ByteTokenizer
        # encodes such text as its bytes, and so does transformers with this setting.
        config["split_special_tokens"] = True
    else:
        shutil.copyfile(tokenizer.path, path)
        bos, eos, pad = (tokenizer.token_name(i) for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id))
    config.update(bos_token=bos, eos_token=eos, pad_token=pad)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def reasoning_prompt(tokenizer: Tokenizer, prompt: str | Sequence[int]) -> list[int]:
    """The ids that open a reasoning turn, ``<bos> prompt "\\n" <think>``: the training format of
    train/data/formatting.py up to the start of the reasoning (pieces tokenised separately, as there).
    ``prompt`` is text, or ids already tokenised (the aggregation prompts of zaya_jax.rsa)."""
    body = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    return [tokenizer.bos_id, *body, *tokenizer.encode("\n"), tokenizer.think_id]
