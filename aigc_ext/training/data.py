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

Text is tokenized by default with :class:`~aigc_ext.training.tokenizers.CharTokenizer`, a
character-level tokenizer with a vocabulary of 128 ids; ``tokenizer="wordpiece"`` selects the
MiniLM tokenizer instead (:mod:`aigc_ext.training.tokenizers`). The datasets hold and batch
their examples with :mod:`aigc_ext.training.collation`.

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
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aigc_ext.training.collation import ExampleDataset, PadCollate, SFTCollate, TensorDictDataset
from aigc_ext.training.components import DataBundle, register_dataset
from aigc_ext.training.tokenizers import get_tokenizer, minilm_tokenizer

__all__ = [
    "CORPUS_MODULES",
    "digits",
    "prompt_response",
    "sentiment",
    "stdlib_docstrings",
    "text_corpus",
]

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
    ``info`` describes the tokenizer (see :class:`~aigc_ext.training.tokenizers.CharTokenizer`) plus ``max_length``.
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
    hf = minilm_tokenizer()
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
