"""Benchmarking as a smaller x86 CPU family on a bigger one, torch included.

Holding only our kernel to AVX2 (``cpu_kernel_config(isa="avx2")``) or off AMX
(``use_amx=False``) on an AMX Xeon compares it with a torch that still uses AVX-512 and AMX:
torch's bf16 SDPA keeps running on AMX tiles through MKL and oneDNN, so the ratio says nothing
about an AMD EPYC or a Zen 4 machine. An emulation limits both sides the same way:

* torch's own kernels through ``ATEN_CPU_CAPABILITY``;
* MKL through ``MKL_ENABLE_INSTRUCTIONS``;
* oneDNN (torch's brgemm and bf16 matmuls) through ``ONEDNN_MAX_CPU_ISA``;
* this package's kernel through :func:`aigc_ext.ops.cpu_kernel_config`.

MKL and oneDNN read their variables once, when first used, so an emulated benchmark runs in a
process started with them set (:func:`reexec`). What stays the host's: clock, caches, memory
bandwidth and the cost of each instruction (a Sapphire Rapids core runs ``vdpbf16ps`` at half
its fp32 FMA rate, a Zen 4 core does not), so an emulated column is a stand-in for, not a
measurement of, the family it names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["EMULATIONS", "Emulation", "active", "reexec"]


@dataclass(frozen=True)
class Emulation:
    """One CPU family: the environment that limits torch's libraries to it, the
    ``cpu_kernel_config`` settings that limit ours, the host CPU features it needs and the
    bf16/fp16 hardware it lacks (hidden from the roofline)."""

    family: str
    env: Mapping[str, str]
    kernel: Mapping[str, object]
    needs: tuple[str, ...]
    lacks: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """One line for a report: the family and every setting that makes it."""
        settings = [f"{k}={v}" for k, v in self.env.items()]
        settings += [f"cpu_kernel_config({k}={v!r})" for k, v in self.kernel.items()]
        return f"{self.family}, emulated: {' '.join(settings)}"


EMULATIONS: dict[str, Emulation] = {
    "avx2": Emulation(
        family="AVX2 + FMA CPU (AMD Zen 2/3, Intel before Skylake-SP)",
        env={
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
        },
        kernel={"isa": "avx2"},
        needs=("avx2", "fma"),
        lacks=("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"),
    ),
    "avx512": Emulation(
        family="AVX-512 CPU with AVX512_BF16 and without AMX (AMD Zen 4, Intel Cooper Lake)",
        env={"MKL_ENABLE_INSTRUCTIONS": "AVX512_E3", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
        kernel={"use_amx": False},
        needs=("avx512f", "avx512_bf16"),
        lacks=("avx512_fp16", "amx_bf16", "amx_fp16"),
    ),
}


def active(environ: Mapping[str, str] | None = None) -> Emulation | None:
    """The emulation whose whole environment is set in ``environ`` (default: this process's),
    or None."""
    environ = os.environ if environ is None else environ
    for emulation in EMULATIONS.values():
        if all(environ.get(k) == v for k, v in emulation.env.items()):
            return emulation
    return None


def reexec(name: str, argv: Sequence[str], cpu_flags: Sequence[str]) -> None:
    """Makes this process run under emulation ``name``: returns at once if its environment is
    already set, else replaces the process by ``python argv...`` with it set (never returns).
    Raises ValueError for an unknown name or a host CPU that lacks what the family has."""
    if name not in EMULATIONS:
        raise ValueError(f"emulate: unknown CPU family {name!r}; one of {', '.join(EMULATIONS)}")
    emulation = EMULATIONS[name]
    missing = [f for f in emulation.needs if f not in cpu_flags]
    if missing:
        raise ValueError(
            f"emulate={name!r}: this CPU lacks {', '.join(missing)}, which the "
            f"{emulation.family} has; it cannot stand in for it"
        )
    if active() is emulation:
        return
    env = {**os.environ, **emulation.env}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
