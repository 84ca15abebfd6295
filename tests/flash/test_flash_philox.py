"""Philox4x32-10 and the contract's dropout keep mask (``aigc_ext.flash.philox``)."""

from __future__ import annotations

import pytest
import torch

from aigc_ext.flash import philox
from aigc_ext.flash.philox import dropout_keep_mask, dropout_threshold, philox4x32_10

MASK = 0xFFFFFFFF

# Random123's known-answer vectors for philox4x32-10: (counter, key, output).
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def scalar_philox(counter, key):
    """Philox4x32-10 on Python ints, written from the definition (the test's own oracle)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK, (k1 + 0xBB67AE85) & MASK
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


def scalar_keep(seed, offset, b, h, i, j, p, heads):
    """The contract's keep decision for one score, from its text."""
    key = (seed & MASK, (seed >> 32) & MASK)
    u = scalar_philox((j >> 2, i, b * heads + h, offset & MASK), key)[j & 3]
    return (u >> 8) >= min(int(p * 2**24), 2**24)


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    got = tuple(int(w) for w in philox4x32_10(counter, key))
    assert got == expected
    assert scalar_philox(counter, key) == expected


def test_vectorised_equals_scalar_on_random_counters():
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (4, 64), generator=gen, dtype=torch.int64)
    key = (0x12345678, 0xFEDCBA98)
    out = torch.stack(philox4x32_10(tuple(words), key))
    for n in range(words.shape[1]):
        expected = scalar_philox(tuple(int(w) for w in words[:, n]), key)
        assert tuple(int(w) for w in out[:, n]) == expected


def test_mask_matches_the_contract_text():
    seed, offset, p, heads = -0x123456789ABC, 0x1_0000_0007, 0.3, 6  # negative seed, wide offset
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    mask = dropout_keep_mask(rng, 3, 4, 9, 13, p, heads)
    assert mask.shape == (9, 13) and mask.dtype == torch.bool
    for i in range(9):
        for j in range(13):
            assert bool(mask[i, j]) == scalar_keep(seed, offset, 3, 4, i, j, p, heads), (i, j)


def test_keep_fraction_of_a_large_mask():
    for p, n in ((0.1, 1024), (0.5, 512)):
        mask = dropout_keep_mask([2024, 0], 0, 0, n, n, p, 1)
        kept = mask.double().mean().item()
        assert abs(kept - (1 - p)) < 0.01 * (1 - p), (p, kept)
        assert abs(kept - (1 - p)) < 3e-3  # 0.25M-1M draws: the mean is within about 1e-3


def test_no_dropout_keeps_everything_and_threshold():
    assert bool(dropout_keep_mask([1, 2], 0, 0, 5, 7, 0.0, 1).all())
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**23
    assert dropout_threshold(1.0) == 2**24


def test_blocks_are_independent_of_tiling_and_of_each_other():
    rng = [99, 5]
    big = dropout_keep_mask(rng, 1, 2, 64, 64, 0.5, 4)
    # A smaller sequence sees the same (i, j) draws: nothing depends on the extent or tiling.
    assert torch.equal(dropout_keep_mask(rng, 1, 2, 37, 53, 0.5, 4), big[:37, :53])
    # Several heads at once equal one head at a time.
    many = dropout_keep_mask(rng, 1, range(4), 64, 64, 0.5, 4)
    assert torch.equal(many[2], big)
    # Other heads, batches, seeds and offsets draw other masks, uncorrelated with this one.
    others = [
        many[0],
        dropout_keep_mask(rng, 0, 2, 64, 64, 0.5, 4),
        dropout_keep_mask([100, 5], 1, 2, 64, 64, 0.5, 4),
        dropout_keep_mask([99, 6], 1, 2, 64, 64, 0.5, 4),
        dropout_keep_mask([99 + 2**32, 5], 1, 2, 64, 64, 0.5, 4),  # high seed word
    ]
    for other in others:
        both = (big & other).double().mean().item()
        assert abs(both - 0.25) < 0.03, both  # independent: P(a and b) = P(a) P(b)
    # The four words of one counter (j, j+1, ...) and neighbouring rows are uncorrelated too.
    mask = dropout_keep_mask([7, 0], 0, 0, 512, 512, 0.5, 1).double()
    assert abs((mask[:, :-1] * mask[:, 1:]).mean().item() - 0.25) < 0.01
    assert abs((mask[:-1] * mask[1:]).mean().item() - 0.25) < 0.01


def test_chunking_does_not_change_the_mask(monkeypatch):
    expected = dropout_keep_mask([3, 4], 0, range(3), 50, 70, 0.25, 3)
    monkeypatch.setattr(philox, "_CHUNK_ELEMENTS", 40)
    assert torch.equal(dropout_keep_mask([3, 4], 0, range(3), 50, 70, 0.25, 3), expected)


def test_rng_state_must_hold_two_values():
    with pytest.raises(ValueError, match="rng_state"):
        dropout_keep_mask([1, 2, 3], 0, 0, 4, 4, 0.1, 1)
