"""What this machine looks like to aigc_ext: the document behind ``aigc-ext info``.

:func:`describe` gathers versions, the CPU model and its instruction sets, GPUs, the CPU
kernel configuration, what the build contains (CPU kernel instruction sets, CUDA kernels,
Triton) and every attention backend with whether it is available here and, if not, why.
``aigc-ext info`` prints it (:func:`format_text`) and ``aigc-ext bench`` records it with each
result file.
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from aigc_ext import dispatch
from aigc_ext._version import __version__
from aigc_ext.cpu_family import cpu_family

__all__ = [
    "ISA_FLAGS",
    "compiled_in",
    "cpu_description",
    "cpu_document",
    "cpu_summary",
    "describe",
    "format_text",
]

# The /proc/cpuinfo flags that matter to the kernels, in the order they are reported.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def _cpu_ops():
    """The CPU backend's operator module (loading it loads the compiled library)."""
    from aigc_ext.backends.cpu import ops

    return ops


def cpu_description() -> tuple[str, list[str]]:
    """CPU model name and the instruction-set flags of :data:`ISA_FLAGS` it has (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def cpu_document() -> dict:
    """The ``cpu`` entry of a machine document: model name, generation (:mod:`aigc_ext.cpu_family`),
    ISA flags and torch's thread count."""
    model, isa = cpu_description()
    return {
        "model": model,
        "family": cpu_family().label(),
        "isa": isa,
        "threads": torch.get_num_threads(),
    }


def cpu_summary(cpu: dict) -> str:
    """One line for a machine document's ``cpu`` entry: model, generation, ISA flags, e.g.
    ``AMD EPYC [Zen 4 (AMD family 25, model 17)] (avx2, fma, avx512f, avx512_bf16)``."""
    family = f" [{cpu['family']}]" if cpu.get("family") else ""
    return f"{cpu.get('model')}{family} ({', '.join(cpu.get('isa', [])) or 'no listed ISA flags'})"


def compiled_in() -> dict:
    """What the installed build contains: CPU kernel instruction sets, CUDA kernels, Triton."""
    config = _cpu_ops().cpu_kernel_config()
    fields = dict(part.split("=", 1) for part in config.split() if "=" in part)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {
        "cpu_kernels": has("aigc_ext::attention_forward", "CPU"),
        "cpu_isas": [i for i in fields.get("compiled", "").split(",") if i],
        "cuda_kernels": has("aigc_ext::attention_forward", "CUDA"),
        "torch_cuda": torch.version.cuda,
        "triton": triton,
    }


def describe() -> dict:
    """The machine document (JSON-serialisable); loads the plugins for the backend list."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "aigc_ext": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_document(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": {"available": torch.cuda.is_available(), "devices": gpus},
        "cpu_kernel": _cpu_ops().cpu_kernel_config(),
        "compiled": compiled_in(),
        "backends": [
            {
                "name": b.name,
                "available": b.available,
                "reason": b.reason,
                "devices": list(b.devices),
                "priority": b.priority,
                "source": b.source,
            }
            for b in dispatch.backends()
        ],
    }


def format_text(doc: dict) -> str:
    """:func:`describe`'s document as the lines ``aigc-ext info`` prints."""
    cpu, cuda, built = doc["cpu"], doc["cuda"], doc["compiled"]
    cpu_kernels = (
        f"yes ({', '.join(built['cpu_isas']) or 'ISAs not reported'})"
        if built["cpu_kernels"]
        else "no"
    )
    cuda_kernels = "yes" if built["cuda_kernels"] else "no"
    torch_cuda = (
        f"torch CUDA {built['torch_cuda']}" if built["torch_cuda"] else "torch built without CUDA"
    )
    gpu = ", ".join(cuda["devices"]) if cuda["available"] else "none (CUDA not available)"
    lines = [
        f"aigc_ext {doc['aigc_ext']}  torch {doc['torch']}  python {doc['python']}",
        f"platform: {doc['platform']}",
        f"cpu: {cpu_summary(cpu)}, {cpu['threads']} threads",
        f"torch cpu capability: {doc['torch_cpu_capability']}",
        f"gpu: {gpu}",
        f"cpu kernel: {doc['cpu_kernel']}",
        f"compiled in: CPU kernels {cpu_kernels}; CUDA kernels {cuda_kernels} ({torch_cuda}); "
        f"triton {built['triton'] or 'not installed'}",
        "backends:",
    ]
    for b in doc["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {b['name']:<16} {'/'.join(b['devices']):<28} {state}  [{b['source']}]")
    return "\n".join(lines)
