r"""VoxelMorph trained with a baseline or a frozen learnt similarity metric.

A U-Net predicts a stationary velocity field from the pair, scaling and squaring turns it into a diffeomorphism
(:func:`learnsim.spatial.integrate_svf`), and the network is trained on the same energy as the variational
registration: ``E(F, M o phi_v) + R(v)`` with a baseline metric (SSD / LCC) or a learnt one loaded frozen from a
learnsim checkpoint. At test time only the network runs, so a learnt metric costs nothing there (unless instance
optimisation is asked for).

* :class:`VoxelMorphNet`: ``(moving, fixed) -> (velocity, displacement)``, both ``[B, 3, D, H, W]`` in voxels
  (learnsim's convention, :mod:`learnsim.spatial`).
* :class:`VoxelMorphModule`: the LightningModule (training, validation DSC, :meth:`~VoxelMorphModule.register_batch`
  for the evaluation CLI). ``VoxelMorphModule.load_from_checkpoint(path)`` rebuilds it without Hydra.

Loss scale
----------
The energies are **sums** over voxels (as in the paper). The training loss divides them by the number of grid
voxels ``D * H * W``:

    loss = mean over pairs of [ E(F, M o phi_v; fixed mask) + R(v) ] / (D H W)

so the gradient of each weight, hence a sensible Adam learning rate, does not depend on the grid size. The
balance between data term and regulariser is untouched (both are divided by the same number), so ``w_reg`` means
what it means in the q_v fit. The ``vxm_*`` experiments use the original ``w_reg`` (1.8 SSD, 2.8 LCC): a learnt
metric was learnt against that prior, and the network then amortises the same energy whose posterior the
variational method fits. For reference, VoxelMorph's ``MSE + lambda * Grad`` (means over voxels; Grad averaged
over the 3 components and 3 axes) equals this SSD loss times 2 with ``w_reg = lambda / 9``, and its
``NCC + lambda * Grad`` equals this LCC loss with ``w_reg = 2 lambda / 9`` (up to LCC's normalisation).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learnsim.checkpoint import MODULE_KEY, ModuleKind
from learnsim.distributed import ManualSyncDDPStrategy, average_gradients
from learnsim.energies import RegLossL2
from learnsim.fast_integration import integrate_fast
from learnsim.grid import as_dims
from learnsim.metric import SimilarityMetric, build_metric
from learnsim.spatial import integrate_svf, warp, warp_labels
from learnsim.vxm2020_integration import INTEGRATIONS, integrate_vxm2020

__all__ = ["VoxelMorphNet", "VoxelMorphModule", "upsample_strided", "cosine_factor"]


def upsample_strided(field: Tensor, factor: int, size: Sequence[int]) -> Tensor:
    """Trilinear up-sampling of a field computed by stride-``factor`` convolutions, in their geometry.

    A stack of stride-2, 3x3x3, padding-1 convolutions puts coarse node ``j`` at fine voxel ``factor * j`` (output
    ``i`` of each is centred on input ``2 i``). So fine voxel ``x`` reads the coarse field at ``x / factor``, linearly
    interpolated, the last node replicated beyond the end. (Resizing with ``align_corners=True`` instead, as
    VoxelMorph's ``ResizeTransform`` does, stretches the coarse grid over the fine one: at 16 -> 64 voxel 63 reads
    node 15, whose features were computed at voxel 60, so the predicted field lands up to 3 voxels off, and the
    error grows across the image: a convolution cannot learn to undo it.)

    Args:
        field: ``[B, C, d, h, w]`` on the coarse grid; values are returned as given (rescale units yourself).
        factor: the total stride ``2^r``.
        size: the fine grid ``(D, H, W)``, at most ``factor * (d, h, w)``.
    Returns:
        ``[B, C, D, H, W]``.
    """
    size = tuple(int(s) for s in size)
    coarse = tuple(field.shape[2:])
    if factor < 1 or any(s > factor * c for s, c in zip(size, coarse, strict=True)):
        raise ValueError(f"upsample_strided: grid {size} is not covered by {coarse} nodes at stride {factor}")
    padded = F.pad(field, (0, 1, 0, 1, 0, 1), mode="replicate")  # node n, at fine voxel factor * n
    fine = F.interpolate(
        padded, size=tuple(factor * c + 1 for c in coarse), mode="trilinear", align_corners=True
    )  # fine voxel x reads node x / factor
    return fine[:, :, : size[0], : size[1], : size[2]]


class VoxelMorphNet(nn.Module):
    """VoxelMorph-style 3D U-Net predicting a stationary velocity field, integrated by scaling and squaring.

    Encoder: one ``3x3x3`` stride-2 convolution + LeakyReLU(0.2) per entry of ``enc_features`` (each halves the
    grid). Decoder: the first ``len(enc_features)`` entries of ``dec_features`` are each a conv, a x2 nearest
    up-sampling and a concatenation with the encoder's skip at that resolution (the last skip is the input
    pair); the remaining entries are further convs at full resolution. A final conv to 3 channels, initialised
    to ``N(0, 1e-5)`` weights and zero bias, gives a near-zero velocity before training.

    With ``half_res`` the last up-sampling (and the skip from the input pair) is left out, the velocity is
    predicted on the half-resolution grid, then up-sampled trilinearly to full resolution (in the strided
    convolutions' geometry, :func:`upsample_strided`) and multiplied by 2 (its units are voxels of the grid it
    lives on).

    ``res_level = r`` generalises this: the last ``r`` up-samplings (and their skips) are left out, the decoder's
    remaining convolutions and the extra ones run at ``1 / 2^r`` resolution, and the velocity is up-sampled by
    ``2^r`` (``half_res`` is ``r = 1``; ``r = 2``, quarter resolution, suits smooth deformations on a CPU).

    With ``int_downsize = f > 1`` the velocity is integrated on a grid ``f`` times coarser and the displacement
    resampled back (VoxelMorph's ``int_downsize``; :func:`learnsim.fast_integration.integrate_fast`): with
    ``half_res`` and ``f = 2`` the integration runs on the grid the velocity was predicted on.

    Args:
        enc_features: encoder widths ([16, 32, 32, 32]).
        dec_features: decoder widths ([32, 32, 32, 32, 32, 16, 16]); at least ``len(enc_features)`` entries.
        half_res: predict the velocity at half resolution.
        no_steps: squarings of the scaling-and-squaring integration (12 in the original); 0 returns ``v`` as the
            displacement.
        int_downsize: integration grid coarsening factor (1: the image grid).
        res_level: number of final up-samplings left out (0: full resolution; ``half_res`` means at least 1).
        integration: ``"learnsim"`` (:func:`~learnsim.fast_integration.integrate_fast`) or ``"voxelmorph_2020"``
            (:func:`~learnsim.vxm2020_integration.integrate_vxm2020`: the geometry the original release's networks
            were trained with; chosen when one is loaded, :mod:`learnsim.original_release`).
        negative_slope: LeakyReLU slope.
        in_channels: channels of ``cat(moving, fixed)`` (2).

    Shapes: ``moving``, ``fixed`` ``[B, 1, D, H, W]`` (``fixed`` may have ``B = 1``); ``D, H, W`` must be divisible
    by ``2 ** len(enc_features)``.
    """

    def __init__(
        self,
        enc_features: Sequence[int] = (16, 32, 32, 32),
        dec_features: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        half_res: bool = False,
        no_steps: int = 12,
        negative_slope: float = 0.2,
        in_channels: int = 2,
        int_downsize: int = 1,
        res_level: int = 0,
        integration: str = "learnsim",
    ) -> None:
        super().__init__()
        if not 0 <= int(res_level) < max(1, len(enc_features)):
            raise ValueError(
                f"VoxelMorphNet: res_level must be in [0, len(enc_features) - 1]; got {res_level}"
            )
        self.res_level = max(int(res_level), 1 if half_res else 0)
        if int(int_downsize) < 1:
            raise ValueError(f"VoxelMorphNet: int_downsize must be >= 1; got {int_downsize}")
        self.int_downsize = int(int_downsize)
        if integration not in INTEGRATIONS:
            raise ValueError(f"VoxelMorphNet: integration must be one of {INTEGRATIONS}; got {integration!r}")
        self.integration = integration
        enc = [int(c) for c in enc_features]
        dec = [int(c) for c in dec_features]
        if not enc or min(enc) < 1:
            raise ValueError(f"VoxelMorphNet: enc_features must be non-empty positive widths; got {enc}")
        if len(dec) < len(enc) or min(dec) < 1:
            raise ValueError(
                f"VoxelMorphNet: dec_features needs at least len(enc_features) = {len(enc)} positive widths; got {dec}"
            )
        if no_steps < 0:
            raise ValueError(f"VoxelMorphNet: no_steps must be >= 0; got {no_steps}")
        self.enc_features, self.dec_features = enc, dec
        self.half_res = bool(half_res)
        self.no_steps = int(no_steps)
        self.negative_slope = float(negative_slope)
        self.in_channels = int(in_channels)

        self.encoder = nn.ModuleList()
        skips = [self.in_channels]  # channels at full res, /2, /4, ...
        cin = self.in_channels
        for c in enc:
            self.encoder.append(nn.Conv3d(cin, c, 3, stride=2, padding=1))
            skips.append(c)
            cin = c
        self.up_convs = nn.ModuleList()
        n = len(enc)
        for level, c in enumerate(dec[:n]):
            self.up_convs.append(nn.Conv3d(cin, c, 3, padding=1))
            cin = c
            if level < n - self.res_level:
                cin += skips[n - 1 - level]  # up-sampled and concatenated with the skip one level up
        self.extra_convs = nn.ModuleList()
        for c in dec[n:]:
            self.extra_convs.append(nn.Conv3d(cin, c, 3, padding=1))
            cin = c
        self.flow = nn.Conv3d(cin, 3, 3, padding=1)
        with torch.no_grad():
            self.flow.weight.normal_(0.0, 1e-5)
            self.flow.bias.zero_()
        self.act = nn.LeakyReLU(self.negative_slope)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain Python (what a checkpoint needs to rebuild the network)."""
        return {
            "enc_features": list(self.enc_features),
            "dec_features": list(self.dec_features),
            "half_res": self.half_res,
            "no_steps": self.no_steps,
            "negative_slope": self.negative_slope,
            "in_channels": self.in_channels,
            "int_downsize": self.int_downsize,
            "res_level": self.res_level,
            "integration": self.integration,
        }

    @property
    def divisor(self) -> int:
        """Grid sizes must be multiples of this (``2 ** len(enc_features)``)."""
        return 2 ** len(self.enc_features)

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise a ValueError naming the grid if ``(D, H, W)`` is not divisible by :attr:`divisor`."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or any(s % self.divisor for s in shape):
            raise ValueError(
                f"VoxelMorphNet: every grid size must be divisible by 2**len(enc_features) = {self.divisor} "
                f"({len(self.enc_features)} stride-2 levels); got grid {shape}. Pad or resize the images "
                f"(e.g. data.dims) to multiples of {self.divisor}."
            )

    def velocity(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The predicted stationary velocity field ``[B, 3, D, H, W]`` in voxels (before integration)."""
        if moving.dim() != 5 or fixed.dim() != 5:
            raise ValueError(
                f"VoxelMorphNet: moving and fixed must be [B, C, D, H, W]; got {tuple(moving.shape)}, {tuple(fixed.shape)}"
            )
        if moving.shape[2:] != fixed.shape[2:]:
            raise ValueError(
                f"VoxelMorphNet: moving grid {tuple(moving.shape[2:])} != fixed grid {tuple(fixed.shape[2:])}"
            )
        self.check_shape(moving.shape[2:])
        if fixed.shape[0] != moving.shape[0]:
            fixed = fixed.expand(moving.shape[0], *fixed.shape[1:])
        x = torch.cat([moving, fixed], dim=1)
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"VoxelMorphNet: cat(moving, fixed) has {x.shape[1]} channels; expected {self.in_channels}"
            )
        history = [x]
        for conv in self.encoder:
            x = self.act(conv(x))
            history.append(x)
        history.pop()  # the bottleneck is not a skip
        n = len(self.up_convs)
        for level, conv in enumerate(self.up_convs):
            x = self.act(conv(x))
            if level >= n - self.res_level:
                continue  # coarse output: no more up-sampling
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = torch.cat([x, history.pop()], dim=1)
        for conv in self.extra_convs:
            x = self.act(conv(x))
        v = self.flow(x)
        if self.res_level:
            # voxel units: a displacement of 1 voxel at 1 / 2^r resolution is 2^r full-res voxels
            factor = 2**self.res_level
            v = float(factor) * upsample_strided(v, factor, moving.shape[2:])
        return v

    def integrate(self, v: Tensor) -> Tensor:
        """Displacement ``[B, 3, D, H, W]`` (voxels) of ``exp(v)`` (integrated ``int_downsize`` times coarser)."""
        if self.integration == "voxelmorph_2020":
            return integrate_vxm2020(v, self.no_steps, self.int_downsize)
        if self.int_downsize > 1:
            return integrate_fast(v, self.no_steps, self.int_downsize)
        return integrate_svf(v, self.no_steps)

    def forward(self, moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """``(velocity, displacement)``, both ``[B, 3, D, H, W]`` in voxels; ``phi = id + displacement``."""
        v = self.velocity(moving, fixed)
        return v, self.integrate(v)


LR_SCHEDULES = ("constant", "cosine")


def cosine_factor(step: int, total: int, final: float) -> float:
    """Learning-rate factor at optimiser step ``step`` of ``total``: 1 -> ``final`` along a half cosine, then ``final``."""
    t = min(max(step, 0), total) / total
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def _freeze(metric: SimilarityMetric) -> SimilarityMetric:
    for p in metric.parameters():
        p.requires_grad_(False)
    return metric.eval()


def _with_lcc_radius(metric: SimilarityMetric, radius: int) -> SimilarityMetric:
    """``metric`` (its weights, scale and precision) with an LCC window of radius ``radius`` (voxels)."""
    spec = dict(metric.spec)
    if "radius" not in spec:
        raise ValueError(f"VoxelMorphModule: lcc_radius is for LCC metrics; the metric is {spec['kind']}")
    if radius < 1 or spec.get("learnable_window"):
        raise ValueError(
            f"VoxelMorphModule: lcc_radius must be >= 1 and the metric's window not learnt; got {radius}, "
            f"learnable_window={spec.get('learnable_window')}"
        )
    spec["radius"] = radius
    out = SimilarityMetric.from_spec(spec)
    out.load_state_dict(metric.state_dict())  # the window is not in the state dict: it follows the radius
    return out


class VoxelMorphModule(pl.LightningModule):
    """VoxelMorph training on ``E(F, M o phi_v) + R(v)`` with a frozen similarity metric.

    The metric is **always frozen** (no gradient, eval mode, not in the optimiser): a baseline has nothing to
    learn, and a learnt metric comes trained from a learnsim checkpoint. Its feature map of the fixed image is
    cached (the atlas is the same in every batch), so a learnt metric costs one feature pass per step (of the
    warped image).

    Args:
        net: the network, or its :attr:`VoxelMorphNet.config` dict.
        metric: a baseline (or any) :class:`~learnsim.metric.SimilarityMetric`; ignored when ``metric_ckpt`` or
            ``metric_spec`` is given, except that its energy (SSD / LCC) must match the checkpoint's. Default:
            the SSD baseline.
        metric_ckpt: path of a learnsim checkpoint whose learnt metric is loaded
            (:meth:`~learnsim.metric.SimilarityMetric.from_checkpoint`).
        reg_loss: the L2 gradient regulariser of the velocity, or its kwargs (``{"w_reg": 1.8}``).
        lr: Adam learning rate of the network (1e-4).
        dims: the training grid ``(D, H, W)`` (checked against the network's divisibility and each batch).
        metric_spec: the metric's :attr:`~learnsim.metric.SimilarityMetric.spec`; rebuilds the metric's structure
            when loading a checkpoint (the weights come from the state dict). Takes precedence over the above.
        metric_source: where a learnt metric came from (the ``metric_ckpt`` path); recorded, never read.
        instance_lr: Adam learning rate of :meth:`register_batch`'s instance optimisation (0.01).
        lr_schedule: ``"constant"`` (VoxelMorph's) or ``"cosine"``: the learning rate falls from ``lr`` to
            ``lr * lr_final`` along a half cosine over the run's optimiser steps (the trainer's
            ``estimated_stepping_batches``: set ``trainer.max_steps``); the decay settles the step-to-step noise
            of batch-1 training on random pairs at the end of a short run.
        lr_final: the final learning rate of the cosine schedule as a fraction of ``lr`` (0.05).
        lcc_radius: an LCC metric's window radius for this network (voxels; None: the metric's own). A learnt
            CNN_LCC is learnt with the q_v fits' 3^3 window; an amortised network needs a wider one (VoxelMorph's
            9^3, radius 4), so the learnt features can be compared in the baseline network's window. Stored in
            the metric's spec, so a checkpoint rebuilds the same energy.

    Loss per batch (see the module docstring): ``mean_b [E(F, M_b o phi_b; mask) + R(v_b)] / (D H W)``.
    """

    def __init__(
        self,
        net: VoxelMorphNet | Mapping[str, Any],
        metric: SimilarityMetric | None = None,
        metric_ckpt: str | os.PathLike | None = None,
        reg_loss: RegLossL2 | Mapping[str, Any] | None = None,
        lr: float = 1e-4,
        dims: int | Sequence[int] = (64, 64, 64),
        metric_spec: Mapping[str, Any] | None = None,
        metric_source: str | None = None,
        instance_lr: float = 0.01,
        lr_schedule: str = "constant",
        lr_final: float = 0.05,
        lcc_radius: int | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"VoxelMorphModule: lr_schedule must be one of {LR_SCHEDULES}; got {lr_schedule!r}"
            )
        if not 0.0 <= float(lr_final) <= 1.0:
            raise ValueError(f"VoxelMorphModule: lr_final must be in [0, 1]; got {lr_final}")
        self.lr_schedule, self.lr_final = lr_schedule, float(lr_final)
        self.net = net if isinstance(net, VoxelMorphNet) else VoxelMorphNet(**dict(net))
        self.dims = as_dims(dims)
        self.net.check_shape(self.dims)
        if metric_spec is not None:
            resolved = SimilarityMetric.from_spec(metric_spec)
        elif metric_ckpt is not None:
            from learnsim.metric_checkpoint import load_learnt_metric

            resolved = load_learnt_metric(metric_ckpt, "metric_ckpt")  # a VoxelMorph checkpoint is refused
            metric_source = str(metric_ckpt)
            if metric is not None and metric.energy_kind != resolved.energy_kind:
                raise ValueError(
                    f"VoxelMorphModule: metric_ckpt {metric_ckpt} holds a {resolved.spec['kind']} metric but the "
                    f"configured metric is {metric.spec['kind']}; use the matching experiment (vxm_learnt_"
                    f"{resolved.energy_kind.value}) or metric={resolved.spec['kind']}"
                )
        elif metric is not None:
            resolved = metric
        else:
            resolved = build_metric("ssd")
        if not isinstance(resolved, SimilarityMetric):
            raise TypeError(
                f"VoxelMorphModule: metric must be a learnsim.metric.SimilarityMetric; got {type(resolved).__name__}"
            )
        if lcc_radius is not None:
            resolved = _with_lcc_radius(resolved, int(lcc_radius))
        self.metric = _freeze(resolved)
        if reg_loss is None:
            reg_loss = RegLossL2()
        self.reg_loss = reg_loss if isinstance(reg_loss, RegLossL2) else RegLossL2(**dict(reg_loss))
        self.lr = float(lr)
        self.instance_lr = float(instance_lr)
        self.metric_source = metric_source
        self._fixed_cache: tuple[Tensor, Tensor] | None = None  # (fixed [1 or B,1,D,H,W], its features)
        self.run_config: dict | None = None  # set by learnsim-train; stored in checkpoints
        # primitives only: load_from_checkpoint(path) rebuilds the module without Hydra; ``metric_spec`` also
        # lets SimilarityMetric.from_checkpoint read the (frozen) metric out of a VoxelMorph checkpoint
        self.save_hyperparameters(
            {
                "net": self.net.config,
                "metric_spec": dict(self.metric.spec),
                "metric_source": metric_source,
                "reg_loss": {"w_reg": self.reg_loss.w_reg},
                "lr": self.lr,
                "dims": list(self.dims),
                "instance_lr": self.instance_lr,
                "lr_schedule": self.lr_schedule,
                "lr_final": self.lr_final,
            }
        )

    # ------------------------------------------------------------------------------------------ metric
    def train(self, mode: bool = True) -> VoxelMorphModule:
        super().train(mode)
        self.metric.eval()  # frozen: stays in eval mode whatever Lightning does
        return self

    def fixed_features(self, fixed: Tensor) -> Tensor:
        """The frozen metric's features of ``fixed`` (``[B or 1, 1, D, H, W]``), cached while ``fixed`` is unchanged.

        A batch whose fixed images are all the same (the atlas) is reduced to one image first.
        """
        if fixed.shape[0] > 1 and torch.equal(fixed, fixed[:1].expand_as(fixed)):
            fixed = fixed[:1]
        hit = self._fixed_cache
        if (
            hit is not None
            and hit[0].shape == fixed.shape
            and hit[0].device == fixed.device
            and hit[0].dtype == fixed.dtype
            and torch.equal(hit[0], fixed)
        ):
            return hit[1]
        with torch.no_grad():
            feats = self.metric.features(fixed)
        self._fixed_cache = (fixed.detach().clone(), feats.detach())
        return self._fixed_cache[1]

    def data_energy(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        """``E(F, M o phi)`` per pair ``[B]`` (a sum over the mask), differentiable w.r.t. ``warped`` only."""
        return self.metric.energy_from_features(
            self.fixed_features(fixed), self.metric.features(warped), mask
        )

    def energies(
        self, fixed: Tensor, moving: Tensor, mask: Tensor | None, v: Tensor, disp: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(data [B], reg [B])`` energies (sums over voxels) of the transformation ``exp(v)``."""
        warped = warp(moving, disp)
        return self.data_energy(fixed, warped, mask), self.reg_loss(v)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """``(velocity, displacement)`` ``[B, 3, D, H, W]`` in voxels."""
        return self.net(moving, fixed)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        if self.lr_schedule == "constant":
            return opt
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                "VoxelMorphModule: lr_schedule='cosine' needs a finite step budget; set trainer.max_steps "
                f"(the trainer estimates {total} steps)"
            )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(cosine_factor, total=int(total), final=self.lr_final))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _check_batch(self, moving: Tensor) -> None:
        if tuple(moving.shape[2:]) != self.dims:
            raise ValueError(
                f"VoxelMorphModule: batch grid {tuple(moving.shape[2:])} != model dims {self.dims}"
            )

    def _step(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        fixed, moving, mask = batch["fixed"], batch["moving"], batch.get("fixed_mask")
        self._check_batch(moving)
        v, disp = self.net(moving, fixed)
        data, reg = self.energies(fixed, moving, mask, v, disp)
        n_vox = math.prod(moving.shape[2:])
        data, reg = data.mean() / n_vox, reg.mean() / n_vox
        return data + reg, data, reg, disp

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, data, reg, _ = self._step(batch)
        b = batch["moving"].shape[0]
        self.log_dict(
            {"train/loss": loss.detach(), "train/data": data.detach(), "train/reg": reg.detach()},
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=b,
            sync_dist=True,
        )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # learnsim's ManualSyncDDPStrategy leaves the module unwrapped (no DDP reducer): average the gradients
        # here. A plain (wrapping) DDPStrategy has already averaged them.
        if isinstance(getattr(self._trainer, "strategy", None), ManualSyncDDPStrategy):
            average_gradients([p for p in self.net.parameters() if p.grad is not None])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, _, _, disp = self._step(batch)
        b = batch["moving"].shape[0]
        self.log("val/loss", loss, batch_size=b, sync_dist=True)
        has_seg = batch.get("has_seg")
        if has_seg is None or not bool(has_seg.any()):
            return
        from learnsim.evaluation.metrics import mean_dice  # MONAI/scipy: only where validation needs them

        warped_seg = warp_labels(batch["moving_seg"], disp)
        fixed_seg = batch["fixed_seg"]
        if fixed_seg.shape[0] != b:
            fixed_seg = fixed_seg.expand(b, *fixed_seg.shape[1:])
        scores = [mean_dice(warped_seg[i], fixed_seg[i]) for i in range(b) if bool(has_seg[i])]
        scores = torch.stack(scores)
        scores = scores[~torch.isnan(scores)]
        if scores.numel():
            self.log("val/dsc", scores.mean(), batch_size=scores.numel(), sync_dist=True, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[MODULE_KEY] = ModuleKind.VOXELMORPH.value
        if self.run_config is not None:
            checkpoint["learnsim_config"] = self.run_config

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self._fixed_cache = None  # the metric's weights may change
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ------------------------------------------------------------------------------------------ inference
    def register_batch(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        no_samples: int = 1,
        instance_optimisation_iters: int = 0,
        instance_lr: float | None = None,
    ) -> tuple[Tensor, Tensor, float]:
        """Register a batch with the network (eval mode), optionally refined by instance optimisation.

        Instance optimisation takes ``instance_optimisation_iters`` Adam steps (lr ``instance_lr``, default the
        module's, 0.01) on the velocity field, starting from the network's prediction, minimising each pair's
        ``E(F, M o phi_v; mask) + R(v)`` with the module's (frozen) metric.

        Args:
            fixed: ``[B or 1, 1, D, H, W]``; moving: ``[B, 1, D, H, W]``; mask: ``[B or 1, 1, D, H, W]`` or None.
            no_samples: accepted for interface compatibility with the variational method; the network is
                deterministic, so exactly one "sample" (the prediction) is returned. Must be >= 1.
        Returns:
            ``(mean_disp [B, 3, D, H, W], sample_disps [1, B, 3, D, H, W], seconds)``, displacements in voxels;
            ``seconds`` is the wall-clock time of prediction (+ refinement), CUDA-synchronised.
        """
        if no_samples < 1:
            raise ValueError(f"register_batch: no_samples must be >= 1; got {no_samples}")
        if instance_optimisation_iters < 0:
            raise ValueError(
                f"register_batch: instance_optimisation_iters must be >= 0; got {instance_optimisation_iters}"
            )
        was_training = self.training
        self.eval()
        dev = moving.device
        try:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                v, disp = self.net(moving, fixed)
            if instance_optimisation_iters > 0:
                v = self._instance_optimise(
                    fixed,
                    moving,
                    mask,
                    v,
                    int(instance_optimisation_iters),
                    self.instance_lr if instance_lr is None else float(instance_lr),
                )
                with torch.no_grad():
                    disp = self.net.integrate(v)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - t0
        finally:
            self.train(was_training)
        disp = disp.detach()
        return disp, disp.unsqueeze(0), seconds

    def _instance_optimise(
        self, fixed: Tensor, moving: Tensor, mask: Tensor | None, v0: Tensor, iters: int, lr: float
    ) -> Tensor:
        # Works under an outer no_grad or inference_mode: fresh (normal) tensors, gradients on.
        with torch.inference_mode(False), torch.enable_grad():
            fixed, moving = fixed.clone(), moving.clone()
            mask = None if mask is None else mask.clone()
            v = v0.detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([v], lr=lr)
            for _ in range(iters):
                opt.zero_grad(set_to_none=True)
                data, reg = self.energies(fixed, moving, mask, v, self.net.integrate(v))
                # a sum over pairs: each pair's gradient is its own, whatever the batch size
                (data + reg).sum().backward()
                opt.step()
        return v.detach()

