"""File I/O shared by every part of learnsim: atomic writes and NIfTI read/write.

Every file learnsim writes goes through :func:`atomic_path`: it is written under a temporary name in the same
folder and renamed into place only when complete, so an interrupted run never leaves a half-written file that a
later run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["atomic_path", "partial_pattern", "save_nifti", "load_nifti", "sha256_file"]


def _partial_parts(path: Path) -> tuple[str, str]:
    """The prefix and suffix of :func:`atomic_path`'s temporary name for ``path`` (the random part goes between)."""
    # keep the suffixes so writers that infer a format from the name (nibabel: .nii.gz) still work
    return f".{path.name.split('.')[0]}.", f".partial{''.join(path.suffixes)}"


def partial_pattern(path: str | os.PathLike) -> re.Pattern[str]:
    """The names :func:`atomic_path` gives the temporary files of ``path`` (``.<stem>.<8 random>.partial<suffixes>``),
    as a regular expression matching a file name in ``path``'s folder and nothing else."""
    prefix, suffix = _partial_parts(Path(path))
    return re.compile(re.escape(prefix) + r"[a-z0-9_]{8}" + re.escape(suffix))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _partial_parts(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; outputs should get the usual permissions (0666 minus the umask)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype: np.dtype | type | None = None) -> Path:
    """Write a 3D (or 4D, e.g. a vector field as ``[D, H, W, 3]``) array as NIfTI atomically.

    ``affine`` is the 4x4 voxel -> mm matrix of the grid ``array`` lives on. Both sform and qform are set.
    """
    array = np.asarray(array)
    if dtype is not None:
        array = array.astype(dtype)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def load_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file as ``(array, affine)``; a trailing singleton 4th dimension is dropped.

    Raises:
        FileNotFoundError: naming the file if it does not exist.
        ValueError: naming the file if it cannot be read as NIfTI, or its voxels are not one real value each
            (RGB, complex).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types; the user needs the file name
        raise ValueError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.dtype.fields is not None or not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_) \
            or np.iscomplexobj(data):  # RGB / complex: dropping a channel or the imaginary part would be silent
        raise ValueError(f"{path}: voxels of type {data.dtype} (RGB, complex or structured); learnsim reads one real "
                         "value per voxel")
    return data, np.asarray(img.affine, dtype=np.float64)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
