"""CUDA checks (skipped without a GPU): the device path computes what the CPU path computes."""

import pytest
import torch

from learnsim.energies import lcc, ssd
from learnsim.metric import build_metric
from learnsim.spatial import gaussian_smooth, integrate_svf, warp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _inputs(shape=(24, 28, 32)):
    g = torch.Generator().manual_seed(0)
    v = gaussian_smooth(torch.randn(2, 3, *shape, generator=g), 2.0) * 4
    img = gaussian_smooth(torch.rand(2, 1, *shape, generator=g), 1.0)
    return v, img


def test_integration_and_warp_match_cpu():
    v, img = _inputs()
    cpu = warp(img, integrate_svf(v, 12))
    gpu = warp(img.cuda(), integrate_svf(v.cuda(), 12)).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)


@pytest.mark.parametrize("kind", ["cnn_ssd", "cnn_lcc"])
def test_learnt_metric_energy_matches_cpu_and_bf16_stays_close(kind):
    _, img = _inputs()
    torch.manual_seed(0)
    metric = build_metric(kind)
    f, m = img[:1], img[1:]
    cpu = metric(f, m)
    metric = metric.cuda()
    gpu = metric(f.cuda(), m.cuda()).cpu()
    assert torch.allclose(cpu, gpu, rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = metric(f.cuda(), m.cuda()).float().cpu()
    assert torch.allclose(cpu, low, rtol=5e-2)


def test_plain_energies_on_cuda():
    _, img = _inputs()
    f, m = img[:1], img[1:]
    assert torch.allclose(ssd(f, m), ssd(f.cuda(), m.cuda()).cpu(), rtol=1e-5)
    assert torch.allclose(lcc(f, m), lcc(f.cuda(), m.cuda()).cpu(), rtol=1e-4)
