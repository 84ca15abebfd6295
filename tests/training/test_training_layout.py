"""The training package stays in modules small enough to read whole."""

from __future__ import annotations

from pathlib import Path

import aigc_ext.training

MAX_LINES = 600


def test_no_training_module_is_over_600_lines():
    package = Path(aigc_ext.training.__file__).parent
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in package.glob("*.py")}
    assert {"loop.py", "build.py", "checkpoint.py", "data.py", "models.py"} <= set(sizes)
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these modules (over {MAX_LINES} lines): {too_long}"
