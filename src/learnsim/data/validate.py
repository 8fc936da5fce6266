"""Up-front validation of a pair list (CSV): every problem found, all reported at once.

A pair list is a CSV with a header; columns ``fixed`` and ``moving`` are required, ``fixed_mask``,
``moving_mask``, ``fixed_seg``, ``moving_seg`` optional (a cell may be empty). Relative paths are resolved
against the CSV's folder. Rows are numbered from 0 (the row index is the stable pair id); messages also give
the line number in the file.
"""

from __future__ import annotations

import csv
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from learnsim.data.preprocess import Grid
from learnsim.io import load_nifti, sha256_file

__all__ = [
    "DataValidationError",
    "PairRecord",
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "read_pairs",
    "validate_pairs",
    "same_file",
    "affine_problem",
    "voxel_problem",
]

REQUIRED_COLUMNS = ("fixed", "moving")
OPTIONAL_COLUMNS = ("fixed_mask", "moving_mask", "fixed_seg", "moving_seg")
_ALL = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class DataValidationError(ValueError):
    """One error listing every problem of a pair list; ``problems`` holds the individual messages."""

    def __init__(self, source: str | os.PathLike, problems: list[str]):
        self.source = str(source)
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.source}: {len(self.problems)} problem(s) in the pair list:\n{lines}")


@dataclass(frozen=True)
class PairRecord:
    """One validated row: absolute paths (``None`` where the column is absent or empty)."""

    index: int
    fixed: Path
    moving: Path
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    fixed_seg: Path | None = None
    moving_seg: Path | None = None

    @property
    def has_seg(self) -> bool:
        return self.fixed_seg is not None and self.moving_seg is not None


@dataclass
class _Summary:
    grid: Grid | None = None
    error: str | None = None
    labels: frozenset[int] | None = None


def _link_loop(path: Path) -> bool:
    """Whether ``path`` is a symbolic link that leads back to itself (ELOOP)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _resolved(path: Path) -> Path:
    """``path.resolve()``; the absolute path for a link loop (reported by :func:`_summarise`, never a crash)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a symlink loop
        return path.absolute()


def _summarise(path: Path, kind: str, check_data: bool) -> _Summary:
    """Read a volume once and keep only what the checks need (shape, affine, problems, label set)."""
    if _link_loop(path):
        return _Summary(error="a symbolic link loop (the link leads back to itself); point it at the file")
    try:
        data, affine = load_nifti(path)
    except FileNotFoundError:
        return _Summary(error="file not found")
    except ValueError as exc:
        return _Summary(error=str(exc).replace(f"{path}: ", ""))
    if data.ndim != 3:
        return _Summary(error=f"not a 3D volume (shape {data.shape})")
    if affine_problem(affine):
        return _Summary(error=affine_problem(affine))
    grid = Grid(data.shape, affine)
    if not check_data:
        return _Summary(grid=grid)
    problems = [p for p in (voxel_problem(data, kind),) if p]
    labels = None
    if kind == "seg" and not problems:
        ids = np.unique(np.rint(data).astype(np.int64))
        labels = frozenset(int(i) for i in ids if i != 0)
        if not labels:
            problems.append("label map is empty (all background)")
    if kind == "mask" and not problems and not np.any(data > 0):
        problems.append("mask is empty (all zero)")
    if kind == "image" and not problems and data.size and np.all(data == data.flat[0]):
        what = "all zero" if data.flat[0] == 0 else f"constant ({data.flat[0]})"
        problems.append(f"image is {what}: nothing to register")
    return _Summary(grid=grid, error="; ".join(problems) or None, labels=labels)


def world_gap(a: Grid, b: Grid) -> float:
    """Distance (mm) between the world bounding boxes of two grids' voxels (each voxel counted to its faces);
    0 when they overlap."""
    def box(g: Grid) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in g.shape], indexing="ij")).reshape(3, -1)
        world = g.affine[:3, :3] @ corners + g.affine[:3, 3:4]
        return world.min(1), world.max(1)

    (alo, ahi), (blo, bhi) = box(a), box(b)
    gaps = np.maximum(0.0, np.maximum(alo - bhi, blo - ahi))
    return float(np.sqrt((gaps**2).sum()))


def affine_problem(affine: np.ndarray) -> str | None:
    """What is wrong with a voxel -> mm affine (non-finite, or singular: no world position), or None."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        return "invalid (singular or non-finite) affine"
    return None


def voxel_problem(data: np.ndarray, kind: str = "image") -> str | None:
    """What is wrong with a volume's values, or None: NaN/inf voxels, values beyond float32's range (they would
    become inf on the working grid), and for a label map (``kind`` ``"seg"``) non-integer ids (rounding 1.5 or
    10.4 to a structure would be silent)."""
    if not np.issubdtype(data.dtype, np.floating):
        return None
    finite = np.isfinite(data)
    n_bad = int(np.size(data) - np.count_nonzero(finite))
    if n_bad:
        return f"{n_bad} NaN/inf voxel(s)"
    n_big = int(np.count_nonzero(np.abs(data) > np.finfo(np.float32).max))
    if n_big:
        return f"{n_big} voxel(s) beyond float32's range (|value| > 3.4e38)"
    if kind == "seg":
        off = data[data != np.rint(data)]
        if off.size:
            return f"label map holds non-integer values (e.g. {float(off.flat[0]):g}); label ids must be integers"
    return None


def read_pairs(csv_path: str | os.PathLike) -> tuple[list[dict[str, str]], list[str], list[str]]:
    """Read the CSV: ``(rows, header, problems)``; rows map column -> stripped cell text."""
    csv_path = Path(csv_path)
    problems: list[str] = []
    if not csv_path.is_file():
        return [], [], [f"pair list not found: {csv_path}"]
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        lines = [row for row in reader if any(c.strip() for c in row)]
    if not lines:
        return [], [], ["the pair list is empty (no header, no rows)"]
    header = [c.strip() for c in lines[0]]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        looks_like_data = any(c.endswith((".nii", ".nii.gz")) for c in header)
        hint = " (the first line looks like data: is the header missing?)" if looks_like_data else ""
        problems.append(f"line 1 (header): missing column(s) {missing}; found {header}{hint}")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        problems.append(f"line 1 (header): duplicated column(s) {dup}")
    # other columns (e.g. a subject id) are allowed and ignored
    rows = []
    for lineno, raw in enumerate(lines[1:], start=2):
        if len(raw) != len(header):
            problems.append(
                f"row {lineno - 2} (line {lineno}): {len(raw)} field(s), header has {len(header)}"
            )
        rows.append({h: (raw[i].strip() if i < len(raw) else "") for i, h in enumerate(header)})
    if not rows and not missing:
        problems.append("the pair list has a header but no rows")
    return rows, header, problems


class _Checker:
    """The checks of :func:`validate_pairs`, row by row; every file is read once (summaries cached by path and
    kind), every problem is collected in ``problems``."""

    def __init__(self, root: Path, required: list[int], check_data: bool, single_fixed: bool, problems: list[str]):
        self.root, self.required, self.check_data, self.single_fixed = root, required, check_data, single_fixed
        self.problems = problems
        self.cache: dict[tuple[Path, str], _Summary] = {}
        self.seen_pairs: dict[tuple[Path, Path], int] = {}
        self.atlas: tuple[Path, str] | None = None  # (first row's fixed image, its cell text)
        self.same_as_atlas: dict[Path, bool] = {}

    def cells(self, where: str, row: dict[str, str]) -> dict[str, Path | None]:
        """Resolve every cell to a path and check its file (readable, 3D, finite, non-empty, required labels)."""
        paths: dict[str, Path | None] = {}
        for col in _ALL:
            cell = row.get(col, "")
            if not cell:
                if col in REQUIRED_COLUMNS:
                    self.problems.append(f"{where}, column '{col}': empty (a {col} image is required)")
                paths[col] = None
                continue
            p = Path(cell).expanduser()
            p = p if p.is_absolute() else self.root / p
            paths[col] = p
            kind = col.split("_")[1] if "_" in col else "image"
            if (p, kind) not in self.cache:
                self.cache[(p, kind)] = _summarise(p, kind, self.check_data)
            s = self.cache[(p, kind)]
            if s.error:
                self.problems.append(f"{where}, column '{col}', file {cell}: {s.error}")
            if kind == "seg" and s.labels and self.required:  # an empty map is reported once, above
                absent = [r for r in self.required if r not in s.labels]
                if absent:
                    self.problems.append(
                        f"{where}, column '{col}', file {cell}: label map is missing required structure(s) {absent}"
                    )
        return paths

    def grids(self, where: str, row: dict[str, str], paths: dict[str, Path | None]) -> None:
        """Mask and seg of each side must lie on the grid of that side's image."""
        for side in ("fixed", "moving"):
            ref = paths[side]
            ref_s = self.cache.get((ref, "image")) if ref is not None else None
            if ref_s is None or ref_s.grid is None:
                continue
            for col in (f"{side}_mask", f"{side}_seg"):
                other = paths[col]
                if other is None:
                    continue
                o = self.cache[(other, col.split("_")[1])]
                if o.grid is not None and not (o.grid == ref_s.grid):
                    self.problems.append(
                        f"{where}, column '{col}', file {row[col]}: grid {o.grid!r} (affine {_fmt(o.grid.affine)}) disagrees "
                        f"with column '{side}' file {row[side]}: {ref_s.grid!r} (affine {_fmt(ref_s.grid.affine)})"
                    )

    def overlap(self, where: str, row: dict[str, str], fixed: Path, moving: Path) -> None:
        """The moving image must overlap the fixed image in world space (through their affines): one that does not
        would be resampled to an all-zero image and 'registered' as such."""
        f, m = self.cache.get((fixed, "image")), self.cache.get((moving, "image"))
        if f is None or m is None or f.grid is None or m.grid is None:
            return
        gap = world_gap(f.grid, m.grid)
        if gap > 0:
            self.problems.append(
                f"{where}, column 'moving', file {row['moving']}: does not overlap the fixed image {row['fixed']} in "
                f"world space (its affine puts it {gap:.0f} mm away); check the affine"
            )

    def pair(self, i: int, where: str, row: dict[str, str], fixed: Path, moving: Path) -> None:
        """No pair twice; with ``single_fixed``, every row's fixed image is row 0's (the file or a copy)."""
        ident = (_resolved(fixed), _resolved(moving))
        if ident in self.seen_pairs:
            j = self.seen_pairs[ident]
            self.problems.append(
                f"{where}, columns 'fixed'/'moving', files {row['fixed']} / {row['moving']}: duplicates row {j} "
                f"(line {j + 2}); each pair may appear once"
            )
        self.seen_pairs.setdefault(ident, i)
        if self.atlas is None:
            self.atlas = (ident[0], row["fixed"])
        elif self.single_fixed and ident[0] != self.atlas[0]:
            if ident[0] not in self.same_as_atlas:
                self.same_as_atlas[ident[0]] = same_file(ident[0], self.atlas[0])
            if not self.same_as_atlas[ident[0]]:
                self.problems.append(
                    f"{where}, column 'fixed', file {row['fixed']}: differs from row 0's fixed image {self.atlas[1]}; "
                    "every pair of a list is registered to one fixed image (the atlas)"
                )


def validate_pairs(
    csv_path: str | os.PathLike,
    required_labels: Iterable[int] | None = None,
    check_data: bool = True,
    single_fixed: bool = True,
) -> list[PairRecord]:
    """Check a pair list and every file it names; return one :class:`PairRecord` per row.

    Checks: header and required columns; every non-empty cell names an existing, readable NIfTI; volumes are 3D
    and finite (NaN/inf); image, mask and segmentation of the fixed side (and of the moving side) share one grid
    (shape and affine); masks are non-empty; images are not constant (all zero); label maps are non-empty and
    contain every id of ``required_labels``; no row repeats another's (fixed, moving) pair; with ``single_fixed``
    (the default: learnsim registers every pair to one atlas) every row names the same fixed image (the same file,
    or a byte-identical copy). ``check_data=False`` reads headers only (shape/affine/3D) and skips the voxel checks.

    Raises:
        DataValidationError: listing ALL problems, each naming the row (0-based, plus the file line), the column
            and the file.
    """
    csv_path = Path(csv_path)
    rows, header, problems = read_pairs(csv_path)
    if any(c not in header for c in REQUIRED_COLUMNS) or not rows:
        raise DataValidationError(csv_path, problems)
    required = sorted({int(r) for r in required_labels}) if required_labels is not None else []
    check = _Checker(csv_path.parent, required, check_data, single_fixed, problems)
    records = []
    for i, row in enumerate(rows):
        where = f"row {i} (line {i + 2})"
        paths = check.cells(where, row)
        check.grids(where, row, paths)
        if paths["fixed"] is not None and paths["moving"] is not None:
            check.pair(i, where, row, paths["fixed"], paths["moving"])
            check.overlap(where, row, paths["fixed"], paths["moving"])
            records.append(PairRecord(i, **{c: paths[c] for c in _ALL}))
    if problems:
        raise DataValidationError(csv_path, problems)
    return records


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file, or files holding the same bytes (False if either cannot be read)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def _fmt(affine: np.ndarray) -> str:
    return np.array2string(np.asarray(affine)[:3], precision=3, separator=",", suppress_small=True).replace(
        "\n", ""
    )
