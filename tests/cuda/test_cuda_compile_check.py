"""The CUDA compile check (aigc_ext.backends.cuda.compile_check) and its build settings.

The parsers run on output captured from nvcc 13.0 (tests/cuda/data): ``ptxas -v`` of the sm80
forward at head dim 128 and of small kernels that really spill and really use a stack frame,
and ``cuobjdump --dump-sass`` listings. One end-to-end compile of the small kernels runs where
nvcc is installed. CMake and the check must agree on the flags: cmake/aigc_cuda.cmake is run
with ``cmake -P`` and compared with the Python side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from aigc_ext.backends.cuda import compile_check, compile_report, toolchain
from aigc_ext.backends.cuda.compile_report import KernelResources

DATA = Path(__file__).resolve().parent / "data"
REPO = Path(__file__).resolve().parents[2]
FWD128 = (
    "_ZN8aigc_ext4cuda4sm8016flash_fwd_kernelINS1_9FwdTraitsIN7cutlass10bfloat16_tELi128E"
    "Li128ELi64ELi8EEEEEvNS_22AttentionForwardParamsE"
)


def _read(name: str) -> str:
    return (DATA / name).read_text()


def _kernel(**kw) -> KernelResources:
    base = {
        "mangled": "k",
        "arch": "sm_80",
        "entry": True,
        "name": "void aigc_ext::cuda::sm80::flash_fwd_kernel<aigc_ext::cuda::sm80::FwdTraits<"
        "cutlass::bfloat16_t, 128, 128, 64, 8> >(aigc_ext::AttentionForwardParams)",
        "sass": {"HMMA": 128},
    }
    base.update(kw)
    return KernelResources(**base)


# --- ptxas -v --------------------------------------------------------------------------------


def test_parse_ptxas_real_forward():
    (k,) = compile_report.parse_ptxas(_read("ptxas_fwd_hdim128_bf16_sm80.txt"))
    assert k.mangled == FWD128 and k.arch == "sm_80" and k.entry
    assert (k.registers, k.stack, k.spill_stores, k.spill_loads, k.smem) == (254, 0, 0, 0, 0)


def test_parse_ptxas_spills_stack_and_smem():
    kernels = {k.mangled: k for k in compile_report.parse_ptxas(_read("ptxas_tiny_sm80.txt"))}
    spill = kernels["_Z17tiny_spill_kernelPKfPf"]
    assert (spill.registers, spill.stack, spill.spill_stores, spill.spill_loads) == (
        32,
        280,
        276,
        336,
    )
    stack = kernels["_Z17tiny_stack_kernelPKiPKfPfi"]
    assert (stack.stack, stack.spill_stores, stack.registers) == (512, 0, 30)
    mma = kernels["_Z15tiny_mma_kernelPKjS0_Pf"]
    assert (mma.registers, mma.stack, mma.spill_stores) == (16, 0, 0)
    (wg,) = compile_report.parse_ptxas(_read("ptxas_tiny_wgmma_sm90a.txt"))
    assert (wg.arch, wg.registers, wg.smem) == ("sm_90a", 30, 8)


def test_parse_ptxas_device_function_is_not_an_entry():
    text = (
        "ptxas info    : Function properties for _Z6helperv\n"
        "    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
    )
    (k,) = compile_report.parse_ptxas(text)
    assert not k.entry and k.stack == 16
    assert compile_report.check_unit([k]) == []  # not a kernel: reported, not judged


# --- SASS ------------------------------------------------------------------------------------


def test_count_sass_sm80_forward():
    counts = compile_report.count_sass(_read("sass_fwd_hdim128_bf16_sm80.txt"))
    c = counts[FWD128]
    assert (c["HMMA"], c["LDSM"], c["LDGSTS"], c["BAR"], c["EXIT"]) == (3, 3, 3, 1, 1)
    assert c["HGMMA"] == 0


def test_count_sass_sm90a_wgmma_and_predicated_syncs():
    c = compile_report.count_sass(_read("sass_tiny_wgmma_sm90a.txt"))["_Z17tiny_wgmma_kernelmmPf"]
    # SYNCS.EXCH behind @!UP0, SYNCS.ARRIVE behind @!P0, two SYNCS.PHASECHK.
    assert c["HGMMA"] == 1 and c["SYNCS"] == 4 and c["HMMA"] == 0
    assert c["WARPGROUP"] == 2


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "short"),
    [
        (
            "void aigc_ext::cuda::sm80::flash_fwd_kernel<aigc_ext::cuda::sm80::FwdTraits<"
            "cutlass::bfloat16_t, 128, 128, 64, 8> >(aigc_ext::AttentionForwardParams)",
            "fwd d128 bf16",
        ),
        (
            "void aigc_ext::cuda::sm80::flash_bwd_dq_kernel<aigc_ext::cuda::sm80::BwdTraits<"
            "cutlass::half_t, 64, 64, 128, 8> >(aigc_ext::AttentionBackwardParams, float const*,"
            " float const*)",
            "bwd_dq d64 fp16",
        ),
        (
            "void aigc_ext::cuda::sm80::flash_bwd_preprocess_kernel<cutlass::half_t>("
            "aigc_ext::AttentionBackwardParams, float*, float*)",
            "bwd_preprocess fp16",
        ),
        (
            "void aigc_ext::cuda::sm80::flash_bwd_dkdv_kernel<aigc_ext::cuda::sm80::BwdTraits<"
            "cutlass::bfloat16_t, 256, 16, 64, 4>, true, false>(aigc_ext::AttentionBackwardParams,"
            " float const*, float const*)",
            "bwd_dkdv d256 bf16 <true,false>",
        ),
        (
            "void aigc_ext::cuda::sm90::flash_fwd_sm90_kernel<aigc_ext::cuda::sm90::FwdTraits<128,"
            " cutlass::bfloat16_t> >(aigc_ext::cuda::sm90::FwdKernelArgs<aigc_ext::cuda::sm90::"
            "FwdTraits<128, cutlass::bfloat16_t> >)",
            "sm90 fwd d128 bf16",
        ),
        ("tiny_mma_kernel(unsigned int const*, unsigned int const*, float*)", "tiny_mma"),
    ],
)
def test_short_name(name, short):
    assert compile_report.short_name(name) == short


# --- rules -----------------------------------------------------------------------------------


def test_rules_pass_a_clean_kernel():
    assert compile_report.check_unit([_kernel(registers=254)]) == []


def test_rules_fail_on_spills():
    (problem,) = compile_report.check_unit([_kernel(spill_stores=8, spill_loads=12)])
    assert "fwd d128 bf16" in problem and "spill" in problem


def test_rules_fail_on_stack_frame():
    (problem,) = compile_report.check_unit([_kernel(stack=16)])
    assert "16 bytes stack frame" in problem


def test_rules_fail_without_tensor_core_instructions():
    (problem,) = compile_report.check_unit([_kernel(sass={"HMMA": 0})])
    assert "no HMMA" in problem
    sm90 = _kernel(name="void aigc_ext::cuda::sm90::flash_fwd_sm90_kernel<X>(Y)", sass={"HMMA": 4})
    (problem,) = compile_report.check_unit([sm90])
    assert "no HGMMA" in problem
    assert compile_report.check_unit([_kernel(name=sm90.name, sass={"HGMMA": 32})]) == []


def test_rules_let_the_preprocess_kernel_use_a_stack():
    pre = _kernel(
        name="void aigc_ext::cuda::sm80::flash_bwd_preprocess_kernel<cutlass::half_t>(P)",
        stack=8,
        sass={},
    )
    assert not compile_report.is_hot(pre)
    assert compile_report.check_unit([pre]) == []


# --- toolchain and flags ---------------------------------------------------------------------


def test_nvcc_absent_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("AIGC_EXT_NVCC", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "no-cuda"))
    monkeypatch.setattr(toolchain, "DEFAULT_NVCC", tmp_path / "nvcc")
    with pytest.raises(toolchain.ToolchainError, match=r"nvcc not found.*AIGC_EXT_NVCC"):
        toolchain.find_nvcc()


def test_bad_env_paths_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_EXT_NVCC", str(tmp_path / "nvcc"))
    with pytest.raises(toolchain.ToolchainError, match=r"AIGC_EXT_NVCC=.*not an executable"):
        toolchain.find_nvcc()
    monkeypatch.setenv("AIGC_EXT_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(toolchain.ToolchainError, match=r"AIGC_EXT_CUTLASS_INCLUDE=.*cute/tensor"):
        toolchain.find_cutlass_include()


def test_main_reports_a_missing_toolchain(monkeypatch, capsys):
    def missing():
        raise toolchain.ToolchainError("nvcc not found: ...")

    monkeypatch.setattr(compile_check, "find_toolchain", missing)
    assert compile_check.main(["--ci"]) == 2
    assert "nvcc not found" in capsys.readouterr().err


def test_gencode_flag():
    assert toolchain.gencode_flag("90a") == "-gencode=arch=compute_90a,code=sm_90a"
    with pytest.raises(ValueError, match="arch"):
        toolchain.gencode_flag("sm_80")


def test_units_cover_every_source_and_sm90_is_hopper_only():
    units = compile_check.all_units()
    sources = {s for s, _ in units}
    on_disk = {
        p.relative_to(compile_check.CUDA_DIR).as_posix()
        for p in compile_check.CUDA_DIR.rglob("*.cu")
    }
    assert sources == on_disk
    assert all(a == "90a" for s, a in units if s.startswith("sm90/"))
    assert {a for s, a in units if s.startswith("sm80/")} == {"80", "90a"}
    assert set(compile_check.CI_SAMPLE) <= set(units)


def _cmake_eval(tmp_path: Path, body: str) -> str:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    script = tmp_path / "eval.cmake"
    script.write_text(f'include("{REPO}/cmake/aigc_cuda.cmake")\n{body}\n')
    out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stderr.strip()  # message() prints to stderr


def test_cmake_and_the_check_read_the_same_flags(tmp_path):
    got = _cmake_eval(
        tmp_path,
        f'aigc_cuda_common_flags("{toolchain.FLAGS_FILE}" f)\nmessage("${{f}}")',
    )
    assert got.split(";") == toolchain.read_flags()
    assert "-O3" in got and "--expt-relaxed-constexpr" in got
    cmakelists = (REPO / "CMakeLists.txt").read_text()
    assert "csrc/cuda/nvcc_flags.txt" in cmakelists and "GLOB_RECURSE" in cmakelists


@pytest.mark.parametrize(
    ("archs", "hopper", "want"),
    [
        ("80+PTX;90a", "OFF", ["sm_80:80", "compute_80:80", "sm_90a:90a"]),
        ("80+PTX;90a", "ON", ["sm_90a:90a"]),
        ("80+PTX", "ON", ["sm_80:80"]),  # sm90 sources: real code only, no PTX
        ("80,86 90a", "OFF", ["sm_80:80", "sm_86:86", "sm_90a:90a"]),
    ],
)
def test_cmake_gencode_list(tmp_path, archs, hopper, want):
    got = _cmake_eval(tmp_path, f'aigc_cuda_gencode_flags("{archs}" {hopper} g)\nmessage("${{g}}")')
    flags = got.split(";")
    expect = [f"-gencode=arch=compute_{a},code={c}" for c, a in (w.split(":") for w in want)]
    assert flags == expect
    real = [f for f in flags if "code=sm_" in f]
    assert all(f in {toolchain.gencode_flag(a) for a in ("80", "86", "90a")} for f in real)


def test_cmake_rejects_a_bad_arch(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not installed")
    script = tmp_path / "bad.cmake"
    script.write_text(
        f'include("{REPO}/cmake/aigc_cuda.cmake")\naigc_cuda_gencode_flags("sm_80" OFF g)\n'
    )
    out = subprocess.run([cmake, "-P", str(script)], capture_output=True, text=True)
    assert out.returncode != 0 and "AIGC_EXT_CUDA_ARCHS" in out.stderr and "sm_80" in out.stderr


def test_lock_file_covers_every_unit():
    lock = json.loads(compile_check.LOCK_FILE.read_text())
    labels = {f"{s}@sm_{a}" for s, a in compile_check.all_units()}
    assert set(lock["units"]) == labels
    assert lock["flags"] == toolchain.read_flags()
    for entry in lock["units"].values():
        assert len(entry["key"]) == 64


# --- end to end (nvcc) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tc():
    try:
        return toolchain.find_toolchain()
    except toolchain.ToolchainError as exc:
        pytest.skip(str(exc))


def _compile(tc, source: Path, arch: str, tmp_path: Path):
    obj = tmp_path / f"{source.stem}.{arch}.o"
    out = subprocess.run(tc.compile_command(source, arch, obj), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kernels = compile_report.parse_ptxas(out.stdout + out.stderr)
    sass = subprocess.run(
        [str(tc.cuobjdump), "--dump-sass", str(obj)], capture_output=True, text=True
    )
    counts = compile_report.count_sass(sass.stdout)
    for k in kernels:
        k.name = k.mangled
        k.sass = dict(counts.get(k.mangled, {}))
    return {compile_report.kernel_kind(k.mangled): k for k in kernels}


def test_end_to_end_tiny_kernels(tc, tmp_path):
    kernels = _compile(tc, DATA / "tiny_kernels.cu", "80", tmp_path)
    mma, stack, spill = (
        kernels[n]
        for n in (
            "_Z15tiny_mma_kernelPKjS0_Pf",
            "_Z17tiny_stack_kernelPKiPKfPfi",
            "_Z17tiny_spill_kernelPKfPf",
        )
    )
    assert mma.sass["HMMA"] >= 1 and mma.stack == 0
    assert compile_report.check_unit([mma]) == []
    assert stack.stack > 0 and spill.spill_stores > 0 and spill.sass.get("STL", 0) > 0
    problems = compile_report.check_unit([stack, spill])
    assert any("stack frame" in p for p in problems) and any("spill" in p for p in problems)


def test_end_to_end_wgmma_and_key(tc, tmp_path):
    (wg,) = _compile(tc, DATA / "tiny_wgmma.cu", "90a", tmp_path).values()
    assert wg.sass["HGMMA"] == 1 and wg.sass["SYNCS"] >= 1
    pre = subprocess.run(
        tc.preprocess_command(DATA / "tiny_wgmma.cu", "90a"), capture_output=True, text=True
    )
    assert pre.returncode == 0 and "wgmma.mma_async" in pre.stdout  # the device side
    key = compile_check.unit_key(tc, pre.stdout, "90a")
    assert key == compile_check.unit_key(tc, pre.stdout.replace('# 1 "', '# 2 "'), "90a")
    assert key != compile_check.unit_key(tc, pre.stdout + "\nint x;", "90a")
    assert key != compile_check.unit_key(tc, pre.stdout, "80")
