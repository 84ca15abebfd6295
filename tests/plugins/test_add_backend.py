"""Adding a backend in the tree is one folder plus one line in the table of the default plugin.

The test copies the package, adds the toy backend of docs/backends.md's worked example (its
code is read from the document, so the document stays true), counts what changed in the copy
and runs the copy in a subprocess: the toy backend is listed, serves the calls it accepts and
leaves the others to the ``cpu`` backend.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aigc_ext"
DOC = ROOT / "docs" / "backends.md"
TABLE = Path("default_plugins") / "backends.py"


def _worked_example() -> tuple[str, str]:
    """(the toy backend module, the table after the change), from docs/backends.md."""
    section = DOC.read_text().split("### In the tree: a worked example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the worked example has the module and the table"
    return blocks[0], blocks[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _changed_lines(before: bytes, after: bytes) -> list[str]:
    diff = difflib.unified_diff(
        before.decode().splitlines(), after.decode().splitlines(), lineterm="", n=0
    )
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


RUN_THE_COPY = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F

    import aigc_ext
    from aigc_ext import dispatch

    assert aigc_ext.__file__.startswith({copy!r}), aigc_ext.__file__
    rows = {{b.name: b for b in aigc_ext.backends()}}
    toy = rows["toy"]
    assert toy.available and toy.source == "aigc_ext" and toy.priority == 150, toy
    assert dispatch.get_backend("toy").trusted
    q, k, v = (torch.randn(2, 3, 5, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    dispatch.backend_usage(reset=True)
    out = aigc_ext.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)  # declined: cpu serves it
    aigc_ext.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert dispatch.backend_usage() == {{"toy": 1, "cpu": 2}}, dispatch.backend_usage()
    print("served")
    """
)


def test_a_toy_backend_is_one_new_module_and_one_line_in_the_table(tmp_path):
    module, table_after = _worked_example()
    copy = tmp_path / "aigc_ext"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _snapshot(copy)

    # The change: a folder with its backend module, and the name in the table.
    (copy / "backends" / "toy").mkdir()
    (copy / "backends" / "toy" / "backend.py").write_text(module)
    table = copy / TABLE
    current = re.search(
        r"BUILTIN_BACKENDS: tuple\[str, \.\.\.\] = \(\n.*?\n\)\n", table.read_text(), re.S
    )
    assert current is not None, "the table is where docs/backends.md says"
    table.write_text(table.read_text().replace(current.group(0), table_after))

    after = _snapshot(copy)
    added = sorted(set(after) - set(before))
    changed = sorted(path for path in before if after.get(path) != before[path])
    assert added == [str(Path("backends") / "toy" / "backend.py")]
    assert changed == [str(TABLE)]
    assert _changed_lines(before[str(TABLE)], after[str(TABLE)]) == ['+    "toy",']

    env = {**os.environ, "PYTHONPATH": str(tmp_path), "AIGC_EXT_NO_PLUGINS": "1"}
    env.pop("AIGC_EXT_BACKEND", None)
    result = subprocess.run(
        [sys.executable, "-c", RUN_THE_COPY.format(copy=str(copy))],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served"
