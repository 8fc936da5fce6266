"""Writing a cohort folder: the one writer behind the demo and the UK Biobank builders.

Layout: ``atlas/``, ``subjects/<id>/`` with an image, ``mask.nii.gz`` and ``seg.nii.gz`` on the atlas grid,
``{train,val,test}.csv`` (paths relative to the CSV's folder) and ``manifest.json``. Every file is written
atomically; a finished file is trusted on a rerun only if its manifest entry has the same spec and sha256.

A builder plans its subjects (:class:`PlannedSubject`: where they go, what determines their bytes, how to make
them) and hands them to :func:`write_cohort`, which skips the finished ones, writes the others one progress step
each, keeps ``manifest.json`` current after every subject (so an interrupted run resumes) and writes the pair lists.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from learnsim.data.preprocess import Preprocessed
from learnsim.data.progress import Progress
from learnsim.io import atomic_path, partial_pattern, save_nifti, sha256_file

__all__ = [
    "CSV_COLUMNS",
    "COHORT_MARKER",
    "cohort_layout",
    "open_cohort",
    "remove_partials",
    "write_subject",
    "write_text",
    "write_json",
    "write_pairs_csv",
    "subject_files",
    "pair_row",
    "read_manifest",
    "is_finished",
    "read_entries",
    "PlannedSubject",
    "write_cohort",
]

SPLITS = ("train", "val", "test")

CSV_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_seg", "moving_seg")


#: the file marking a folder as a learnsim cohort (JSON: the builder and the files it writes there)
COHORT_MARKER = ".learnsim-cohort"
_TOP_FILES = ("manifest.json", "train.csv", "val.csv", "test.csv", "atlas/COPYING", COHORT_MARKER)
#: what the ``what`` field of a manifest written before the marker existed starts with
_LEGACY_WHAT = ("learnsim demo cohort", "UK Biobank-style cohort")


def cohort_layout(folders: Iterable[str], image_name: str = "t1.nii.gz") -> set[str]:
    """The files a cohort build may write (relative paths): the top-level files, and in each subject ``folder``
    (``atlas``, ``subjects/<id>``) the image, ``mask.nii.gz`` and ``seg.nii.gz``."""
    return {*_TOP_FILES, *(f"{d}/{n}" for d in folders for n in (image_name, "mask.nii.gz", "seg.nii.gz"))}


def _cohort_files(root: Path) -> set[str] | None:
    """The files the cohort marker of ``root`` names; for a cohort written before the marker existed, those its
    manifest names; None when ``root`` is not a learnsim cohort."""
    marker = read_manifest(root / COHORT_MARKER)
    if isinstance(marker.get("files"), list):
        return {str(f) for f in marker["files"]}
    manifest = read_manifest(root / "manifest.json")
    if str(manifest.get("what", "")).startswith(_LEGACY_WHAT):
        volumes = [e for e in manifest.get("volumes", []) if isinstance(e, dict)]
        return {*_TOP_FILES, *(str(f) for e in volumes for f in e.get("files", {}))}
    return None


def open_cohort(root: Path, builder: str, files: Iterable[str]) -> list[Path]:
    """Claim ``root`` for a cohort build; returns the temporary files of an interrupted build it removed.

    ``root`` must be new, empty or a learnsim cohort (a folder holding :data:`COHORT_MARKER`, or a manifest of an
    older learnsim cohort): any other folder is refused, so a build never replaces a user's ``train.csv`` or
    images, nor walks a home folder. Then the marker is written naming the files this build writes (``files``,
    from :func:`cohort_layout`) and those the marker named before; only their temporary files are ever removed.

    Raises:
        ValueError: naming ``root`` and a few of its entries, when it is a non-empty folder that is not a cohort.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a folder; refusing to write a cohort there")
    root.mkdir(parents=True, exist_ok=True)
    known = _cohort_files(root)
    if known is None:
        entries = sorted(p.name for p in root.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ValueError(f"{root}: not empty ({shown}) and not a learnsim cohort (no {COHORT_MARKER}); "
                             "refusing to write a cohort into it (choose a new or empty folder)")
        known = set()
    named = known | set(files)
    removed = remove_partials(root, named)
    write_json(root / COHORT_MARKER, {"written_by": builder, "files": sorted(named)})
    return removed


def remove_partials(root: Path, files: Iterable[str]) -> list[Path]:
    """Delete the temporary files an interrupted (killed) run left behind for ``files`` (paths relative to
    ``root``): only names :func:`learnsim.io.atomic_path` gives them (``.<stem>.<8 random>.partial<suffixes>``),
    in those files' own folders, nothing else; returns what was removed."""
    gone = []
    by_folder: dict[Path, list] = {}
    for rel in files:
        by_folder.setdefault((root / rel).parent, []).append(partial_pattern(root / rel))
    for folder, patterns in sorted(by_folder.items()):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for p in sorted(folder.iterdir()):
            if any(pat.fullmatch(p.name) for pat in patterns) and p.is_file() and not p.is_symlink():
                p.unlink()
                gone.append(p)
    return gone


def write_subject(
    root: Path, rel_folder: str, p: Preprocessed, image_name: str = "t1.nii.gz"
) -> dict[str, str]:
    """Write image (float32), mask (uint8) and seg (its own integer type: int16, int32 for ids beyond int16) of one
    subject under ``root/rel_folder``.

    Returns ``{path relative to root: sha256}``. gzip output is deterministic (nibabel writes mtime 0 and no
    file name), so equal arrays give equal bytes.
    """
    out = {}
    items = [
        (image_name, p.image, np.float32),
        ("mask.nii.gz", p.mask, np.uint8),
        ("seg.nii.gz", p.seg, p.seg.dtype if p.seg is not None and p.seg.dtype == np.int32 else np.int16),
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


def subject_files(folder: str, written: Collection[str], image_name: str = "t1.nii.gz") -> dict[str, str | None]:
    """A subject's files as :func:`write_subject` names them: ``{"image": "<folder>/<image_name>", "mask":
    "<folder>/mask.nii.gz" or None, "seg": "<folder>/seg.nii.gz" or None}``; mask and seg only when in ``written``
    (the paths :func:`write_subject` returned)."""
    optional = {k: f"{folder}/{k}.nii.gz" for k in ("mask", "seg")}
    return {"image": f"{folder}/{image_name}", **{k: (v if v in written else None) for k, v in optional.items()}}


def pair_row(fixed: Mapping[str, str | None], moving: Mapping[str, str | None]) -> dict[str, str]:
    """One pair-list row (:data:`CSV_COLUMNS`) from the fixed and the moving subject's files (mappings with keys
    ``image``, ``mask``, ``seg``: a path, or None / missing for none; an empty cell in the CSV)."""
    row = {}
    for side, files in (("fixed", fixed), ("moving", moving)):
        if not files.get("image"):
            raise ValueError(f"pair_row: the {side} subject has no image")
        row[side] = str(files["image"])
        for kind in ("mask", "seg"):
            row[f"{side}_{kind}"] = str(files[kind]) if files.get(kind) else ""
    return {c: row[c] for c in CSV_COLUMNS}


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


def read_entries(manifest_path: Path) -> dict[str, dict]:
    """The subject entries of an existing manifest by ``id`` (``{}`` if there is none or it is unreadable)."""
    return {
        e["id"]: e for e in read_manifest(manifest_path).get("volumes", []) if isinstance(e, dict) and "id" in e
    }


@dataclass(frozen=True)
class PlannedSubject:
    """One subject of a cohort (the atlas included), as :func:`write_cohort` writes it.

    Attributes:
        folder: where its files go, relative to the cohort root (``atlas`` or ``subjects/<name>``).
        split: ``atlas``, ``train``, ``val`` or ``test``.
        head: the manifest entry's identifying fields, in order (``id`` first; ``id`` keys the rerun check).
        spec: what determines the files' bytes; a finished subject with another spec is rebuilt.
        make: ``make(log) -> (subject on the atlas grid, extra entry fields)``; ``log`` prints above the progress
            bar. Called only when the subject has to be (re)built.
        done: the progress message after writing, from the subject and the extra fields.
        label: the name in the "up to date" message.
        keep: extra fields carried over from the old entry when the subject is up to date.
    """

    folder: str
    split: str
    head: dict
    spec: dict
    make: Callable[[Callable[..., None]], tuple[Preprocessed, dict]]
    done: Callable[[Preprocessed, dict], str]
    label: str
    keep: tuple[str, ...] = field(default=())


def _write_subject_entry(
    out: Path, s: PlannedSubject, old: dict | None, progress: Progress, image_name: str
) -> dict:
    entry = {**s.head, "spec": s.spec}
    if is_finished(out, old, s.spec):
        entry.update({k: old.get(k, {}) for k in s.keep})
        entry["files"] = old["files"]
        progress.step(f"[learnsim-data] {s.label}: up to date")
        return entry
    subject, extra = s.make(progress.log)
    entry.update(extra)
    entry["files"] = write_subject(out, s.folder, subject, image_name=image_name)
    progress.step(s.done(subject, extra))
    return entry


def write_cohort(
    out: Path,
    subjects: Sequence[PlannedSubject],
    manifest: Callable[[list[dict], bool], dict],
    title: str,
    log: Callable[..., None],
    image_name: str = "t1.nii.gz",
) -> dict:
    """Write (or finish, or verify) every subject, the manifest and ``{train,val,test}.csv``; returns the manifest.

    Args:
        out: the cohort root (exists).
        subjects: the atlas first, then the moving subjects in pair-list order.
        manifest: ``manifest(entries, complete) -> dict``, written to ``out/manifest.json`` after every subject
            (``complete=False``) and at the end (``True``).
        title: the progress bar's title; log: where messages go.
        image_name: the image file name in every subject folder.

    Subjects whose manifest entry (from the manifest found at the start) has the same spec and whose files still
    match their sha256 are kept as they are; one progress step per subject.
    """
    if not subjects or subjects[0].split != "atlas":
        raise ValueError("write_cohort: the first planned subject must be the atlas")
    manifest_path = out / "manifest.json"
    old = read_entries(manifest_path)
    entries: list[dict] = []
    progress = Progress(len(subjects), title, log)
    for s in subjects:
        entries.append(_write_subject_entry(out, s, old.get(s.head["id"]), progress, image_name))
        write_json(manifest_path, manifest(entries, False))
    progress.close()
    atlas_files = subject_files(subjects[0].folder, entries[0]["files"], image_name)
    for split in SPLITS:
        rows = [
            pair_row(atlas_files, subject_files(s.folder, e["files"], image_name))
            for s, e in zip(subjects, entries, strict=True)
            if s.split == split
        ]
        write_pairs_csv(out / f"{split}.csv", rows)
    final = manifest(entries, True)
    write_json(manifest_path, final)
    return final
