"""Reads what nvcc says about compiled kernels: ``ptxas -v`` resources and the SASS mix.

* :func:`parse_ptxas` turns ``-Xptxas -v`` output into one :class:`KernelResources` per
  function (registers, static shared memory, stack frame, spill stores and loads);
* :func:`count_sass` counts instructions in ``cuobjdump --dump-sass`` output, per function;
* :func:`short_name` makes a demangled kernel name readable (``fwd d128 bf16``);
* :func:`check_unit` applies the rules: no spill and no stack frame in a hot kernel, tensor
  core instructions (``HMMA``, and ``HGMMA`` in the Hopper forward) in every hot kernel.

Pure text processing: the tests feed it output captured from nvcc 13.0.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field

__all__ = [
    "MIX_OPCODES",
    "NOT_HOT",
    "REQUIRED_OPCODE",
    "KernelResources",
    "check_unit",
    "count_sass",
    "is_hot",
    "kernel_kind",
    "parse_ptxas",
    "short_name",
]

# The instruction mix the report prints: tensor cores (HMMA: mma.sync; HGMMA: wgmma), TMA
# loads (UTMALDG), shared-memory matrix loads (LDSM), async copies (LDGSTS), mbarrier and
# other SYNCS operations, barriers (BAR), and local-memory traffic (STL/LDL: spills, stack).
MIX_OPCODES = ("HMMA", "HGMMA", "UTMALDG", "LDSM", "LDGSTS", "SYNCS", "BAR", "STL", "LDL")

# Kernels that may use a stack frame or spill, and why; every other __global__ is hot.
NOT_HOT = {
    "flash_bwd_preprocess_kernel": "one warp per query row computing a dot product (no tiles)",
}

# The tensor core instruction each hot kernel family must contain.
REQUIRED_OPCODE = {"flash_fwd_sm90_kernel": "HGMMA"}
DEFAULT_REQUIRED_OPCODE = "HMMA"

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_SASS_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_SASS_INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.|\s|;)")


@dataclass
class KernelResources:
    """One function's resources from ``ptxas -v`` (``entry``: a ``__global__`` kernel, else a
    non-inlined device function, which has no register line)."""

    mangled: str
    arch: str = ""
    entry: bool = False
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""  # demangled
    sass: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A plain dict (what ``--json`` and the record store)."""
        return asdict(self)


def parse_ptxas(text: str) -> list[KernelResources]:
    """Every function ``ptxas -v`` reports on, in order of appearance."""
    kernels: dict[str, KernelResources] = {}
    current: KernelResources | None = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = kernels.setdefault(m.group(1), KernelResources(m.group(1)))
            current.arch, current.entry = m.group(2), True
        elif m := _PROPS.search(line):
            current = kernels.setdefault(m.group(1), KernelResources(m.group(1)))
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
    return list(kernels.values())


def count_sass(text: str) -> dict[str, Counter]:
    """Opcode counts per function of a ``cuobjdump --dump-sass`` listing (mangled names as
    keys). ``SYNCS.ARRIVE...`` counts as ``SYNCS``: the mnemonic before the first dot."""
    counts: dict[str, Counter] = {}
    current: Counter | None = None
    for line in text.splitlines():
        if m := _SASS_FUNC.match(line):
            current = counts.setdefault(m.group(1), Counter())
        elif current is not None and (m := _SASS_INSN.search(line)):
            current[m.group(1)] += 1
    return counts


def kernel_kind(name: str) -> str:
    """The function's own name without namespaces and template arguments
    (``aigc_ext::cuda::sm80::flash_fwd_kernel<...>(...)`` -> ``flash_fwd_kernel``)."""
    head = name
    for stop in ("<", "("):
        head = head.split(stop, 1)[0]
    head = head.rsplit(" ", 1)[-1]
    return head.rsplit("::", 1)[-1]


def _template_args(name: str) -> list[str]:
    start = name.find("<")
    if start < 0:
        return []
    depth, args, cur = 0, [], []
    for ch in name[start:]:
        if ch == "<":
            depth += 1
            if depth == 1:
                continue
        elif ch == ">":
            depth -= 1
            if depth == 0:
                break
        if depth >= 1:
            cur.append(ch)
    inner = "".join(cur)
    # The kernel's one template argument is a traits class: use its arguments.
    if "<" in inner and inner.count(",") >= 0:
        sub = inner[inner.find("<") + 1 : inner.rfind(">")]
        inner = sub or inner
    for part in re.split(r",\s*(?![^<]*>)", inner):
        part = part.strip()
        if part:
            args.append(part)
    return args


def short_name(name: str) -> str:
    """``<kind> d<head dim> <dtype>`` for a demangled kernel name, e.g. ``fwd d128 bf16``,
    ``bwd_dq d64 fp16``, ``sm90 fwd d128 bf16``; the kind alone for names without those."""
    kind = kernel_kind(name)
    label = kind.removeprefix("flash_").removesuffix("_kernel")
    if label.endswith("_sm90"):
        label = "sm90 " + label.removesuffix("_sm90")
    dtype = "bf16" if "bfloat16" in name else "fp16" if "half" in name else ""
    if not dtype and re.search(r"\btrue\b|\bfalse\b", name) and "sm90" in name:
        dtype = "bf16" if re.search(r"\btrue\b", name) else "fp16"
    dims = [a for a in _template_args(name) if re.fullmatch(r"\d+", a)]
    head_dim = next((d for d in dims if int(d) in (32, 64, 96, 128, 192, 256)), "")
    parts = [label, f"d{head_dim}" if head_dim else "", dtype]
    # Further template arguments of the kernel itself (flags such as <true, false>) tell the
    # instantiations of one traits class apart.
    extra = _top_level_args(name)[1:]
    if extra:
        parts.append("<" + ",".join(extra) + ">")
    return " ".join(p for p in parts if p)


def _top_level_args(name: str) -> list[str]:
    """The kernel template's own arguments, nested ones left whole."""
    head = name.split("(", 1)[0]
    start = head.find("<")
    if start < 0:
        return []
    args, depth, cur = [], 0, []
    for ch in head[start + 1 :]:
        if ch == "<":
            depth += 1
        elif ch == ">":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    args.append("".join(cur).strip())
    return [a for a in args if a]


def is_hot(kernel: KernelResources) -> bool:
    """A ``__global__`` kernel not listed in :data:`NOT_HOT`."""
    return kernel.entry and kernel_kind(kernel.name or kernel.mangled) not in NOT_HOT


def check_unit(kernels: list[KernelResources]) -> list[str]:
    """The rule violations of one compiled object (empty: it passes). Its kernels must carry
    their ``sass`` counts (see :func:`count_sass`) for the tensor core rule."""
    problems = []
    for k in kernels:
        if not is_hot(k):
            continue
        label = short_name(k.name or k.mangled) or k.mangled
        if k.spill_stores or k.spill_loads:
            problems.append(
                f"{label} ({k.arch}): {k.spill_stores} bytes spill stores, "
                f"{k.spill_loads} bytes spill loads (a hot kernel must not spill)"
            )
        if k.stack:
            problems.append(
                f"{label} ({k.arch}): {k.stack} bytes stack frame (a hot kernel must have none)"
            )
        need = REQUIRED_OPCODE.get(kernel_kind(k.name or k.mangled), DEFAULT_REQUIRED_OPCODE)
        if not k.sass.get(need):
            problems.append(f"{label} ({k.arch}): no {need} instruction in its SASS")
    return problems
