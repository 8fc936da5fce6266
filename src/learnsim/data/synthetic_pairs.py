"""Training pairs generated on the fly: (atlas, a fresh random pseudo-subject of a training source volume).

A VoxelMorph network trained on the 12 demo training pairs (3 source anatomies) memorises them. Here every item
is a new pseudo-subject made by the demo cohort's own generator (:func:`learnsim.data.demo.perturb`: a random
smooth SVF diffeomorphism of 6-9 mm largest displacement, a smooth multiplicative bias field, a gamma change,
min-max to [0, 1] in the brain mask), optionally plus Gaussian noise, applied to a training subject drawn at
random. So the network sees as many distinct pairs as it takes steps.

The generator here, :func:`perturb_on_grid`, is :func:`~learnsim.data.demo.perturb` for a volume that already lies
on the working grid: the same random draws in the same order from the same seed (largest displacement, B-spline SVF,
bias strength, bias field, gamma), the same integration and rescaling; it warps with learnsim's kernels and skips
the Jacobian statistics the cohort builder records, so a pair costs ~0.1 s at 64^3 instead of ~0.4 s (a test
checks it against ``perturb``).

* Reproducible: item ``k`` depends only on ``(seed, k)`` (NumPy ``SeedSequence([seed, k])``), not on the order in
  which items are asked for, the process, or the number of workers.
* The stream: :class:`StreamSampler` hands epoch ``e`` the items ``e * n ... e * n + n - 1`` (``n`` items per
  epoch), so every epoch gets new pairs, and a resumed run gets the same pairs as an uninterrupted one (the epoch is
  read from the trainer).
* Never a test-source volume: the source subjects are the training pair list's moving images only, and
  construction fails if any of them is (by path or file content), or was made from the same source volume as
  (by the cohort's ``manifest.json``), a moving image of a forbidden list (the test pairs; validation pairs too).

Optionally (``atlas_fraction > 0``) a share of the items deform the atlas itself instead of a training subject:
pairs whose exact answer is a smooth diffeomorphism, a clean training signal for an amortised network (the atlas is
the fixed image of every pair, not a test source; the test subjects' source volume is still never used).

The intensities follow the path of the fixed pair files: the generator writes min-max images, and with
``intensity="histmatch"`` each one's histogram inside its mask is matched to the atlas' afterwards, as
:class:`~learnsim.data.dataset.PairDataset` does for the files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from learnsim import spatial
from learnsim.data.atlas import Atlas
from learnsim.data.dataset import PairDataset
from learnsim.data.demo import DemoConfig, _bspline_field
from learnsim.data.preprocess import Grid, Preprocessed, match_histogram, minmax
from learnsim.io import sha256_file

__all__ = ["SyntheticPairs", "StreamSampler", "item_seed", "source_names", "perturb_on_grid"]


def perturb_on_grid(
    image: np.ndarray,
    mask: np.ndarray,
    seg: np.ndarray | None,
    grid: Grid,
    seed: int,
    cfg: DemoConfig,
) -> tuple[Preprocessed, dict]:
    """One pseudo-subject of a subject already on the working grid, drawn as :func:`learnsim.data.demo.perturb` does.

    Args:
        image: ``[D, H, W]`` float32 in [0, 1] (brain-masked).
        mask: ``[D, H, W]`` 0/1 brain mask.
        seg: ``[D, H, W]`` integer label map, or None.
        grid: the working grid (its affine scales the displacement in mm); ``grid.shape == image.shape``.
        seed: the generator's seed (``torch.Generator().manual_seed(seed)``, as in ``perturb``).
        cfg: ranges (``max_disp_mm`` in mm, ``bias``, ``log_gamma``, ``svf_steps``).
    Returns:
        ``(Preprocessed(image float32 [D, H, W] in [0, 1], mask uint8, seg int16 or None), params)``; ``params``
        holds ``seed``, ``max_disp_mm`` (the SVF's largest displacement, mm), ``bias_strength``, ``gamma``.
    """
    shape = tuple(int(n) for n in image.shape)
    if tuple(grid.shape) != shape or tuple(mask.shape) != shape or (seg is not None and tuple(seg.shape) != shape):
        raise ValueError(
            f"perturb_on_grid: image, mask (and seg) must lie on grid {grid.shape}; got {image.shape}, {mask.shape}"
            f"{'' if seg is None else f', {seg.shape}'}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    u01 = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731

    target_mm = u01(*cfg.max_disp_mm)
    v = _bspline_field(gen, 3, shape, 8)
    aff = torch.tensor(np.asarray(grid.affine, dtype=np.float64), dtype=torch.float32)
    v = v * (target_mm / float(spatial.displacement_to_mm(v, aff).norm(dim=1).max()))
    disp = spatial.integrate_svf(v, cfg.svf_steps)
    msk = (spatial.warp(torch.from_numpy(np.asarray(mask, np.float32))[None, None], disp, mode="nearest") > 0.5)
    msk_np = msk[0, 0].numpy().astype(np.uint8)
    img = spatial.warp(torch.from_numpy(np.asarray(image, np.float32))[None, None], disp)[0, 0].numpy()
    img = minmax(img * msk_np, msk_np)
    lab = None
    if seg is not None:
        lab = spatial.warp_labels(torch.from_numpy(np.asarray(seg, np.int64))[None, None], disp)[0, 0]
        lab = lab.numpy().astype(np.int16)

    bias_strength = u01(*cfg.bias)
    b = _bspline_field(gen, 1, shape, 4)
    b = (b / b.abs().max())[0, 0].numpy()
    gamma = float(np.exp(u01(-cfg.log_gamma, cfg.log_gamma)))
    img = minmax(img * np.exp(bias_strength * b), msk_np) ** gamma
    img = minmax(img, msk_np)
    params = {
        "seed": int(seed),
        "max_disp_mm": round(target_mm, 4),
        "bias_strength": round(bias_strength, 4),
        "gamma": round(gamma, 4),
    }
    return Preprocessed(img.astype(np.float32), msk_np, lab, grid, []), params


def item_seed(seed: int, k: int) -> int:
    """The 32-bit seed of item ``k`` of the stream with global ``seed`` (both non-negative ints)."""
    if seed < 0 or k < 0:
        raise ValueError(f"item_seed: seed and k must be >= 0; got {seed}, {k}")
    return int(np.random.SeedSequence([int(seed), 7, int(k)]).generate_state(1)[0])


def _manifest_sources(csv_path: Path) -> dict[str, str]:
    """``{subject folder name: source volume name}`` from the cohort's manifest.json beside ``csv_path`` ({} if none)."""
    path = csv_path.parent / "manifest.json"
    if not path.is_file():
        return {}
    try:
        volumes = json.loads(path.read_text()).get("volumes", [])
    except (OSError, ValueError):
        return {}
    return {str(e["id"]): str(e["source"]) for e in volumes if isinstance(e, dict) and "id" in e and "source" in e}


def source_names(ds: PairDataset) -> list[str | None]:
    """Per row of ``ds``, the name of the real volume its moving image was made from (the cohort manifest's
    ``source``; ``None`` where no manifest names it)."""
    names = _manifest_sources(ds.csv_path)
    return [names.get(r.moving.parent.name) for r in ds.records]


class SyntheticPairs(Dataset):
    """A stream of training pairs ``(atlas, perturb(random training subject))``, ``items_per_epoch`` per epoch.

    Args:
        source: the training pairs (their fixed image is the atlas; their moving images, brain masks and label
            maps, if any, are the volumes drawn from). Build it with ``intensity="minmax"``: the generator rescales
            itself (a ``histmatch`` source is refused, its images would be matched twice).
        items_per_epoch: ``len(self)``; indices ``k >= len(self)`` are valid too (later epochs, see
            :class:`StreamSampler`).
        seed: global seed of the stream.
        forbidden: pair lists whose moving images must never be drawn from (the test and validation lists).
        cfg: ranges of the perturbations (:class:`~learnsim.data.demo.DemoConfig`; the demo cohort's by default).
        noise_std: std of additive Gaussian noise inside the brain mask (intensity units of [0, 1] images), after
            the gamma change; the image is clipped to [0, 1] and min-max rescaled in the mask again.
        intensity: ``"minmax"`` or ``"histmatch"`` (match each generated image to the atlas inside the masks).
        atlas_fraction: probability in [0, 1] that an item deforms the atlas (with its mask and labels) instead of
            a training subject.

    Items are dicts with :data:`learnsim.data.dataset.BATCH_KEYS` (shapes as in :class:`PairDataset`:
    ``[1, D, H, W]`` volumes on the atlas grid), plus ``source_index`` (int64 scalar, the row of ``source``) and
    ``params`` (a JSON string: seed, largest displacement in mm, bias strength, gamma). ``index`` is ``k``;
    ``pair_id`` is ``otf-<k>-<source pair id>``; for an atlas item ``source_index`` is -1, ``pair_id``
    ``otf-<k>-atlas``, and ``moving_seg`` the warped atlas labels.

    Raises:
        ValueError: a source moving image is a forbidden one (same path or same bytes) or comes from a forbidden
            source volume (manifest), a bad argument.
    """

    def __init__(
        self,
        source: PairDataset,
        items_per_epoch: int,
        seed: int = 0,
        forbidden: Sequence[PairDataset] = (),
        cfg: DemoConfig | None = None,
        noise_std: float = 0.01,
        intensity: str = "minmax",
        atlas_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= atlas_fraction <= 1.0:
            raise ValueError(f"SyntheticPairs: atlas_fraction must be in [0, 1]; got {atlas_fraction}")
        self.atlas_fraction = float(atlas_fraction)
        if items_per_epoch < 1:
            raise ValueError(f"SyntheticPairs: items_per_epoch must be >= 1; got {items_per_epoch}")
        if seed < 0:
            raise ValueError(f"SyntheticPairs: seed must be >= 0; got {seed}")
        if not 0.0 <= noise_std < 1.0:
            raise ValueError(f"SyntheticPairs: noise_std must be in [0, 1); got {noise_std}")
        if intensity not in ("minmax", "histmatch"):
            raise ValueError(f"SyntheticPairs: intensity must be 'minmax' or 'histmatch'; got {intensity!r}")
        if source.intensity != "minmax":
            raise ValueError(
                "SyntheticPairs: build the source PairDataset with intensity='minmax' (the generator applies "
                f"{intensity!r} itself, after the perturbation); got {source.intensity!r}"
            )
        self.source = source
        self.items_per_epoch = int(items_per_epoch)
        self.seed = int(seed)
        self.cfg = replace(cfg or DemoConfig(), dims=source.grid.shape)
        self.noise_std = float(noise_std)
        self.intensity = intensity
        self.grid = source.grid
        self._check_forbidden(forbidden)

    # -------------------------------------------------------------------------------------------- checks
    def _check_forbidden(self, forbidden: Sequence[PairDataset]) -> None:
        def real(p: Path) -> str:
            return os.path.realpath(p)

        src_rows = self.source.records
        src_names = source_names(self.source)
        bad_paths: dict[str, str] = {}
        bad_names: dict[str, str] = {}
        for ds in forbidden:
            for rec, name in zip(ds.records, source_names(ds), strict=True):
                bad_paths[real(rec.moving)] = f"{ds.csv_path} row {rec.index}"
                if name is not None:
                    bad_names[name] = f"{ds.csv_path} row {rec.index}"
        problems = []
        for rec, name in zip(src_rows, src_names, strict=True):
            where = f"{self.source.csv_path} row {rec.index} ({rec.moving})"
            if real(rec.moving) in bad_paths:
                problems.append(f"{where} is the moving image of {bad_paths[real(rec.moving)]}")
            elif name is not None and name in bad_names:
                problems.append(f"{where} is made from source volume {name!r}, as is {bad_names[name]}")
        if not problems and bad_paths:
            # same bytes under another name
            digests = {sha256_file(p): w for p, w in bad_paths.items() if os.path.isfile(p)}
            for rec in src_rows:
                w = digests.get(sha256_file(rec.moving))
                if w is not None:
                    problems.append(f"{self.source.csv_path} row {rec.index} ({rec.moving}) has the bytes of {w}")
        if problems:
            raise ValueError(
                "SyntheticPairs: training sources must not include test-source volumes:\n  " + "\n  ".join(problems)
            )

    # -------------------------------------------------------------------------------------------- items
    def __len__(self) -> int:
        return self.items_per_epoch

    @property
    def atlas(self) -> Atlas:
        """The fixed image of every pair (the source list's :class:`~learnsim.data.atlas.Atlas`)."""
        return self.source.atlas

    def _subject(self, row: int) -> tuple[Preprocessed, Preprocessed]:
        """The source subject ``row`` (min-max, on the atlas grid, cached) and the atlas."""
        rec = self.source.records[row]
        return self.source._load_moving(rec), self.source._load_fixed(rec)

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        if k < 0:
            raise IndexError(f"SyntheticPairs: index must be >= 0; got {k}")
        s = item_seed(self.seed, k)
        rng = np.random.default_rng(s)
        row = int(rng.integers(len(self.source.records)))
        use_atlas = self.atlas_fraction > 0 and bool(rng.random() < self.atlas_fraction)
        src, fixed = self._subject(row)
        if use_atlas:
            src = fixed
        mask = src.mask if src.mask is not None else np.ones(self.grid.shape, np.uint8)
        subj, params = perturb_on_grid(src.image, mask, src.seg, self.grid, s, self.cfg)
        img, mask = subj.image, subj.mask
        if self.noise_std > 0:
            noise = rng.standard_normal(img.shape).astype(np.float32) * np.float32(self.noise_std)
            img = np.clip(img + noise * (mask > 0), 0.0, 1.0)
            img = minmax(img, mask).astype(np.float32)
        if self.intensity == "histmatch":
            img = match_histogram(img, mask, fixed.image, fixed.mask).astype(np.float32)
        base = self.source[row]  # the atlas tensors, affine, ids
        has_seg = subj.seg is not None and (use_atlas or bool(base["has_seg"]))
        seg = (
            torch.from_numpy(subj.seg.astype(np.int64)).unsqueeze(0)
            if subj.seg is not None
            else torch.zeros(1, *self.grid.shape, dtype=torch.int64)
        )
        return {
            "fixed": base["fixed"],
            "moving": torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).unsqueeze(0),
            "fixed_mask": base["fixed_mask"],
            "moving_mask": torch.from_numpy(mask.astype(np.float32)).unsqueeze(0),
            "fixed_seg": base["fixed_seg"],
            "moving_seg": seg,
            "has_seg": torch.tensor(has_seg),
            "index": torch.tensor(k, dtype=torch.int64),
            "pair_id": f"otf-{k}-{'atlas' if use_atlas else base['pair_id']}",
            "affine": base["affine"],
            "pair_key": hashlib.sha256(f"{base['pair_key']}\0{self.seed}\0{k}".encode()).hexdigest()[:16],
            "source_index": torch.tensor(-1 if use_atlas else row, dtype=torch.int64),
            "params": json.dumps(params, sort_keys=True),
        }


class StreamSampler(Sampler[int]):
    """Indices of epoch ``e`` of a stream with ``n`` items per epoch, sharded over ranks.

    Epoch ``e`` covers the stream items ``e * n * world ... (e + 1) * n * world - 1``; rank ``r`` gets every
    ``world``-th of them starting at ``r`` (``n`` per rank, disjoint across ranks). ``epoch_fn`` returns the current
    epoch (the trainer's, so a resumed run continues the stream); without it the sampler counts its own iterations.
    """

    def __init__(
        self, n: int, rank: int = 0, world: int = 1, epoch_fn: Callable[[], int] | None = None
    ) -> None:
        if n < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"StreamSampler: need n >= 1, world >= 1, 0 <= rank < world; got {n}, {rank}, {world}")
        self.n, self.rank, self.world = int(n), int(rank), int(world)
        self.epoch_fn = epoch_fn
        self._count = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self._count
        self._count += 1
        start = epoch * self.n * self.world
        return iter(range(start + self.rank, start + self.n * self.world, self.world))
