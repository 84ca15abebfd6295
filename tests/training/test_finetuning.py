"""Finetuners ("full", "lora"), the adapter helpers and SFT batching, on tiny HF models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import tiny_models  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import aigc_ext  # noqa: E402
import aigc_ext.nn  # noqa: E402
from aigc_ext.default_plugins.strategies import finetuning as ft  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return tiny_models.tiny_gpt2(seed).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3) -> nn.Module:
    return tiny_models.tiny_bert(num_labels, layers=2, seed=seed).eval()


def ids(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def train_step(model: nn.Module, input_ids: torch.Tensor, lr: float = 0.05) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    out = model(input_ids=input_ids).logits
    loss = out.float().pow(2).mean()  # any differentiable function of the output will do
    loss.backward()
    optimizer.step()
    model.eval()


# --- full -----------------------------------------------------------------------------------------


def test_full_unfreezes_everything():
    model = tiny_gpt2()
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)
    out = ft.FullFinetune()(model)
    assert out is model
    assert all(p.requires_grad for p in model.parameters())


# --- lora -----------------------------------------------------------------------------------------


def test_lora_trains_only_adapters_and_starts_as_the_base_model():
    model = tiny_gpt2()
    x = ids()
    before = logits(model, x)
    n_base = sum(p.numel() for p in model.parameters())
    peft_model = ft.LoRAFinetune(r=4, alpha=8, dropout=0.0)(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    # c_attn, attn.c_proj and mlp.c_proj in each of 2 blocks, A and B each.
    assert len(trainable) == 2 * 3 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 0 < n_trainable < n_base / 5
    # B = 0 at initialisation: the adapted model computes exactly what the base model did.
    torch.testing.assert_close(logits(peft_model, x), before, atol=0, rtol=0)


def test_lora_merge_after_a_step_matches_the_adapted_model():
    model = tiny_gpt2()
    x = ids()
    before = logits(model, x)
    peft_model = ft.LoRAFinetune(r=4, alpha=8, dropout=0.0)(model)
    train_step(peft_model, x)
    adapted = logits(peft_model, x)
    assert (adapted - before).abs().max() > 1e-4  # the step moved the adapters
    merged = ft.merge_lora(peft_model)
    assert type(merged) is transformers.GPT2LMHeadModel
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-5, rtol=0)


def test_save_adapter_writes_only_the_adapter_and_load_reproduces(tmp_path):
    base = tiny_bert_classifier()
    fresh_base = copy.deepcopy(base)
    x = ids()
    peft_model = ft.LoRAFinetune(r=4, alpha=8, dropout=0.0)(base)
    # A sequence classifier's new head trains and is saved with the adapter (task SEQ_CLS).
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    train_step(peft_model, x)
    expected = logits(peft_model, x)

    out = ft.save_adapter(peft_model, tmp_path / "adapter")
    assert out == tmp_path / "adapter"
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    assert tensors and all("lora_" in k or "classifier" in k for k in tensors), list(tensors)
    adapter_numel = sum(t.numel() for t in tensors.values())
    base_numel = sum(p.numel() for p in fresh_base.parameters())
    assert adapter_numel < base_numel / 5
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4

    loaded = ft.load_adapter(fresh_base, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, x), expected, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference


def test_save_adapter_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="no adapters"):
        ft.save_adapter(tiny_gpt2(), tmp_path)
    with pytest.raises(ValueError, match="PEFT model"):
        ft.merge_lora(tiny_gpt2())


def test_load_adapter_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ft.load_adapter(tiny_gpt2(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json"):
        ft.load_adapter(tiny_gpt2(), tmp_path / "empty")
    # A corrupt weights file, and an adapter for another architecture.
    peft_model = ft.LoRAFinetune(r=2)(tiny_gpt2())
    ft.save_adapter(peft_model, tmp_path / "good")
    corrupt = tmp_path / "corrupt"
    ft.save_adapter(peft_model, corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot load the adapter"):
        ft.load_adapter(tiny_gpt2(), corrupt)
    with pytest.raises(ValueError, match="cannot load the adapter"):
        ft.load_adapter(tiny_bert_classifier(), tmp_path / "good")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (tiny_gpt2, ["c_attn", "c_proj"]),
        (tiny_bert_classifier, ["query", "key", "value"]),
        (
            lambda: transformers.T5ForConditionalGeneration(
                transformers.T5Config(
                    vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2
                )
            ),
            ["q", "k", "v", "o"],
        ),
        (
            lambda: transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=64,
                    hidden_size=16,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=32,
                )
            ),
            ["q_proj", "k_proj", "v_proj", "o_proj"],
        ),
    ],
    ids=["gpt2", "bert", "t5", "llama"],
)
def test_default_target_modules_by_architecture(make, expected):
    model = make()
    assert ft.default_target_modules(model) == expected
    peft_model = ft.LoRAFinetune(r=2)(model)
    adapted = {
        n.split(".lora_A.")[0].rsplit(".", 1)[-1]
        for n, _ in peft_model.named_parameters()
        if ".lora_A." in n
    }
    assert adapted == set(expected)


class FusedAttentionNet(nn.Module):
    """A model of this project's shape: fused qkv, output proj, an MLP and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.fc1 = nn.Linear(16, 32)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.embed(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = h + self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return self.head(h.mean(1))


def test_lora_on_a_plain_module_with_modules_to_save():
    torch.manual_seed(0)
    model = FusedAttentionNet()
    assert ft.default_target_modules(model) == ["qkv", "proj"]
    x = torch.randn(2, 5, 4)
    before = model(x).detach()
    peft_model = ft.LoRAFinetune(r=2, modules_to_save=["head"], dropout=0.0)(model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)
    assert any("head.modules_to_save" in n for n in trainable)
    assert not any(n.endswith(("fc1.weight", "embed.weight")) for n in trainable)
    torch.testing.assert_close(peft_model(x), before, atol=0, rtol=0)


class MHABlock(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.attn = aigc_ext.nn.MultiheadAttention(dim, 2, batch_first=True)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(x)))


def test_lora_adapts_multihead_attention_and_merges():
    torch.manual_seed(0)
    model = nn.Sequential(MHABlock(), MHABlock()).eval()
    assert ft.default_target_modules(model) == ["attn"]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
    peft_model = ft.LoRAFinetune(r=2, dropout=0.0)(model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and ".attn." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    peft_model(x).pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        adapted = peft_model(x)
        assert (adapted - before).abs().max() > 1e-4
        merged = ft.merge_lora(peft_model)
        assert isinstance(merged[0].attn, aigc_ext.nn.MultiheadAttention)
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)


def test_lora_without_a_known_projection_lists_the_linear_layers():
    model = nn.Sequential()
    model.add_module("encoder", nn.Linear(4, 4))
    model.add_module("decoder", nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"target_modules.*decoder, encoder"):
        ft.LoRAFinetune()(model)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"r": 0}, "r"),
        ({"r": -2}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": [""]}, "target_modules"),
        ({"target_modules": 3}, "target_modules"),
        ({"bias": "some"}, "bias"),
        ({"modules_to_save": [1]}, "modules_to_save"),
        ({"task_type": "LM"}, "task_type"),
    ],
)
def test_lora_bad_options(options, option):
    with pytest.raises(ValueError, match=option):
        ft.LoRAFinetune(**options)


def test_lora_names_missing_modules_and_refuses_double_adapters():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\].*c_attn"):
        ft.LoRAFinetune(target_modules=["c_attn", "nope"])(tiny_gpt2())
    with pytest.raises(ValueError, match=r"modules_to_save \['nohead'\]"):
        ft.LoRAFinetune(modules_to_save="nohead")(tiny_gpt2())
    peft_model = ft.LoRAFinetune(r=2)(tiny_gpt2())
    with pytest.raises(ValueError, match="already has adapters"):
        ft.LoRAFinetune(r=2)(peft_model)


# --- sft_collate --------------------------------------------------------------------------------


def test_sft_collate_masks_prompt_and_padding():
    pairs = [([5, 6, 7], [8, 9]), (torch.tensor([11]), torch.tensor([12, 13, 14, 15]))]
    batch = ft.sft_collate(pairs, pad_token_id=0, eos_token_id=2)
    # Equal lengths here (3 + 2 + 1 and 1 + 4 + 1): no padding needed.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [11, 12, 13, 14, 15, 2]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 2], [-100, 12, 13, 14, 15, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6]
    for value in batch.values():
        assert value.dtype == torch.long


def test_sft_collate_pads_at_the_end_with_pad_equal_to_eos():
    batch = ft.sft_collate([([1, 2], [3]), ([4], [5, 6, 7, 8])], pad_token_id=9, eos_token_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9, 9, 9], [4, 5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    # The eos after the response is learned; the padding with the same id is not.
    assert batch["labels"].tolist() == [[-100, -100, 3, 9, -100, -100], [-100, 5, 6, 7, 8, 9]]


def test_sft_collate_without_eos_and_truncation():
    batch = ft.sft_collate([([1, 2, 3], [4, 5, 6, 7]), ([], [8])], pad_token_id=0, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [8, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, 5], [8, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 0, 0, 0, 0]]
    # Truncation from the right drops the eos of a long response.
    batch = ft.sft_collate([([1], [2, 3, 4])], pad_token_id=0, eos_token_id=99, max_length=3)
    assert batch["input_ids"].tolist() == [[1, 2, 3]]


@pytest.mark.parametrize(
    ("pairs", "kwargs", "match"),
    [
        ([([1], [])], {}, "empty response"),
        ([], {}, "non-empty"),
        ([([1, 2, 3], [4])], {"max_length": 3}, "max_length=3"),
        ([([1], [2])], {"pad_token_id": -1}, "pad_token_id"),
        ([([1], [2])], {"eos_token_id": 1.5}, "eos_token_id"),
        ([([1], [2])], {"max_length": 0}, "max_length"),
        ([([1], [-4])], {}, r"pairs\[0\] response"),
        ([(torch.tensor([1.0]), [2])], {}, "integer tensor"),
        ([([1], [2], [3])], {}, "pair"),
    ],
)
def test_sft_collate_bad_input(pairs, kwargs, match):
    kwargs = {"pad_token_id": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        ft.sft_collate(pairs, **kwargs)


def test_sft_batch_trains_gpt2_on_the_response_only():
    model = tiny_gpt2()
    batch = ft.sft_collate([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], pad_token_id=0, eos_token_id=0)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Only the response tokens and their eos carry labels.
    assert (batch["labels"] != -100).sum().item() == (2 + 1) + (3 + 1)
    # The loss ignores the prompt: changing a prompt token's label would change nothing.
    masked = batch["labels"].clone()
    masked[0, 2] = 50  # supervise a prompt position (the first label is never used)
    assert not torch.equal(model(**{**batch, "labels": masked}).loss, out.loss)


# --- registry -----------------------------------------------------------------------------------


def test_registry_has_the_finetuners():
    registry = aigc_ext.plugins.get_registry("finetuners")
    assert registry.get("full") is ft.FullFinetune
    assert registry.get("lora") is ft.LoRAFinetune
    assert all(e.description for e in registry.entries() if e.name in ("full", "lora"))
    finetuner = registry.get("lora")(r=2, alpha=4, target_modules=["c_attn"])
    peft_model = finetuner(tiny_gpt2())
    assert {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    } == {"c_attn"}
