"""The ``files`` dataset: a user's own JSONL, JSON, CSV, Parquet or text files.

::

    [data]
    name = "files"
    path = "data/train.jsonl"         # a file, a glob ("data/*.jsonl") or a list of them
    eval_path = "data/eval.jsonl"     # or eval_fraction = 0.05 (the default)
    prompt_field = "question"         # field names are options

Files are read through Hugging Face ``datasets`` (:mod:`aigc_ext.training.file_reading`:
locally, offline, with a temporary cache) and tokenised with the model's tokenizer: that of
the ``hf`` model's checkpoint directory, or ``tokenizer`` (a tokenizer directory, ``"char"``
or ``"wordpiece"``; ``"char"`` for the built-in models). What a row holds decides the kind of
examples (``kind = "auto"`` picks the first that the first file's fields allow):

* ``chat``: ``messages_field`` (``[{"role": ..., "content": ...}, ...]`` ending with the
  assistant's answer), rendered with the tokenizer's chat template; the loss covers the answer
  only (earlier turns are context).
* ``prompt-response``: ``prompt_field`` and ``response_field``; the loss covers the response
  and the end-of-sequence id, as the built-in ``prompt-response`` set does.
* ``classification``: ``text_field`` and ``label_field`` (integers, or names mapped to ids in
  sorted order unless ``labels`` lists them).
* ``text``: ``text_field``, for pretraining: each document framed by the tokenizer's special
  tokens and ended with the end-of-sequence id; with ``packing`` (the default) the documents
  are concatenated and cut into chunks of ``seq_len`` tokens (the last chunk may be shorter).

A row longer than ``seq_len`` is an error naming its file, row and field unless ``truncation``
is on (documents that are packed are never too long). The held-out split is ``eval_path`` or
a seeded random ``eval_fraction`` of the rows (0: none), drawn before packing. The examples
come in file order and row order, so the same files and seed give the same run, and
``--resume`` continues it exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from aigc_ext.training.collation import ExampleDataset, PadCollate, SFTCollate
from aigc_ext.training.components import DataBundle, builtin_table
from aigc_ext.training.file_reading import DataFileError, FileRows, expand_paths, read_rows

# Registered by aigc_ext.default_plugins.training, through the hook.
BUILTIN_DATASETS, register_dataset = builtin_table()

__all__ = ["KINDS", "DataFileError", "files"]

KINDS = ("auto", "chat", "prompt-response", "classification", "text")
logger = logging.getLogger("aigc_ext.training.data")


# --- tokenizers ----------------------------------------------------------------------------------


class _BuiltinEncoding:
    """The encodings of :class:`~aigc_ext.training.hf_tokenizers.HFTokenizer` for a built-in
    tokenizer, framed as the built-in datasets frame their text."""

    def __init__(self, tok: Any, name: str) -> None:
        self.tok, self.name = tok, name

    def document(self, text: str) -> list[int]:
        return self.tok.encode(text, add_eos=True)

    def sequence(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=True, add_eos=True)

    def prompt(self, text: str) -> list[int]:
        return self.tok.encode(text, add_bos=True)

    def response(self, text: str) -> list[int]:
        return self.tok.encode(text, add_eos=True)

    def chat(self, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        raise ValueError(
            f"tokenizer {self.name!r} has no chat template; messages need a Hugging Face "
            "tokenizer with one (give prompt_field/response_field instead)"
        )


def _tokenizer(tokenizer: str | None, model: Mapping[str, Any] | None) -> tuple[Any, Any]:
    """(tokenizer, encoder): ``tokenizer`` when given, else the ``hf`` model's checkpoint
    directory, else the built-in character tokenizer."""
    from aigc_ext.training.hf_tokenizers import HFTokenizer, load_local_tokenizer
    from aigc_ext.training.tokenizers import get_tokenizer

    if tokenizer is None:
        path = (model or {}).get("path")
        if path is None:
            tokenizer = "char"
        else:
            hf = load_local_tokenizer(path, "the model's tokenizer (model.path)")
            tok = HFTokenizer(path, hf)
            return tok, tok
    if not isinstance(tokenizer, str | os.PathLike):
        raise TypeError(f"tokenizer must be a name or a directory, got {tokenizer!r}")
    if tokenizer in ("char", "wordpiece"):
        tok = get_tokenizer(str(tokenizer))
        return tok, _BuiltinEncoding(tok, str(tokenizer))
    tok = HFTokenizer(tokenizer, load_local_tokenizer(tokenizer, "tokenizer"))
    return tok, tok


# --- rows to token ids ---------------------------------------------------------------------------


def _text(rows: FileRows, row: int, name: str) -> str:
    value = rows.value(row, name)
    if not isinstance(value, str):
        raise DataFileError(
            f"{rows.where(row, name)}: expected text, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _messages(rows: FileRows, row: int, name: str) -> list[dict[str, str]]:
    value = rows.value(row, name)
    where = rows.where(row, name)
    if not isinstance(value, list) or not value:
        raise DataFileError(f"{where}: expected a non-empty list of messages, got {value!r:.60}")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise DataFileError(
                f"{where}: message {i} must have 'role' and 'content' strings, got {message!r:.80}"
            )
    if value[-1]["role"] != "assistant":
        raise DataFileError(
            f"{where}: the last message must be the assistant's answer (the one trained on), "
            f"got role {value[-1]['role']!r}"
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _fit(ids: list[int], rows: FileRows, row: int, name: str, seq_len: int, cut: bool) -> list[int]:
    if len(ids) <= seq_len:
        return ids
    if not cut:
        raise DataFileError(
            f"{rows.where(row, name)}: {len(ids)} tokens, longer than seq_len={seq_len}; raise "
            "seq_len, shorten the row, or set truncation = true"
        )
    return ids[:seq_len]


class _Examples:
    """Turns the rows of a file into examples of one kind."""

    def __init__(self, kind: str, enc: Any, fields: Mapping[str, str], seq_len: int, cut: bool):
        self.kind, self.enc, self.fields, self.seq_len, self.cut = kind, enc, fields, seq_len, cut

    def __call__(self, rows: FileRows) -> list[dict[str, Any]]:
        out = []
        for row in range(len(rows)):
            example = getattr(self, "_" + self.kind.replace("-", "_"))(rows, row)
            if example is not None:
                out.append(example)
        return out

    def _text(self, rows: FileRows, row: int) -> dict[str, Any] | None:
        text = _text(rows, row, self.fields["text"])
        if not text.strip():
            return None  # blank lines separate documents; they are none
        return {"ids": self.enc.document(text), "where": (rows, row)}

    def _pair(self, rows: FileRows, row: int, prompt: list[int], response: list[int], name: str):
        if len(prompt) + len(response) > self.seq_len:
            if not self.cut:
                raise DataFileError(
                    f"{rows.where(row, name)}: {len(prompt) + len(response)} tokens with the "
                    f"prompt, longer than seq_len={self.seq_len}; raise seq_len, shorten the "
                    "row, or set truncation = true (which cuts the response)"
                )
            if len(prompt) >= self.seq_len:
                raise DataFileError(
                    f"{rows.where(row, name)}: the prompt alone has {len(prompt)} tokens, "
                    f"which leaves no response token within seq_len={self.seq_len}"
                )
        return {"prompt_ids": torch.tensor(prompt), "response_ids": torch.tensor(response)}

    def _prompt_response(self, rows: FileRows, row: int) -> dict[str, Any]:
        prompt = _text(rows, row, self.fields["prompt"])
        response = _text(rows, row, self.fields["response"])
        if not response:
            raise DataFileError(
                f"{rows.where(row, self.fields['response'])}: empty response (nothing to learn)"
            )
        ids = self.enc.prompt(prompt), self.enc.response(response)
        return self._pair(rows, row, *ids, self.fields["response"])

    def _chat(self, rows: FileRows, row: int) -> dict[str, Any]:
        name = self.fields["messages"]
        messages = _messages(rows, row, name)
        try:
            prompt, response = self.enc.chat(messages)
        except ValueError as exc:
            raise DataFileError(f"{rows.where(row, name)}: {exc}") from None
        return self._pair(rows, row, prompt, response, name)

    def _classification(self, rows: FileRows, row: int) -> dict[str, Any]:
        name = self.fields["text"]
        ids = self.enc.sequence(_text(rows, row, name))
        ids = _fit(ids, rows, row, name, self.seq_len, self.cut)
        label = rows.value(row, self.fields["label"])
        return {"input_ids": ids, "label": label, "where": (rows, row)}


def _detect_kind(rows: FileRows, fields: Mapping[str, str]) -> str:
    present = {k for k, v in rows.columns.items() if v and v[0] is not None}
    if fields["messages"] in present:
        return "chat"
    if fields["prompt"] in present and fields["response"] in present:
        return "prompt-response"
    if fields["text"] in present and fields["label"] in present:
        return "classification"
    if fields["text"] in present:
        return "text"
    wanted = (
        f"{fields['messages']!r} (chat), {fields['prompt']!r} and {fields['response']!r} "
        f"(prompt-response), {fields['text']!r} (text, with {fields['label']!r}: classification)"
    )
    raise DataFileError(
        f"{rows.where(0)}: the row has fields {', '.join(map(repr, sorted(present))) or 'none'}, "
        f"none of the expected {wanted}; set the *_field options to the file's field names"
    )


# --- labels, packing, splitting --------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _label_ids(examples: list[dict[str, Any]], labels: Sequence[Any] | None, field: str):
    """Maps every example's label to an id: a name to its index in ``labels`` (or in the
    sorted names), a number to itself. Returns the label names."""
    values = [e["label"] for e in examples]
    names = None if labels is None else [str(v) for v in labels]
    if names is None and not all(_is_number(v) for v in values):
        names = sorted({str(v) for v in values if not _is_number(v)})
    index = {name: i for i, name in enumerate(names or ())}
    largest = -1
    for example in examples:
        value = example.pop("label")
        rows, row = example.pop("where")
        if _is_number(value):
            bound = len(names) if names is not None else None
            if not float(value).is_integer() or value < 0 or (bound and value >= bound):
                raise DataFileError(
                    f"{rows.where(row, field)}: label {value!r} is no class id "
                    f"(an integer in [0, {bound or 'num_labels'}) or a label name)"
                )
            label = int(value)
        elif str(value) in index:
            label = index[str(value)]
        else:
            raise DataFileError(
                f"{rows.where(row, field)}: label {value!r} is not one of labels {names}"
            )
        largest = max(largest, label)
        ids = example.pop("input_ids")
        example.update(
            input_ids=torch.tensor(ids),
            attention_mask=torch.ones(len(ids), dtype=torch.long),
            labels=torch.tensor(label),
        )
    return names if names is not None else [str(i) for i in range(largest + 1)]


def _documents(docs: list[dict[str, Any]], seq_len: int, packing: bool, cut: bool, field: str):
    """Text examples: documents packed into ``seq_len`` chunks, or one example each."""
    out = []
    if packing:
        stream = [i for doc in docs for i in doc["ids"]]
        for start in range(0, len(stream), seq_len):
            chunk = stream[start : start + seq_len]
            if len(chunk) >= 2:  # a single token teaches next-token prediction nothing
                out.append(chunk)
    else:
        out = [_fit(doc["ids"], *doc["where"], field, seq_len, cut) for doc in docs]
    return [
        {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long)}
        for ids in out
    ]


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train rows, eval rows): a seeded random ``fraction`` held out, both in row order."""
    if fraction == 0:
        return list(range(n)), []
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DataFileError(f"eval_fraction={fraction} leaves no training row out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# --- the dataset ---------------------------------------------------------------------------------


@register_dataset("files")
def files(
    *,
    seed: int = 0,
    path: str | list[str] | None = None,
    eval_path: str | list[str] | None = None,
    eval_fraction: float | None = None,
    format: str | None = None,
    kind: str = "auto",
    text_field: str = "text",
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: str = "messages",
    label_field: str = "label",
    labels: list[str] | None = None,
    seq_len: int = 512,
    packing: bool = True,
    truncation: bool = False,
    sample_by: str = "line",
    tokenizer: str | None = None,
    max_examples: int | None = None,
    max_eval_examples: int | None = None,
    cache_dir: str | None = None,
    model: Mapping[str, Any] | None = None,
) -> DataBundle:
    """Examples from the user's files (``path``; a held-out ``eval_path`` or ``eval_fraction``,
    0.05 by default, 0 for none), tokenised with the model's tokenizer (see the module).

    ``format`` forces the ``datasets`` builder (``json``, ``csv``, ``parquet``, ``text``) where
    the suffix does not tell it; ``sample_by`` cuts plain text into rows by ``line``,
    ``paragraph`` or ``document``. ``kind``: ``auto``, ``chat``, ``prompt-response``,
    ``classification`` or ``text``. ``packing`` (text only) concatenates documents into
    ``seq_len`` chunks; ``truncation`` cuts rows longer than ``seq_len`` instead of refusing
    them. ``max_examples`` / ``max_eval_examples`` keep the first examples of each split.
    ``cache_dir`` keeps ``datasets``' cache (default: a temporary directory, removed).
    ``model`` is the model section, given by the runner (its ``path`` names the tokenizer).
    """
    if path is None:
        raise ValueError("path is required: a data file, a glob or a list of them (data.path)")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _check_int("seq_len", seq_len, 2)
    _check_int("max_examples", max_examples, 1, optional=True)
    _check_int("max_eval_examples", max_eval_examples, 1, optional=True)
    if eval_fraction is not None and eval_path is not None:
        raise ValueError("give eval_path or eval_fraction, not both")
    fraction = 0.05 if eval_fraction is None and eval_path is None else eval_fraction or 0.0
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise ValueError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    fields = {
        "text": text_field,
        "prompt": prompt_field,
        "response": response_field,
        "messages": messages_field,
        "label": label_field,
    }
    for key, name in fields.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{key}_field must be a field name, got {name!r}")

    tok, enc = _tokenizer(tokenizer, model)

    def read(option: str, value: Any) -> list[FileRows]:
        found = expand_paths(value, f"data.{option}")
        return [read_rows(p, format, sample_by=sample_by, cache_dir=cache_dir) for p in found]

    train_files = read("path", path)
    eval_files = read("eval_path", eval_path) if eval_path is not None else []
    if kind == "auto":
        kind = _detect_kind(train_files[0], fields)
    make = _Examples(kind, enc, fields, seq_len, truncation)
    train = [e for rows in train_files for e in make(rows)]
    if eval_files:
        held_out = [e for rows in eval_files for e in make(rows)]
    else:
        keep, out = _split(len(train), fraction, seed)
        train, held_out = [train[i] for i in keep], [train[i] for i in out]
    if not train:
        raise DataFileError(f"{train_files[0].path}: no usable row (every text is blank)")

    info = tok.info() | {"data_kind": kind, "data_files": [str(r.path) for r in train_files]}
    if kind == "text":
        train = _documents(train, seq_len, packing, truncation, text_field)
        held_out = _documents(held_out, seq_len, packing, truncation, text_field)
        collate = PadCollate({"input_ids": tok.pad_token_id, "attention_mask": 0})
    elif kind == "classification":
        names = _label_ids(train + held_out, labels, label_field)
        info |= {"num_labels": len(names), "label_names": names}
        collate = PadCollate({"input_ids": tok.pad_token_id, "attention_mask": 0})
    else:
        collate = SFTCollate(tok.pad_token_id, None, seq_len if truncation else None)
    train, held_out = train[:max_examples], held_out[:max_eval_examples]
    if not train:
        raise DataFileError(f"{train_files[0].path}: too little text for one example")
    info["max_length"] = min(seq_len, max(_length(e) for e in train + held_out))
    logger.info(
        "data: %d training and %d held-out %s examples from %d file(s), tokenizer %s",
        len(train),
        len(held_out),
        kind,
        len(train_files) + len(eval_files),
        getattr(tok, "path", None) or tokenizer or "char",
    )
    return DataBundle(
        train=ExampleDataset(train),
        eval=ExampleDataset(held_out) if held_out else None,
        collate=collate,
        info=info,
    )


def _length(example: Mapping[str, Any]) -> int:
    if "input_ids" in example:
        return int(example["input_ids"].shape[0])
    return int(example["prompt_ids"].shape[0] + example["response_ids"].shape[0])
