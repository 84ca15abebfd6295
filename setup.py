"""Build script: drives CMakeLists.txt (the single list of C++ sources) to build aigc_ext._C.

Build against the installed torch, without build isolation:

    pip install --no-build-isolation -e .

Environment:
    AIGC_EXT_WITH_CUDA=1   also compile csrc/cuda/**/*.cu (needs nvcc and a CUDA build of torch)
    AIGC_EXT_CUDA_ARCHS    with CUDA: the architectures, e.g. "80+PTX;90a" (the default); NN or
                           NNa for real code, +PTX to add that architecture's PTX
    AIGC_EXT_CUTLASS_INCLUDE  with CUDA: CUTLASS's include directory (default: the one of the
                           installed nvidia-cutlass wheel)
    MAX_JOBS=N             parallel compile jobs (default: number of CPUs)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "80+PTX;90a"  # the default of AIGC_EXT_CUDA_ARCHS in CMakeLists.txt too


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project, then places `_C.so` where Python expects it."""

    def build_extension(self, ext: Extension) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - message for users
            raise RuntimeError(
                "aigc_ext is built against the installed torch: install torch==2.13.0 first and "
                "build with `pip install --no-build-isolation .`"
            ) from exc
        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        with_cuda = os.environ.get("AIGC_EXT_WITH_CUDA", "0") == "1"
        cfg = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            "-G",
            "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DAIGC_EXT_PYTHON_MODULE=ON",
            f"-DAIGC_EXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if with_cuda:
            archs = os.environ.get("AIGC_EXT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
            cfg.append(f"-DAIGC_EXT_CUDA_ARCHS={archs}")
            cutlass = os.environ.get("AIGC_EXT_CUTLASS_INCLUDE", "")
            cfg.append(f"-DAIGC_EXT_CUTLASS_INCLUDE={cutlass}")
        subprocess.run(cfg, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Replace atomically: a process that has the old library mapped keeps a valid file.
        tmp_path = out_path.with_name(out_path.name + ".tmp")
        shutil.copyfile(build_dir / "_C.so", tmp_path)
        os.replace(tmp_path, out_path)


setup(
    ext_modules=[CMakeExtension("aigc_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
)
