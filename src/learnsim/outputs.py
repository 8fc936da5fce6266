"""Output folders learnsim writes as a whole: staged, published by one rename, replaced only if wholly its own.

A tool (``learnsim-register``) writes its outputs into a hidden staging folder beside ``--out`` and renames it into
place when complete. The last file written is :data:`MARKER`, a JSON file naming the tool and every file it wrote.
``--overwrite`` replaces an existing folder only when it holds that marker and nothing else than the files the
marker names: a file or folder the user put there is listed and the folder is left alone. Without ``--overwrite``
an existing ``--out`` is never replaced, also when another run created it while this one was working.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "MARKER",
    "refuse_precious",
    "recorded_files",
    "foreign_files",
    "check_replaceable",
    "make_stage",
    "write_marker",
    "publish",
    "default_mode_dir",
]

#: the file that marks a folder as written by a learnsim tool (JSON: ``{"written_by": tool, "files": [...]}``)
MARKER = ".learnsim-output"


def refuse_precious(out: Path, prog: str) -> None:
    """Refuse ``/``, the home folder, the working folder and its parents as an output folder to replace."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if target == Path(target.anchor) or target == Path.home().resolve() or target == cwd or target in cwd.parents:
        raise SystemExit(f"{prog}: --out {out} is {target}, the root, home or working folder or a parent of it; "
                         "refusing to replace it (choose a new folder)")


def recorded_files(folder: Path, legacy: Iterable[str] = ()) -> set[str] | None:
    """The files (relative, ``/``-separated) the marker of ``folder`` says learnsim wrote; None without a marker.

    A marker of an older version (plain text) stands for the ``legacy`` names.
    """
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        return {str(f) for f in data["files"]}
    except (OSError, ValueError, TypeError, KeyError):
        return set(legacy)


def _entries(folder: Path) -> list[str]:
    """Every file, link and folder below ``folder`` (relative, ``/``-separated; links are not followed)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        out += [(rel / name).as_posix() for name in dirs + files]
    return sorted(out)


def foreign_files(folder: Path, recorded: set[str]) -> list[str]:
    """Entries below ``folder`` that are neither :data:`MARKER`, a recorded file, nor a folder holding one."""
    parents = {p.as_posix() for f in recorded for p in Path(f).parents if p != Path(".")}
    foreign = []
    for rel in _entries(folder):
        path = folder / rel
        if rel == MARKER or (rel in recorded and (path.is_symlink() or path.is_file())):
            continue
        if rel in parents and path.is_dir() and not path.is_symlink():
            continue
        foreign.append(rel)
    return foreign


def check_replaceable(out: Path, prog: str, legacy: Iterable[str] = ()) -> None:
    """Refuse to replace ``out`` unless it is a folder that a learnsim tool wrote, holding only what it wrote.

    Raises:
        SystemExit: naming ``out`` and, for a folder holding files learnsim did not write, listing them.
    """
    refuse_precious(out, prog)
    if out.is_symlink() or not out.is_dir():
        raise SystemExit(f"{prog}: --out {out} exists and is not a folder; refusing to replace it")
    recorded = recorded_files(out, legacy)
    if recorded is None:
        raise SystemExit(f"{prog}: --out {out} exists but is not a {prog} output (no {MARKER} file); "
                         "refusing to replace it with --overwrite")
    foreign = foreign_files(out, recorded)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise SystemExit(f"{prog}: --out {out} holds files {prog} did not write ({shown}); refusing to replace it "
                         "with --overwrite (move them away or choose another --out)")


def default_mode_dir(path: Path) -> None:
    """Give a folder made by :func:`tempfile.mkdtemp` (mode 0700) the usual permissions: 0777 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def make_stage(out: Path) -> Path:
    """A new hidden staging folder beside ``out`` (``.<name>.partial-XXXX``), with the usual permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    default_mode_dir(stage)
    return stage


def write_marker(stage: Path, tool: str) -> None:
    """Write :data:`MARKER` into ``stage``, naming every file in it: call it last, when the outputs are complete."""
    files = [rel for rel in _entries(stage) if rel != MARKER and not (stage / rel).is_dir()]
    text = json.dumps({"written_by": tool, "files": files, "note": f"--overwrite of {tool} may replace this folder"},
                      indent=2)
    (stage / MARKER).write_text(text + "\n", encoding="utf-8")


def publish(stage: Path, out: Path, overwrite: bool, prog: str, legacy: Iterable[str] = ()) -> None:
    """Rename the complete ``stage`` to ``out``; an existing ``out`` is replaced only with ``overwrite`` and only if
    :func:`check_replaceable` allows it (checked now: another run may have written ``out`` in the meantime).

    Raises:
        SystemExit: ``out`` exists (or appeared during the run) and may not be replaced; ``stage`` is left for the
            caller to remove.
    """
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SystemExit(f"{prog}: {out} exists now (another run wrote it while this one was working?); "
                             "not replacing it without --overwrite")
        check_replaceable(out, prog, legacy)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        try:
            stage.rename(out)
        except OSError:
            with contextlib.suppress(OSError):
                (old / out.name).rename(out)  # put the previous output back
            raise
        shutil.rmtree(old)
        return
    try:
        os.rename(stage, out)  # fails if another run published a (non-empty) folder there in the meantime
    except OSError as exc:
        raise SystemExit(f"{prog}: {out} appeared while this run was working (another run?); "
                         f"not replacing it ({exc.strerror})") from None
