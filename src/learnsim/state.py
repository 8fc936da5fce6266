"""Per-pair q_v state that persists across epochs (warm start), stored compactly on disk.

At 128^3 one pair's q_v (``mu``, ``log_var``, ``u``) is ~75 MB in fp32: it cannot live in GPU memory for
thousands of pairs, and it is not network weights either. Each pair is one file ``<index>.pt`` (fp16 by default,
halving the size), written atomically. Under DDP every rank owns a fixed shard of the pairs (see
:class:`learnsim.distributed.RankShardSampler`), so no two ranks ever write the same file and a node-local
disk is enough. Writes run on a background thread so that disk I/O overlaps the next batch's q_v fit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from learnsim.distributions import LowRankParams
from learnsim.io import atomic_path

__all__ = ["QVStateStore"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class QVStateStore:
    """Directory of per-pair q_v states.

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

    def path(self, index: int) -> Path:
        return self.root / f"{int(index):08d}.pt"

    def __contains__(self, index: int) -> bool:
        return self.path(index).is_file()

    def load(self, indices: Sequence[int], init: LowRankParams) -> tuple[LowRankParams, torch.Tensor]:
        """Replace the rows of ``init`` whose pair has a stored state; returns ``(params, found [B] bool)``.

        A stored state whose shape does not match ``init`` (e.g. another grid size) raises a ValueError naming
        the file rather than being silently ignored.
        """
        self.flush()
        loc, log_var, u = (t.clone() for t in init.tensors())
        found = torch.zeros(len(indices), dtype=torch.bool)
        for row, index in enumerate(indices):
            path = self.path(index)
            if not path.is_file():
                continue
            saved = torch.load(path, map_location="cpu", weights_only=True)
            for name, dst in (("loc", loc), ("log_var", log_var), ("u", u)):
                src = saved[name]
                if tuple(src.shape) != tuple(dst.shape[1:]):
                    raise ValueError(f"{path}: field {name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape[1:])}")
                dst[row].copy_(src.to(device=dst.device, dtype=dst.dtype), non_blocking=True)
            found[row] = True
        return LowRankParams(loc, log_var, u), found

    def save(self, indices: Sequence[int], params: LowRankParams) -> None:
        """Store each pair's row of ``params`` (converted to the storage dtype)."""
        # convert and copy to host now (the device tensors will be overwritten by the next batch)
        host = [t.detach().to(self.dtype).to("cpu", non_blocking=False) for t in params.tensors()]
        for row, index in enumerate(indices):
            state = {name: t[row].clone() for name, t in zip(("loc", "log_var", "u"), host, strict=True)}
            if self._pool is None:
                self._write(self.path(index), state)
            else:
                with self._lock:
                    self._pending.append(self._pool.submit(self._write, self.path(index), state))

    @staticmethod
    def _write(path: Path, state: dict[str, torch.Tensor]) -> None:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

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
