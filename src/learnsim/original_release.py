"""The original LearnSim release's model files in learnsim: recognised by their layout, rebuilt as learnsim modules.

learnsim does not ship these files (the original repository has no licence); a user who has them loads them with
:func:`learnsim.load_network` / :func:`learnsim.load_metric`, ``learnsim-register --network`` or
``learnsim-test ckpt=``. Two layouts are recognised (anything else is refused in one line naming the file):

* **VoxelMorph network** (``checkpoint_VXM_{SSD,LCC}_{baseline,learnt}.pt``): ``{"config": {...}, "model_state":
  {...}}``, plain tensors and values. ``config`` holds the 2020 voxelmorph ``VxmDense`` arguments (``inshape``,
  ``nb_unet_features``, ``int_steps``, ``int_downsize``, ``bidir``, ``use_probs``, ...); ``model_state`` its weights
  ``unet_model.{downarm,uparm,extras}.N.main.{weight,bias}`` and ``flow.{weight,bias}``. learnsim's
  :class:`~learnsim.voxelmorph.VoxelMorphNet` has the same architecture: the keys are renamed
  (:func:`rename_network_keys`), loaded with ``strict=True``, and the network integrates in the 2020 geometry
  (:mod:`learnsim.vxm2020_integration`).
* **learnt metric** (the original trainer's checkpoint): ``{"epoch", "step", "config", "q_f", "model",
  "optimizer_q_f", "optimizer_q_phi"}``, where ``model`` is the state of the original ``CNN_SSD`` / ``CNN_LCC``:
  ``enc.enc.N.main.{weight,bias}`` (3x3x3 convs, replicate padding, LeakyReLU 0.2), ``agg.weight`` ``[1, C, 1]``
  (a 1x1 aggregation), and for LCC the learnt 3x3x3 window ``kernel.weight`` (:mod:`learnsim.original_lcc`).
  ``config`` is a pickled ``parse_config.ConfigParser``: the file is read with ``weights_only=True`` and every
  object of a class outside torch's safe list is replaced by an inert stand-in (no code from the file runs).

Both were made on inputs in the original loader's convention (:mod:`learnsim.original_convention`: tensor axes
I, P, R; min-max intensities): networks are wrapped to reorient learnsim's RAS tensors exactly
(:class:`ReleasedVoxelMorphNet`); a metric's convolution kernels are flipped/permuted so that it computes on RAS
tensors exactly what the original computed on the same anatomy in its axes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.serialization as serialization
from torch import Tensor

from learnsim.metric import CNNSSD, SimilarityMetric
from learnsim.original_convention import NETWORK_AXCODES, SignedPermutation
from learnsim.voxelmorph import VoxelMorphNet

__all__ = ["ReleaseKind", "read_release_file", "release_kind", "rename_network_keys", "network_from_release",
           "metric_from_release", "ReleasedVoxelMorphNet", "load_release", "DEFAULT_UNET_FEATURES"]

#: voxelmorph's default U-Net widths (``nb_unet_features=None``)
DEFAULT_UNET_FEATURES = ((16, 32, 32, 32), (32, 32, 32, 32, 32, 16, 16))
#: learnsim's working grids (cohorts, :func:`learnsim.register`) run R, A, S
WORKING_AXCODES = ("R", "A", "S")
_NETWORK_KEYS = re.compile(r"^unet_model\.(downarm|uparm|extras)\.(\d+)\.main\.(weight|bias)$")
_RENAMED = {"downarm": "encoder", "uparm": "up_convs", "extras": "extra_convs"}
_METRIC_KEYS = re.compile(r"^(enc\.enc\.\d+\.main\.(weight|bias)|agg\.weight|kernel\.weight)$")


class ReleaseKind(str, Enum):
    """What an original release file holds."""

    NETWORK = "VoxelMorph network"
    CNN_SSD = "CNN_SSD learnt metric"
    CNN_LCC = "CNN_LCC learnt metric"


class _Inert:
    """Stands in for any object of a class the file names outside torch's safe list (the original trainer's
    ``ConfigParser``, its paths and logger): remembers what it was built from, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def read_release_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file, foreign classes replaced by inert stand-ins (no code runs).

    Raises:
        FileNotFoundError: naming the file. ValueError: naming the file if torch cannot read it at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception:  # noqa: BLE001  (an unsafe global: list the names and read them as stand-ins)
            names = serialization.get_unsafe_globals_in_checkpoint(path)
            if not names:
                raise
            with serialization.safe_globals([(_Inert, name) for name in names]):
                return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: cannot be read as a torch file of tensors and plain values ({first})") from exc


def _is_network(state: Any) -> bool:
    return (isinstance(state, Mapping) and isinstance(state.get("config"), Mapping)
            and isinstance(state.get("model_state"), Mapping)
            and any(str(k).startswith("unet_model.") for k in state["model_state"]))


def _metric_state(state: Any) -> Mapping | None:
    model = state.get("model") if isinstance(state, Mapping) else None
    if isinstance(model, Mapping) and model and all(_METRIC_KEYS.match(str(k)) for k in model):
        return model
    return None


def release_kind(state: Any) -> ReleaseKind | None:
    """The original release layout of a loaded file, or None."""
    if _is_network(state):
        return ReleaseKind.NETWORK
    model = _metric_state(state)
    if model is None:
        return None
    return ReleaseKind.CNN_LCC if "kernel.weight" in model else ReleaseKind.CNN_SSD


def rename_network_keys(model_state: Mapping[str, Tensor], path: str | os.PathLike = "<state>") -> dict[str, Tensor]:
    """``unet_model.downarm.N.main.X -> encoder.N.X``, ``uparm -> up_convs``, ``extras -> extra_convs``,
    ``flow.X -> flow.X``; any other key is refused naming the file and the key."""
    out = {}
    for key, value in model_state.items():
        hit = _NETWORK_KEYS.match(str(key))
        if hit:
            out[f"{_RENAMED[hit[1]]}.{hit[2]}.{hit[3]}"] = value
        elif key in ("flow.weight", "flow.bias"):
            out[key] = value
        else:
            raise ValueError(f"{path}: model_state: unexpected key {key!r} (not a 2020 voxelmorph VxmDense weight)")
        if not isinstance(value, Tensor):
            raise ValueError(f"{path}: model_state.{key} is not a tensor ({type(value).__name__})")
    return out


def _unet_features(config: Mapping[str, Any], path: Path) -> tuple[list[int], list[int]]:
    """``(enc, dec)`` widths from ``nb_unet_features`` / ``nb_unet_levels`` / ``unet_feat_mult`` (voxelmorph's rule)."""
    feats, levels, mult = config.get("nb_unet_features"), config.get("nb_unet_levels"), config.get("unet_feat_mult", 1)
    if feats is None:
        feats = DEFAULT_UNET_FEATURES
    if isinstance(feats, int):
        if levels is None:
            raise ValueError(f"{path}: config.nb_unet_levels is needed with an integer nb_unet_features")
        widths = [int(round(feats * float(mult) ** i)) for i in range(int(levels))]
        return widths[:-1], widths[::-1]
    if levels is not None:
        raise ValueError(f"{path}: config.nb_unet_levels must be None with a list nb_unet_features; got {levels!r}")
    try:
        enc, dec = feats
        return [int(c) for c in enc], [int(c) for c in dec]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: config.nb_unet_features must be [[encoder widths], [decoder widths]]; got {feats!r}") from exc


def _int_setting(config: Mapping[str, Any], key: str, default: int, path: Path, low: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{path}: config.{key} must be an integer >= {low}; got {value!r}")
    return value


class ReleasedVoxelMorphNet(VoxelMorphNet):
    """A :class:`~learnsim.voxelmorph.VoxelMorphNet` with the weights of an original release network.

    It predicts on tensors in the original loader's axes (:data:`~learnsim.original_convention.NETWORK_AXCODES`);
    inputs on a grid whose axes run ``working_axcodes`` are reoriented exactly on the way in, the velocity on the
    way out (``working_axcodes = NETWORK_AXCODES``: no reorientation, e.g. on :func:`network_grid`). The 2020
    integration commutes with the reorientation (``align_corners=True`` geometry and zeros padding are symmetric),
    so :meth:`integrate` runs on the working axes.

    Attributes:
        inshape: the grid the network was trained on (``config.inshape``).
        source: the file it came from.
    """

    def __init__(self, *, inshape: Sequence[int], source: str, working_axcodes: Sequence[str] = WORKING_AXCODES,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.inshape = tuple(int(n) for n in inshape)
        self.source = source
        self.set_working_axes(working_axcodes)

    def set_working_axes(self, axcodes: Sequence[str]) -> None:
        """The axes of the grid the inputs come on (``("R", "A", "S")`` for learnsim's cohorts)."""
        self.working_axcodes = tuple(axcodes)
        self._to_network = SignedPermutation.between(self.working_axcodes, NETWORK_AXCODES)

    def velocity(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """The velocity ``[B, 3, D, H, W]`` (voxels, working axes) predicted in the network's own axes."""
        to_net = self._to_network
        v = super().velocity(to_net.volume(moving), to_net.volume(fixed))
        return to_net.inverse().field(v)


def network_from_release(state: Mapping[str, Any], path: str | os.PathLike = "<state>",
                         working_axcodes: Sequence[str] = WORKING_AXCODES) -> ReleasedVoxelMorphNet:
    """The learnsim network of an original release VoxelMorph file (``strict=True``), in eval mode."""
    path = Path(path)
    config = state["config"]
    if config.get("use_probs"):
        raise ValueError(f"{path}: config.use_probs=True (a probabilistic flow) is not supported by voxelmorph's "
                         "PyTorch backend nor by learnsim")
    inshape = config.get("inshape")
    if not isinstance(inshape, Sequence) or len(inshape) != 3:
        raise ValueError(f"{path}: config.inshape must be a 3D shape; got {inshape!r}")
    enc, dec = _unet_features(config, path)
    net = ReleasedVoxelMorphNet(
        inshape=inshape, source=str(path), working_axcodes=working_axcodes, enc_features=enc, dec_features=dec,
        half_res=False, no_steps=_int_setting(config, "int_steps", 7, path, 0),
        int_downsize=_int_setting(config, "int_downsize", 2, path, 1), res_level=0, integration="voxelmorph_2020")
    weights = rename_network_keys(state["model_state"], path)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"{path}: model_state does not fit config.nb_unet_features {[enc, dec]}: {detail}") from exc
    return net.eval()


def _metric_features(model: Mapping[str, Tensor], path: Path) -> list[int]:
    """The encoder widths of an original metric state, checked: ``enc.enc.0..N-1`` 3x3x3 convs from 1 channel."""
    n = len([k for k in model if str(k).endswith(".main.weight")])
    widths, cin = [], 1
    for i in range(n):
        w = model.get(f"enc.enc.{i}.main.weight")
        if w is None or f"enc.enc.{i}.main.bias" not in model:
            raise ValueError(f"{path}: model: enc.enc.{i}.main.weight/bias missing (layers must be numbered 0..{n - 1})")
        if tuple(w.shape[1:]) != (cin, 3, 3, 3):
            raise ValueError(f"{path}: model.enc.enc.{i}.main.weight has shape {tuple(w.shape)}; expected "
                             f"[C, {cin}, 3, 3, 3] (the released metrics use s=1)")
        widths.append(int(w.shape[0]))
        cin = widths[-1]
    agg = model.get("agg.weight")
    if not widths or agg is None or tuple(agg.shape) != (1, cin, 1):
        raise ValueError(f"{path}: model.agg.weight must be [1, {cin}, 1] after {len(widths)} encoder layers; got "
                         f"{None if agg is None else tuple(agg.shape)}")
    return widths


def _negative_slope(state: Mapping[str, Any]) -> float:
    """The LeakyReLU slope recorded in the pickled config (0.2, the released configs', when unreadable)."""
    cfg = getattr(state.get("config"), "state", None)
    try:
        return float(cfg["_config"]["model"]["args"]["activation"]["args"]["negative_slope"])
    except (KeyError, TypeError, ValueError):
        return 0.2


def _kernel_to_working(w: Tensor, to_network: SignedPermutation) -> Tensor:
    """A conv kernel ``[O, I, k, k, k]`` made on network axes, rewritten for the working axes.

    ``conv(P x, w) = P conv(x, w')`` with ``w' = P^-1 w`` spatially: the kernel is reoriented like a volume by the
    inverse map (replicate padding commutes with permutations and flips).
    """
    return to_network.inverse().volume(w)


def metric_from_release(state: Mapping[str, Any], path: str | os.PathLike = "<state>",
                        working_axcodes: Sequence[str] = WORKING_AXCODES) -> SimilarityMetric:
    """The learnsim metric of an original learnt-metric checkpoint, for tensors on ``working_axcodes`` axes.

    Its energy equals the original ``CNN_SSD`` (``0.5 sum_mask (a(F) - a(M))^2``) or ``CNN_LCC`` (``-sum_mask
    cross^2 / (var_F var_M + 1e-5)`` in the original's formula, :class:`~learnsim.original_lcc.OriginalLCC`)
    forward pass on the same anatomy in the network's axes.
    """
    from learnsim.original_lcc import OriginalLCC

    path = Path(path)
    model = _metric_state(state)
    if model is None:
        raise ValueError(f"{path}: not an original learnt-metric checkpoint (no model with enc.enc.N.main weights)")
    widths = _metric_features(model, path)
    to_net = SignedPermutation.between(tuple(working_axcodes), NETWORK_AXCODES)
    metric = CNNSSD(True, widths, _negative_slope(state))
    with torch.no_grad():
        for i, conv in enumerate(metric.encoder.convs):
            conv.weight.copy_(_kernel_to_working(model[f"enc.enc.{i}.main.weight"].float(), to_net))
            conv.bias.copy_(model[f"enc.enc.{i}.main.bias"].float())
        metric.encoder.aggregation.weight.copy_(model["agg.weight"].float().view(1, -1, 1, 1, 1))
    if "kernel.weight" in model:
        kernel = model["kernel.weight"].float()
        if tuple(kernel.shape) != (1, 1, 3, 3, 3):
            raise ValueError(f"{path}: model.kernel.weight has shape {tuple(kernel.shape)}; expected [1, 1, 3, 3, 3]")
        metric = OriginalLCC.metric_with(metric, _kernel_to_working(kernel, to_net))
    return metric.eval()


def load_release(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                 working_axcodes: Sequence[str] = WORKING_AXCODES) -> tuple[ReleaseKind, torch.nn.Module, str]:
    """``(kind, module, one-line description)`` of an original release file.

    Raises:
        ValueError: naming the file if it has neither original layout.
    """
    path = Path(path)
    state = read_release_file(path, map_location)
    kind = release_kind(state)
    if kind is None:
        keys = sorted(map(str, state))[:6] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{path}: not a file of the original LearnSim release (neither config + model_state of a "
                         f"VoxelMorph network nor a trainer checkpoint with a CNN_SSD/CNN_LCC model; top level: {keys})")
    if kind is ReleaseKind.NETWORK:
        net = network_from_release(state, path, working_axcodes)
        line = (f"{path}: original release {kind.value} (2020 voxelmorph VxmDense, inshape {list(net.inshape)}, "
                f"features {[net.enc_features, net.dec_features]}, {net.no_steps} squarings on a 1/{net.int_downsize} "
                f"grid, voxelmorph_2020 integration; inputs in the original loader's I-P-R axes)")
        return kind, net, line
    metric = metric_from_release(state, path, working_axcodes)
    line = (f"{path}: original release {kind.value} (features {metric.spec['no_features']}, LeakyReLU "
            f"{metric.spec['negative_slope']:g}; kernels reoriented from the original's I-P-R axes to "
            f"{''.join(working_axcodes)})")
    return kind, metric, line


def is_release_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a readable file in one of the original release layouts (False for anything else)."""
    try:
        return release_kind(read_release_file(path)) is not None
    except (ValueError, FileNotFoundError):
        return False
