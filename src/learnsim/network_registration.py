"""One-shot registration of two NIfTI files by a VoxelMorph network, optionally refined, outputs on the fixed grid.

The network is a learnsim VoxelMorph checkpoint (``learnsim-train +experiment=vxm_*``) or a VoxelMorph file of the
original release (:mod:`learnsim.original_release`). Each brings its own input convention:

* **original release**: the original loader's grid (:func:`learnsim.original_convention.network_grid`: the image
  taken as stored LAS, all axes flipped, padded to a cube, ``inshape`` voxels with ``align_corners=True``), intensities
  min-max scaled over the whole volume (no mask applied), as ``utils.rescale_im`` did;
* **learnsim**: the grid the network was trained on (RAS, centred cube, the checkpoint's ``dims``), the image masked
  (with ``--fixed-mask``) and min-max scaled, as ``learnsim-data`` cohorts are.

Both inputs are resampled onto that grid through their affines (any orientation), the network predicts
(:meth:`~learnsim.voxelmorph.VoxelMorphModule.register_batch`, with ``instance_optimisation_iters`` Adam steps of
refinement on the metric's energy if asked), and the displacement is brought back onto the fixed image's own grid
(trilinear, its components rotated/scaled from network voxels to fixed voxels), where the moving image and its
labels are warped once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learnsim.defaults import PAPER
from learnsim.energies import RegLossL2
from learnsim.grid import Grid
from learnsim.metric import SimilarityMetric, build_metric
from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

__all__ = ["LoadedNetwork", "open_network", "release_module", "register_with_network", "field_to_grid"]


@dataclass
class LoadedNetwork:
    """A network ready for :func:`register_with_network`.

    Attributes:
        net: the network (an original one predicts in its own axes: its working axes are set per use).
        original: whether it comes from the original release (its input convention, module docstring).
        dims: its input grid ``(D, H, W)``.
        metric: the metric of its training energy (a learnsim checkpoint's frozen one; for an original file, the
            baseline its file name says, ``VXM_SSD_*`` or ``VXM_LCC_*``; LCC otherwise), for refinement.
        reg_loss: the regulariser of refinement (a learnsim checkpoint's; for an original file the paper's ``w_reg``
            for that energy, :data:`learnsim.defaults.PAPER`: SSD 1.8, LCC 2.8).
        histmatch: match the moving image's histogram to the fixed image's first (a learnsim checkpoint trained on
            ``data.intensity=histmatch``; never for the original networks, trained on min-max intensities).
        description: one line saying what was loaded.
    """

    net: VoxelMorphNet
    original: bool
    dims: tuple[int, int, int]
    metric: SimilarityMetric
    description: str
    reg_loss: RegLossL2 = field(default_factory=RegLossL2)
    histmatch: bool = False


def _energy_from_name(path: Path) -> str:
    name = path.name.upper()
    return "ssd" if "SSD" in name and "LCC" not in name else "lcc"


def open_network(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LoadedNetwork:
    """Load a learnsim VoxelMorph checkpoint or an original release VoxelMorph file.

    Raises:
        FileNotFoundError: naming the file. ValueError: naming the file for anything else (a learnsim checkpoint of
            a learnt metric, an original metric file, a foreign file).
    """
    from learnsim.checkpoint import ModuleKind, checkpoint_module, checkpoint_settings, load_checkpoint
    from learnsim.original_release import ReleaseKind, load_release, read_release_file, release_kind

    path = Path(path)
    state = read_release_file(path, map_location)
    kind = release_kind(state)
    if kind is ReleaseKind.NETWORK:
        _, net, line = load_release(path, map_location)
        energy = _energy_from_name(path)
        metric = build_metric(energy)
        return LoadedNetwork(net, True, net.inshape, metric, f"{line}; refinement metric {energy}",
                             RegLossL2(PAPER[metric.energy_kind].w_reg))
    if kind is not None:
        raise ValueError(f"{path}: an original release {kind.value}, not a network (load it with learnsim.load_metric "
                         "or give it as --metric)")
    del state
    ckpt = load_checkpoint(path, map_location)  # names the file if it is no learnsim checkpoint either
    if checkpoint_module(ckpt) is not ModuleKind.VOXELMORPH:
        raise ValueError(f"{path}: a learnsim checkpoint of a learnt metric, not a VoxelMorph network (use it as "
                         "--metric, or train a network with learnsim-train +experiment=vxm_*)")
    module = VoxelMorphModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    net = module.net.eval()
    line = (f"{path}: learnsim VoxelMorph network (features {[net.enc_features, net.dec_features]}, grid "
            f"{list(module.dims)}, {net.integration} integration), metric {module.metric.spec['kind']}")
    histmatch = bool(checkpoint_settings(ckpt).get("histmatch", False))
    return LoadedNetwork(net, False, module.dims, module.metric.eval(), line + (", histmatch" if histmatch else ""),
                         module.reg_loss, histmatch)


def release_module(path: str | os.PathLike, device: torch.device | str = "cpu", instance_lr: float = 0.01,
                   verbose: bool = True) -> VoxelMorphModule:
    """An original release network as a :class:`~learnsim.voxelmorph.VoxelMorphModule` for ``learnsim-test``
    (inputs on learnsim's RAS cohort grids, reoriented exactly to the network's axes)."""
    loaded = open_network(path)
    loaded.net.set_working_axes(("R", "A", "S"))  # type: ignore[attr-defined]
    if verbose:
        print(f"learnsim: {loaded.description}", file=sys.stderr)
    module = VoxelMorphModule(loaded.net, metric=loaded.metric, dims=loaded.dims, instance_lr=instance_lr,
                              reg_loss=loaded.reg_loss)
    return module.to(device).eval()


def field_to_grid(disp: Tensor, source: Grid, target: Grid) -> Tensor:
    """A displacement on ``source`` (``[1, 3, *source.shape]``, source voxels) as one on ``target`` (target voxels).

    ``phi(x) = x + u(x)`` is the same map in world space: the field is sampled at each target voxel's position on
    the source grid (trilinear, border values beyond it) and its vectors taken from source voxels to target voxels
    (``A_target^-1 A_source`` on the linear parts).
    """
    from learnsim.data.preprocess import sample_at_voxels, source_voxel_coords

    coords = source_voxel_coords(target, source.affine, dtype=disp.dtype).to(disp.device)
    u = sample_at_voxels(disp, coords, padding_mode="border")
    lin = np.linalg.solve(np.asarray(target.affine)[:3, :3], np.asarray(source.affine)[:3, :3])
    return torch.einsum("ij,bjdhw->bidhw", torch.as_tensor(lin, dtype=u.dtype, device=u.device), u)


def _network_inputs(loaded: LoadedNetwork, fixed_v: Any, moving_v: Any, mask_v: Any) -> tuple[Grid, Tensor, Tensor, Tensor | None]:
    """The pair on the network's grid, in its convention: ``(grid, fixed, moving, mask)`` tensors ``[1, 1, D, H, W]``."""
    from learnsim.data.preprocess import canonical_grid, match_histogram, preprocess, target_grid
    from learnsim.original_convention import network_grid

    if loaded.original:
        # the original loader's voxels, stored RAS (a signed permutation: exact); the network reorients them back to
        # its own axes, and a metric for refinement works on RAS tensors like every learnsim metric
        grid = network_grid(fixed_v.data.shape, fixed_v.affine, loaded.dims)
        grid = canonical_grid(grid.shape, grid.affine)
        loaded.net.set_working_axes(("R", "A", "S"))  # type: ignore[attr-defined]
    else:
        grid = target_grid(fixed_v.data.shape, fixed_v.affine, loaded.dims)
    pf = preprocess(fixed_v, grid, mask=mask_v, apply_mask=not loaded.original)
    pm = preprocess(moving_v, grid, apply_mask=False)
    moving = match_histogram(pm.image, None, pf.image, pf.mask) if loaded.histmatch else pm.image
    mask = torch.from_numpy(pf.mask.astype(np.float32))[None, None] if pf.mask is not None else None
    return grid, torch.from_numpy(pf.image)[None, None], torch.from_numpy(moving)[None, None], mask


def register_with_network(
    fixed: str | os.PathLike,
    moving: str | os.PathLike,
    network: LoadedNetwork,
    *,
    moving_seg: str | os.PathLike | None = None,
    fixed_mask: str | os.PathLike | None = None,
    metric: SimilarityMetric | None = None,
    instance_optimisation_iters: int = 0,
    instance_lr: float = 0.01,
    device: str | torch.device = "cpu",
) -> Any:
    """Register ``moving`` to ``fixed`` (NIfTI paths) with ``network``; a :class:`learnsim.api.RegistrationOutput`
    on the fixed image's grid and affine (one "sample": the network is deterministic; no uncertainty map).

    ``fit.seconds`` is the time of the prediction (+ refinement) per pair, without file I/O and resampling;
    ``fit.loss`` the data energy ``E(F, M o phi)`` of the metric at the result on the network grid (a sum).
    """
    from learnsim.api import RegistrationOutput, _as_volume, _check_volumes
    from learnsim.data.preprocess import preprocess
    from learnsim.registration import FitResult
    from learnsim.spatial import displacement_to_mm, warp, warp_labels

    fixed_v, moving_v = _as_volume(fixed, "fixed"), _as_volume(moving, "moving")
    seg_v = _as_volume(moving_seg, "moving_seg") if moving_seg is not None else None
    mask_v = _as_volume(fixed_mask, "fixed_mask") if fixed_mask is not None else None
    _check_volumes(fixed_v, moving_v, seg_v, mask_v, fixed, moving, moving_seg, fixed_mask)
    dev = torch.device(device)
    grid, fixed_t, moving_t, mask_t = _network_inputs(network, fixed_v, moving_v, mask_v)
    if not bool(moving_t.any()):
        raise ValueError(f"{moving}: the moving image does not overlap the fixed image {fixed} in world space")
    module = VoxelMorphModule(network.net, metric=metric or network.metric, dims=grid.shape, instance_lr=instance_lr,
                              reg_loss=network.reg_loss)
    module = module.to(dev).eval()
    fixed_t, moving_t = fixed_t.to(dev), moving_t.to(dev)
    mask_t = mask_t.to(dev) if mask_t is not None else None
    disp, _, seconds = module.register_batch(fixed_t, moving_t, mask_t,
                                             instance_optimisation_iters=int(instance_optimisation_iters))
    with torch.no_grad():
        energy = module.data_energy(fixed_t, warp(moving_t, disp), mask_t).detach().cpu()
    fixed_grid = Grid(tuple(fixed_v.data.shape), fixed_v.affine)
    with torch.no_grad():
        disp_fix = field_to_grid(disp.cpu().double(), grid, fixed_grid).float()
        pm = preprocess(moving_v, fixed_grid, seg=seg_v, apply_mask=False)
        warped = warp(torch.from_numpy(pm.image)[None, None], disp_fix)
        seg = torch.from_numpy(pm.seg.astype(np.int64))[None, None] if pm.seg is not None else None
        warped_seg = warp_labels(seg, disp_fix) if seg is not None else None
        disp_mm = displacement_to_mm(disp_fix, torch.as_tensor(fixed_v.affine, dtype=torch.float32))
    notes = [network.description, f"network registration {seconds:.2f} s per pair (prediction"
             + (f" + {instance_optimisation_iters} refinement steps)" if instance_optimisation_iters else ")"),
             f"network grid {list(grid.shape)} ({grid.orientation}); outputs on the fixed grid {list(fixed_grid.shape)}"]
    fit = FitResult(None, energy, seconds)  # type: ignore[arg-type]  # no q_v: the network's result
    return RegistrationOutput(warped, warped_seg, disp_fix, disp_mm, disp_fix[None], None,
                              np.asarray(fixed_v.affine, dtype=np.float64), fit, notes)


def release_registration(path: str | os.PathLike, device: torch.device | str, instance_lr: float | None,
                         q_v: Any) -> tuple[Any, list[str]] | None:
    """What ``learnsim-test ckpt=PATH`` registers with when ``PATH`` is an original release file, else None.

    A network: :func:`release_module` (the cohort's RAS tensors reoriented to its axes). A learnt metric: ``q_v(metric)``
    (the test config's registration, with :func:`learnsim.api.load_metric`'s metric). The notes say what was loaded.
    """
    from learnsim.original_release import ReleaseKind, load_release, read_release_file, release_kind

    try:
        kind = release_kind(read_release_file(path))
    except ValueError:
        return None  # not even a torch file: the learnsim checkpoint reader says so
    if kind is None:
        return None
    if kind is ReleaseKind.NETWORK:
        module = release_module(path, device, 0.01 if instance_lr is None else float(instance_lr), verbose=False)
        return module, [f"{module.net.source}: original release network (voxelmorph_2020 integration, I-P-R inputs)"]
    _, metric, line = load_release(path)
    return q_v(metric.to(device).eval()), [line]
