"""The CPU generation read from /proc/cpuinfo (aigc_ext.cpu_family)."""

from __future__ import annotations

import pytest

from aigc_ext.cpu_family import CpuFamily, cpu_family, microarchitecture, parse_cpuinfo


def cpuinfo(vendor: str, family: int, model: int, stepping: int, name: str) -> str:
    """Two processors' blocks as Linux writes them; the second must not be read."""
    block = (
        f"processor\t: {{n}}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: {name}\nstepping\t: {stepping}\nflags\t\t: fpu avx2\n"
    )
    return block.format(n=0) + "\n" + block.replace(str(model), "999").format(n=1)


@pytest.mark.parametrize(
    ("vendor", "family", "model", "stepping", "expected"),
    [
        ("AuthenticAMD", 25, 17, 1, "Zen 4"),  # EPYC 9004 (Genoa)
        ("AuthenticAMD", 25, 1, 1, "Zen 3"),  # EPYC 7003 (Milan)
        ("AuthenticAMD", 25, 0x21, 0, "Zen 3"),
        ("AuthenticAMD", 25, 0x61, 2, "Zen 4"),
        ("AuthenticAMD", 25, 0xA0, 1, "Zen 4"),
        ("AuthenticAMD", 23, 0x31, 0, "Zen 2"),  # EPYC 7002 (Rome)
        ("AuthenticAMD", 23, 1, 2, "Zen / Zen+"),
        ("AuthenticAMD", 26, 2, 0, "Zen 5"),
        ("GenuineIntel", 6, 143, 8, "Sapphire Rapids"),
        ("GenuineIntel", 6, 85, 4, "Skylake-SP"),
        ("GenuineIntel", 6, 85, 7, "Cascade Lake"),
        ("GenuineIntel", 6, 85, 11, "Cooper Lake"),
        ("GenuineIntel", 6, 0x3F, 2, "Haswell-EP"),
    ],
)
def test_known_generations(vendor, family, model, stepping, expected):
    info = parse_cpuinfo(cpuinfo(vendor, family, model, stepping, "Some CPU"))
    assert (info.vendor, info.family, info.model, info.stepping) == (
        vendor,
        family,
        model,
        stepping,
    )
    assert info.name == expected
    short = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}[vendor]
    assert info.label() == f"{expected} ({short} family {family}, model {model})"


@pytest.mark.parametrize(
    ("vendor", "family", "model"),
    [
        ("AuthenticAMD", 25, 0xFF),
        ("AuthenticAMD", 21, 2),
        ("GenuineIntel", 6, 1),
        ("HygonGenuine", 24, 1),
    ],
)
def test_unknown_generations_give_their_numbers_alone(vendor, family, model):
    info = parse_cpuinfo(cpuinfo(vendor, family, model, 0, "x"))
    assert info.name is None
    assert microarchitecture(vendor, family, model) is None
    assert info.label().endswith(f"family {family}, model {model}")
    assert not info.label().startswith("None")


@pytest.mark.parametrize("text", ["", "processor : 0\n", "vendor_id : GenuineIntel\nmodel : x\n"])
def test_missing_or_malformed_fields_give_no_label(text):
    info = parse_cpuinfo(text)
    assert info.name is None and info.label() == ""


def test_stepping_unknown_keeps_the_three_names():
    assert microarchitecture("GenuineIntel", 6, 85) == "Skylake-SP / Cascade Lake / Cooper Lake"


def test_this_machine_is_reported_in_info():
    from aigc_ext import info

    doc = info.describe()
    assert doc["cpu"]["family"] == cpu_family().label()
    line = info.format_text(doc).splitlines()[2]
    assert line.startswith(f"cpu: {doc['cpu']['model']}")
    if doc["cpu"]["family"]:
        assert f"[{doc['cpu']['family']}]" in line


def test_empty_family_is_falsy_label():
    assert CpuFamily().label() == ""
