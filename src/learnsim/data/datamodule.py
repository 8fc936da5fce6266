"""Lightning DataModule over :class:`learnsim.data.dataset.PairDataset` (no Hydra needed to use it)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from learnsim.data.dataset import PairDataset

__all__ = ["PairDataModule"]


def _given(path: str | os.PathLike | None) -> bool:
    return path is not None and str(path) not in ("", "None", "null")


class PairDataModule(pl.LightningDataModule):
    """Train/val/test pair lists -> dataloaders of :data:`learnsim.data.dataset.BATCH_KEYS` dicts.

    Validation and test loaders use batch size 1 and keep the CSV order; the train loader shuffles if ``shuffle``.
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
    ):
        super().__init__()
        self.train_csv = train_csv if _given(train_csv) else None
        self.val_csv = val_csv if _given(val_csv) else None
        self.test_csv = test_csv if _given(test_csv) else None
        self.dims = tuple(int(d) for d in dims) if not isinstance(dims, int) else dims
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.structures = [int(s) for s in structures] if structures is not None else None
        self.shuffle = bool(shuffle)
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.test_set: PairDataset | None = None

    def _make(self, csv: str | os.PathLike | None) -> PairDataset | None:
        return PairDataset(csv, self.dims, self.structures) if csv is not None else None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._make(self.train_csv)
        if stage in (None, "fit", "validate") and self.val_set is None:
            self.val_set = self._make(self.val_csv)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._make(self.test_csv)

    def _loader(self, ds: PairDataset | None, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        if ds is None:
            raise RuntimeError(f"PairDataModule: no {name} pair list given (or setup() not called)")
        return DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", self.batch_size, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        # no validation list: an empty list tells Lightning to skip validation
        return self._loader(self.val_set, "val", 1, False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, "test", 1, False)
