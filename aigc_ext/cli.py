"""The ``aigc-ext`` command.

``aigc-ext plugins [--json] [--all] [--strict]`` lists the installed plugins, the hooks each
implements and what each registered.

``aigc-ext info [--json]`` describes this machine as aigc_ext sees it: versions, CPU model and
instruction sets, GPUs, the CPU kernel configuration, what the build contains (CPU kernel
instruction sets, CUDA kernels), and every attention backend with whether it is available here
and, if not, why.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aigc_ext.plugins import PluginInfo

__all__ = ["main"]


def _plugins(args: argparse.Namespace) -> int:
    from aigc_ext import plugins

    try:
        infos = plugins.get_plugins(include_builtins=args.all)
        failed = plugins.failures()
    except plugins.PluginError as exc:  # AIGC_EXT_STRICT_PLUGINS=1
        print(f"aigc-ext: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = {
            "plugins": [i.as_dict() for i in infos],
            "failures": [f.__dict__ for f in failed],
        }
        print(json.dumps(doc, indent=2))
    else:
        if not infos:
            print("no plugins installed" + ("" if args.all else " (--all lists the built-ins)"))
        for i in infos:
            version = f" {i.version}" if i.version else ""
            print(f"{i.distribution or i.name}{version} ({_origin(i)})")
            print(f"  hooks: {', '.join(i.hooks) or 'none'}")
            for family, names in sorted(i.registered.items()):
                print(f"  {family}: {', '.join(names)}")
        for f in failed:
            dist = f" ({f.distribution})" if f.distribution else ""
            print(f"failed: {f.name}{dist}: {f.error}", file=sys.stderr)
    return 1 if args.strict and failed else 0


def _origin(info: PluginInfo) -> str:
    """How a plugin is named besides its distribution: the entry point (what
    ``AIGC_EXT_PLUGINS`` takes, as well as the distribution name), else the plugin's name."""
    where = f"entry point {info.entry_point!r}" if info.entry_point else f"plugin {info.name!r}"
    return f"built-in, {where}" if info.builtin else where


_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def _cpu_description() -> tuple[str, list[str]]:
    """CPU model name and the instruction-set flags that matter to the kernels (Linux)."""
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
    return model, [f for f in _ISA_FLAGS if f in flags]


def _compiled_in() -> dict:
    """What the installed build contains: CPU kernel instruction sets, CUDA kernels, Triton."""
    import importlib.metadata

    import torch

    import aigc_ext

    config = aigc_ext.ops.cpu_kernel_config()
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


def _info_doc() -> dict:
    import torch

    import aigc_ext

    model, isa = _cpu_description()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "aigc_ext": aigc_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {"model": model, "isa": isa, "threads": torch.get_num_threads()},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": {"available": torch.cuda.is_available(), "devices": gpus},
        "cpu_kernel": aigc_ext.ops.cpu_kernel_config(),
        "compiled": _compiled_in(),
        "backends": [
            {
                "name": b.name,
                "available": b.available,
                "reason": b.reason,
                "devices": list(b.devices),
                "priority": b.priority,
                "source": b.source,
            }
            for b in aigc_ext.backends()
        ],
    }


def _info(args: argparse.Namespace) -> int:
    doc = _info_doc()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"aigc_ext {doc['aigc_ext']}  torch {doc['torch']}  python {doc['python']}")
    print(f"platform: {doc['platform']}")
    cpu = doc["cpu"]
    print(f"cpu: {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX'}), {cpu['threads']} threads")
    print(f"torch cpu capability: {doc['torch_cpu_capability']}")
    cuda = doc["cuda"]
    print(
        f"gpu: {', '.join(cuda['devices']) if cuda['available'] else 'none (CUDA not available)'}"
    )
    print(f"cpu kernel: {doc['cpu_kernel']}")
    built = doc["compiled"]
    cpu_kernels = (
        f"yes ({', '.join(built['cpu_isas']) or 'ISAs not reported'})"
        if built["cpu_kernels"]
        else "no"
    )
    cuda_kernels = "yes" if built["cuda_kernels"] else "no"
    torch_cuda = (
        f"torch CUDA {built['torch_cuda']}" if built["torch_cuda"] else "torch built without CUDA"
    )
    print(
        f"compiled in: CPU kernels {cpu_kernels}; CUDA kernels {cuda_kernels} ({torch_cuda}); "
        f"triton {built['triton'] or 'not installed'}"
    )
    print("backends:")
    for b in doc["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"  {b['name']:<16} {'/'.join(b['devices']):<28} {state}  [{b['source']}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aigc-ext", description="aigc_ext command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--all", action="store_true", help="include the built-in plugins")
    p.add_argument("--strict", action="store_true", help="exit 1 if a plugin failed to load")
    p.set_defaults(func=_plugins)
    p = sub.add_parser("info", help="versions, CPU/GPU, kernel configuration, backends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)
    from aigc_ext.bench import cli as bench_cli
    from aigc_ext.training import cli as train_cli

    bench_cli.add_parser(sub)
    train_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
