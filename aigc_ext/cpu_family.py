"""Which x86 microarchitecture this CPU is, from the vendor, family and model it reports.

A VM's model name often says little ("AMD EPYC", "Intel(R) Xeon(R) Processor"), yet the
generation decides what the kernels can reach: AMD Zen 4 issues a 512-bit FMA as two 256-bit
halves (so its AVX-512 and AVX2 FMA peaks are the same), Zen 5 and Intel's server cores issue
them whole, and only Sapphire Rapids and later have AMX. ``aigc-ext info`` and the benchmarks
print :meth:`CpuFamily.label` next to the model name, so that every measurement says which
generation it was taken on.

The table covers the server and desktop generations the CPU kernel is tuned and measured on
(the ranges of model numbers follow the vendors' published CPUID family/model assignments);
other CPUs are reported by their numbers alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = ["CpuFamily", "cpu_family", "microarchitecture", "parse_cpuinfo"]

# AMD: (family, first model, last model, name). Family 0x17 is Zen to Zen 2, 0x19 Zen 3 and
# Zen 4, 0x1A Zen 5.
_AMD: tuple[tuple[int, int, int, str], ...] = (
    (0x17, 0x00, 0x2F, "Zen / Zen+"),
    (0x17, 0x30, 0xFF, "Zen 2"),
    (0x19, 0x00, 0x0F, "Zen 3"),
    (0x19, 0x10, 0x1F, "Zen 4"),
    (0x19, 0x20, 0x5F, "Zen 3"),
    (0x19, 0x60, 0x7F, "Zen 4"),
    (0x19, 0xA0, 0xAF, "Zen 4"),
    (0x1A, 0x00, 0xFF, "Zen 5"),
)

# Intel family 6: model -> name (Xeon server parts and the desktop cores with AVX2).
_INTEL6: dict[int, str] = {
    0x3C: "Haswell",
    0x3F: "Haswell-EP",
    0x45: "Haswell",
    0x46: "Haswell",
    0x3D: "Broadwell",
    0x47: "Broadwell",
    0x4F: "Broadwell-EP",
    0x56: "Broadwell-DE",
    0x4E: "Skylake",
    0x5E: "Skylake",
    0x8E: "Kaby Lake / Coffee Lake",
    0x9E: "Kaby Lake / Coffee Lake",
    0x6A: "Ice Lake-SP",
    0x6C: "Ice Lake-D",
    0x8F: "Sapphire Rapids",
    0xCF: "Emerald Rapids",
    0xAD: "Granite Rapids",
    0xAF: "Sierra Forest",
}


def microarchitecture(
    vendor: str, family: int, model: int, stepping: int | None = None
) -> str | None:
    """The generation's name for a CPUID vendor string, family and model (as /proc/cpuinfo
    reports them, in decimal there), or None where the table does not know it."""
    if vendor == "AuthenticAMD":
        for fam, lo, hi, name in _AMD:
            if family == fam and lo <= model <= hi:
                return name
        return None
    if vendor == "GenuineIntel" and family == 6:
        if model == 0x55:  # one model number, three generations told apart by the stepping
            if stepping is None:
                return "Skylake-SP / Cascade Lake / Cooper Lake"
            return (
                "Cooper Lake"
                if stepping >= 10
                else "Cascade Lake"
                if stepping >= 5
                else "Skylake-SP"
            )
        return _INTEL6.get(model)
    return None


_VENDORS = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}


@dataclass(frozen=True)
class CpuFamily:
    """The CPU's vendor id and CPUID family, model and stepping (None where not reported)."""

    vendor: str = ""
    family: int | None = None
    model: int | None = None
    stepping: int | None = None

    @property
    def name(self) -> str | None:
        """The microarchitecture, e.g. ``"Zen 4"``; None where unknown."""
        if self.family is None or self.model is None:
            return None
        return microarchitecture(self.vendor, self.family, self.model, self.stepping)

    def label(self) -> str:
        """E.g. ``"Zen 4 (AMD family 25, model 17)"``; ``""`` where nothing was reported."""
        if self.family is None or self.model is None:
            return ""
        numbers = f"{_VENDORS.get(self.vendor, self.vendor or 'x86')} family {self.family}, model {self.model}"
        return f"{self.name} ({numbers})" if self.name else numbers


def parse_cpuinfo(text: str) -> CpuFamily:
    """The first processor's vendor, family, model and stepping in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            if fields:  # a blank line ends the first processor's block
                break
            continue
        if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
            fields[key] = value.strip()

    def number(key: str) -> int | None:
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    return CpuFamily(
        vendor=fields.get("vendor_id", ""),
        family=number("cpu family"),
        model=number("model"),
        stepping=number("stepping"),
    )


@functools.cache
def cpu_family() -> CpuFamily:
    """This machine's :class:`CpuFamily` (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuFamily()
