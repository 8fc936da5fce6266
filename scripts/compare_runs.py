#!/usr/bin/env python
"""Compare evaluated learnsim runs: kept for old command lines; the installed command is ``learnsim-compare``.

    python scripts/compare_runs.py RUN_A RUN_B [...] [--labels A B ...] [--out DIR] [--pairing pair|sample]

is ``learnsim-compare RUN_A RUN_B [...]`` (see ``learnsim-compare --help`` and learnsim.cli.compare).
"""

from __future__ import annotations

import sys

from learnsim.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
