"""RUN/hf: the trained model and its tokenizer as a transformers checkpoint. AutoModelFor...
and AutoTokenizer load it back (in this process, without aigc_ext's attention) and give the
trained model's logits and the run's token ids; LoRA runs write the merged model on request;
the folder is replaced atomically."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from hf_checkpoints import llama_checkpoint, qa_rows, write_jsonl

from aigc_ext.training import train
from aigc_ext.training.hf_export import write_hf
from aigc_ext.training.tokenizers import CharTokenizer, WordPieceTokenizer

SMALL = {"run.max_steps": 2, "run.batch_size": 4, "run.eval_batch_size": 8, "run.log_every": 1}
TINY_TEXT = {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "data.seq_len": 32}
TINY_DATA = {"data.max_examples": 16, "data.max_eval_examples": 4}


def _recipe(name, out, **overrides):
    return train({"recipe": name}, overrides={**SMALL, "run.output_dir": str(out), **overrides})


def _same_logits(trained, loaded, **inputs):
    trained.eval()
    loaded.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    return got


def test_a_builtin_gpt_run_loads_back_with_its_character_tokenizer(tmp_path):
    result = _recipe(
        "clm-pretrain", tmp_path, **TINY_TEXT, **TINY_DATA, **{"model.n_positions": 32}
    )
    hf_dir = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(hf_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert type(model) is transformers.GPT2LMHeadModel
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    char = CharTokenizer()
    text = "x =\n\tcafe\u0301 \u20ac!"
    ids = tokenizer(text)["input_ids"]
    assert ids == char.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == char.decode(char.encode(text))
    assert tokenizer.eos_token_id == char.eos_token_id and tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == char.sentinel_id(0)
    _same_logits(result.model, model, input_ids=torch.tensor([ids]))
    # attention on aigc_ext's kernel gives the same logits as the trained model bit for bit
    ours = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="aigc_ext")
    with torch.no_grad():
        assert torch.equal(
            ours(torch.tensor([ids])).logits, result.model(torch.tensor([ids])).logits
        )


def test_builtin_bert_and_t5_runs_load_back_with_wordpiece_and_sentinels(tmp_path):
    wordpiece = {"data.tokenizer": "wordpiece", **TINY_TEXT, **TINY_DATA}
    bert = _recipe("mlm-pretrain", tmp_path / "bert", **wordpiece, **{"model.n_positions": 32})
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "bert/hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "bert/hf")
    piece = WordPieceTokenizer()
    assert len(tokenizer) == piece.vocab_size
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == piece.sentinel_id(0)
    ids = torch.tensor([piece.encode("hello world", add_bos=True, add_eos=True)])
    _same_logits(bert.model, loaded, input_ids=ids)
    t5 = _recipe("span-pretrain", tmp_path / "t5", **TINY_TEXT, **TINY_DATA)
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5/hf")
    ids = torch.tensor([CharTokenizer().encode("hello world")])
    _same_logits(t5.model, loaded, input_ids=ids, decoder_input_ids=ids[:, :4])


def test_a_minilm_classifier_run_loads_back_as_a_classifier(tmp_path):
    result = _recipe("transfer-minilm", tmp_path, **{"data.num_train": 8, "data.num_eval": 4})
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tokenizer(["what a good movie", "not bad"], padding=True, return_tensors="pt")
    got = _same_logits(result.model, loaded, **batch)
    assert got.shape == (2, 2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt")


def _sft(out, checkpoint, data, **run):
    return {
        "run": {
            "max_steps": 3,
            "batch_size": 4,
            "lr": 1e-2,
            "output_dir": str(out),
            "device": "cpu",
            **run,
        },
        "model": {"name": "hf", "path": str(checkpoint)},
        "data": {"name": "files", "path": str(data), "seq_len": 64, "eval_fraction": 0},
        "objective": {"name": "causal-lm"},
    }


def test_an_hf_run_saves_the_checkpoints_tokenizer_beside_the_model(tmp_path, llama):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    result = train(_sft(tmp_path / "run", llama, data))
    hf_dir = tmp_path / "run/hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    original = transformers.AutoTokenizer.from_pretrained(llama)
    text = "question: say fox twice? answer: fox"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    _same_logits(result.model, model, input_ids=ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # it trained


def test_lora_runs_write_the_merged_model_only_on_request(tmp_path, llama):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    cfg = _sft(tmp_path / "plain", llama, data)
    cfg["finetune"] = {"name": "lora", "r": 4, "dropout": 0.0}
    train(cfg)
    assert (tmp_path / "plain/adapter/adapter_config.json").is_file()
    assert not (tmp_path / "plain/hf").exists()
    assert "not written: it has LoRA adapters" in (tmp_path / "plain/train.log").read_text()
    cfg["run"].update(output_dir=str(tmp_path / "merged"), merge_lora=True)
    result = train(cfg)
    assert (tmp_path / "merged/adapter/adapter_model.safetensors").is_file()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged/hf")
    assert type(merged) is transformers.LlamaForCausalLM
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([[0, 5, 9, 14, 30]])
    _same_logits(result.model, merged, input_ids=ids)
    # the trained model keeps its adapters: a copy was merged
    assert any("lora_A" in name for name, _ in result.model.named_parameters())


def test_checkpoints_get_an_hf_folder_when_asked(tmp_path, llama):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(8))
    cfg = _sft(
        tmp_path / "run",
        llama,
        data,
        max_steps=4,
        save_every=2,
        keep_checkpoints=2,
        save_hf="checkpoints",
    )
    train(cfg)
    for step in (2, 4):
        folder = tmp_path / f"run/checkpoints/step-{step}/hf"
        assert transformers.AutoConfig.from_pretrained(folder).model_type == "llama"
        assert (folder / "tokenizer.json").is_file()
    cfg["run"].update(output_dir=str(tmp_path / "off"), save_hf="off")
    train(cfg)
    assert not (tmp_path / "off/hf").exists()
    assert not list((tmp_path / "off/checkpoints").glob("*/hf"))


def test_the_folder_is_replaced_atomically(tmp_path, llama, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llama)
    assert write_hf(tmp_path, model, tokenizer) == tmp_path / "hf"
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}

    class Died(Exception):
        pass

    def dies(self, directory, **kwargs):
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise Died

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", dies)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(Died):
        write_hf(tmp_path, model, tokenizer)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary left


def test_models_that_are_not_transformers_models_get_no_folder(tmp_path):
    _recipe(
        "vision-augment",
        tmp_path,
        **{"model.dim": 16, "model.depth": 1, "model.heads": 2, "data.max_examples": 40},
    )
    assert not (tmp_path / "hf").exists()
    assert "is not a transformers model" in (tmp_path / "train.log").read_text()
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["step"] == 2
