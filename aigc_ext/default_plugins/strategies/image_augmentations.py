"""Built-in data augmentations for images (pixel tensors).

Every augmentation is a class whose options are keyword arguments of its constructor (validated
there); an instance is called as ``aug(batch, *, generator=None)``. ``batch`` is a dict of tensors
(a new dict is returned; no input tensor is modified in place) or a bare tensor (``input_ids``
for text, ``pixel_values`` for images; a tensor is returned). All randomness is drawn from
``generator`` (the global RNG when it is ``None``), so the same seed gives the same output.

Image augmentations work on ``pixel_values`` (B, C, H, W), floating point in [0, 1]. The random
parameters of each sample are drawn from the generator and applied with kornia's functional
operations (kornia's own augmentation modules draw from the global RNG, which would make a seeded
run depend on everything else using it). MixUp and CutMix also need ``labels`` and turn them into
soft labels (B, num_classes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aigc_ext.default_plugins.strategies.helpers import (
    generator_device,
    positive_int,
    probability,
    rand,
    randint,
)

__all__ = [
    "ColorJitter",
    "CutMix",
    "HorizontalFlip",
    "MixUp",
    "RandomResizedCrop",
    "Rotation",
    "VerticalFlip",
    "register_all",
]


class _ImageAugmentation:
    """Shared batch handling of the image augmentations (see the module docstring)."""

    name = "image augmentation"

    def _unpack(self, batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            pixels = batch
        elif isinstance(batch, Mapping):
            if "pixel_values" not in batch:
                raise KeyError(
                    f"{self.name}: the batch has no 'pixel_values'; keys: {sorted(batch)}"
                )
            pixels = batch["pixel_values"]
        else:
            raise TypeError(
                f"{self.name}: expected a dict batch or a pixel_values tensor, got "
                f"{type(batch).__name__}"
            )
        if not isinstance(pixels, Tensor) or pixels.dim() != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels)
            raise ValueError(f"{self.name}: pixel_values must be (B, C, H, W), got {shape}")
        if not pixels.dtype.is_floating_point:
            raise TypeError(
                f"{self.name}: pixel_values must be floating point in [0, 1], got {pixels.dtype}"
            )
        return pixels

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> Any:
        pixels = self._unpack(batch)
        new = self._apply(pixels, generator)
        if isinstance(batch, Tensor):
            return new
        out = dict(batch)
        out["pixel_values"] = new
        return out

    def _apply(self, pixels: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError


def _per_sample(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.reshape(-1, 1, 1, 1), new, old)


class _Flip(_ImageAugmentation):
    dim = -1

    def __init__(self, *, p: float = 0.5):
        self.p = probability("p", p)

    def _apply(self, pixels, generator):
        hit = rand((pixels.shape[0],), generator, pixels.device) < self.p
        return _per_sample(hit, pixels.flip(self.dim), pixels)


class HorizontalFlip(_Flip):
    """Mirrors each image left-right with probability ``p``."""

    name = "horizontal-flip"
    dim = -1


class VerticalFlip(_Flip):
    """Mirrors each image upside down with probability ``p``."""

    name = "vertical-flip"
    dim = -2


def _range_option(
    name: str, value: Any, *, symmetric_about: float | None, low: float, high: float
) -> tuple[float, float]:
    """A (min, max) option given as a pair or as one number ``x`` meaning
    ``(symmetric_about - x, symmetric_about + x)`` clipped to ``[low, high]``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value:g}")
        center = 0.0 if symmetric_about is None else symmetric_about
        lo, hi = max(low, center - value), min(high, center + value)
        if symmetric_about == 0.0 and value > high:
            raise ValueError(f"{name} must be in [0, {high:g}], got {value:g}")
        return float(lo), float(hi)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        lo, hi = float(value[0]), float(value[1])
        if not low <= lo <= hi <= high:
            raise ValueError(
                f"{name} must be a pair (min, max) with {low:g} <= min <= max <= {high:g}, "
                f"got {tuple(value)}"
            )
        return lo, hi
    raise TypeError(f"{name} must be a number or a (min, max) pair, got {value!r}")


def _uniform(
    lo: float, hi: float, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return lo + (hi - lo) * rand((n,), generator, device)


class Rotation(_ImageAugmentation):
    """Rotates each image (probability ``p``) by an angle drawn uniformly from
    ``(-degrees, degrees)`` or from a ``(min, max)`` pair, counter-clockwise about its centre,
    bilinear, with zeros outside the source image."""

    name = "rotation"

    def __init__(self, *, degrees: float | tuple[float, float] = 15.0, p: float = 1.0):
        self.degrees = _range_option(
            "degrees", degrees, symmetric_about=0.0, low=-360.0, high=360.0
        )
        self.p = probability("p", p)

    def _apply(self, pixels, generator):
        from kornia.geometry.transform import rotate

        bsz = pixels.shape[0]
        angles = _uniform(*self.degrees, bsz, generator, pixels.device)
        hit = rand((bsz,), generator, pixels.device) < self.p
        rotated = rotate(pixels.float(), angles.float(), mode="bilinear", align_corners=True)
        return _per_sample(hit, rotated.to(pixels.dtype), pixels)


def _crop_axis(start: Tensor, extent: Tensor, size: int) -> Tensor:
    """(B, size) normalised source coordinates (align_corners=True convention) that resample
    ``extent`` pixels starting at ``start`` onto ``size`` output pixels."""
    steps = torch.arange(size, device=start.device, dtype=torch.float32)
    frac = steps / (size - 1) if size > 1 else torch.full_like(steps, 0.5)
    pos = start[:, None] + frac[None] * (extent[:, None] - 1)
    return pos * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(pos)


class RandomResizedCrop(_ImageAugmentation):
    """Crops a random region of each image and resizes it back to the input size (H, W).

    The region covers a fraction of the image area drawn from ``scale`` and has an aspect ratio
    (width / height) drawn log-uniformly from ``ratio``; as in torchvision, up to 10 draws are
    tried per image and a centre crop of the whole image (aspect ratio clamped to ``ratio``) is
    the fallback. Bilinear resampling."""

    name = "random-resized-crop"

    def __init__(
        self,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.scale = _range_option("scale", scale, symmetric_about=None, low=0.0, high=1.0)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be a pair (min, max) with 0 < min, got {tuple(scale)}")
        self.ratio = _range_option("ratio", ratio, symmetric_about=None, low=0.0, high=math.inf)
        if self.ratio[0] <= 0:
            raise ValueError(f"ratio must be a pair (min, max) with 0 < min, got {tuple(ratio)}")

    def boxes(self, bsz: int, height: int, width: int, generator: torch.Generator | None) -> Tensor:
        """(B, 4) integer boxes (top, left, crop height, crop width)."""
        attempts = 10
        cpu = torch.device("cpu")
        area = height * width
        target = area * (
            self.scale[0] + (self.scale[1] - self.scale[0]) * rand((bsz, attempts), generator, cpu)
        )
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * rand((bsz, attempts), generator, cpu))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        top = (rand((bsz, attempts), generator, cpu) * (height - h + 1).clamp(min=1)).long()
        left = (rand((bsz, attempts), generator, cpu) * (width - w + 1).clamp(min=1)).long()
        first = valid.long().argmax(1, keepdim=True)
        chosen = torch.cat([t.gather(1, first) for t in (top, left, h, w)], dim=1)
        # Fallback: centre crop with the aspect ratio clamped into `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(height * self.ratio[1]), height
        else:
            fw, fh = width, height
        fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
        return torch.where(valid.any(1, keepdim=True), chosen, fallback)

    def _apply(self, pixels, generator):
        bsz, _, height, width = pixels.shape
        top, left, h, w = (
            self.boxes(bsz, height, width, generator).to(pixels.device).float().unbind(1)
        )
        # Output pixel u samples the source at left + u * (w - 1) / (width - 1) (corners map to
        # corners); a sampling grid (rather than a perspective warp from the box corners) also
        # handles one-pixel-wide boxes.
        xs = _crop_axis(left, w, width)
        ys = _crop_axis(top, h, height)
        grid = torch.stack(
            [xs[:, None, :].expand(bsz, height, width), ys[:, :, None].expand(bsz, height, width)],
            dim=-1,
        )
        out = torch.nn.functional.grid_sample(
            pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return out.to(pixels.dtype)


class ColorJitter(_ImageAugmentation):
    """Random brightness, contrast, saturation and hue changes, applied in this order, each with
    a factor drawn per image.

    ``brightness``/``contrast``/``saturation`` ``x`` draw a factor from ``[max(0, 1 - x), 1 + x]``
    (or give a ``(min, max)`` pair); brightness multiplies the pixels, contrast blends with the
    image's mean grey level, saturation with its greyscale version (as torchvision does).
    ``hue`` ``h`` in [0, 0.5] shifts the hue by a fraction of a turn drawn from ``[-h, h]``.
    Saturation and hue need RGB images (3 channels): setting them for another number of channels
    is an error at call time. Results are clipped to [0, 1].
    """

    name = "color-jitter"

    def __init__(
        self,
        *,
        brightness: float | tuple[float, float] = 0.2,
        contrast: float | tuple[float, float] = 0.2,
        saturation: float | tuple[float, float] = 0.0,
        hue: float | tuple[float, float] = 0.0,
    ):
        def factor_range(name, value):
            return _range_option(name, value, symmetric_about=1.0, low=0.0, high=math.inf)

        self.brightness = factor_range("brightness", brightness)
        self.contrast = factor_range("contrast", contrast)
        self.saturation = factor_range("saturation", saturation)
        self.hue = _range_option("hue", hue, symmetric_about=0.0, low=-0.5, high=0.5)

    def _apply(self, pixels, generator):
        import kornia.enhance as ke

        bsz, channels = pixels.shape[:2]
        for name, rng in (("saturation", self.saturation), ("hue", self.hue)):
            neutral = (0.0, 0.0) if name == "hue" else (1.0, 1.0)
            if rng != neutral and channels != 3:
                raise ValueError(
                    f"color-jitter: {name} needs RGB images (3 channels), got {channels} "
                    f"channel(s); set {name}=0 for these images"
                )
        device = pixels.device
        factors = [
            _uniform(*rng, bsz, generator, device)
            for rng in (self.brightness, self.contrast, self.saturation, self.hue)
        ]
        x = pixels.float()
        if self.brightness != (1.0, 1.0):
            x = (x * factors[0].reshape(-1, 1, 1, 1)).clamp(0.0, 1.0)
        if self.contrast != (1.0, 1.0):
            x = ke.adjust_contrast_with_mean_subtraction(x, factors[1])
        if self.saturation != (1.0, 1.0):
            x = ke.adjust_saturation_with_gray_subtraction(x, factors[2]).clamp(0.0, 1.0)
        if self.hue != (0.0, 0.0):
            x = ke.adjust_hue(x, factors[3] * (2 * math.pi)).clamp(0.0, 1.0)
        return x.to(pixels.dtype)


class _Mixing(_ImageAugmentation):
    """Shared parts of MixUp and CutMix: Beta(alpha, alpha) draw, pairing, soft labels."""

    def __init__(self, *, alpha: float, num_classes: int | None, num_labels: int | None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{self.name}: alpha must be a number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        if num_classes is not None:
            num_classes = positive_int("num_classes", num_classes)
        if num_labels is not None:
            num_labels = positive_int("num_labels", num_labels)
        if num_classes is not None and num_labels is not None and num_classes != num_labels:
            raise ValueError(
                f"{self.name}: num_classes={num_classes} and num_labels={num_labels} disagree"
            )
        self.num_classes = num_classes if num_classes is not None else num_labels

    def _lambda(self, generator: torch.Generator | None) -> float:
        # torch has no generator-driven Beta sampler: seed numpy's from the generator.
        seed = int(
            torch.randint(2**62, (1,), generator=generator, device=generator_device(generator))
        )
        return float(np.random.default_rng(seed).beta(self.alpha, self.alpha))

    def _soft_labels(self, labels: Any) -> Tensor:
        if not isinstance(labels, Tensor):
            raise TypeError(f"{self.name}: labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() == 2 and labels.dtype.is_floating_point:
            if self.num_classes is not None and labels.shape[1] != self.num_classes:
                raise ValueError(
                    f"{self.name}: soft labels must have num_classes={self.num_classes} columns, "
                    f"got shape {tuple(labels.shape)}"
                )
            return labels.float()
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"{self.name}: labels must be (B,) class indices or (B, C) float probabilities, "
                f"got shape {tuple(labels.shape)} dtype {labels.dtype}"
            )
        if self.num_classes is None:
            raise ValueError(
                f"{self.name}: num_classes is required to turn class indices into soft labels"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must be in [0, {self.num_classes}), got values in "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return torch.nn.functional.one_hot(labels.long(), self.num_classes).float()

    def __call__(self, batch: Any, *, generator: torch.Generator | None = None) -> dict:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"{self.name}: needs a dict batch with 'pixel_values' and 'labels', got "
                f"{type(batch).__name__}"
            )
        pixels = self._unpack(batch)
        if "labels" not in batch:
            raise KeyError(f"{self.name}: the batch has no 'labels'; keys: {sorted(batch)}")
        soft = self._soft_labels(batch["labels"]).to(pixels.device)
        if soft.shape[0] != pixels.shape[0]:
            raise ValueError(f"{self.name}: {soft.shape[0]} labels for {pixels.shape[0]} images")
        lam = self._lambda(generator)
        perm = torch.randperm(
            pixels.shape[0], generator=generator, device=generator_device(generator)
        ).to(pixels.device)
        new_pixels, weight = self._mix(pixels, perm, lam, generator)
        out = dict(batch)
        out["pixel_values"] = new_pixels
        out["labels"] = weight * soft + (1.0 - weight) * soft[perm]
        return out

    def _mix(
        self, pixels: Tensor, perm: Tensor, lam: float, generator: torch.Generator | None
    ) -> tuple[Tensor, float]:
        raise NotImplementedError


class MixUp(_Mixing):
    """MixUp: each image is blended with a partner from a random permutation of the batch,
    ``lam * x + (1 - lam) * x[perm]``, with one ``lam ~ Beta(alpha, alpha)`` per batch; the
    labels are mixed with the same weights into soft labels (B, num_classes). ``num_classes``
    falls back to ``num_labels`` and is not needed when the labels are already soft."""

    name = "mixup"

    def __init__(
        self, *, alpha: float = 0.2, num_classes: int | None = None, num_labels: int | None = None
    ):
        super().__init__(alpha=alpha, num_classes=num_classes, num_labels=num_labels)

    def _mix(self, pixels, perm, lam, generator):
        return lam * pixels + (1.0 - lam) * pixels[perm], lam


class CutMix(_Mixing):
    """CutMix: a box from each partner image (random permutation of the batch) is pasted into
    the image. ``lam ~ Beta(alpha, alpha)`` sets the box side to ``sqrt(1 - lam)`` of the image
    sides around a uniformly drawn centre (clipped at the borders; one box per batch); the labels
    are mixed by the actual pasted area: weight ``1 - box_area / (H * W)`` for the image's own
    label."""

    name = "cutmix"

    def __init__(
        self, *, alpha: float = 1.0, num_classes: int | None = None, num_labels: int | None = None
    ):
        super().__init__(alpha=alpha, num_classes=num_classes, num_labels=num_labels)

    def box(
        self, height: int, width: int, lam: float, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """(y1, y2, x1, x2) of the pasted box for mixing weight ``lam``."""
        cut = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cpu = torch.device("cpu")
        cy = int(randint(height, (1,), generator, cpu))
        cx = int(randint(width, (1,), generator, cpu))
        y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return y1, y2, x1, x2

    def _mix(self, pixels, perm, lam, generator):
        height, width = pixels.shape[-2:]
        y1, y2, x1, x2 = self.box(height, width, lam, generator)
        out = pixels.clone()
        out[:, :, y1:y2, x1:x2] = pixels[perm][:, :, y1:y2, x1:x2]
        return out, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


def register_all(register: Callable[..., Any]) -> None:
    """Registers the built-in image augmentations."""
    augmentations = (
        ("rotation", Rotation, "rotate images by a random angle within degrees"),
        ("horizontal-flip", HorizontalFlip, "mirror images left-right (probability p)"),
        ("vertical-flip", VerticalFlip, "mirror images upside down (probability p)"),
        ("random-resized-crop", RandomResizedCrop, "crop a random region, resize to input size"),
        ("color-jitter", ColorJitter, "random brightness, contrast, saturation and hue"),
        ("mixup", MixUp, "blend image pairs and their labels (Beta(alpha, alpha)); soft labels"),
        ("cutmix", CutMix, "paste a box from another image; labels mixed by area; soft labels"),
    )
    for name, cls, description in augmentations:
        register(name, cls, description=description)
