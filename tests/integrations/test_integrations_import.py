"""Integrations import their third-party library lazily: ``import aigc_ext`` stays light."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_integrations_import_without_transformers():
    code = textwrap.dedent(
        """
        import sys
        import aigc_ext
        import aigc_ext.integrations.transformers as hf
        assert "transformers" not in sys.modules, "imported transformers eagerly"
        sys.modules["transformers"] = None  # as if it were not installed
        try:
            hf.register()
        except ImportError as exc:
            assert "pip install transformers" in str(exc), exc
        else:
            raise AssertionError("register() without transformers did not raise ImportError")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
