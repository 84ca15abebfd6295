"""Tests of the built-in augmentations (aigc_ext/default_plugins/strategies/text_augmentations.py
and image_augmentations.py)."""

from __future__ import annotations

import pytest
import torch

from aigc_ext.default_plugins.strategies.image_augmentations import (
    ColorJitter,
    CutMix,
    HorizontalFlip,
    MixUp,
    RandomResizedCrop,
    Rotation,
    VerticalFlip,
)
from aigc_ext.default_plugins.strategies.text_augmentations import (
    RandomDeletion,
    RandomInsertion,
    RandomSwap,
    SpanMasking,
    TokenMasking,
)
from aigc_ext.plugins import get_registry

CLS, SEP, MASK, PAD = 101, 102, 103, 0
SPECIALS = [CLS, SEP, MASK]
VOCAB = 1000


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text_batch(bsz=64, length=32, seed=0):
    """[CLS] tokens [SEP] [PAD]..., random lengths, token ids in [200, 1000) (all distinct from
    the specials)."""
    g = gen(seed)
    ids = torch.randint(200, VOCAB, (bsz, length), generator=g)
    lengths = torch.randint(3, length + 1, (bsz,), generator=g)
    lengths[0] = length  # one full row
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(bsz), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


COMMON = {"special_token_ids": SPECIALS, "pad_token_id": PAD}
TEXT_AUGS = {
    "token-masking": lambda: TokenMasking(mask_token_id=MASK, p=0.3, **COMMON),
    "span-masking": lambda: SpanMasking(mask_token_id=MASK, p=0.3, **COMMON),
    "random-deletion": lambda: RandomDeletion(p=0.3, **COMMON),
    "random-swap": lambda: RandomSwap(n=2, **COMMON),
    "random-swap-p": lambda: RandomSwap(p=0.2, **COMMON),
    "random-insertion": lambda: RandomInsertion(p=0.3, vocab_size=VOCAB, **COMMON),
}


def non_special(row: torch.Tensor) -> list[int]:
    return [t for t in row.tolist() if t not in (CLS, SEP, PAD)]


def is_subsequence(small: list[int], big: list[int]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@pytest.mark.parametrize("name", TEXT_AUGS)
def test_text_common_contract(name):
    aug = TEXT_AUGS[name]()
    batch = text_batch()
    before = {k: v.clone() for k, v in batch.items()}
    out = aug(batch, generator=gen(1))
    for k, v in before.items():
        assert torch.equal(batch[k], v), f"{k} modified in place"
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == before["input_ids"].shape and ids.dtype == before["input_ids"].dtype
    assert mask.dtype == before["attention_mask"].dtype
    # Padding exactly where the mask is 0, and only at the end.
    assert torch.equal(mask == 0, ids == PAD)
    assert not (mask[:, 1:] > mask[:, :-1]).any()
    # Each row still starts with [CLS] and ends (last real token) with [SEP]; no new specials.
    lengths = mask.sum(1)
    assert (ids[:, 0] == CLS).all()
    assert (ids[torch.arange(len(ids)), lengths - 1] == SEP).all()
    assert ((ids == CLS).sum(1) == 1).all() and ((ids == SEP).sum(1) == 1).all()
    assert not torch.equal(ids, before["input_ids"])  # and something changed
    # Seeded: the same seed gives the same output, another seed another one; bare tensor too.
    again = aug(batch, generator=gen(1))
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["labels"], out["labels"])
    assert not torch.equal(aug(batch, generator=gen(2))["input_ids"], ids)
    bare = aug({"input_ids": batch["input_ids"]}, generator=gen(1))
    assert torch.equal(bare["input_ids"], ids) and torch.equal(bare["attention_mask"], mask)
    tensor_out = aug(batch["input_ids"], generator=gen(1))
    assert isinstance(tensor_out, torch.Tensor) and torch.equal(tensor_out, ids)
    # labels started as a copy of input_ids: they move with the tokens (inserted tokens -> -100).
    labels = out["labels"]
    moved = labels != -100
    if name in ("token-masking", "span-masking"):
        assert torch.equal(labels, before["labels"])
    else:
        assert torch.equal(labels[moved], ids[moved])
        if name != "random-insertion":  # only new padding is unlabelled
            assert (ids[~moved] == PAD).all()


@pytest.mark.parametrize("name", ["token-masking", "span-masking"])
def test_masking_rate_and_positions(name):
    aug = TEXT_AUGS[name]()
    batch = text_batch(bsz=256, length=64, seed=3)
    out = aug(batch, generator=gen(0))
    cand = (batch["attention_mask"] == 1) & ~torch.isin(batch["input_ids"], torch.tensor(SPECIALS))
    masked = out["input_ids"] == MASK
    assert not (masked & ~cand).any()
    assert torch.equal(out["input_ids"][~masked], batch["input_ids"][~masked])
    rate = masked.sum().item() / cand.sum().item()
    # Span masking loses a little at sequence ends (spans are cut there).
    assert rate == pytest.approx(0.3, abs=0.02 if name == "token-masking" else 0.04)
    runs = (masked[:, 1:] & ~masked[:, :-1]).sum() + masked[:, 0].sum()
    mean_run = masked.sum().item() / runs.item()
    if name == "span-masking":
        assert mean_run > 2.0  # contiguous spans (mean length 3, cut by merges and ends)
    else:
        assert mean_run < 1.6  # independent tokens


def test_random_deletion_keeps_order_and_at_least_one_token():
    batch = text_batch(bsz=128, seed=4)
    out = RandomDeletion(p=0.3, **COMMON)(batch, generator=gen(0))
    kept = 0
    for old, new in zip(batch["input_ids"], out["input_ids"], strict=True):
        assert is_subsequence(non_special(new), non_special(old))
        kept += len(non_special(new))
    total = sum(len(non_special(r)) for r in batch["input_ids"])
    assert 1 - kept / total == pytest.approx(0.3, abs=0.03)
    soft = torch.rand(128, 32)  # (B, C) soft class labels with C == T are not per-token
    again = RandomDeletion(p=0.3, **COMMON)({**batch, "labels": soft}, generator=gen(0))
    assert torch.equal(again["labels"], soft) and torch.equal(again["input_ids"], out["input_ids"])
    everything = RandomDeletion(p=1.0, **COMMON)(batch, generator=gen(0))
    assert ((everything["attention_mask"].sum(1)) == 3).all()  # [CLS] one-token [SEP]


def test_random_insertion_keeps_original_and_final_special():
    batch = text_batch(bsz=128, seed=5)
    aug = RandomInsertion(p=0.3, vocab_size=VOCAB, **COMMON)
    out = aug(batch, generator=gen(0))
    truncated = 0
    for old, new, m in zip(
        batch["input_ids"], out["input_ids"], out["attention_mask"], strict=True
    ):
        old_tokens, new_tokens = non_special(old), non_special(new)
        inserted = len(new_tokens) - len(old_tokens)
        if inserted >= 0 and is_subsequence(old_tokens, new_tokens):
            continue
        # Cut at the length: a prefix of the original survives, [SEP] still last.
        truncated += 1
        assert m.all() and new[-1] == SEP
        assert is_subsequence(old_tokens[: len(old_tokens) // 2], new_tokens)
    assert truncated > 0  # the full row (and others) overflowed
    assert not torch.isin(out["input_ids"][out["labels"] == -100], torch.tensor(SPECIALS)).any()
    grown = out["attention_mask"].sum() - batch["attention_mask"].sum()
    assert grown > 0


def test_random_swap_permutes_within_row():
    batch = text_batch(bsz=32, seed=6)
    out = RandomSwap(n=1, **COMMON)(batch, generator=gen(0))
    for old, new, m in zip(
        batch["input_ids"], out["input_ids"], batch["attention_mask"], strict=True
    ):
        assert sorted(old.tolist()) == sorted(new.tolist())
        changed = (old != new).sum().item()
        assert changed == (2 if m.sum() >= 4 else 0)  # two distinct non-special tokens swap


def test_text_bad_options_and_inputs():
    with pytest.raises(ValueError, match="mask_token_id"):
        TokenMasking(p=0.1)
    with pytest.raises(ValueError, match="p must be in"):
        TokenMasking(mask_token_id=MASK, p=1.5)
    with pytest.raises(ValueError, match="pad_token_id"):
        RandomDeletion(p=0.1)
    with pytest.raises(ValueError, match="vocab_size"):
        RandomInsertion(p=0.1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="n or p"):
        RandomSwap(n=1, p=0.1)
    with pytest.raises(ValueError, match="mean_span_length"):
        SpanMasking(mask_token_id=MASK, mean_span_length=0.5)
    left_padded = {
        "input_ids": torch.tensor([[PAD, 5, 6]]),
        "attention_mask": torch.tensor([[0, 1, 1]]),
    }
    with pytest.raises(ValueError, match="padding must be at the end"):
        TokenMasking(mask_token_id=MASK, **COMMON)(left_padded)


# --- images --------------------------------------------------------------------------------------


def image_batch(bsz=6, channels=3, size=(8, 8), seed=0):
    g = gen(seed)
    return {
        "pixel_values": torch.rand(bsz, channels, *size, generator=g),
        "labels": torch.arange(bsz) % 4,
    }


IMAGE_AUGS = {
    "rotation": lambda: Rotation(degrees=30),
    "horizontal-flip": lambda: HorizontalFlip(p=0.5),
    "vertical-flip": lambda: VerticalFlip(p=0.5),
    "random-resized-crop": lambda: RandomResizedCrop(),
    "color-jitter": lambda: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
    "mixup": lambda: MixUp(alpha=0.4, num_classes=4),
    "cutmix": lambda: CutMix(alpha=1.0, num_classes=4),
}


@pytest.mark.parametrize("name", IMAGE_AUGS)
def test_image_common_contract(name):
    aug = IMAGE_AUGS[name]()
    batch = image_batch()
    before = {k: v.clone() for k, v in batch.items()}
    out = aug(batch, generator=gen(1))
    for k, v in before.items():
        assert torch.equal(batch[k], v), f"{k} modified in place"
    px = out["pixel_values"]
    assert px.shape == batch["pixel_values"].shape and px.dtype == torch.float32
    assert px.min() >= 0 and px.max() <= 1
    assert not torch.equal(px, batch["pixel_values"])
    again = aug(batch, generator=gen(1))
    assert torch.equal(again["pixel_values"], px) and torch.equal(again["labels"], out["labels"])
    assert not torch.equal(aug(batch, generator=gen(2))["pixel_values"], px)
    if name in ("mixup", "cutmix"):
        assert out["labels"].shape == (6, 4) and out["labels"].dtype == torch.float32
        assert torch.allclose(out["labels"].sum(1), torch.ones(6))
    else:
        assert torch.equal(out["labels"], batch["labels"])
        assert torch.equal(aug(batch["pixel_values"], generator=gen(1)), px)
    half = aug({**batch, "pixel_values": batch["pixel_values"].double()}, generator=gen(1))
    assert half["pixel_values"].dtype == torch.float64


def test_flips_are_exact():
    x = image_batch(bsz=16)["pixel_values"]
    assert torch.equal(HorizontalFlip(p=1.0)(x), x.flip(-1))
    assert torch.equal(VerticalFlip(p=1.0)(x), x.flip(-2))
    assert torch.equal(HorizontalFlip(p=0.0)(x), x)
    some = HorizontalFlip(p=0.5)(x, generator=gen(3))
    flipped = [torch.equal(s, xi.flip(-1)) for s, xi in zip(some, x, strict=True)]
    kept = [torch.equal(s, xi) for s, xi in zip(some, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and any(flipped) and any(kept)


def test_rotation_zero_is_identity_and_ninety_is_rot90():
    x = image_batch(size=(7, 7))["pixel_values"]
    assert torch.allclose(Rotation(degrees=0)(x, generator=gen(0)), x, atol=1e-5)
    r90 = Rotation(degrees=(90, 90))(x, generator=gen(0))
    assert torch.allclose(r90, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5)


def test_random_resized_crop_boxes_and_identity():
    x = image_batch(size=(10, 10))["pixel_values"]
    full = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, generator=gen(0))
    assert torch.allclose(full, x, atol=1e-5)
    aug = RandomResizedCrop(scale=(0.2, 0.6), ratio=(0.5, 2.0))
    boxes = aug.boxes(500, 32, 48, gen(0))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 48).all() and (h > 0).all() and (w > 0).all()
    area = (h * w).float() / (32 * 48)
    assert area.min() > 0.17 and area.max() < 0.65  # scale range, up to rounding
    assert area.std() > 0.05 and left.unique().numel() > 10  # really random


def test_random_resized_crop_samples_the_drawn_box():
    x = torch.arange(64.0).reshape(1, 1, 8, 8).expand(6, 2, 8, 8) / 64
    aug = RandomResizedCrop(scale=(0.1, 0.5), ratio=(0.5, 2.0))
    out = aug(x, generator=gen(4))
    for (top, left, h, w), img, src in zip(
        aug.boxes(6, 8, 8, gen(4)).tolist(), out, x, strict=True
    ):
        # Corners map to corners; along a row the ramp rises evenly across the box.
        assert torch.allclose(img[:, 0, 0], src[:, top, left], atol=1e-6)
        assert torch.allclose(img[:, -1, -1], src[:, top + h - 1, left + w - 1], atol=1e-6)
        assert torch.allclose(img[:, 0, -1], src[:, top, left + w - 1], atol=1e-6)
    tiny = RandomResizedCrop(scale=(0.01, 0.02))(torch.rand(8, 3, 4, 4), generator=gen(0))
    assert not tiny.isnan().any()  # one-pixel boxes: constant images, no NaN


def test_color_jitter_channels_and_brightness():
    gray = image_batch(channels=1)["pixel_values"]
    with pytest.raises(ValueError, match="saturation"):
        ColorJitter(saturation=0.3)(gray)
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.1)(gray)
    out = ColorJitter(brightness=0.3, contrast=0.3)(gray, generator=gen(0))
    assert out.shape == gray.shape
    doubled = ColorJitter(brightness=(2.0, 2.0), contrast=0.0)(gray)
    assert torch.allclose(doubled, (gray * 2).clamp(max=1))
    with pytest.raises(ValueError, match="hue"):
        ColorJitter(hue=0.7)
    with pytest.raises(ValueError, match="brightness"):
        ColorJitter(brightness=-0.1)


def constant_images(bsz=8):
    """Image i is constant with value values[i]; label i."""
    values = torch.linspace(0.05, 0.95, bsz)
    pixels = values.reshape(-1, 1, 1, 1).expand(bsz, 3, 12, 16).clone()
    return {"pixel_values": pixels, "labels": torch.arange(bsz)}, values


def test_mixup_pixels_match_soft_labels():
    batch, values = constant_images()
    out = MixUp(alpha=1.0, num_classes=8)(batch, generator=gen(0))
    labels = out["labels"]
    assert torch.allclose(labels.sum(1), torch.ones(8))
    expected = labels @ values  # pixel value = label-weighted mix of the two images' values
    assert torch.allclose(
        out["pixel_values"],
        expected.reshape(-1, 1, 1, 1).expand_as(batch["pixel_values"]),
        atol=1e-6,
    )
    assert ((labels > 0).sum(1) <= 2).all() and (labels.max(1).values < 1).any()
    soft_again = MixUp(alpha=1.0)(out, generator=gen(1))  # soft labels in, no num_classes needed
    assert torch.allclose(soft_again["labels"].sum(1), torch.ones(8))


def test_cutmix_label_weight_equals_pasted_area():
    batch, values = constant_images()
    aug = CutMix(alpha=1.0, num_labels=8)
    mixed_somewhere = False
    for seed in range(5):
        out = aug(batch, generator=gen(seed))
        labels = out["labels"]
        assert torch.allclose(labels.sum(1), torch.ones(8))
        for i in range(8):
            own = (out["pixel_values"][i] == values[i]).float().mean()
            assert labels[i, i].item() == pytest.approx(own.item(), abs=1e-6)
            mixed_somewhere |= own.item() < 1
    assert mixed_somewhere


def test_mixing_needs_labels_and_classes():
    x = image_batch()
    with pytest.raises(TypeError, match="dict batch"):
        MixUp(num_classes=4)(x["pixel_values"])
    with pytest.raises(ValueError, match="num_classes"):
        CutMix()(x)
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha=0, num_classes=4)
    with pytest.raises(ValueError, match="disagree"):
        MixUp(num_classes=4, num_labels=5)


def test_augmentations_registered_through_entry_point():
    registry = get_registry("augmentations")
    names = [
        "token-masking",
        "random-deletion",
        "random-swap",
        "random-insertion",
        "span-masking",
        "rotation",
        "horizontal-flip",
        "vertical-flip",
        "random-resized-crop",
        "color-jitter",
        "mixup",
        "cutmix",
    ]
    entries = {e.name: e for e in registry.entries()}
    for name in names:
        assert name in registry
        assert entries[name].source == "aigc_ext" and entries[name].description
    assert registry.get("cutmix") is CutMix and registry.get("token-masking") is TokenMasking
