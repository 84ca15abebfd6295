"""The ``aigc-ext`` command.

``aigc-ext plugins [--json] [--all] [--strict]`` lists the installed plugins, the hooks each
implements and what each registered.

``aigc-ext train`` and ``aigc-ext generate`` are described in
:mod:`aigc_ext.training.cli` and :mod:`aigc_ext.training.generate_cli`.

``aigc-ext info [--json]`` describes this machine as aigc_ext sees it: versions, CPU model and
instruction sets, GPUs, the CPU kernel configuration, what the build contains (CPU kernel
instruction sets, CUDA kernels), and every attention backend with whether it is available here
and, if not, why (the document is :func:`aigc_ext.info.describe`'s).
"""

from __future__ import annotations

import argparse
import json
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


def _info(args: argparse.Namespace) -> int:
    from aigc_ext import info

    doc = info.describe()
    print(json.dumps(doc, indent=2) if args.json else info.format_text(doc))
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
    from aigc_ext.training import generate_cli

    bench_cli.add_parser(sub)
    train_cli.add_parser(sub)
    generate_cli.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
