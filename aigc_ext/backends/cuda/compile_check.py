"""Compiles the CUDA kernels of ``csrc/cuda`` without a GPU and checks the code nvcc makes.

Every ``csrc/cuda/**/*.cu`` is compiled with ``nvcc -c`` for sm_80 and sm_90a (``csrc/cuda/sm90``
for sm_90a only), with the flags of ``csrc/cuda/nvcc_flags.txt`` (the file CMake reads) and
``-Xptxas -v``. For each kernel it reports registers, static shared memory, stack frame and
spills; ``cuobjdump --dump-sass`` gives the instruction mix of each object. It fails when a
hot kernel (every forward/backward attention kernel; see ``compile_report.NOT_HOT``) spills or
has a stack frame, or lacks its tensor core instructions (HMMA; HGMMA in the sm_90a forward)::

    python -m aigc_ext.backends.cuda.compile_check                # every unit (slow)
    python -m aigc_ext.backends.cuda.compile_check --update-lock  # ... and record the results
    python -m aigc_ext.backends.cuda.compile_check --ci           # the CI check (below)
    python -m aigc_ext.backends.cuda.compile_check --only hdim128 --json report.json

The record ``csrc/cuda/compile_check.lock.json`` holds the results of the last full run, each
unit (source + architecture) under a key: the sha256 of nvcc's version, the flags and the
unit's device-side preprocessed text (``nvcc -E`` for that architecture, line markers dropped,
checkout folders replaced by placeholders). ``--ci`` really compiles :data:`CI_SAMPLE`; for
every other unit it preprocesses (fast) and takes the results from the record, failing when a
unit's key is not there (sources, headers, flags or nvcc changed without a new full run) or
when the record holds a failing result. A sampled unit whose key is in the record must also
reproduce the recorded result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aigc_ext.backends.cuda import compile_report as report
from aigc_ext.backends.cuda.toolchain import CSRC, Toolchain, ToolchainError, find_toolchain

__all__ = ["CI_SAMPLE", "LOCK_FILE", "UnitResult", "all_units", "main", "run_unit", "unit_key"]

CUDA_DIR = CSRC / "cuda"
LOCK_FILE = CUDA_DIR / "compile_check.lock.json"
ARCHS = ("80", "90a")
# What --ci compiles for real: the sm_90a forward and the sm80 forward + backward, head dim
# 128, bfloat16 (the others are taken from the record when their keys match).
CI_SAMPLE = (
    ("sm90/flash_fwd_sm90_hdim128.cu", "90a"),
    ("sm80/flash_fwd_hdim128_bf16.cu", "80"),
    ("sm80/flash_bwd_hdim128_bf16.cu", "80"),
)
_LINE_MARKER = re.compile(r"^#(?:line)? *\d+ .*$", re.MULTILINE)


@dataclass
class UnitResult:
    """One translation unit compiled (or only keyed) for one architecture."""

    source: str  # relative to csrc/cuda
    arch: str
    key: str = ""
    compiled: bool = False
    from_record: bool = False
    seconds: float = 0.0
    kernels: list[report.KernelResources] = field(default_factory=list)
    sass: dict[str, int] = field(default_factory=dict)  # the whole object
    problems: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def label(self) -> str:
        """``sm80/flash_fwd_hdim128_bf16.cu@sm_80``: the unit's name in tables and the record."""
        return f"{self.source}@sm_{self.arch}"

    def record(self) -> dict:
        """What the record keeps of a compiled unit."""
        return {
            "key": self.key,
            "kernels": [k.to_json() for k in self.kernels],
            "sass": dict(sorted(self.sass.items())),
            "problems": self.problems,
        }

    @classmethod
    def recorded(cls, source: str, arch: str, entry: dict) -> UnitResult:
        """A unit as the record holds it."""
        kernels = [report.KernelResources(**k) for k in entry["kernels"]]
        return cls(
            source,
            arch,
            key=entry["key"],
            from_record=True,
            kernels=kernels,
            sass=dict(entry["sass"]),
            problems=list(entry["problems"]),
        )


def all_units() -> list[tuple[str, str]]:
    """Every (source relative to csrc/cuda, arch): sm90/ for 90a only, the rest for both."""
    units = []
    for path in sorted(CUDA_DIR.rglob("*.cu")):
        rel = path.relative_to(CUDA_DIR).as_posix()
        for arch in ("90a",) if rel.startswith("sm90/") else ARCHS:
            units.append((rel, arch))
    return units


def unit_key(tc: Toolchain, preprocessed: str, arch: str) -> str:
    """The record key of a unit: sha256 of nvcc's version, the flags, the arch and the
    preprocessed text (line markers dropped, checkout folders replaced by placeholders)."""
    text = _LINE_MARKER.sub("", preprocessed)
    for path, name in tc.path_placeholders():
        text = text.replace(path, name)
    text = "\n".join(line for line in text.splitlines() if line.strip())
    h = hashlib.sha256()
    for part in (tc.nvcc_version, " ".join(tc.flags), arch, text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def run_unit(tc: Toolchain, source: str, arch: str, workdir: Path, compile_: bool) -> UnitResult:
    """Keys one unit and, with ``compile_``, compiles and disassembles it (no rules applied)."""
    res = UnitResult(source, arch)
    path = CUDA_DIR / source
    start = time.monotonic()
    pre = _run(tc.preprocess_command(path, arch))
    if pre.returncode != 0:
        res.error = f"nvcc -E failed:\n{pre.stderr[-4000:]}"
        return res
    res.key = unit_key(tc, pre.stdout, arch)
    if not compile_:
        return res
    obj = workdir / (source.replace("/", "__") + f".sm_{arch}.o")
    out = _run(tc.compile_command(path, arch, obj))
    if out.returncode != 0:
        res.error = f"nvcc -c failed:\n{(out.stderr or out.stdout)[-4000:]}"
        return res
    res.kernels = report.parse_ptxas(out.stdout + out.stderr)
    sass = _run([str(tc.cuobjdump), "--dump-sass", str(obj)])
    if sass.returncode != 0:
        res.error = f"cuobjdump --dump-sass failed:\n{sass.stderr[-2000:]}"
        return res
    per_function = report.count_sass(sass.stdout)
    total: Counter = Counter()
    for counts in per_function.values():
        total.update(counts)
    res.sass = {op: total.get(op, 0) for op in report.MIX_OPCODES}
    for k in res.kernels:
        counts = per_function.get(k.mangled, Counter())
        k.sass = {op: counts.get(op, 0) for op in report.MIX_OPCODES}
    res.compiled = True
    res.seconds = time.monotonic() - start
    obj.unlink(missing_ok=True)
    return res


def demangle(tc: Toolchain, results: list[UnitResult]) -> None:
    """Fills each kernel's demangled ``name`` (one demangler call for all of them)."""
    kernels = [k for r in results for k in r.kernels if not k.name]
    if not kernels:
        return
    names = [k.mangled for k in kernels]
    if tc.demangler is not None:
        out = subprocess.run(
            [str(tc.demangler)], input="\n".join(names) + "\n", capture_output=True, text=True
        )
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            names = out.stdout.splitlines()
    for k, name in zip(kernels, names, strict=True):
        k.name = name


def _table(results: list[UnitResult]) -> str:
    head = f"{'unit':<44} {'kernel':<22} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}"
    lines = [head + "  hot", "-" * (len(head) + 5)]
    for r in results:
        src = r.label + (" (record)" if r.from_record else "")
        if r.error:
            lines.append(f"{src:<44} ERROR: {r.error.splitlines()[0]}")
        for k in (k for k in r.kernels if k.entry):
            spills = f"{k.spill_stores}/{k.spill_loads}"
            hot = "yes" if report.is_hot(k) else "no"
            lines.append(
                f"{src:<44} {report.short_name(k.name or k.mangled):<22} {k.registers:>4} "
                f"{k.smem:>6} {k.stack:>5} {spills:>11}  {hot}"
            )
    lines += [
        "",
        f"{'object (SASS instruction mix)':<44} "
        + " ".join(f"{op:>7}" for op in report.MIX_OPCODES),
    ]
    for r in results:
        if r.sass:
            counts = " ".join(f"{r.sass.get(op, 0):>7}" for op in report.MIX_OPCODES)
            lines.append(f"{r.label:<44} {counts}")
    return "\n".join(lines)


def _load_lock(path: Path) -> dict:
    if not path.is_file():
        return {"units": {}}
    return json.loads(path.read_text())


def _write_lock(path: Path, tc: Toolchain, results: list[UnitResult]) -> None:
    data = {
        "about": "Results of `python -m aigc_ext.backends.cuda.compile_check --update-lock`; "
        "`--ci` compiles a sample and takes the other units from here by key.",
        "nvcc": tc.nvcc_version,
        "flags": list(tc.flags),
        "units": {r.label: r.record() for r in sorted(results, key=lambda r: r.label)},
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def _same_result(a: UnitResult, b: UnitResult) -> bool:
    def view(r: UnitResult):
        return sorted(
            (k.mangled, k.registers, k.smem, k.stack, k.spill_stores, k.spill_loads)
            for k in r.kernels
        ), r.sass

    return view(a) == view(b)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m aigc_ext.backends.cuda.compile_check",
        description="Compile csrc/cuda for sm_80 / sm_90a and check registers, spills and SASS.",
    )
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc")
    ap.add_argument("--ci", action="store_true", help="compile CI_SAMPLE, key the rest")
    ap.add_argument("--update-lock", action="store_true", help="write the record (full run)")
    ap.add_argument("--lock", type=Path, default=LOCK_FILE, help="the record's path")
    ap.add_argument("--only", default="", help="units whose name contains this text")
    ap.add_argument("--json", type=Path, default=None, help="save the results as JSON")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.ci and (args.update_lock or args.only):
        ap.error("--ci checks every unit: it takes neither --update-lock nor --only")
    if args.update_lock and args.only:
        ap.error("--update-lock records every unit: it does not take --only")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0: every unit compiled and passes)."""
    args = _parse_args(argv)
    try:
        tc = find_toolchain()
    except ToolchainError as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 2
    units = [u for u in all_units() if args.only in f"{u[0]}@sm_{u[1]}"]
    if not units:
        print(f"compile_check: no unit matches --only {args.only!r}", file=sys.stderr)
        return 2
    sample = set(CI_SAMPLE) if args.ci else set(units)
    print(
        f"compile_check: {tc.nvcc_version}; {len(sample)} of {len(units)} units compiled, "
        f"-j {args.jobs}",
        flush=True,
    )
    start = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="aigc_cuda_check_") as tmp,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
    ):
        # Compiles first (they take longest), then the key-only units.
        ordered = sorted(units, key=lambda u: u not in sample)
        futures = [pool.submit(run_unit, tc, s, a, Path(tmp), (s, a) in sample) for s, a in ordered]
        results = []
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            what = f"{r.seconds:.0f} s" if r.compiled else "keyed" if r.key else "FAILED"
            print(f"  {r.label}: {what}", flush=True)
            results.append(r)
    elapsed = time.monotonic() - start
    order = {u: i for i, u in enumerate(units)}
    results.sort(key=lambda r: order[(r.source, r.arch)])
    demangle(tc, results)
    for r in results:
        if r.compiled:
            r.problems = report.check_unit(r.kernels)
    failures = [f"{r.label}: {r.error.splitlines()[0]}" for r in results if r.error]
    if args.ci:
        failures += _check_against_record(results, _load_lock(args.lock), args.lock)
    shown = [r for r in results if r.compiled or r.from_record or r.error]
    print()
    print(_table(shown))
    failures += [f"{r.label}: {p}" for r in shown for p in r.problems]
    if args.update_lock and not any(r.error for r in results):
        _write_lock(args.lock, tc, results)
        print(f"\nrecorded {len(results)} units in {args.lock}")
    if args.json:
        payload = {
            "nvcc": tc.nvcc_version,
            "flags": list(tc.flags),
            "seconds": round(elapsed, 1),
            "units": {r.label: {**r.record(), "from_record": r.from_record} for r in shown},
            "failures": failures,
        }
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"\n{len(results)} units in {elapsed:.0f} s")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("compile check passed")
    return 0


def _check_against_record(results: list[UnitResult], lock: dict, path: Path) -> list[str]:
    """--ci: replaces each keyed unit by its recorded result; the reasons to fail."""
    failures = []
    recorded = lock.get("units", {})
    for i, r in enumerate(results):
        entry = recorded.get(r.label)
        if not r.key:
            continue
        if entry is None or entry["key"] != r.key:
            failures.append(
                f"{r.label}: not in {path.name} under this key (its preprocessed source, nvcc "
                "or the flags changed since the record was written): run `python -m "
                "aigc_ext.backends.cuda.compile_check --update-lock` and commit the record"
            )
            continue
        rec = UnitResult.recorded(r.source, r.arch, entry)
        if r.compiled:
            if not _same_result(r, rec):
                failures.append(f"{r.label}: a fresh compile differs from the record's result")
        else:
            results[i] = rec
    return failures


if __name__ == "__main__":
    sys.exit(main())
