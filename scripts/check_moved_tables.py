"""Check that every table row of an earlier README is still in the documents (issue 27: tables moved, not deleted).

    python scripts/check_moved_tables.py [REV]     # REV: the README before the move (default 3834be8)

Prints how many rows were found where, and every row that is in no docs/*.md (or README.md); exit 1 if any.
A one-off check of the move: later re-measurements may change the tables on purpose.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def table_rows(text: str) -> list[str]:
    """Every markdown table row (header and body, not the |---| separator), stripped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and line.endswith("|") and set(line) - set("|-: "):
            rows.append(line)
    return rows


def main(argv: list[str]) -> int:
    rev = argv[0] if argv else "3834be8"
    old = subprocess.run(["git", "show", f"{rev}:README.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    docs = {p.relative_to(ROOT).as_posix(): set(table_rows(p.read_text(encoding="utf-8")))
            for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    rows = table_rows(old.stdout)
    missing, where = [], {}
    for row in rows:
        homes = [name for name, have in docs.items() if row in have]
        if homes:
            where[homes[0]] = where.get(homes[0], 0) + 1
        else:
            missing.append(row)
    print(f"{len(rows)} table rows in {rev}:README.md; {len(rows) - len(missing)} found in the documents: "
          + ", ".join(f"{n} in {name}" for name, n in sorted(where.items())))
    for row in missing:
        print(f"MISSING: {row}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
