"""Writing a cohort folder (shared by the demo and the UK Biobank builders).

Layout: ``atlas/``, ``subjects/<id>/`` with an image, ``mask.nii.gz`` and ``seg.nii.gz`` on the atlas grid,
``{train,val,test}.csv`` (paths relative to the CSV's folder) and ``manifest.json``. Every file is written
atomically; a finished file is trusted on a rerun only if its manifest entry has the same spec and sha256.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from learnsim.data.preprocess import Preprocessed
from learnsim.io import atomic_path, save_nifti, sha256_file

__all__ = [
    "CSV_COLUMNS",
    "remove_partials",
    "write_subject",
    "write_text",
    "write_json",
    "write_pairs_csv",
    "read_manifest",
    "is_finished",
]

CSV_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_seg", "moving_seg")


def remove_partials(root: Path) -> list[Path]:
    """Delete temporary files an interrupted (killed) run left behind (``learnsim.io.atomic_path`` names them
    ``.<name>.<random>.partial<suffix>``); returns what was removed."""
    gone = []
    if root.is_dir():
        for p in sorted(root.rglob(".*.partial*")):
            if p.is_file():
                p.unlink()
                gone.append(p)
    return gone


def write_subject(
    root: Path, rel_folder: str, p: Preprocessed, image_name: str = "t1.nii.gz"
) -> dict[str, str]:
    """Write image (float32), mask (uint8) and seg (int16) of one subject under ``root/rel_folder``.

    Returns ``{path relative to root: sha256}``. gzip output is deterministic (nibabel writes mtime 0 and no
    file name), so equal arrays give equal bytes.
    """
    out = {}
    items = [
        (image_name, p.image, np.float32),
        ("mask.nii.gz", p.mask, np.uint8),
        ("seg.nii.gz", p.seg, np.int16),
    ]
    for name, array, dtype in items:
        if array is None:
            continue
        rel = f"{rel_folder}/{name}"
        save_nifti(root / rel, array, p.grid.affine, dtype)
        out[rel] = sha256_file(root / rel)
    return out


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_pairs_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """A pair list with the standard header (missing keys -> empty cells)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_manifest(path: Path) -> dict:
    """The manifest as a dict, ``{}`` if absent or unreadable (then everything is rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_finished(root: Path, entry: dict | None, spec: dict) -> bool:
    """Trust a subject only if its manifest entry has the same spec and every file's sha256 still matches."""
    if not entry or entry.get("spec") != spec:
        return False
    files = entry.get("files", {})
    return bool(files) and all((root / f).is_file() and sha256_file(root / f) == h for f, h in files.items())
