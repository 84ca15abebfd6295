"""Tests of the built-in objectives (aigc_ext/default_plugins/strategies/objectives.py and
span_corruption.py)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aigc_ext.default_plugins.strategies.helpers import IGNORE_INDEX
from aigc_ext.default_plugins.strategies.objectives import CausalLM, Classification, MaskedLM
from aigc_ext.default_plugins.strategies.span_corruption import (
    SpanCorruption,
    noise_span_counts,
    random_spans_noise_mask,
)
from aigc_ext.plugins import get_registry

VOCAB = 50


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TinyLM(nn.Module):
    """Embedding + linear: logits (B, T, V). Records the keyword arguments it was called with."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)
        self.calls: list[set[str]] = []

    def forward(self, input_ids, attention_mask=None, **kwargs):
        self.calls.append(
            {"input_ids", "attention_mask", *kwargs}
            if attention_mask is not None
            else {"input_ids", *kwargs}
        )
        return self.out(self.emb(input_ids))


def hand_ce(logits: torch.Tensor, targets: list[tuple[tuple[int, ...], int]]) -> float:
    """Mean of -log softmax(logits[pos])[target] over (pos, target) pairs, in float64."""
    total = 0.0
    for pos, target in targets:
        row = logits[pos].double()
        total += float(torch.logsumexp(row, 0) - row[target])
    return total / len(targets)


def text_batch(bsz=2, length=6, seed=0, lengths=None):
    g = gen(seed)
    ids = torch.randint(4, VOCAB, (bsz, length), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths or []):
        ids[b, n:] = 0
        mask[b, n:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- causal LM -----------------------------------------------------------------------------------


def test_causal_lm_labels_padding_and_loss_mask():
    batch = text_batch(lengths=[6, 4])
    batch["loss_mask"] = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    before = {k: v.clone() for k, v in batch.items()}
    out = CausalLM().prepare(batch, generator=gen(0))
    for k, v in before.items():
        assert torch.equal(batch[k], v), f"{k} was modified in place"
    assert "loss_mask" not in out
    expected = batch["input_ids"].clone()
    expected[1, 4:] = IGNORE_INDEX  # padding
    expected[0, :2] = IGNORE_INDEX  # loss_mask 0
    expected[1, 0] = IGNORE_INDEX
    assert torch.equal(out["labels"], expected)

    no_mask = CausalLM().prepare(text_batch(lengths=[6, 3]))
    assert torch.equal(no_mask["labels"][1, 3:], torch.full((3,), IGNORE_INDEX))
    assert torch.equal(no_mask["labels"][0], no_mask["input_ids"][0])


def test_causal_lm_uses_given_labels():
    batch = text_batch(lengths=[6, 5])
    labels = batch["input_ids"].clone()
    labels[:, :3] = IGNORE_INDEX
    batch["labels"] = labels
    out = CausalLM().prepare(batch, generator=gen(0))
    expected = labels.clone()
    expected[1, 5] = IGNORE_INDEX
    assert torch.equal(out["labels"], expected)
    assert out["labels"] is not labels


def test_causal_lm_loss_matches_hand_computation():
    torch.manual_seed(1)
    model = TinyLM()
    batch = text_batch(bsz=3, length=7, lengths=[7, 5, 2])
    batch["loss_mask"] = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 0, 0], [1] * 7])
    objective = CausalLM()
    prepared = objective.prepare(batch, generator=gen(0))
    loss = objective(model, prepared)
    assert model.calls[-1] == {"input_ids", "attention_mask"}
    logits = model(batch["input_ids"]).detach()
    targets = []
    for b in range(3):
        for t in range(6):
            label = int(prepared["labels"][b, t + 1])
            if label != IGNORE_INDEX:
                targets.append(((b, t), label))
    # Row 0: 6 predictions; row 1: targets at positions 2..4 -> 3; row 2: one (t=0 -> 1).
    assert len(targets) == 6 + 3 + 1
    assert loss.item() == pytest.approx(hand_ce(logits, targets), rel=1e-5)
    loss.backward()
    assert model.out.weight.grad is not None

    metrics = objective.eval_metrics(model, prepared)
    loss_sum, count = metrics["loss"]
    assert count == len(targets)
    assert loss_sum / count == pytest.approx(loss.item(), rel=1e-5)
    correct = sum(int(logits[pos].argmax()) == target for pos, target in targets)
    assert metrics["accuracy"] == (pytest.approx(correct), len(targets))


def test_causal_lm_no_labelled_token_gives_zero_loss_with_graph():
    model = TinyLM()
    batch = text_batch(bsz=1, length=4)
    batch["loss_mask"] = torch.zeros_like(batch["input_ids"])
    loss = CausalLM()(model, batch)  # prepares itself when loss_mask is present
    assert loss.item() == 0.0
    loss.backward()


def test_causal_lm_with_hf_gpt2_output():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=16,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    batch = CausalLM().prepare(text_batch(bsz=2, length=8, lengths=[8, 5]))
    loss = CausalLM()(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


# --- masked LM -----------------------------------------------------------------------------------

CLS, SEP, MASK, PAD = 1, 2, 3, 0


def mlm_batch(bsz=256, length=64, seed=0):
    g = gen(seed)
    ids = torch.randint(4, 1000, (bsz, length), generator=g)
    lengths = torch.randint(length // 2, length + 1, (bsz,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(bsz), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask}


def make_mlm(**kw):
    opts = dict(mask_token_id=MASK, vocab_size=1000, special_token_ids=[CLS, SEP], pad_token_id=PAD)
    opts.update(kw)
    return MaskedLM(**opts)


def test_masked_lm_statistics():
    batch = mlm_batch()
    original = batch["input_ids"].clone()
    out = make_mlm().prepare(batch, generator=gen(7))
    assert torch.equal(batch["input_ids"], original)
    ids, labels = out["input_ids"], out["labels"]
    chosen = labels != IGNORE_INDEX
    eligible = (batch["attention_mask"] == 1) & ~torch.isin(original, torch.tensor([CLS, SEP, PAD]))
    # Specials and padding are never chosen nor changed; labels hold the original ids.
    assert not (chosen & ~eligible).any()
    assert torch.equal(ids[~eligible], original[~eligible])
    assert torch.equal(labels[chosen], original[chosen])
    assert torch.equal(ids[~chosen], original[~chosen])
    # Exactly round(0.15 n) (at least 1) chosen per sequence.
    n = eligible.sum(1)
    assert torch.equal(chosen.sum(1), torch.round(n.double() * 0.15).long().clamp(min=1))
    frac = chosen.sum().item() / eligible.sum().item()
    assert frac == pytest.approx(0.15, abs=0.01)
    # 80 / 10 / 10.
    total = chosen.sum().item()
    masked = (chosen & (ids == MASK)).sum().item() / total
    kept = (chosen & (ids == original)).sum().item() / total
    randomized = (chosen & (ids != MASK) & (ids != original)).sum().item() / total
    assert total > 1000
    assert masked == pytest.approx(0.8, abs=0.035)
    assert kept == pytest.approx(0.1, abs=0.03)
    assert randomized == pytest.approx(0.1, abs=0.03)
    # Random replacements are real vocabulary tokens, never special.
    replaced = ids[chosen & (ids != MASK)]
    assert not torch.isin(replaced, torch.tensor([CLS, SEP, PAD, MASK])).any()
    assert replaced.max() < 1000


def test_masked_lm_short_sequence_gets_one_token_and_empty_gets_none():
    batch = {
        "input_ids": torch.tensor([[CLS, 10, 11, SEP, PAD], [CLS, SEP, PAD, PAD, PAD]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]),
    }
    out = make_mlm().prepare(batch, generator=gen(0))
    assert (out["labels"][0] != IGNORE_INDEX).sum() == 1
    assert (out["labels"][1] == IGNORE_INDEX).all()


def test_masked_lm_seeded():
    batch = mlm_batch(bsz=8, length=32)
    mlm = make_mlm()
    a = mlm.prepare(batch, generator=gen(3))
    b = mlm.prepare(batch, generator=gen(3))
    c = mlm.prepare(batch, generator=gen(4))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])


def test_masked_lm_loss_and_model_call():
    torch.manual_seed(0)
    model = TinyLM(vocab=1000)
    mlm = make_mlm()
    batch = mlm.prepare(mlm_batch(bsz=4, length=16), generator=gen(1))
    loss = mlm(model, batch)
    assert model.calls[-1] == {"input_ids", "attention_mask"}
    logits = model(batch["input_ids"]).detach()
    targets = [
        ((b, t), int(batch["labels"][b, t]))
        for b, t in (batch["labels"] != -100).nonzero().tolist()
    ]
    assert loss.item() == pytest.approx(hand_ce(logits, targets), rel=1e-5)
    loss_sum, count = mlm.eval_metrics(model, batch)["loss"]
    assert count == len(targets) and loss_sum / count == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mlm_probability": 0}, "mlm_probability"),
        ({"mlm_probability": 1.5}, "mlm_probability"),
        ({"mask_token_id": None}, "mask_token_id"),
        ({"mask_token_id": 1000}, "mask_token_id"),
        ({"mask_replace_prob": 0.95}, "mask_replace_prob"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_masked_lm_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mlm(**kwargs)


# --- span corruption -----------------------------------------------------------------------------


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the runs of True."""
    out, start = [], None
    for i, v in enumerate([*mask.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("length", [2, 3, 7, 20, 33, 100, 257])
def test_random_spans_noise_mask_counts(length):
    num_noise = min(max(round(length * 0.15), 1), length - 1)
    num_spans = max(1, round(num_noise / 3))
    assert noise_span_counts(length, 0.15, 3.0) == (num_noise, num_spans)
    masks = [random_spans_noise_mask(length, 0.15, 3.0, gen(s)) for s in range(20)]
    for m in masks:
        assert m.dtype == torch.bool and m.shape == (length,)
        assert int(m.sum()) == num_noise
        assert len(runs(m)) == num_spans
        assert not m[0] and m[-1]  # starts with kept tokens, ends with a noise span
    if num_spans >= 2:
        assert len({tuple(m.tolist()) for m in masks}) > 10


def test_random_spans_noise_mask_known_values_and_mean_span():
    assert noise_span_counts(100, 0.15, 3.0) == (15, 5)
    assert noise_span_counts(512, 0.15, 3.0) == (77, 26)  # round(76.8) = 77, round(25.67) = 26
    assert noise_span_counts(1, 0.15, 3.0) == (0, 0)
    assert not random_spans_noise_mask(1).any()
    lengths = [
        b - a for s in range(50) for a, b in runs(random_spans_noise_mask(512, 0.15, 3.0, gen(s)))
    ]
    assert sum(lengths) / len(lengths) == pytest.approx(77 / 26)
    assert max(lengths) > 3  # span lengths vary


SENT, EOS = 99, 1


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for tok in targets[:-1]:
        if tok > 90:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out = []
    for tok in inputs[:-1]:
        out.extend(spans.pop(tok) if tok > 90 else [tok])
    assert not spans
    return out


def test_span_corruption_reconstructs_original():
    lengths = [40, 23, 9, 2]
    batch = text_batch(bsz=4, length=40, seed=3, lengths=lengths)
    batch["input_ids"][batch["attention_mask"] == 1] = (
        batch["input_ids"][batch["attention_mask"] == 1] % 80 + 5
    )
    before = batch["input_ids"].clone()
    sc = SpanCorruption(sentinel_start_id=SENT, eos_token_id=EOS, pad_token_id=0)
    out = sc.prepare(batch, generator=gen(5))
    assert torch.equal(batch["input_ids"], before)
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "decoder_input_ids",
        "decoder_attention_mask",
        "labels",
    }
    for b, n in enumerate(lengths):
        n_in = int(out["attention_mask"][b].sum())
        n_out = int(out["decoder_attention_mask"][b].sum())
        inputs = out["input_ids"][b, :n_in].tolist()
        targets = out["labels"][b, :n_out].tolist()
        assert reconstruct(inputs, targets) == before[b, :n].tolist()
        # Sentinels count down from SENT, in inputs and targets alike.
        num_noise, num_spans = noise_span_counts(n, 0.15, 3.0)
        expected_sentinels = [SENT - j for j in range(num_spans)]
        assert [t for t in inputs if t > 90] == expected_sentinels
        assert [t for t in targets if t > 90] == expected_sentinels
        assert len(targets) == num_noise + num_spans + 1
        assert len(inputs) == n - num_noise + num_spans + 1
        # eos exactly once, last; then padding.
        assert inputs.count(EOS) == 1 and targets.count(EOS) == 1
        assert (out["input_ids"][b, n_in:] == 0).all()
        assert (out["labels"][b, n_out:] == IGNORE_INDEX).all()
        assert (out["attention_mask"][b, :n_in] == 1).all()
        # decoder inputs: targets shifted right with the start token (pad by default).
        dec = out["decoder_input_ids"][b, :n_out].tolist()
        assert dec == [0, *targets[:-1]]
        assert (out["decoder_attention_mask"][b, n_out:] == 0).all()
    assert out["input_ids"].shape[1] == max(int(m.sum()) for m in out["attention_mask"])


def test_span_corruption_trailing_eos_and_start_token_and_seed():
    ids = torch.cat([torch.arange(5, 45), torch.tensor([EOS])])[None]  # 40 tokens + eos
    sc = SpanCorruption(
        sentinel_start_id=SENT, eos_token_id=EOS, pad_token_id=0, decoder_start_token_id=4
    )
    out = sc.prepare({"input_ids": ids}, generator=gen(2))
    inputs, targets = out["input_ids"][0].tolist(), out["labels"][0].tolist()
    assert reconstruct(inputs, targets) == ids[0, :-1].tolist()  # eos was not corrupted
    assert out["decoder_input_ids"][0, 0] == 4
    again = sc.prepare({"input_ids": ids}, generator=gen(2))
    assert all(torch.equal(out[k], again[k]) for k in out)
    other = [sc.prepare({"input_ids": ids}, generator=gen(s))["input_ids"] for s in range(3, 8)]
    assert any(not torch.equal(o, out["input_ids"]) for o in other)


def test_span_corruption_with_hf_t5():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=100,
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        attn_implementation="eager",
    )
    model = transformers.T5ForConditionalGeneration(config).eval()
    sc = SpanCorruption(sentinel_start_id=SENT, eos_token_id=EOS, pad_token_id=0)
    batch = sc.prepare(text_batch(bsz=2, length=30, lengths=[30, 17]), generator=gen(0))
    loss = sc(model, batch)
    ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = F.cross_entropy(ref.reshape(-1, 100), batch["labels"].reshape(-1), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss_sum, count = sc.eval_metrics(model, batch)["loss"]
    assert count == int((batch["labels"] != -100).sum())
    assert loss_sum / count == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_density": 0.0}, "noise_density"),
        ({"noise_density": 1.0}, "noise_density"),
        ({"noise_density": 1.5}, "noise_density"),
        ({"mean_noise_span_length": 0.5}, "mean_noise_span_length"),
        ({"sentinel_start_id": None}, "sentinel_start_id"),
        ({"eos_token_id": None}, "eos_token_id"),
        ({"num_sentinels": 200}, "num_sentinels"),
    ],
)
def test_span_corruption_bad_options(kwargs, match):
    opts = {"sentinel_start_id": SENT, "eos_token_id": EOS, "pad_token_id": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SpanCorruption(**opts)


def test_span_corruption_too_few_sentinels():
    sc = SpanCorruption(sentinel_start_id=SENT, eos_token_id=EOS, pad_token_id=0, num_sentinels=2)
    with pytest.raises(ValueError, match="sentinels"):
        sc.prepare({"input_ids": torch.arange(5, 105)[None] % 80 + 5}, generator=gen(0))


# --- classification ------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.fc = nn.Linear(4, classes)
        self.seen: set[str] = set()

    def forward(self, pixel_values, **kwargs):
        self.seen = {"pixel_values", *kwargs}
        return self.fc(pixel_values.flatten(1))


def test_classification_hard_labels():
    torch.manual_seed(0)
    model = ImageClassifier()
    batch = {"pixel_values": torch.rand(6, 1, 2, 2), "labels": torch.tensor([0, 1, 2, 0, 1, 2])}
    obj = Classification(num_labels=3)
    prepared = obj.prepare(batch, generator=gen(0))
    loss = obj(model, prepared)
    assert model.seen == {"pixel_values"}
    logits = model(batch["pixel_values"]).detach()
    targets = [((i,), int(y)) for i, y in enumerate(batch["labels"])]
    assert loss.item() == pytest.approx(hand_ce(logits, targets), rel=1e-5)
    metrics = obj.eval_metrics(model, prepared)
    correct = int((logits.argmax(1) == batch["labels"]).sum())
    assert metrics["accuracy"] == (correct, 6)
    assert metrics["loss"][1] == 6 and metrics["loss"][0] / 6 == pytest.approx(
        loss.item(), rel=1e-5
    )


def test_classification_soft_labels_and_model_output_object():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(VOCAB, 3, mode="sum")

        def forward(self, input_ids, attention_mask):
            return Out(self.emb(input_ids, per_sample_weights=attention_mask.float()))

    torch.manual_seed(0)
    model = TextClassifier()
    batch = text_batch(bsz=4, length=5, lengths=[5, 3, 4, 2])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0], [0.2, 0.5, 0.3], [0.5, 0.0, 0.5]])
    batch["labels"] = soft
    obj = Classification()
    loss = obj(model, obj.prepare(batch))
    logits = model(batch["input_ids"], batch["attention_mask"]).logits.detach().double()
    expected = -(soft.double() * logits.log_softmax(-1)).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = obj.eval_metrics(model, batch)
    correct = int((logits.argmax(1) == soft.argmax(1)).sum())
    assert metrics["accuracy"] == (correct, 4)


def test_classification_bad_labels():
    obj = Classification(num_labels=3)
    with pytest.raises(ValueError, match="labels"):
        obj.prepare({"pixel_values": torch.rand(2, 4), "labels": torch.tensor([0, 3])})
    with pytest.raises(TypeError, match="labels"):
        obj.prepare({"pixel_values": torch.rand(2, 4), "labels": torch.tensor([0.0, 1.0])})
    with pytest.raises(KeyError, match="labels"):
        obj.prepare({"pixel_values": torch.rand(2, 4)})
    with pytest.raises(ValueError, match="num_labels"):
        Classification(num_labels=0)


# --- registration --------------------------------------------------------------------------------


def test_objectives_registered_through_entry_point():
    registry = get_registry("objectives")
    expected = {
        "causal-lm": CausalLM,
        "masked-lm": MaskedLM,
        "span-corruption": SpanCorruption,
        "classification": Classification,
    }
    entries = {e.name: e for e in registry.entries()}
    for name, cls in expected.items():
        assert registry.get(name) is cls
        assert entries[name].source == "aigc_ext" and entries[name].description


def test_options_are_keyword_only_and_named_like_info_keys():
    for cls in (CausalLM, MaskedLM, SpanCorruption, Classification):
        params = inspect.signature(cls).parameters.values()
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), cls
    assert {"mask_token_id", "vocab_size", "special_token_ids", "pad_token_id"} <= set(
        inspect.signature(MaskedLM).parameters
    )
    assert {"sentinel_start_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"} <= set(
        inspect.signature(SpanCorruption).parameters
    )
    assert math.isclose(MaskedLM(mask_token_id=3, vocab_size=10).mlm_probability, 0.15)
