"""The ``files`` dataset: a user's JSONL, JSON, CSV, Parquet and text files read through
Hugging Face ``datasets``, tokenised with a checkpoint's tokenizer, packed, prompt-masked,
split, and refused with messages that name the file, the row and the field."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from hf_checkpoints import gpt2_checkpoint, llama_checkpoint, qa_rows, write_jsonl

from aigc_ext.training.file_data import files
from aigc_ext.training.file_reading import DataFileError
from aigc_ext.training.hf_tokenizers import HFTokenizer

IGNORE = -100


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"gpt2": gpt2_checkpoint(root / "gpt2"), "llama": llama_checkpoint(root / "llama")}


@pytest.fixture(scope="module")
def gpt2_tok(checkpoints):
    return HFTokenizer(checkpoints["gpt2"])


def _ids(dataset) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


# --- formats and fields ----------------------------------------------------------------------


TEXTS = ["the quick brown fox", "hello world", "a small model learns", "reverse the word"]
LABELS = ["pos", "neg", "pos", "neg"]


def _write_all_formats(tmp_path):
    rows = [{"text": t, "label": label} for t, label in zip(TEXTS, LABELS, strict=True)]
    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    out["json"] = tmp_path / "d.json"
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    out["csv"] = tmp_path / "d.csv"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS, "label": LABELS}), tmp_path / "d.parquet")
    out["parquet"] = tmp_path / "d.parquet"
    return out


def test_every_format_gives_the_same_examples(tmp_path, checkpoints, gpt2_tok):
    paths = _write_all_formats(tmp_path)
    results = {}
    for name, path in paths.items():
        bundle = files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
        assert bundle.info["data_kind"] == "classification"
        results[name] = (_ids(bundle.train), [int(e["labels"]) for e in bundle.train])
    expected_ids = [gpt2_tok.sequence(t) for t in TEXTS]
    # names map to ids in sorted order: neg 0, pos 1
    assert results["jsonl"] == (expected_ids, [1, 0, 1, 0])
    assert all(value == results["jsonl"] for value in results.values()), results
    bundle = files(path=str(paths["csv"]), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    assert bundle.info["num_labels"] == 2 and bundle.info["label_names"] == ["neg", "pos"]


def test_text_files_and_globs(tmp_path, checkpoints, gpt2_tok):
    (tmp_path / "b.txt").write_text("hello world\n\nthe quick brown fox\n")
    (tmp_path / "a.txt").write_text("a small model learns\n")
    bundle = files(
        path=str(tmp_path / "*.txt"),
        tokenizer=str(checkpoints["gpt2"]),
        eval_fraction=0,
        packing=False,
        seq_len=64,
    )
    assert bundle.info["data_kind"] == "text"
    assert bundle.info["data_files"] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    # sorted files, rows in file order, the blank line skipped; each document ends with eos
    docs = ["a small model learns", "hello world", "the quick brown fox"]
    assert _ids(bundle.train) == [gpt2_tok.document(d) for d in docs]
    assert all(ids[-1] == gpt2_tok.eos_token_id for ids in _ids(bundle.train))


def test_field_names_are_options(tmp_path, checkpoints, gpt2_tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "say fox", "a": " fox", "other": 1}])
    bundle = files(
        path=str(path),
        tokenizer=str(checkpoints["gpt2"]),
        prompt_field="q",
        response_field="a",
        eval_fraction=0,
    )
    assert bundle.info["data_kind"] == "prompt-response"
    example = bundle.train[0]
    assert example["prompt_ids"].tolist() == gpt2_tok.prompt("say fox")
    assert example["response_ids"].tolist() == [*gpt2_tok.ids(" fox"), gpt2_tok.eos_token_id]


def test_the_model_sections_checkpoint_gives_the_tokenizer(tmp_path, checkpoints):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    bundle = files(
        path=str(path), eval_fraction=0, model={"name": "hf", "path": str(checkpoints["llama"])}
    )
    assert bundle.info["tokenizer_path"] == str(checkpoints["llama"])
    llama = HFTokenizer(checkpoints["llama"])
    assert bundle.train[0]["prompt_ids"][0] == llama.bos_token_id  # Llama's <s> starts a prompt
    char = files(path=str(path), eval_fraction=0, model={"name": "gpt"})
    assert char.info["vocab_size"] == 128  # the built-in models' character tokenizer


# --- text: packing ---------------------------------------------------------------------------


def test_packing_concatenates_documents_into_seq_len_chunks(tmp_path, checkpoints, gpt2_tok):
    docs = [f"hello world number {i} the quick brown fox" for i in range(12)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    bundle = files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0, seq_len=16)
    stream = [i for d in docs for i in gpt2_tok.document(d)]
    chunks = _ids(bundle.train)
    assert all(len(c) == 16 for c in chunks[:-1]) and 2 <= len(chunks[-1]) <= 16
    assert [i for c in chunks for i in c] == stream[: sum(map(len, chunks))]
    assert len(stream) - sum(map(len, chunks)) < 2  # nothing but a lone last token dropped
    batch = bundle.collate([bundle.train[0], bundle.train[len(chunks) - 1]])
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][1].sum() == len(chunks[-1])


def test_an_unpacked_document_longer_than_seq_len_is_refused_or_cut(tmp_path, checkpoints):
    rows = [{"text": "hello"}, {"text": "the quick brown fox jumps over the lazy dog " * 3}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    common = {"path": str(path), "tokenizer": str(checkpoints["gpt2"]), "eval_fraction": 0}
    with pytest.raises(
        DataFileError,
        match=r"t\.jsonl: row 2 \(line 2\), field 'text': \d+ tokens, longer than seq_len=8",
    ):
        files(**common, packing=False, seq_len=8)
    cut = files(**common, packing=False, seq_len=8, truncation=True)
    assert [len(ids) for ids in _ids(cut.train)][1] == 8


# --- prompt/response and chat ------------------------------------------------------------------


def test_prompt_response_rows_mask_the_prompt(tmp_path, checkpoints, gpt2_tok):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(3))
    bundle = files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    batch = bundle.collate([bundle.train[i] for i in range(3)])
    for row, e in enumerate(qa_rows(3)):
        prompt, response = gpt2_tok.prompt(e["prompt"]), gpt2_tok.response(e["response"])
        n = len(prompt) + len(response)
        assert batch["input_ids"][row, :n].tolist() == prompt + response
        assert batch["labels"][row, : len(prompt)].eq(IGNORE).all()
        assert batch["labels"][row, len(prompt) : n].tolist() == response  # ends with eos
        assert (
            batch["labels"][row, n:].eq(IGNORE).all()
            and batch["attention_mask"][row, n:].sum() == 0
        )


def test_chat_rows_use_the_chat_template_and_train_on_the_answer(tmp_path, checkpoints):
    llama = HFTokenizer(checkpoints["llama"])
    conversation = [
        {"role": "user", "content": "say fox"},
        {"role": "assistant", "content": "fox"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "fox fox"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation}])
    bundle = files(path=str(path), tokenizer=str(checkpoints["llama"]), eval_fraction=0)
    assert bundle.info["data_kind"] == "chat"
    batch = bundle.collate([bundle.train[0]])
    full = llama.hf.apply_chat_template(conversation, tokenize=False)
    assert full.endswith("<|assistant|>fox fox<|end|>")
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids == [*llama.ids(full), llama.eos_token_id]
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert llama.decode(trained, skip_special_tokens=False) == "fox fox<|end|></s>"


def test_chat_rows_need_a_template_and_an_answer_last(tmp_path, checkpoints):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fox"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    with pytest.raises(
        DataFileError,
        match=r"chat\.jsonl: row 1 \(line 1\), field 'messages': the tokenizer .* has no chat template",
    ):
        files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    path = write_jsonl(
        tmp_path / "chat2.jsonl", [{"messages": messages}, {"messages": messages[:1]}]
    )
    with pytest.raises(
        DataFileError,
        match=r"row 2 \(line 2\), field 'messages': the last message must be the assistant's",
    ):
        files(path=str(path), tokenizer=str(checkpoints["llama"]), eval_fraction=0)


def test_a_row_longer_than_seq_len_names_its_file_row_and_field(tmp_path, checkpoints):
    rows = qa_rows(3)
    rows[2]["response"] = " fox" * 40
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    common = {"path": str(path), "tokenizer": str(checkpoints["gpt2"]), "eval_fraction": 0}
    with pytest.raises(
        DataFileError,
        match=r"qa\.jsonl: row 3 \(line 3\), field 'response': \d+ tokens with the prompt, longer than seq_len=32",
    ):
        files(**common, seq_len=32)
    cut = files(**common, seq_len=32, truncation=True)
    assert cut.collate([cut.train[2]])["input_ids"].shape == (1, 32)


# --- classification labels -----------------------------------------------------------------------


def test_labels_option_orders_the_names_and_bad_labels_are_named(tmp_path, checkpoints):
    rows = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    common = {"path": str(path), "tokenizer": str(checkpoints["gpt2"]), "eval_fraction": 0}
    bundle = files(**common, labels=["pos", "neg"])
    assert [int(e["labels"]) for e in bundle.train] == [0, 1]
    assert bundle.info["label_names"] == ["pos", "neg"] and bundle.info["num_labels"] == 2
    with pytest.raises(
        DataFileError,
        match=r"row 2 \(line 2\), field 'label': label 'neg' is not one of labels \['pos', 'mixed'\]",
    ):
        files(**common, labels=["pos", "mixed"])
    numbers = write_jsonl(
        tmp_path / "n.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}]
    )
    bundle = files(path=str(numbers), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    assert bundle.info["num_labels"] == 3
    negative = write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": -1}])
    with pytest.raises(
        DataFileError, match=r"m\.jsonl: row 1 \(line 1\), field 'label': label -1 is no class id"
    ):
        files(path=str(negative), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)


# --- held-out split ------------------------------------------------------------------------------


def test_the_held_out_split_by_fraction_is_seeded_and_disjoint(tmp_path, checkpoints):
    rows = [{"prompt": f"say {i}", "response": f" {i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    common = {"path": str(path), "tokenizer": str(checkpoints["gpt2"]), "eval_fraction": 0.25}

    def split(seed):
        bundle = files(seed=seed, **common)
        key = [tuple(bundle.train[i]["prompt_ids"].tolist()) for i in range(len(bundle.train))]
        held = [tuple(bundle.eval[i]["prompt_ids"].tolist()) for i in range(len(bundle.eval))]
        return key, held

    train_a, eval_a = split(0)
    assert (len(train_a), len(eval_a)) == (30, 10)
    assert not set(train_a) & set(eval_a) and len(set(train_a) | set(eval_a)) == 40
    assert split(0) == (train_a, eval_a)
    assert split(1)[1] != eval_a
    with pytest.raises(ValueError, match="give eval_path or eval_fraction, not both"):
        files(**common, eval_path=str(path))
    none = files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    assert none.eval is None and len(none.train) == 40


def test_the_held_out_split_can_be_a_second_file(tmp_path, checkpoints):
    train_file = write_jsonl(tmp_path / "train.jsonl", qa_rows(6))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", qa_rows(2))
    bundle = files(
        path=str(train_file), eval_path=str(eval_file), tokenizer=str(checkpoints["gpt2"])
    )
    assert (len(bundle.train), len(bundle.eval)) == (6, 2)
    assert bundle.eval[1]["prompt_ids"].tolist() == bundle.train[1]["prompt_ids"].tolist()


# --- bad files -----------------------------------------------------------------------------------


def test_a_missing_field_names_the_file_row_line_and_field(tmp_path, checkpoints):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "answer": "d"}\n')
    with pytest.raises(
        DataFileError,
        match=r"qa\.jsonl: row 2 \(line 3\), field 'response': the field is missing; the row has 'prompt', 'answer'",
    ):
        files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    other = write_jsonl(tmp_path / "x.jsonl", [{"question": "a"}])
    with pytest.raises(
        DataFileError,
        match=r"x\.jsonl: row 1 \(line 1\): the row has fields 'question', none of the expected",
    ):
        files(path=str(other), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", b"", r"empty\.jsonl: the file is empty"),
        ("blank.txt", b"\n\n  \n", r"blank\.txt: the file is empty"),
        ("header.csv", b"text,label\n", r"header\.csv: the file has no rows"),
        (
            "bad.jsonl",
            b'{"text": "a"}\n{"text": oops}\n',
            r"bad\.jsonl: cannot be read as json: line 2 is not valid JSON",
        ),
        (
            "latin.txt",
            b"caf\xe9\n",
            r"latin\.txt: cannot be read as text: not UTF-8 text \(byte 0xe9 at offset 3\)",
        ),
        (
            "junk.parquet",
            b"not a parquet file at all",
            r"junk\.parquet: cannot be read as parquet: ArrowInvalid",
        ),
        ("data.xml", b"<a/>", r"data\.xml: cannot tell the format from the suffix '\.xml'"),
    ],
)
def test_unusable_files_are_named(tmp_path, checkpoints, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        files(path=str(tmp_path / name), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)


def test_paths_that_name_no_file(tmp_path, checkpoints):
    tok = str(checkpoints["gpt2"])
    with pytest.raises(DataFileError, match=r"data\.path: file '.*nope\.jsonl' not found"):
        files(path=str(tmp_path / "nope.jsonl"), tokenizer=tok)
    with pytest.raises(DataFileError, match=r"data\.path: no file matches '.*\*\.jsonl'"):
        files(path=str(tmp_path / "*.jsonl"), tokenizer=tok)
    with pytest.raises(DataFileError, match=r"is a directory; give a file or a glob"):
        files(path=str(tmp_path), tokenizer=tok)
    with pytest.raises(ValueError, match=r"path is required"):
        files(tokenizer=tok)
    with pytest.raises(ValueError, match=r"tokenizer directory '.*missing' does not exist"):
        files(path=str(tmp_path / "x.jsonl"), tokenizer=str(tmp_path / "missing"))


def test_datasets_runs_offline_with_a_temporary_cache(tmp_path, checkpoints, monkeypatch):
    import tempfile

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(4))
    files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0)
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert list(scratch.iterdir()) == []  # the cache went with its temporary directory
    kept = tmp_path / "cache"
    files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0, cache_dir=str(kept))
    assert any(kept.iterdir())


def test_examples_are_tensors_the_collate_batches(tmp_path, checkpoints):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(5))
    bundle = files(path=str(path), tokenizer=str(checkpoints["gpt2"]), eval_fraction=0.2)
    assert len(bundle.train) == 4 and len(bundle.eval) == 1
    batch = bundle.collate([bundle.train[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    examples = [bundle.train[i] for i in range(4)] + [bundle.eval[0]]
    lengths = [len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples]
    assert bundle.info["max_length"] == max(lengths)
