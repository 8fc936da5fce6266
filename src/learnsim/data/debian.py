"""Debian packages as a data source: ``apt-get download`` a pinned version, read one file out of the ``.deb``.

A ``.deb`` is an ``ar`` archive (``debian-binary``, ``control.tar.*``, ``data.tar.*``); the installed files are in
``data.tar.{xz,gz,bz2}`` under ``./usr/...``. Nothing is installed: the package is only downloaded
(``apt-get download``, no root needed) and read with the standard library.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["DebianError", "apt_download", "ar_members", "deb_data_tar", "read_deb_member"]

_AR_MAGIC = b"!<arch>\n"


class DebianError(RuntimeError):
    """apt-get is missing or failed, or a ``.deb`` is malformed or lacks a member."""


def ar_members(fileobj: BinaryIO, name: str = "archive") -> dict[str, bytes]:
    """Every member of an ``ar`` archive (the container of a ``.deb``) as ``{name: bytes}``.

    Raises:
        DebianError: naming ``name`` if the magic or a header is wrong, or the archive is truncated.
    """
    if fileobj.read(8) != _AR_MAGIC:
        raise DebianError(f"{name}: not an ar archive (a .deb starts with '!<arch>')")
    out: dict[str, bytes] = {}
    while True:
        header = fileobj.read(60)
        if not header:
            return out
        if len(header) != 60 or header[58:60] != b"`\n":
            raise DebianError(f"{name}: malformed ar header after {sorted(out)}")
        member = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        data = fileobj.read(size)
        if len(data) != size:
            raise DebianError(f"{name}: truncated member {member!r}")
        out[member] = data
        if size % 2:
            fileobj.read(1)  # members are padded to an even length


def deb_data_tar(deb: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` of a ``.deb`` opened with :mod:`tarfile` (xz, gzip, bzip2 or uncompressed)."""
    with open(deb, "rb") as f:
        members = ar_members(f, deb.name)
    names = [n for n in members if n.startswith("data.tar")]
    if not names:
        raise DebianError(f"{deb.name}: no data.tar.* member (has {sorted(members)})")
    if names[0].endswith(".zst"):
        raise DebianError(f"{deb.name}: {names[0]} is zstd-compressed, which Python's tarfile cannot read")
    return tarfile.open(fileobj=io.BytesIO(members[names[0]]), mode="r:*")


def read_deb_member(deb: Path, member: str) -> bytes:
    """The bytes of ``member`` (e.g. ``usr/share/doc/.../x.nii.gz``; a leading ``./`` optional) of a ``.deb``."""
    want = member.removeprefix("./")
    with deb_data_tar(deb) as tf:
        for m in tf.getmembers():
            if m.isfile() and m.name.removeprefix("./") == want:
                src = tf.extractfile(m)
                if src is not None:
                    return src.read()
    raise DebianError(f"{deb.name}: member {member!r} not found in its data tarball")


def apt_download(package: str, version: str, dest: Path) -> Path:
    """``apt-get download package=version`` into ``dest``; the ``.deb``'s path.

    Raises:
        DebianError: one line naming the package if apt-get is not installed (not a Debian/Ubuntu machine), or if
            the download failed (e.g. that version is not in this machine's apt sources).
    """
    apt = shutil.which("apt-get")
    if apt is None:
        raise DebianError(f"{package}={version}: apt-get is not available on this machine (a Debian package)")
    proc = subprocess.run(
        [apt, "download", "-q", f"{package}={version}"], cwd=dest, capture_output=True, text=True, check=False
    )
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        last = (proc.stderr.strip().splitlines() or ["no .deb written"])[-1]
        raise DebianError(f"apt-get download {package}={version} failed: {last}")
    return debs[0]
