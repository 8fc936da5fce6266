"""Lightning DataModule over :class:`learnsim.data.dataset.PairDataset` (no Hydra needed to use it).

Sharding: the module keeps per-pair q_v state on the rank that owns the pair, so the loaders use
:class:`learnsim.distributed.RankShardSampler` (rank ``r`` of ``w`` always gets rows ``i % w == r``; short shards
are padded by repeating pairs, so with several ranks a pair may be seen twice per epoch: key per-pair results by
``index``). Run the Trainer with ``use_distributed_sampler=False``. On one process this is a plain (shuffled)
loader.

``on_the_fly=True`` (for VoxelMorph, which has no per-pair state) replaces the fixed training pairs by a seeded
stream of fresh pseudo-subjects of the training subjects (:class:`learnsim.data.synthetic_pairs.SyntheticPairs`,
``items_per_epoch`` a rank and epoch); validation and test pairs stay the files of their lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from learnsim.data.atlas import Atlas
from learnsim.data.dataset import PairDataset
from learnsim.data.synthetic_pairs import StreamSampler, SyntheticPairs
from learnsim.data.validate import same_file
from learnsim.distributed import RankShardSampler
from learnsim.grid import as_dims

__all__ = ["PairDataModule"]


def _given(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path) not in ("", "None", "null")


class PairDataModule(pl.LightningDataModule):
    """Train/val/test pair lists -> dataloaders of :data:`learnsim.data.dataset.BATCH_KEYS` dicts.

    Validation and test loaders use batch size 1 and keep the CSV order; the train loader shuffles if ``shuffle``.
    ``intensity`` (``"minmax"`` or ``"histmatch"``) is passed to :class:`~learnsim.data.dataset.PairDataset`.

    On-the-fly training pairs (``on_the_fly=True``): the train loader draws ``items_per_epoch`` new pairs per epoch
    from :class:`~learnsim.data.synthetic_pairs.SyntheticPairs` (seeded by ``seed``; ``noise_std`` its Gaussian
    noise; ``atlas_fraction`` the share of items that deform the atlas itself), never from a moving image of the validation or test list (checked at setup). Not for the variational
    method, whose per-pair q_v state needs the same pairs every epoch.
    """

    def __init__(
        self,
        train_csv: str | os.PathLike | None,
        val_csv: str | os.PathLike | None = None,
        test_csv: str | os.PathLike | None = None,
        dims: int | Sequence[int] = (64, 64, 64),
        batch_size: int = 1,
        num_workers: int = 0,
        structures: Sequence[int] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        intensity: str = "minmax",
        on_the_fly: bool = False,
        items_per_epoch: int = 64,
        noise_std: float = 0.01,
        atlas_fraction: float = 0.0,
    ):
        super().__init__()
        self.on_the_fly = bool(on_the_fly)
        self.items_per_epoch = int(items_per_epoch)
        self.noise_std = float(noise_std)
        self.atlas_fraction = float(atlas_fraction)
        if self.on_the_fly and self.items_per_epoch < 1:
            raise ValueError(f"PairDataModule: items_per_epoch must be >= 1; got {items_per_epoch}")
        self.intensity = str(intensity)
        self.train_csv = train_csv if _given(train_csv) else None
        self.val_csv = val_csv if _given(val_csv) else None
        self.test_csv = test_csv if _given(test_csv) else None
        self.dims = as_dims(dims)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.structures = [int(s) for s in structures] if structures is not None else None
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.train_set: PairDataset | SyntheticPairs | None = None
        self.val_set: PairDataset | None = None
        self.test_set: PairDataset | None = None

    def _make(self, csv: str | os.PathLike | None) -> PairDataset | None:
        return PairDataset(csv, self.dims, self.structures, intensity=self.intensity) if csv is not None else None

    def _make_stream(self) -> SyntheticPairs:
        if self.train_csv is None:
            raise RuntimeError("PairDataModule: on_the_fly needs a train pair list (its subjects are the sources)")
        source = PairDataset(self.train_csv, self.dims, self.structures, intensity="minmax")
        forbidden = [ds for ds in (self._make(self.val_csv), self._make(self.test_csv)) if ds is not None]
        return SyntheticPairs(
            source,
            self.items_per_epoch,
            seed=self.seed,
            forbidden=forbidden,
            noise_std=self.noise_std,
            intensity=self.intensity,
            atlas_fraction=self.atlas_fraction,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            if self.on_the_fly:
                self.train_set = self._make_stream()
            else:
                self.train_set = self._make(self.train_csv)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._make(self.val_csv)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._make(self.test_csv)
        self._check_one_atlas()

    def _pair_sets(self) -> list[PairDataset]:
        """The pair lists set up so far, train first (the on-the-fly stream's source list stands for train)."""
        train = self.train_set.source if isinstance(self.train_set, SyntheticPairs) else self.train_set
        return [ds for ds in (train, self.val_set, self.test_set) if ds is not None]

    def _check_one_atlas(self) -> None:
        """Every pair list must name the same fixed image (the same file or a byte-identical copy)."""
        sets = self._pair_sets()
        for ds in sets[1:]:
            a, b = sets[0].records[0].fixed, ds.records[0].fixed
            if not same_file(a, b):
                raise ValueError(
                    f"PairDataModule: {ds.csv_path}, column 'fixed': names {b}, but {sets[0].csv_path} names {a}; "
                    "the train, validation and test lists must share one fixed image (the atlas)"
                )

    @property
    def atlas(self) -> Atlas | None:
        """The cohort's fixed image on the working grid (:class:`~learnsim.data.atlas.Atlas`: image, mask, seg,
        grid); None before :meth:`setup`. Loaded once, from the first list set up (train, else val, else test)."""
        sets = self._pair_sets()
        return sets[0].atlas if sets else None

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _worker_options(self) -> dict:
        """DataLoader worker settings: ``num_workers`` persistent workers, started with ``spawn``, not ``fork`` (a
        worker forked after the parent ran a parallel numba kernel inherits GNU OpenMP's pool state and dies, or hangs
        in its first parallel region: a training that stops at step 0 with both processes idle)."""
        if self.num_workers == 0:
            return {"num_workers": 0}
        return {"num_workers": self.num_workers, "persistent_workers": True, "multiprocessing_context": "spawn"}

    def _loader(self, ds: PairDataset | None, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"PairDataModule: no {name} pair list given (or setup() not called)")
        rank, world = self._rank_world()
        return DataLoader(
            ds,
            batch_size=batch_size,
            sampler=RankShardSampler(len(ds), rank, world, shuffle=shuffle, seed=self.seed),
            **self._worker_options(),
        )

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, SyntheticPairs):
            rank, world = self._rank_world()
            trainer = getattr(self, "trainer", None)
            epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
            return DataLoader(
                self.train_set,
                batch_size=self.batch_size,
                sampler=StreamSampler(len(self.train_set), rank, world, epoch_fn=epoch_fn),
                **self._worker_options(),
            )
        return self._loader(self.train_set, "train", self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        # no validation list: an empty list tells Lightning to skip validation
        return self._loader(self.val_set, "val", 1, False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", 1, False)
