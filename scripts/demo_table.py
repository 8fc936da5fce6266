#!/usr/bin/env python
"""Print the demo's results table (docs/results.md): kept for old command lines; the installed command is
``learnsim-compare --table [--per-pair] RUN ...`` (see learnsim.cli.compare)."""

from __future__ import annotations

import sys

from learnsim.cli.compare import main

if __name__ == "__main__":
    sys.exit(main(["--table", *sys.argv[1:]]))
