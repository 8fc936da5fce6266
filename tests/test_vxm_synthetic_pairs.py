"""On-the-fly training pairs for VoxelMorph (learnsim.data.synthetic_pairs, data.on_the_fly)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from learnsim.data.datamodule import PairDataModule
from learnsim.data.dataset import PairDataset
from learnsim.data.demo import DemoConfig, _Raw, perturb
from learnsim.data.preprocess import Volume
from learnsim.data.synthetic_pairs import StreamSampler, SyntheticPairs, item_seed, perturb_on_grid
from learnsim.voxelmorph import VoxelMorphModule, VoxelMorphNet

N = 16  # grid size (VoxelMorph with 2 levels needs multiples of 4)
HEADER = "fixed,moving,fixed_mask,moving_mask,fixed_seg,moving_seg\n"


def _subject(folder: Path, seed: int, with_seg: bool) -> None:
    """A smooth random 'brain' in a ball, its mask, and (optionally) two labelled blobs; 2 mm RAS voxels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -N
    z, y, x = np.mgrid[:N, :N, :N] - (N - 1) / 2
    r = np.sqrt(x**2 + y**2 + z**2)
    mask = (r < N * 0.4).astype(np.uint8)
    img = ndimage.gaussian_filter(rng.standard_normal((N, N, N)), 2.0) + 0.02 * (N - r)
    img = (img - img.min()) * mask
    nib.save(nib.Nifti1Image(img.astype(np.float32), aff), folder / "t1.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), folder / "mask.nii.gz")
    if with_seg:
        seg = np.zeros((N, N, N), np.int16)
        seg[(r < N * 0.3) & (x < 0)] = 10
        seg[(r < N * 0.3) & (x >= 0)] = 49
        nib.save(nib.Nifti1Image(seg, aff), folder / "seg.nii.gz")


def _row(subj: str, seg: bool) -> str:
    s = f"subjects/{subj}/seg.nii.gz" if seg else ""
    return f"atlas/t1.nii.gz,subjects/{subj}/t1.nii.gz,atlas/mask.nii.gz,subjects/{subj}/mask.nii.gz,atlas/seg.nii.gz,{s}\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """3 train subjects (sources a, b, a), 1 val and 1 test subject (source 'evalsrc'), a manifest naming sources."""
    root = tmp_path_factory.mktemp("cohort")
    _subject(root / "atlas", 0, True)
    train = {"train-00": "a", "train-01": "b", "train-02": "a"}
    for i, sid in enumerate(train):
        _subject(root / "subjects" / sid, 10 + i, False)
    for i, sid in enumerate(("val-00", "test-00")):
        _subject(root / "subjects" / sid, 20 + i, True)
    (root / "train.csv").write_text(HEADER + "".join(_row(s, False) for s in train))
    (root / "val.csv").write_text(HEADER + _row("val-00", True))
    (root / "test.csv").write_text(HEADER + _row("test-00", True))
    vols = [{"id": s, "source": src} for s, src in train.items()]
    vols += [{"id": "val-00", "source": "evalsrc"}, {"id": "test-00", "source": "evalsrc"}]
    (root / "manifest.json").write_text(json.dumps({"volumes": vols}))
    return root


def _stream(root: Path, seed: int = 0, n: int = 4, train_csv: str = "train.csv", **kw) -> SyntheticPairs:
    src = PairDataset(root / train_csv, N)
    forbidden = [PairDataset(root / "val.csv", N), PairDataset(root / "test.csv", N)]
    return SyntheticPairs(src, n, seed=seed, forbidden=forbidden, **kw)


def test_generator_is_deterministic_per_seed(cohort):
    a, b = _stream(cohort, seed=3), _stream(cohort, seed=3)
    later_first = [b[k] for k in (5, 0)]  # order of requests must not matter
    for k, item_b in zip((5, 0), later_first, strict=True):
        item_a = a[k]
        for key in ("moving", "moving_mask", "fixed"):
            assert torch.equal(item_a[key], item_b[key]), (k, key)
        assert item_a["params"] == item_b["params"] and item_a["pair_id"] == item_b["pair_id"]
    # new items are new pairs; another seed gives another stream
    assert not torch.equal(a[0]["moving"], a[1]["moving"])
    assert not torch.equal(a[0]["moving"], _stream(cohort, seed=4)[0]["moving"])
    assert item_seed(3, 0) != item_seed(3, 1) != item_seed(4, 1)
    # the fixed image is the atlas, untouched
    assert torch.equal(a[0]["fixed"], a.atlas.image[0])


def test_generator_is_the_demo_perturbation(cohort):
    """Same draws as learnsim.data.demo.perturb for a volume already on the grid (image, mask and parameters)."""
    ds = PairDataset(cohort / "train.csv", N)
    p = ds._load_moving(ds.records[1])
    cfg = DemoConfig()
    ours, params = perturb_on_grid(p.image, p.mask, None, ds.grid, 123, cfg)
    aff = np.array(ds.grid.affine)
    ref, ref_params = perturb(_Raw(Volume(p.image, aff), Volume(p.mask, aff), None), ds.grid, 123, cfg)
    assert np.abs(ours.image - ref.image).max() < 1e-4
    assert np.array_equal(ours.mask, ref.mask)
    assert params["gamma"] == ref_params["gamma"] and params["bias_strength"] == ref_params["bias_strength"]
    assert np.abs(ours.image - p.image).mean() > 1e-2  # and it did deform / recontrast the source


def test_never_yields_a_test_source_volume(cohort, tmp_path):
    ds = _stream(cohort, n=8)
    train_ids = {r.moving.parent.name for r in ds.source.records}
    test_images = [PairDataset(cohort / f, N)[0]["moving"] for f in ("test.csv", "val.csv")]
    for k in range(6):
        item = ds[k]
        assert item["pair_id"].split("-", 2)[2] in train_ids and 0 <= int(item["source_index"]) < 3
        for t in test_images:
            assert not torch.equal(item["moving"], t)

    # a pair list that reaches a test-source volume is refused: same file, same bytes, or same source volume
    root = tmp_path / "c"
    shutil.copytree(cohort, root)
    (root / "bad_path.csv").write_text(HEADER + _row("train-00", False) + _row("test-00", True))
    with pytest.raises(ValueError, match="moving image of .*test.csv"):
        _stream(root, train_csv="bad_path.csv")
    shutil.copytree(root / "subjects" / "test-00", root / "subjects" / "copy-of-test")
    (root / "bad_bytes.csv").write_text(HEADER + _row("train-00", False) + _row("copy-of-test", True))
    with pytest.raises(ValueError, match="bytes of"):
        _stream(root, train_csv="bad_bytes.csv")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["volumes"][1]["source"] = "evalsrc"  # train-01 made from the test subjects' volume
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="source volume 'evalsrc'"):
        _stream(root)


def test_stream_sampler_gives_each_epoch_new_items():
    s = StreamSampler(4)
    assert list(s) == [0, 1, 2, 3] and list(s) == [4, 5, 6, 7]
    epoch = [5]
    ranks = [list(StreamSampler(3, r, 2, epoch_fn=lambda: epoch[0])) for r in range(2)]
    assert ranks == [[30, 32, 34], [31, 33, 35]]  # disjoint across ranks, resumable from the trainer's epoch


def test_datamodule_on_the_fly_train_fixed_val_test(cohort):
    dm = PairDataModule(cohort / "train.csv", cohort / "val.csv", cohort / "test.csv", dims=N, batch_size=2,
                        on_the_fly=True, items_per_epoch=2, seed=1, intensity="histmatch")
    dm.setup("fit")
    dm.setup("test")
    assert isinstance(dm.train_set, SyntheticPairs) and isinstance(dm.val_set, PairDataset)
    loader = dm.train_dataloader()
    e0, e1 = next(iter(loader)), next(iter(loader))
    assert e0["index"].tolist() == [0, 1] and e1["index"].tolist() == [2, 3]
    assert e0["moving"].shape == (2, 1, N, N, N) and not bool(e0["has_seg"].any())
    val = next(iter(dm.val_dataloader()))
    assert val["pair_id"] == ["val-00"] and bool(val["has_seg"][0])
    assert [b["pair_id"][0] for b in dm.test_dataloader()] == ["test-00"]


def test_one_training_step_on_generated_pairs_lowers_the_loss(cohort):
    torch.manual_seed(0)
    ds = _stream(cohort, n=2, intensity="histmatch")
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    net = VoxelMorphNet((8, 8), (8, 8, 8), half_res=True, no_steps=5, int_downsize=2)
    module = VoxelMorphModule(net, dims=(N, N, N), lr=1e-3)
    module.metric.energy.weight = 100.0  # the demo's SSD precision: the data term dominates at the start
    opt = module.configure_optimizers()
    loss = module._step(batch)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    loss0 = loss.item()
    with torch.no_grad():
        loss1 = module._step(batch)[0].item()
    assert loss1 < loss0 * (1 - 1e-3), (loss0, loss1)


def test_atlas_fraction_deforms_the_atlas_with_its_labels(cohort):
    ds = _stream(cohort, seed=0, atlas_fraction=0.5)
    items = [ds[k] for k in range(6)]
    atlas = [it for it in items if int(it["source_index"]) == -1]
    assert 0 < len(atlas) < len(items)  # both kinds in a short stream (seeded: fixed counts)
    for it in atlas:
        assert it["pair_id"].endswith("-atlas") and bool(it["has_seg"])
        assert not torch.equal(it["moving"], it["fixed"])  # deformed, recontrasted
        assert set(torch.unique(it["moving_seg"]).tolist()) <= {0, 10, 49}
    assert all(int(it["source_index"]) >= 0 for it in (_stream(cohort, seed=0)[k] for k in range(6)))
    with pytest.raises(ValueError, match="atlas_fraction"):
        _stream(cohort, atlas_fraction=1.5)


def test_loader_workers_start_clean_after_parallel_kernels(cohort):
    """A worker started after the parent ran a parallel kernel still generates pairs: workers are spawned, not
    forked (a forked worker inherits GNU OpenMP's pool state and hangs in its first parallel region)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch
        from learnsim import spatial
        from learnsim.data.datamodule import PairDataModule
        spatial.integrate_svf(torch.randn(1, 3, 24, 24, 24), 6)  # the parent's thread pools are running now
        dm = PairDataModule({str(cohort / 'train.csv')!r}, {str(cohort / 'val.csv')!r}, {str(cohort / 'test.csv')!r},
                            dims={N}, batch_size=1, on_the_fly=True, items_per_epoch=2, num_workers=1)
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert loader.multiprocessing_context.get_start_method() == "spawn"
        batch = next(iter(loader))
        assert batch["moving"].shape == (1, 1, {N}, {N}, {N})
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
