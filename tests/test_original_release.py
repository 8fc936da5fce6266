"""The original release's files (issue 25): loaded strictly, equal to independent re-statements of the original code.

No released weights are used: files are constructed here in exactly the original layouts, with random weights. The
re-statements below follow the old code's own steps (voxelmorph's PyTorch ``VxmDense`` before January 2021:
``Unet``, ``ResizeTransform``, ``VecInt``, ``SpatialTransformer``; the original LearnSim ``CNN_SSD`` / ``CNN_LCC``,
``SSD`` / ``LCC`` data losses and its data loader), written in plain PyTorch, independently of learnsim's code.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import learnsim
from learnsim.original_convention import NETWORK_AXCODES, SignedPermutation, network_grid
from learnsim.original_release import load_release
from learnsim.vxm2020_integration import integrate_vxm2020

ENC, DEC = (4, 8, 8, 8), (8, 8, 8, 8, 8, 4, 4)
SHAPE = (32, 32, 32)


# ------------------------------------------------------------------------------------------ the old voxelmorph
def _conv_state(gen: torch.Generator, cout: int, cin: int, scale: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(cout, cin, 3, 3, 3, generator=gen) * scale / (cin * 27) ** 0.5 * 2
    return w, torch.randn(cout, generator=gen) * 0.05


def vxm_file_state(seed: int = 0, inshape=SHAPE, int_steps: int = 7, int_downsize: int = 2) -> dict:
    """``{"config", "model_state"}`` of a 2020 voxelmorph VxmDense, random weights (a flow of a few voxels)."""
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    prev, hist = 2, [2]
    for i, nf in enumerate(ENC):
        state[f"unet_model.downarm.{i}.main.weight"], state[f"unet_model.downarm.{i}.main.bias"] = _conv_state(gen, nf, prev)
        prev = nf
        hist.append(nf)
    enc_history = list(reversed(ENC))
    for i, nf in enumerate(DEC[: len(ENC)]):
        cin = prev + enc_history[i] if i > 0 else prev
        state[f"unet_model.uparm.{i}.main.weight"], state[f"unet_model.uparm.{i}.main.bias"] = _conv_state(gen, nf, cin)
        prev = nf
    prev += 2
    for i, nf in enumerate(DEC[len(ENC):]):
        state[f"unet_model.extras.{i}.main.weight"], state[f"unet_model.extras.{i}.main.bias"] = _conv_state(gen, nf, prev)
        prev = nf
    state["flow.weight"], state["flow.bias"] = _conv_state(gen, 3, prev, scale=30.0)
    config = {"flow_log_sigma_bias": -5, "use_probs": False, "bidir": False, "int_downsize": int_downsize,
              "int_steps": int_steps, "unet_feat_mult": 1, "nb_unet_levels": None,
              "nb_unet_features": [ENC, DEC], "inshape": inshape}
    return {"config": config, "model_state": state}


def old_spatial_transformer(src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """voxelmorph's 2020 ``SpatialTransformer``: voxel grid + flow, normalised per axis, channels reversed,
    ``grid_sample(align_corners=True)`` with its default zeros padding."""
    shape = flow.shape[2:]
    vectors = [torch.arange(0, s) for s in shape]
    grid = torch.stack(torch.meshgrid(vectors, indexing="ij")).unsqueeze(0).float().to(flow.dtype)
    new_locs = grid + flow
    new_locs = torch.stack([2 * (new_locs[:, i] / (shape[i] - 1) - 0.5) for i in range(3)], dim=1)
    new_locs = new_locs.permute(0, 2, 3, 4, 1)[..., [2, 1, 0]]
    return F.grid_sample(src, new_locs, align_corners=True, mode="bilinear")


def old_vxm_forward(file_state: dict, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flow_field, pos_flow)`` of the 2020 ``VxmDense.forward(source, target, registration=True)``."""
    w, cfg = file_state["model_state"], file_state["config"]
    enc_nf, dec_nf = cfg["nb_unet_features"]

    def block(x, name, stride=1):
        return F.leaky_relu(F.conv3d(x, w[f"{name}.main.weight"], w[f"{name}.main.bias"], stride, 1), 0.2)

    x_enc = [torch.cat([source, target], dim=1)]
    for i in range(len(enc_nf)):
        x_enc.append(block(x_enc[-1], f"unet_model.downarm.{i}", stride=2))
    x = x_enc.pop()
    for i in range(len(enc_nf)):
        x = F.interpolate(block(x, f"unet_model.uparm.{i}"), scale_factor=2, mode="nearest")
        x = torch.cat([x, x_enc.pop()], dim=1)
    for i in range(len(dec_nf) - len(enc_nf)):
        x = block(x, f"unet_model.extras.{i}")
    flow_field = F.conv3d(x, w["flow.weight"], w["flow.bias"], padding=1)
    f, steps = cfg["int_downsize"], cfg["int_steps"]
    pos = F.interpolate(flow_field, align_corners=True, scale_factor=1.0 / f, mode="trilinear") * (1.0 / f)
    pos = pos * (1.0 / 2**steps)  # VecInt
    for _ in range(steps):
        pos = pos + old_spatial_transformer(pos, pos)
    pos = F.interpolate(f * pos, align_corners=True, scale_factor=f, mode="trilinear")
    return flow_field, pos


def _pair(seed: int = 1, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    smooth = lambda x: F.avg_pool3d(x, 5, 1, 2)  # noqa: E731
    return smooth(torch.rand(1, 1, *shape, generator=gen)), smooth(torch.rand(1, 1, *shape, generator=gen))


# ------------------------------------------------------------------------------------------ networks
def test_network_loads_strictly_and_matches_the_old_forward_pass(tmp_path):
    state = vxm_file_state()
    torch.save(state, tmp_path / "checkpoint_VXM_SSD_learnt.pt")
    net = learnsim.load_network(tmp_path / "checkpoint_VXM_SSD_learnt.pt", verbose=False)
    assert net.integration == "voxelmorph_2020" and net.no_steps == 7 and net.int_downsize == 2
    net.set_working_axes(NETWORK_AXCODES)  # tensors already in the network's axes
    moving, fixed = _pair()
    with torch.no_grad():
        v, disp = net(moving, fixed)
        v_old, disp_old = old_vxm_forward(state, moving, fixed)
    assert float(disp_old.abs().max()) > 2.0  # a real deformation, not a near-identity
    torch.testing.assert_close(v, v_old, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(disp, disp_old, atol=1e-4, rtol=1e-4)
    # learnsim's own geometry (65^3-style grid, 64/127-style factors, border padding) is measurably different
    net.integration = "learnsim"
    with torch.no_grad():
        assert float((net(moving, fixed)[1] - disp_old).abs().max()) > 1e-2


def test_network_on_ras_tensors_is_the_old_forward_pass_reoriented(tmp_path):
    state = vxm_file_state(seed=3)
    torch.save(state, tmp_path / "net.pt")
    net = learnsim.load_network(tmp_path / "net.pt", verbose=False)  # working axes R, A, S by default
    moving, fixed = _pair(seed=4)
    to_net = SignedPermutation.between(("R", "A", "S"), NETWORK_AXCODES)
    with torch.no_grad():
        v, disp = net(moving, fixed)
        v_old, disp_old = old_vxm_forward(state, to_net.volume(moving), to_net.volume(fixed))
    back = to_net.inverse()
    torch.testing.assert_close(v, back.field(v_old), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(disp, back.field(disp_old), atol=1e-4, rtol=1e-4)


def test_vxm2020_integration_without_downsizing_and_without_steps():
    v = 3.0 * F.avg_pool3d(torch.randn(1, 3, 16, 16, 16), 5, 1, 2)
    u = v / 2**5
    for _ in range(5):
        u = u + old_spatial_transformer(u, u)
    torch.testing.assert_close(integrate_vxm2020(v, 5, 1), u, atol=1e-5, rtol=1e-5)
    assert integrate_vxm2020(v, 0, 2) is v
    with pytest.raises(ValueError, match="not divisible"):
        integrate_vxm2020(torch.zeros(1, 3, 15, 16, 16), 3, 2)


def test_signed_permutation_moves_fields_consistently():
    from learnsim.spatial import warp

    p = SignedPermutation.between(("R", "A", "S"), ("I", "P", "R"))
    img = torch.rand(1, 1, 6, 7, 8)
    u = torch.randn(1, 3, 6, 7, 8)
    # warping commutes with the reorientation when the field's components are mapped too
    torch.testing.assert_close(p.volume(warp(img, u)), warp(p.volume(img), p.field(u)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.inverse().field(p.field(u)), u)


# ------------------------------------------------------------------------------------------ refusals
def test_other_layouts_are_refused_naming_the_file(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: .*not a file of the original LearnSim release"):
        load_release(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt"):
        learnsim.load_network(tmp_path / "other.pt", verbose=False)
    with pytest.raises(ValueError, match=r"other\.pt"):
        learnsim.load_metric(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.pt: cannot be read"):
        learnsim.load_network(tmp_path / "text.pt", verbose=False)


def test_a_network_file_with_a_foreign_key_or_shape_is_refused(tmp_path):
    state = vxm_file_state()
    state["model_state"]["unet_model.extra.0.main.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad_key.pt")
    with pytest.raises(ValueError, match=r"bad_key\.pt: model_state: unexpected key 'unet_model\.extra\.0"):
        learnsim.load_network(tmp_path / "bad_key.pt", verbose=False)
    state = vxm_file_state()
    state["config"]["nb_unet_features"] = [ENC, (*DEC[:-1], 5)]
    torch.save(state, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match=r"bad_shape\.pt: model_state does not fit config\.nb_unet_features"):
        learnsim.load_network(tmp_path / "bad_shape.pt", verbose=False)
    state = vxm_file_state()
    state["config"]["use_probs"] = True
    torch.save(state, tmp_path / "probs.pt")
    with pytest.raises(ValueError, match=r"probs\.pt: config\.use_probs"):
        learnsim.load_network(tmp_path / "probs.pt", verbose=False)


def test_a_network_is_not_a_metric_and_a_metric_not_a_network(tmp_path):
    torch.save(vxm_file_state(), tmp_path / "net.pt")
    _save_metric_checkpoint(tmp_path / "metric.pt", _metric_state(lcc=False))
    with pytest.raises(ValueError, match=r"net\.pt: .*VoxelMorph network, not a learnt metric"):
        learnsim.load_metric(tmp_path / "net.pt")
    with pytest.raises(ValueError, match=r"metric\.pt: an original release CNN_SSD learnt metric, not a network"):
        learnsim.load_network(tmp_path / "metric.pt", verbose=False)


# ------------------------------------------------------------------------------------------ learnt metrics
def _metric_state(lcc: bool, seed: int = 0, features=(4, 8, 8)) -> OrderedDict:
    """The original CNN_SSD / CNN_LCC ``state_dict()`` with random weights (a learnt, asymmetric kernel for LCC)."""
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    cin = 1
    for i, c in enumerate(features):
        state[f"enc.enc.{i}.main.weight"] = torch.randn(c, cin, 3, 3, 3, generator=gen) * 0.3
        state[f"enc.enc.{i}.main.bias"] = torch.randn(c, generator=gen) * 0.1
        cin = c
    state["agg.weight"] = torch.rand(1, cin, 1, generator=gen) + 0.5
    if lcc:
        state["kernel.weight"] = torch.rand(1, 1, 3, 3, 3, generator=gen) + 0.5
    return state


def _save_metric_checkpoint(path, model_state: OrderedDict) -> None:
    """The original trainer's checkpoint dict, with a pickled ``parse_config.ConfigParser`` (a class this
    environment cannot import), paths and a logger in it, as ``torch.save(state)`` of the original wrote it."""
    mod = types.ModuleType("parse_config")

    class ConfigParser:  # the original's config object: only its pickled form matters
        pass

    ConfigParser.__module__, ConfigParser.__qualname__ = "parse_config", "ConfigParser"
    mod.ConfigParser = ConfigParser
    sys.modules["parse_config"] = mod
    try:
        cfg = ConfigParser()
        cfg._config = {"model": {"type": "CNN_LCC", "args": {"activation": {"type": "LeakyReLU",
                                                                             "args": {"negative_slope": 0.2}}}}}
        cfg._save_dir, cfg._logger = pathlib.PosixPath("saved/LCC/model/checkpoints"), logging.getLogger("default")
        torch.save({"epoch": 50, "step": 1234, "config": cfg, "q_f": {"loc": torch.zeros(1, 1, 4, 4, 4)},
                    "model": model_state, "optimizer_q_f": {"state": {}, "param_groups": []},
                    "optimizer_q_phi": {"state": {}, "param_groups": []}}, path)
    finally:
        del sys.modules["parse_config"]


def old_feature_extraction(w: OrderedDict, im_fixed: torch.Tensor, im_moving: torch.Tensor):
    """The original ``BaseModel.feature_extraction``: ConvBlocks (replicate padding, LeakyReLU 0.2), then the 1x1
    ``Conv1d`` aggregation on the flattened voxels."""
    def enc(x):
        i = 0
        while f"enc.enc.{i}.main.weight" in w:
            x = F.leaky_relu(F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), w[f"enc.enc.{i}.main.weight"],
                                      w[f"enc.enc.{i}.main.bias"]), 0.2)
            i += 1
        n, c, d, h, ww = x.shape
        return F.conv1d(x.view(n, c, -1), w["agg.weight"]).view(n, 1, d, h, ww)

    return enc(im_fixed), enc(im_moving)


def old_energy(w: OrderedDict, im_fixed, im_moving, mask) -> torch.Tensor:
    """``SSD(CNN_SSD(...))`` = 0.5 sum z[mask] or ``LCC(CNN_LCC(...))`` = -sum z[mask] of the original."""
    z_f, z_m = old_feature_extraction(w, im_fixed, im_moving)
    if "kernel.weight" not in w:
        return 0.5 * torch.sum(((z_f - z_m) ** 2)[mask])
    k = w["kernel.weight"]

    def kernel(x):
        return F.conv3d(F.pad(x, (1,) * 6, mode="replicate"), k)

    sz = 27.0
    u_f, u_m = kernel(z_f) / sz, kernel(z_m) / sz
    cross = kernel((z_f - u_f) * (z_m - u_m))
    var_f, var_m = kernel((z_f - u_f) ** 2), kernel((z_m - u_m) ** 2)
    z = cross * cross / (var_f * var_m + 1e-5)
    return -1.0 * torch.sum(z[mask])


@pytest.mark.parametrize("lcc", [False, True])
def test_learnt_metric_energy_equals_the_original_forward_pass(tmp_path, lcc):
    w = _metric_state(lcc, seed=5)
    _save_metric_checkpoint(tmp_path / "checkpoint_50.pt", w)
    fixed, moving = _pair(seed=6, shape=(10, 12, 14))
    mask = torch.rand(1, 1, 10, 12, 14, generator=torch.Generator().manual_seed(7)) > 0.3
    to_net = SignedPermutation.between(("R", "A", "S"), NETWORK_AXCODES)
    expected = old_energy(w, to_net.volume(fixed), to_net.volume(moving), to_net.volume(mask))
    metric = learnsim.load_metric(tmp_path / "checkpoint_50.pt")  # for RAS tensors: kernels reoriented
    assert metric.spec["kind"] == ("cnn_lcc" if lcc else "cnn_ssd")
    with torch.no_grad():
        got = metric(fixed, moving, mask.float())
    torch.testing.assert_close(got, expected.view(1), rtol=1e-5, atol=1e-5)
    # the same weights without reorienting the kernels give another energy: the reorientation matters
    _, raw, _ = load_release(tmp_path / "checkpoint_50.pt", working_axcodes=NETWORK_AXCODES)
    with torch.no_grad():
        torch.testing.assert_close(raw(to_net.volume(fixed), to_net.volume(moving), to_net.volume(mask).float()),
                                   expected.view(1), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(raw(fixed, moving, mask.float()), expected.view(1), rtol=1e-3)


def test_learnsim_lcc_is_not_the_original_formula():
    """learnsim's LCC centres each window by its own mean; the original centres each voxel first: the original
    metric needs its own energy (learnsim.original_lcc), even with a window of ones."""
    from learnsim.energies import lcc

    w = _metric_state(True)
    w["kernel.weight"] = torch.ones(1, 1, 3, 3, 3)
    f, m = _pair(seed=8, shape=(8, 8, 8))
    mask = torch.ones(1, 1, 8, 8, 8, dtype=torch.bool)
    z_f, z_m = old_feature_extraction(w, f, m)
    assert not torch.allclose(lcc(z_f, z_m), old_energy(w, f, m, mask).view(1), rtol=1e-3)


# ------------------------------------------------------------------------------------------ input convention
def old_loader_image(data_xyz: np.ndarray, dims) -> torch.Tensor:
    """The original loader on an image stored LAS: SimpleITK array ``[k, j, i]``, all axes flipped (reversed flat
    array), symmetric zero padding ``(max - n) // 2``, trilinear ``align_corners=True`` resize, min-max."""
    im = torch.from_numpy(np.ascontiguousarray(data_xyz.transpose(2, 1, 0))).float()[None, None]
    im = torch.flipud(im.reshape(-1)).reshape(im.shape)
    padding = (max(im.shape) - np.asarray(im.shape)) // 2
    im = F.pad(im, (*(int(padding[4]),) * 2, *(int(padding[3]),) * 2, *(int(padding[2]),) * 2), mode="constant")
    im = F.interpolate(im, size=dims, mode="trilinear", align_corners=True)
    return (im - im.min()) / (im.max() - im.min())


@pytest.mark.parametrize("stored", ["LAS", "RAS", "PSL"])
def test_network_grid_reproduces_the_original_loader_in_any_orientation(stored):
    import nibabel as nib

    from learnsim.data.preprocess import Volume, preprocess

    shape_las = (12, 17, 9)  # odd deficits: the original pads one voxel short of a cube
    data_las = np.random.default_rng(0).random(shape_las).astype(np.float32) + 1.0
    aff_las = np.diag([-1.5, 1.5, 1.5, 1.0])
    aff_las[:3, 3] = [10.0, -20.0, 5.0]
    expected = old_loader_image(data_las, (16, 16, 16))
    # the same anatomy stored another way
    xform = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt(tuple("LAS")),
                                            nib.orientations.axcodes2ornt(tuple(stored)))
    data = nib.orientations.apply_orientation(data_las, xform)
    aff = aff_las @ nib.orientations.inv_ornt_aff(xform, shape_las)
    grid = network_grid(data.shape, aff, (16, 16, 16))
    got = preprocess(Volume(np.ascontiguousarray(data), aff, "image"), grid, apply_mask=False).image
    torch.testing.assert_close(torch.from_numpy(got)[None, None], expected, atol=1e-5, rtol=1e-5)
    assert "".join(nib.aff2axcodes(grid.affine)) == "IPR"


# ------------------------------------------------------------------------------------------ NIfTI files, CLI
def _phantom_pair(folder, shape, affine) -> tuple[str, str, str]:
    """A fixed / moving image (smooth blobs, brain-like zero background) and the moving labels, as NIfTI."""
    from learnsim.io import save_nifti

    gen = torch.Generator().manual_seed(11)
    vols = []
    for _ in range(2):
        x = F.avg_pool3d(torch.rand(1, 1, *shape, generator=gen), 7, 1, 3)[0, 0].numpy()
        x[:3], x[-3:], x[:, :3], x[:, -3:] = 0, 0, 0, 0
        vols.append(x.astype(np.float32))
    seg = (vols[1] > np.median(vols[1][vols[1] > 0])).astype(np.int16) * 7
    paths = [str(folder / n) for n in ("fixed.nii.gz", "moving.nii.gz", "seg.nii.gz")]
    for p, v in zip(paths, [*vols, seg], strict=True):
        save_nifti(p, v, affine)
    return paths[0], paths[1], paths[2]


def test_register_with_network_equals_the_original_pipeline_on_las_files(tmp_path):
    """LAS files of the network's size: the original loader is a flip of all axes, so the displacement on the fixed
    grid is the old forward pass on the loader's tensors, flipped back (components negated)."""
    import nibabel as nib

    from learnsim.network_registration import open_network, register_with_network

    state = vxm_file_state(seed=2)
    torch.save(state, tmp_path / "net.pt")
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    fixed, moving, _ = _phantom_pair(tmp_path, SHAPE, affine)
    res = register_with_network(fixed, moving, open_network(tmp_path / "net.pt"))
    load = lambda p: old_loader_image(np.asarray(nib.load(p).dataobj, dtype=np.float32), SHAPE)  # noqa: E731
    with torch.no_grad():
        _, disp_old = old_vxm_forward(state, load(moving), load(fixed))
    # loader tensor [a, b, c] is stored voxel [X-1-c, Y-1-b, Z-1-a]: axes I, P, R of an L, A, S file
    back = SignedPermutation.between(NETWORK_AXCODES, ("L", "A", "S"))
    assert float(disp_old.abs().max()) > 1.0
    torch.testing.assert_close(res.disp, back.field(disp_old), atol=2e-4, rtol=1e-4)
    assert res.warped.shape[2:] == SHAPE and np.allclose(res.affine, affine)


def test_learnsim_register_with_a_network_file(tmp_path):
    """``learnsim-register --network`` on an original-layout file: outputs on the fixed grid (non-cubic, RAS),
    the time per pair recorded, q_v settings refused."""
    import json

    import nibabel as nib

    from learnsim.cli.register import main

    torch.save(vxm_file_state(seed=4), tmp_path / "checkpoint_VXM_SSD_learnt.pt")
    shape = (30, 34, 26)
    affine = np.diag([1.7, 1.7, 1.7, 1.0])
    fixed, moving, seg = _phantom_pair(tmp_path, shape, affine)
    out = tmp_path / "out"
    argv = [fixed, moving, "--network", str(tmp_path / "checkpoint_VXM_SSD_learnt.pt"), "--out", str(out), "--seg", seg,
            "--fixed-seg", seg, "--no-figures", "instance_optimisation_iters=2", "device=cpu"]
    assert main(argv) == 0
    info = json.loads((out / "registration.json").read_text())
    assert info["fit_seconds"] > 0 and "dsc_after" in info
    assert info["metric"].endswith("2 steps of ssd")  # refined with the metric the file name says
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == shape and np.allclose(warped.affine, affine)
    assert nib.load(out / "disp_mm.nii.gz").shape == (*shape, 3)
    with pytest.raises(SystemExit, match="q_v settings do not apply"):
        main([*argv[:6], "--overwrite", "no_iters=5"])


@pytest.mark.parametrize("kind", ["network", "metric"])
def test_learnsim_test_evaluates_an_original_release_file(cfg_test, tmp_path, kind):
    """``learnsim-test ckpt=<original file>`` on a cohort: a network predicts each pair; a learnt metric runs q_v."""
    from omegaconf import OmegaConf

    from learnsim.cli.test import evaluate

    path = tmp_path / f"{kind}.pt"
    if kind == "network":
        torch.save(vxm_file_state(seed=6), path)
    else:
        _save_metric_checkpoint(path, _metric_state(lcc=True))
    OmegaConf.update(cfg_test, "ckpt", str(path), force_add=True)
    summary = evaluate(cfg_test, tmp_path / "run")
    assert summary["n_pairs"] == 1 and summary["overall"]["dsc"]["n"] > 0
    assert any("original release" in note for note in summary["notes"])


def test_learnsim_register_with_a_learnsim_voxelmorph_checkpoint(tmp_path, capsys):
    """``--network`` also takes learnsim's own VoxelMorph checkpoints: its grid (RAS cube of its dims), its metric,
    and its training run's intensity handling (histmatch here)."""
    import lightning.pytorch as pl
    import nibabel as nib
    from torch.utils.data import DataLoader

    from learnsim.cli.register import main
    from learnsim.metric import build_metric
    from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

    module = VoxelMorphModule(VoxelMorphNet(ENC, DEC, no_steps=4, int_downsize=2), metric=build_metric("ssd"), dims=SHAPE)
    module.run_config = {"data": {"intensity": "histmatch"}}
    fixed_t, moving_t = _pair(seed=9)
    batch = {"fixed": fixed_t[0], "moving": moving_t[0], "fixed_mask": torch.ones(1, *SHAPE)}
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=1))
    trainer.save_checkpoint(tmp_path / "vxm.ckpt")
    shape, affine = (30, 34, 26), np.diag([1.7, 1.7, 1.7, 1.0])
    fixed, moving, seg = _phantom_pair(tmp_path, shape, affine)
    out = tmp_path / "out"
    assert main([fixed, moving, "--network", str(tmp_path / "vxm.ckpt"), "--out", str(out), "--no-figures"]) == 0
    printed = capsys.readouterr().out
    assert "learnsim VoxelMorph network" in printed and "histmatch" in printed
    assert nib.load(out / "warped.nii.gz").shape == shape


def test_learnsim_register_with_an_original_metric_file(tmp_path):
    """``learnsim-register --metric <original CNN_LCC file>``: q_v with the released metric (its energy: LCC)."""
    import json

    from learnsim.cli.register import main

    _save_metric_checkpoint(tmp_path / "checkpoint_50.pt", _metric_state(lcc=True))
    fixed, moving, _ = _phantom_pair(tmp_path, (20, 22, 18), np.diag([2.0, 2.0, 2.0, 1.0]))
    out = tmp_path / "out"
    assert main([fixed, moving, "--metric", str(tmp_path / "checkpoint_50.pt"), "--out", str(out), "--no-figures",
                 "levels=1", "no_iters=2", "no_samples=2", "dims=16"]) == 0
    info = json.loads((out / "registration.json").read_text())
    assert info["q_v_levels"] == [2] and info["q_v_level_lr"] == [0.02]  # the paper's LCC rate (SSD: 0.01)


def test_field_to_grid_keeps_the_map_in_world_space():
    """A displacement carried to another grid moves every world point the same way: a linear field
    ``u(x) = B x + c`` on the source grid, read on a permuted, flipped, rescaled target grid, is exact there."""
    from learnsim.grid import Grid
    from learnsim.network_registration import field_to_grid
    from learnsim.spatial import identity_grid

    src = Grid((12, 12, 12), np.diag([2.0, 2.0, 2.0, 1.0]))
    tgt_aff = np.array([[0.0, -1.5, 0.0, 15.0], [1.5, 0.0, 0.0, 3.0], [0.0, 0.0, 1.5, 4.0], [0.0, 0.0, 0.0, 1.0]])
    tgt = Grid((9, 10, 11), tgt_aff)
    b, c = torch.tensor([[0.05, 0.0, 0.02], [0.0, -0.03, 0.0], [0.01, 0.0, 0.04]]), torch.tensor([0.5, -1.0, 0.25])
    b, c = b.double(), c.double()
    u_src = torch.einsum("ij,bjdhw->bidhw", b, identity_grid(src.shape, dtype=torch.float64)) + c.view(1, 3, 1, 1, 1)
    u_tgt = field_to_grid(u_src, src, tgt)
    # expected: world displacement A_src_lin u_src(y), y = A_src^-1 A_tgt x, in target voxels
    x = identity_grid(tgt.shape, dtype=torch.float64)
    m = torch.from_numpy(np.linalg.solve(src.affine, tgt.affine))
    y = torch.einsum("ij,bjdhw->bidhw", m[:3, :3], x) + m[:3, 3].view(1, 3, 1, 1, 1)
    u_y = torch.einsum("ij,bjdhw->bidhw", b, y) + c.view(1, 3, 1, 1, 1)
    lin = torch.from_numpy(np.linalg.solve(tgt.affine[:3, :3], src.affine[:3, :3]))
    expected = torch.einsum("ij,bjdhw->bidhw", lin, u_y)
    inside = ((y >= 0) & (y <= 11)).all(dim=1, keepdim=True).expand_as(expected)  # border values beyond the grid
    assert bool(inside.any())
    torch.testing.assert_close(u_tgt[inside], expected[inside], atol=1e-9, rtol=1e-9)
