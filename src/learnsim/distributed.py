"""Multi-GPU pieces: a DDP strategy without the DDP wrapper, a rank-owned sampler, and gradient averaging.

Why no ``DistributedDataParallel`` wrapper: each training step runs ~1000 q_v backward passes whose gradients
belong to per-pair (per-rank) state and must *not* be all-reduced, followed by a single q_phi/q_f step whose
gradients must be. DDP's reducer assumes one backward per forward over the wrapped parameters, so instead the
module stays unwrapped and :func:`average_gradients` all-reduces the q_phi/q_f gradients in one flat bucket.
Lightning still launches the processes, shards the data, and saves checkpoints on rank 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import Sampler

__all__ = ["ManualSyncDDPStrategy", "RankShardSampler", "average_gradients", "broadcast_module"]


class ManualSyncDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy with the module left unwrapped (gradients are averaged by the module)."""

    strategy_name = "learnsim_ddp"

    def configure_ddp(self) -> None:
        assert self.model is not None
        broadcast_module(self.model)  # identical initial weights on every rank


class RankShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` always gets the pairs ``i`` with ``i % w == r`` (shuffled per epoch within the shard).

    Keeping a pair on the same rank across epochs lets its q_v state live on that rank's disk.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0) -> None:
        self.indices = list(range(rank, length, world_size))
        # every rank must run the same number of steps: pad short shards by repeating their first pairs
        per_rank = -(-length // world_size)
        while len(self.indices) < per_rank:
            self.indices.append(self.indices[len(self.indices) % max(len(self.indices), 1)])
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(self.indices)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when it wraps a module)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            if isinstance(t, torch.Tensor):
                dist.broadcast(t, src)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (mean) the ``.grad`` of ``params`` across ranks in one flat bucket; no-op on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n
