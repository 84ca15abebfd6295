"""``python -m aigc_ext``: the ``aigc-ext`` command line.

The same commands as the ``aigc-ext`` script (``info``, ``plugins``, ``bench``, ``train``), for
environments where the script is not on ``PATH`` and for launchers that take a module, e.g.
``torchrun --nproc_per_node 2 -m aigc_ext train run.toml``.
"""

from __future__ import annotations

import sys

from aigc_ext.cli import main

if __name__ == "__main__":
    sys.exit(main())
