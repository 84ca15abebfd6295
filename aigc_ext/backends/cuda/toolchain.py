"""Finds the CUDA tools and headers the compile check needs, and builds its nvcc command lines.

Nothing here imports torch, triton or CUTLASS: their install folders are located with
:func:`importlib.util.find_spec`, so the check starts fast and runs beside a CPU-only torch.

Where each piece comes from (first match wins):

* ``nvcc``: ``$AIGC_EXT_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on ``PATH``,
  ``/usr/local/cuda/bin/nvcc``;
* ``cuobjdump``: ``$AIGC_EXT_CUOBJDUMP``, beside nvcc, on ``PATH``, the copy inside triton's
  wheel (``triton/backends/nvidia/bin``);
* CUTLASS/CuTe headers: ``$AIGC_EXT_CUTLASS_INCLUDE``, else ``cutlass_library/source/include``
  of the ``nvidia-cutlass`` wheel (the same order as ``cmake/aigc_cuda.cmake``);
* torch's headers: ``torch/include`` of the installed torch (the kernels include c10 headers).

The nvcc flags are those of ``csrc/cuda/nvcc_flags.txt``, the file ``CMakeLists.txt`` reads too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CSRC",
    "FLAGS_FILE",
    "REPO_ROOT",
    "Toolchain",
    "ToolchainError",
    "find_toolchain",
    "gencode_flag",
    "read_flags",
]

REPO_ROOT = Path(__file__).resolve().parents[3]
CSRC = REPO_ROOT / "csrc"
FLAGS_FILE = CSRC / "cuda" / "nvcc_flags.txt"
# What CMake adds by itself to every CUDA object of the shared library (host side only).
CMAKE_HOST_FLAGS = ("-Xcompiler=-fPIC",)
DEFAULT_NVCC = Path("/usr/local/cuda/bin/nvcc")


class ToolchainError(RuntimeError):
    """A tool or header folder the compile check needs is missing; the message says how to
    provide it."""


def read_flags(path: Path = FLAGS_FILE) -> list[str]:
    """The flags of ``nvcc_flags.txt``: one per line, ``#`` comments and blank lines dropped
    (what ``aigc_cuda_common_flags`` in ``cmake/aigc_cuda.cmake`` does)."""
    flags = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            flags.append(line)
    return flags


def gencode_flag(arch: str) -> str:
    """``-gencode=arch=compute_X,code=sm_X`` for one real architecture such as ``"80"`` or
    ``"90a"`` (the form CMake emits for an ``AIGC_EXT_CUDA_ARCHS`` entry)."""
    if not arch or not arch.rstrip("a").isdigit() or arch.count("a") > 1:
        raise ValueError(f"arch must be a number with an optional 'a' (80, 90a), got {arch!r}")
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(env_var: str, name: str, beside: Path | None, extra: list[Path]) -> Path | None:
    if os.environ.get(env_var):
        path = Path(os.environ[env_var])
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"{env_var}={path} is not an executable file")
        return path
    candidates: list[Path] = []
    if beside is not None:
        candidates.append(beside / name)
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    candidates += extra
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def find_nvcc() -> Path:
    """The nvcc to compile with, or :class:`ToolchainError` naming the ways to provide one."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    beside = Path(cuda_home) / "bin" if cuda_home else None
    nvcc = _executable("AIGC_EXT_NVCC", "nvcc", beside, [DEFAULT_NVCC])
    if nvcc is None:
        raise ToolchainError(
            "nvcc not found: install the CUDA toolkit (nvcc 12.3 or newer), put nvcc on PATH, "
            "or set CUDA_HOME or AIGC_EXT_NVCC"
        )
    return nvcc


def find_cuobjdump(nvcc: Path) -> Path:
    """cuobjdump (beside nvcc, on PATH, or triton's bundled copy)."""
    extra = []
    triton = _package_dir("triton")
    if triton is not None:
        extra.append(triton / "backends" / "nvidia" / "bin" / "cuobjdump")
    tool = _executable("AIGC_EXT_CUOBJDUMP", "cuobjdump", nvcc.resolve().parent, extra)
    if tool is None:
        raise ToolchainError(
            "cuobjdump not found: it ships with the CUDA toolkit and with triton's wheel; put "
            "it on PATH or set AIGC_EXT_CUOBJDUMP"
        )
    return tool


def find_cutlass_include() -> Path:
    """CUTLASS's include folder (``$AIGC_EXT_CUTLASS_INCLUDE`` or the nvidia-cutlass wheel)."""
    env = os.environ.get("AIGC_EXT_CUTLASS_INCLUDE")
    if env:
        path = Path(env)
        if not (path / "cute" / "tensor.hpp").is_file():
            raise ToolchainError(
                f"AIGC_EXT_CUTLASS_INCLUDE={path} holds no cute/tensor.hpp: point it at "
                "CUTLASS's include directory"
            )
        return path
    wheel = _package_dir("cutlass_library")
    if wheel is not None and (wheel / "source" / "include" / "cute" / "tensor.hpp").is_file():
        return wheel / "source" / "include"
    raise ToolchainError(
        "CUTLASS headers not found: set AIGC_EXT_CUTLASS_INCLUDE to CUTLASS's include "
        "directory, or pip install nvidia-cutlass==4.2.0.0 (the `cuda` extra), whose headers "
        "are in cutlass_library/source/include"
    )


def find_torch_include() -> Path:
    """``torch/include`` of the installed torch (found without importing torch)."""
    torch = _package_dir("torch")
    if torch is None or not (torch / "include" / "c10").is_dir():
        raise ToolchainError("torch's C++ headers not found: install torch (torch/include)")
    return torch / "include"


def find_demangler(nvcc: Path) -> Path | None:
    """cu++filt beside nvcc, else c++filt (both demangle CUDA kernel names); None if neither."""
    return _executable("AIGC_EXT_CXXFILT", "cu++filt", nvcc.resolve().parent, []) or (
        Path(shutil.which("c++filt")) if shutil.which("c++filt") else None
    )


@dataclass(frozen=True)
class Toolchain:
    """The tools and include folders of one compile check, and the nvcc command lines."""

    nvcc: Path
    cuobjdump: Path
    cutlass_include: Path
    torch_include: Path
    demangler: Path | None
    nvcc_version: str
    flags: tuple[str, ...]

    def includes(self) -> list[str]:
        """The ``-I`` flags, in CMake's order (csrc, CUTLASS, torch)."""
        return [f"-I{CSRC}", f"-I{self.cutlass_include}", f"-I{self.torch_include}"]

    def compile_command(self, source: Path, arch: str, output: Path) -> list[str]:
        """``nvcc -c`` of one translation unit for one architecture, with ptxas's report."""
        return [
            str(self.nvcc),
            *self.includes(),
            *self.flags,
            *CMAKE_HOST_FLAGS,
            gencode_flag(arch),
            "-Xptxas",
            "-v",
            "-c",
            str(source),
            "-o",
            str(output),
        ]

    def preprocess_command(self, source: Path, arch: str) -> list[str]:
        """``nvcc -E`` for the device side of one architecture (``__CUDA_ARCH__`` defined):
        the text the object is compiled from, on stdout."""
        return [
            str(self.nvcc),
            *self.includes(),
            *self.flags,
            gencode_flag(arch),
            "-E",
            str(source),
        ]

    def path_placeholders(self) -> list[tuple[str, str]]:
        """Checkout-specific folders and the names that stand for them in a cache key."""
        return [
            (str(self.cutlass_include), "<cutlass>"),
            (str(self.torch_include), "<torch>"),
            (str(REPO_ROOT), "<repo>"),
        ]


def find_toolchain() -> Toolchain:
    """Locates everything, or raises :class:`ToolchainError` with what is missing and how to
    provide it."""
    nvcc = find_nvcc()
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ToolchainError(f"{nvcc} --version failed: {exc}") from exc
    version = next(
        (line.strip() for line in out.stdout.splitlines() if "release" in line), out.stdout.strip()
    )
    return Toolchain(
        nvcc=nvcc,
        cuobjdump=find_cuobjdump(nvcc),
        cutlass_include=find_cutlass_include(),
        torch_include=find_torch_include(),
        demangler=find_demangler(nvcc),
        nvcc_version=version,
        flags=tuple(read_flags()),
    )
