"""Per-pair q_v state that persists across epochs (warm start), stored compactly on disk.

At 128^3 one pair's q_v (``mu``, ``log_var``, ``u``) is ~75 MB in fp32: it cannot live in GPU memory for
thousands of pairs, and it is not network weights either. Each pair is stored under a *pair key* (a hash of its
file paths, :func:`learnsim.data.dataset.pair_key`, so that a re-ordered or moved pair list keeps its states and
a different pair never picks up another's), fp16 by default, written atomically. Under DDP every rank owns a
fixed shard of the pairs (see :class:`learnsim.distributed.RankShardSampler`), so no two ranks ever write the same
file and a node-local disk is enough. Writes run on a background thread so that disk I/O overlaps the next
batch's q_v fit.

Exact resume
------------
Every state is tagged with the training *step* that wrote it (the number of training batches done before it,
counted across epochs, and saved in each checkpoint) and the epoch. A file is named ``<key>.s<step>.pt`` and the
store keeps, per pair, the newest state and the one before it. :meth:`QVStateStore.set_valid_before` is called on
fit start with the checkpoint's step count (0 for a fresh run): from then on a state written at step >= that
count by *another* session (a run killed after its last checkpoint, or an older run in the same folder) is never
read, and the previous generation is used instead (rolled back). A state written by this session is always
valid.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from learnsim.distributions import LowRankParams
from learnsim.io import atomic_path

__all__ = ["QVStateStore", "state_key"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NAME = re.compile(r"^(?P<key>[A-Za-z0-9_+=-]+)\.s(?P<step>\d{10})\.pt$")
_KEY = re.compile(r"^[A-Za-z0-9_+=-]+$")


def state_key(key: str | int) -> str:
    """The file-name key of a pair: a string key as is (letters, digits, ``_+=-``), an int as ``row<8 digits>``."""
    if isinstance(key, str):
        if not _KEY.match(key):
            raise ValueError(f"QVStateStore: pair key {key!r} must be letters, digits or _+=-")
        return key
    return f"row{int(key):08d}"


class QVStateStore:
    """Directory of per-pair q_v states, tagged with the step and epoch that wrote them.

    Args:
        root: folder of the state files (created on first write).
        dtype: storage dtype, ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        async_writes: write on a background thread (call :meth:`flush` before reading back or exiting).
    """

    def __init__(self, root: str | os.PathLike, dtype: str = "float16", async_writes: bool = True) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"QVStateStore: dtype must be one of {sorted(_DTYPES)}; got {dtype!r}")
        self.root = Path(root)
        self.dtype = _DTYPES[dtype]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qv-state") if async_writes else None
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.valid_before: int | None = None  # None: every stored state is valid (no resume point set)
        self._written: set[tuple[str, int]] = set()  # (key, step) written by this session

    # ------------------------------------------------------------------------------------------ files
    def path(self, key: str | int, step: int = 0) -> Path:
        """File of ``key``'s state written at training step ``step``."""
        return self.root / f"{state_key(key)}.s{int(step):010d}.pt"

    def _files(self, key: str) -> dict[int, Path]:
        """``step -> path`` of every stored state of ``key`` (empty if none)."""
        if not self.root.is_dir():
            return {}
        out = {}
        for p in self.root.glob(f"{key}.s*.pt"):
            m = _NAME.match(p.name)
            if m and m["key"] == key:
                out[int(m["step"])] = p
        return out

    def _valid(self, key: str, step: int) -> bool:
        return self.valid_before is None or step < self.valid_before or (key, step) in self._written

    def set_valid_before(self, step: int) -> int:
        """Make states written at ``step`` or later by another session invisible; returns how many exist.

        Called on fit start with the step count of the checkpoint the run resumes from (0 for a fresh run).
        """
        self.flush()
        self.valid_before = int(step)
        if not self.root.is_dir():
            return 0
        n = 0
        for p in self.root.glob("*.s*.pt"):
            m = _NAME.match(p.name)
            if m and not self._valid(m["key"], int(m["step"])):
                n += 1
        return n

    def stored_keys(self) -> set[str]:
        """Keys with at least one valid state."""
        if not self.root.is_dir():
            return set()
        keys = set()
        for p in self.root.glob("*.s*.pt"):
            m = _NAME.match(p.name)
            if m and self._valid(m["key"], int(m["step"])):
                keys.add(m["key"])
        return keys

    def __contains__(self, key: str | int) -> bool:
        k = state_key(key)
        return any(self._valid(k, s) for s in self._files(k))

    # ------------------------------------------------------------------------------------------ read / write
    def load(
        self, keys: Sequence[str | int], init: LowRankParams
    ) -> tuple[LowRankParams, torch.Tensor]:
        """Replace the rows of ``init`` whose pair has a valid stored state; returns ``(params, found [B] bool)``.

        ``init`` holds ``[B, ...]`` tensors (``B = len(keys)``); the newest valid state of each key is used. A
        stored state whose shape does not match ``init`` (e.g. another grid size), or whose key differs from its
        file name, raises a ValueError naming the file rather than being silently ignored.
        """
        self.flush()
        loc, log_var, u = (t.clone() for t in init.tensors())
        found = torch.zeros(len(keys), dtype=torch.bool)
        for row, key in enumerate(keys):
            k = state_key(key)
            steps = sorted((s for s in self._files(k) if self._valid(k, s)), reverse=True)
            if not steps:
                continue
            path = self.root / f"{k}.s{steps[0]:010d}.pt"
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key", k) != k:
                raise ValueError(f"{path}: field 'key' is {saved.get('key')!r}, expected {k!r} (a state of another pair)")
            for name, dst in (("loc", loc), ("log_var", log_var), ("u", u)):
                src = saved[name]
                if tuple(src.shape) != tuple(dst.shape[1:]):
                    raise ValueError(f"{path}: field {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape[1:])}")
                dst[row].copy_(src.to(device=dst.device, dtype=dst.dtype), non_blocking=True)
            found[row] = True
        return LowRankParams(loc, log_var, u), found

    def save(self, keys: Sequence[str | int], params: LowRankParams, step: int = 0, epoch: int = 0) -> None:
        """Store each pair's row of ``params`` (converted to the storage dtype), tagged with ``step`` and ``epoch``.

        Older generations of each key are pruned after the write, keeping the newest valid one before ``step``
        (the roll-back point of a run killed before its next checkpoint).
        """
        # convert and copy to host now (the device tensors will be overwritten by the next batch)
        host = [t.detach().to(self.dtype).to("cpu", non_blocking=False) for t in params.tensors()]
        for row, key in enumerate(keys):
            k = state_key(key)
            state = {name: t[row].clone() for name, t in zip(("loc", "log_var", "u"), host, strict=True)}
            state.update(key=k, step=int(step), epoch=int(epoch))
            with self._lock:
                self._written.add((k, int(step)))
            if self._pool is None:
                self._write(k, int(step), state)
            else:
                with self._lock:
                    self._pending.append(self._pool.submit(self._write, k, int(step), state))

    def _write(self, key: str, step: int, state: dict) -> None:
        with atomic_path(self.path(key, step)) as tmp:
            torch.save(state, tmp)
        # prune: keep this state, the newest valid one before it, and anything newer (another session's, ignored)
        older = sorted((s for s in self._files(key) if s < step), reverse=True)
        keep = next((s for s in older if self._valid(key, s)), None)
        for s in older:
            if s != keep:
                self.path(key, s).unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait for pending writes and re-raise the first error."""
        with self._lock:
            pending, self._pending = self._pending, []
        for fut in pending:
            fut.result()

    def close(self) -> None:
        self.flush()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
