#!/usr/bin/env python
"""The FlashAttention feature benchmarks of the CPU operators: ``aigc-ext bench --feature``.

Variable-length batches against torch SDPA (padded with a key-padding mask, and per
sequence), a sliding window against full causal attention, softcap against no softcap, and a
paged decode step against a contiguous cache; every ratio with its target. Without
``--feature`` every feature runs; every other option is the bench command's (``--quick``,
``--dtype``, ``--mode``, ``--reps``, ``--warmup``, ``--threads``, ``--seed``, ``--json``).

    python benchmarks/bench_flash_features.py                 # all features, a few minutes
    python benchmarks/bench_flash_features.py --quick         # about a minute
    python benchmarks/bench_flash_features.py --feature varlen --dtype fp32 --json varlen.json
"""

from __future__ import annotations

import sys

from aigc_ext.bench import main


def run(argv: list[str]) -> int:
    """The bench command with ``--feature all`` unless ``argv`` names features."""
    if not any(a == "--feature" or a.startswith("--feature=") for a in argv):
        argv = ["--feature", "all", *argv]
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
