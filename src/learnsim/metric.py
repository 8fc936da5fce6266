"""Similarity metrics: the baselines (SSD, LCC) and the learnt CNN_SSD / CNN_LCC of the paper.

A metric maps both images through a feature extractor ``a(.)`` with shared weights and compares the feature
maps with SSD or LCC: ``E(F, M o phi) = SSD(a(F), a(M o phi))`` (or LCC). ``a`` is the identity for the
baselines (``learnable=False``) and a 3D convolutional encoder plus a 1x1 aggregation layer for the learnt ones.

The metric is split into :meth:`SimilarityMetric.features` and :meth:`SimilarityMetric.energy_from_features` so
that the registration loop computes the fixed image's features once (the metric is frozen while q_v is fitted).

Normalised features (``normalise=True``, the bounded objective of :mod:`learnsim.module`): the energy compares
``c a(.)`` with ``c = rms_mask(F) / rms_mask(a(F))``, the RMS of the atlas' features inside its mask brought back to
the atlas' own. ``c a(F)`` then has the RMS of ``F`` whatever the weights, so a rescaling ``a -> k a`` changes no
energy, and at the Dirac initialisation (``a(F) = F``) ``c = 1``: the energy is the baseline's. ``c`` is a buffer
(:meth:`SimilarityMetric.calibrate_`, saved in checkpoints) set on the training atlas each time the weights change;
the training module differentiates through it (:meth:`SimilarityMetric.atlas_scale`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from learnsim.energies import LCC, SSD, EnergyKind, StudentT, lcc_terms, student_t_terms

__all__ = ["FeatureEncoder", "SimilarityMetric", "CNNSSD", "CNNSSDT", "CNNLCC", "build_metric", "masked_rms"]


class FeatureEncoder(nn.Module):
    """3D conv encoder, stride 1, no down-sampling, replicate padding, LeakyReLU, then a 1x1 aggregation layer.

    ``[B, 1, D, H, W] -> [B, 1, D, H, W]``. With :meth:`dirac_init_` it starts as the identity on non-negative
    inputs (each conv passes the input through its centre tap, LeakyReLU is the identity on ``x >= 0``, and the
    aggregation sums the channels back).

    Args:
        no_features: output channels of each conv block ([4, 8, 8] in the original).
        negative_slope: LeakyReLU slope (0.2).
        kernel_size: conv kernel size (3).
        init_noise: scale of the off-centre taps at initialisation (1e-7): breaks the channels' symmetry
            while keeping the metric equal to its baseline to ~1e-6.
    """

    def __init__(
        self,
        no_features: Sequence[int] = (4, 8, 8),
        negative_slope: float = 0.2,
        kernel_size: int = 3,
        init_noise: float = 1e-7,
    ) -> None:
        super().__init__()
        if not no_features:
            raise ValueError("FeatureEncoder: no_features must be non-empty")
        chans = [1, *[int(c) for c in no_features]]
        self.convs = nn.ModuleList(
            nn.Conv3d(cin, cout, kernel_size, padding=kernel_size // 2, padding_mode="replicate")
            for cin, cout in zip(chans[:-1], chans[1:], strict=True)
        )
        self.act = nn.LeakyReLU(negative_slope)
        self.aggregation = nn.Conv3d(chans[-1], 1, kernel_size=1, bias=False)
        self.init_noise = init_noise
        self.dirac_init_()

    @torch.no_grad()
    def dirac_init_(self) -> None:
        """Dirac-delta initialisation: centre taps ``1 / C_out`` (summing to 1 over output channels)."""
        for conv in self.convs:
            w = conv.weight
            c_out = w.shape[0]
            w.normal_(0.0, self.init_noise) if self.init_noise > 0 else w.zero_()
            centre = tuple(k // 2 for k in w.shape[2:])
            w[(slice(None), slice(None), *centre)] = 1.0 / c_out
            conv.bias.zero_()
        self.aggregation.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = self.act(conv(x))
        return self.aggregation(x)


class SimilarityMetric(nn.Module):
    """``E(F, M o phi) = energy(a(F), a(M o phi))``; ``forward(fixed, warped, mask) -> [B]`` (lower = more similar).

    Args:
        energy: the data term on feature maps, :class:`~learnsim.energies.SSD` or :class:`~learnsim.energies.LCC`
            (the original ``data_loss``).
        learnable: False gives the plain baseline (``a`` is the identity; nothing to learn).
        no_features, negative_slope, init_noise: see :class:`FeatureEncoder` (the original ``model.args``).
        normalise: scale the features by ``c = rms_mask(F) / rms_mask(a(F))`` on the atlas (module docstring):
            energies invariant to the features' scale, equal to the baseline's at the Dirac initialisation. False
            (the original): ``a`` as is, whose scale the contrastive objective can grow without bound.
    """

    def __init__(
        self,
        energy: nn.Module,
        learnable: bool = True,
        no_features: Sequence[int] = (4, 8, 8),
        negative_slope: float = 0.2,
        init_noise: float = 1e-7,
        normalise: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(energy, (SSD, LCC)):
            raise TypeError(f"SimilarityMetric: energy must be learnsim.energies.SSD or LCC; got {type(energy).__name__}")
        self.energy = energy
        self.learnable = bool(learnable)
        self.encoder = FeatureEncoder(no_features, negative_slope, init_noise=init_noise) if learnable else None
        self.normalise = bool(normalise) and self.encoder is not None
        if self.normalise:
            # c of the module docstring: a scalar set on the atlas by calibrate_ (1 at the Dirac initialisation)
            self.register_buffer("feature_scale", torch.ones(()))
        # enough to rebuild the metric from a checkpoint without Hydra (see SimilarityMetric.from_checkpoint)
        self.spec: dict = {
            "kind": ("cnn_" if self.learnable else "") + ("lcc" if isinstance(energy, LCC) else "ssd")
            + ("_t" if isinstance(energy, StudentT) else ""),
            "learnable": self.learnable,
            "no_features": [int(c) for c in no_features],
            "negative_slope": float(negative_slope),
        }
        if self.normalise:
            self.spec["normalise"] = True
        if energy.weight != 1.0:
            self.spec["weight"] = energy.weight
        if isinstance(energy, LCC):
            self.spec.update(radius=energy.radius, learnable_window=energy.learnable_window)
        if isinstance(energy, StudentT):
            self.spec.update(nu=energy.nu, precision=energy.precision)

    def set_weight_(self, weight: float, precision: float | None = None) -> None:
        """Set the likelihood precision q_v sees (``energy.weight``; a Student-t energy's noise precision too,
        ``precision`` or ``weight``), and record it in :attr:`spec` so that checkpoints carry it."""
        weight = float(weight)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"metric.energy.weight must be a finite number > 0; got {weight}")
        self.energy.weight = weight
        self.spec["weight"] = weight
        if isinstance(self.energy, StudentT):
            self.energy.precision = float(weight if precision is None else precision)
            self.spec["precision"] = self.energy.precision

    def set_nu_(self, nu: float) -> None:
        """Set a Student-t energy's degrees of freedom (recorded in :attr:`spec`)."""
        if not isinstance(self.energy, StudentT):
            raise TypeError("set_nu_: the metric's energy is not Student-t")
        self.energy.nu = float(nu)
        self.spec["nu"] = float(nu)

    @property
    def name(self) -> str:
        return self.spec["kind"]

    @property
    def energy_kind(self) -> EnergyKind:
        """The data term the features are compared with (SSD or LCC): it selects the paper's settings."""
        return self.energy.kind

    @classmethod
    def from_spec(cls, spec: Mapping) -> SimilarityMetric:
        """An untrained metric of the structure :attr:`spec` describes (the inverse of :attr:`spec`)."""
        spec = dict(spec)
        return build_metric(spec.pop("kind"), **{k: v for k, v in spec.items() if k != "learnable"})

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, map_location: str | torch.device = "cpu") -> SimilarityMetric:
        """The metric of a learnsim training checkpoint (learnt, or a VoxelMorph run's frozen one), in eval mode.

        No Hydra needed; the file is read with ``weights_only=True`` (:func:`learnsim.checkpoint.load_checkpoint`).

        Raises:
            FileNotFoundError: naming the checkpoint if it does not exist.
            ValueError: naming the checkpoint if it holds no learnsim metric.
        """
        from learnsim.checkpoint import load_checkpoint

        path = Path(ckpt)
        state = load_checkpoint(path, map_location)
        spec = (state.get("hyper_parameters") or {}).get("metric_spec")
        if spec is None:
            raise ValueError(f"{path}: not a learnsim checkpoint (no hyper_parameters.metric_spec)")
        metric = cls.from_spec(spec)
        prefix = "metric."
        weights = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
        missing, unexpected = metric.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if not m.endswith("window")]:
            raise ValueError(f"{path}: metric weights do not match its spec (missing {missing}, unexpected {unexpected})")
        return metric.eval()

    def raw_features(self, image: Tensor) -> Tensor:
        """``a(image)`` before normalisation: ``[B, 1, D, H, W] -> [B, 1, D, H, W]`` (the image for a baseline)."""
        return image if self.encoder is None else self.encoder(image)

    def features(self, image: Tensor) -> Tensor:
        """The features the energy compares, ``c a(image)`` (``c`` = :attr:`feature_scale`, 1 unless normalised):
        ``[B, 1, D, H, W] -> [B, 1, D, H, W]``."""
        feats = self.raw_features(image)
        return feats * self.feature_scale.to(feats.dtype) if self.normalise else feats

    def atlas_scale(self, fixed: Tensor, mask: Tensor | None = None, raw_fixed: Tensor | None = None) -> Tensor:
        """``c = rms_mask(F) / rms_mask(a(F))``, a scalar tensor differentiable in the weights (1 if not normalised).

        Args:
            fixed: the atlas ``[1, 1, D, H, W]`` in [0, 1].
            mask: its mask ``[1, 1, D, H, W]`` (0/1 or soft weights) or None (all voxels).
            raw_fixed: ``a(F)`` if already computed (``[1, 1, D, H, W]``).
        """
        if not self.normalise:
            return torch.ones((), device=fixed.device)
        raw = self.raw_features(fixed) if raw_fixed is None else raw_fixed
        return masked_rms(fixed, mask) / masked_rms(raw, mask).clamp_min(1e-12)

    def linear_log_det(self, shape: Sequence[int], scale: Tensor | None = None) -> Tensor:
        """``log |det(c A)|`` for ``A`` the encoder's linear part as a circular convolution on a grid ``shape``.

        The linear part is the encoder with LeakyReLU taken as the identity and the biases dropped (the exact map on
        non-negative inputs at the Dirac initialisation): per frequency ``H(omega) = w_agg H_L ... H_1``, products
        of the convolutions' channel matrices, and ``log |det A| = sum_omega log |H(omega)|``. A scalar tensor,
        differentiable in the weights (and in ``scale``, ``c``; default :attr:`feature_scale`, 1 unless
        normalised); 0 for a baseline. It is ``-log Z`` up to a constant for SSD on linear features.
        """
        if self.encoder is None:
            return torch.zeros(())
        shape = tuple(int(n) for n in shape)
        resp = None
        for conv in self.encoder.convs:  # [C_out, C_in, *half-spectrum]
            h = torch.fft.rfftn(conv.weight, s=shape, dim=(-3, -2, -1))
            resp = h if resp is None else torch.einsum("oi...,ic...->oc...", h, resp)
        agg = self.encoder.aggregation.weight.flatten(1).to(resp.dtype)  # [1, C]
        resp = torch.einsum("oi,ic...->oc...", agg, resp)[0, 0]
        # the half-spectrum of rfftn: every bin but the 0 and Nyquist planes of the last axis stands for two
        mult = torch.full((resp.shape[-1],), 2.0, device=resp.device)
        mult[0] = 1.0
        if shape[-1] % 2 == 0:
            mult[-1] = 1.0
        log_det = (torch.log(resp.abs().clamp_min(1e-12)) * mult).sum()
        c = (self.feature_scale if self.normalise else None) if scale is None else scale
        return log_det if c is None else log_det + math.prod(shape) * torch.log(c)

    @torch.no_grad()
    def calibrate_(self, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        """Set :attr:`feature_scale` to :meth:`atlas_scale` on the atlas (call after the weights change); returns it."""
        c = self.atlas_scale(fixed, mask)
        if self.normalise:
            self.feature_scale.copy_(c)
        return c

    def energy_from_features(self, feat_fixed: Tensor, feat_warped: Tensor, mask: Tensor | None = None) -> Tensor:
        """Energy ``[B]`` between precomputed feature maps."""
        return self.energy(feat_fixed, feat_warped, mask)

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.energy_from_features(self.features(fixed), self.features(warped), mask)

    @torch.no_grad()
    def energy_map(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        """The energy voxel by voxel, ``[B, 1, D, H, W]``: its sum over voxels is :meth:`forward` (for figures)."""
        ff, fw = self.features(fixed), self.features(warped)
        if isinstance(self.energy, LCC):
            window = self.energy.window.clamp_min(1e-3) if self.energy.learnable_window else None
            e = -lcc_terms(ff, fw, self.energy.radius, window)
        elif isinstance(self.energy, StudentT):
            e = student_t_terms(ff, fw, self.energy.precision, self.energy.nu)
        else:
            e = 0.5 * (ff - fw) ** 2
        e = self.energy.weight * e
        return e if mask is None else e * mask


def masked_rms(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Root mean square of ``x`` ``[B, C, D, H, W]`` over all its elements inside ``mask`` (weights, broadcast
    over ``B, C``; None: everywhere): a scalar tensor, in ``x``'s units."""
    if mask is None:
        return x.pow(2).mean().sqrt()
    m = mask.to(x.dtype).expand_as(x)
    return ((x.pow(2) * m).sum() / m.sum().clamp_min(1e-12)).sqrt()


def CNNSSD(learnable: bool = True, no_features: Sequence[int] = (4, 8, 8), negative_slope: float = 0.2,
           init_noise: float = 1e-7, weight: float = 1.0, normalise: bool = False) -> SimilarityMetric:
    """CNN_SSD: ``0.5 * weight * sum_mask (a(F) - a(M o phi))^2`` (``c a`` for ``a`` when ``normalise``)."""
    return SimilarityMetric(SSD(weight), learnable, no_features, negative_slope, init_noise, normalise)


def CNNSSDT(learnable: bool = True, no_features: Sequence[int] = (4, 8, 8), negative_slope: float = 0.2,
            init_noise: float = 1e-7, weight: float = 1.0, normalise: bool = False, nu: float = math.inf,
            precision: float | None = None) -> SimilarityMetric:
    """CNN_SSD with Student-t noise (:class:`~learnsim.energies.StudentT`); ``nu = inf`` is CNN_SSD."""
    return SimilarityMetric(StudentT(weight, nu, precision), learnable, no_features, negative_slope, init_noise,
                            normalise)


def CNNLCC(learnable: bool = True, no_features: Sequence[int] = (4, 8, 8), negative_slope: float = 0.2,
           init_noise: float = 1e-7, radius: int = 1, learnable_window: bool = False, weight: float = 1.0,
           normalise: bool = False) -> SimilarityMetric:
    """CNN_LCC: LCC between the feature maps, window ``(2 radius + 1)^3`` (optionally learnt)."""
    return SimilarityMetric(LCC(radius, learnable_window and learnable, weight), learnable, no_features, negative_slope,
                            init_noise, normalise)


def build_metric(kind: str, **kwargs) -> SimilarityMetric:
    """``"ssd"``/``"cnn_ssd"`` or ``"lcc"``/``"cnn_lcc"`` -> metric; the plain names are baselines.

    ``build_metric(**metric.spec)`` rebuilds an equivalent (untrained) metric.
    """
    kind = kind.lower()
    if kind in ("ssd", "lcc", "ssd_t"):
        kwargs["learnable"] = False
    factory = {"ssd": CNNSSD, "cnn_ssd": CNNSSD, "lcc": CNNLCC, "cnn_lcc": CNNLCC, "ssd_t": CNNSSDT,
               "cnn_ssd_t": CNNSSDT}.get(kind)
    if factory is None:
        raise ValueError(f"unknown metric {kind!r}; expected one of ssd, lcc, cnn_ssd, cnn_lcc, ssd_t, cnn_ssd_t")
    if factory is not CNNLCC:
        kwargs.pop("radius", None)
        kwargs.pop("learnable_window", None)
    return factory(**kwargs)
