"""learnsim's optimised q_v loss equals the plain re-statement of the original pipeline (learnsim.reference).

Same random draws on both sides: ``VariationalRegistration.loss`` is run with a seeded generator, and its draws
are replayed from a copy of the generator's state in the order learnsim makes them
(``antithetic_samples``: eps ``[B, 3, D, H, W]`` then xi ``[B, r]``; then, when training, the uniform noise as two
``[B, 3, D, H, W]`` draws, one per antithetic half). ``test_draw_order`` pins that order down so that a change
there fails loudly and by name rather than as a loss mismatch.
"""

from __future__ import annotations

import sys

import pytest
import torch

from learnsim.distributions import LowRankParams, antithetic_samples
from learnsim.energies import RegLossL2
from learnsim.metric import build_metric
from learnsim.reference import reference_entropy, reference_q_v_terms
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth
from learnsim.transformation import SVF

SHAPE = (16, 20, 24)  # non-cubic: catches a channel-order slip
B = 2
NO_STEPS = 12
NOISE = 0.1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny grids: one intra-op thread is enough, and it keeps these tests fast on a shared machine (two
    OpenMP threads next to another busy process ran them ~10x slower in CPU time here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images():
    g = torch.Generator().manual_seed(0)
    norm = lambda x: (x - x.amin()) / (x.amax() - x.amin())  # noqa: E731
    fixed = norm(gaussian_smooth(torch.rand(1, 1, *SHAPE, generator=g), 0.7))
    moving = torch.cat([norm(gaussian_smooth(torch.rand(1, 1, *SHAPE, generator=g), 0.7)) for _ in range(B)])
    mask = torch.ones_like(fixed)
    mask[..., :2, :, :] = 0
    mask[..., -3:] = 0
    return fixed, moving, mask


def _params(rank: int = 1) -> LowRankParams:
    """A q_v away from its initialisation: a smooth mean of a few voxels, varied sigma and u."""
    g = torch.Generator().manual_seed(1)
    mu = gaussian_smooth(torch.randn(B, 3, *SHAPE, generator=g), 0.7) * 3.0
    log_var = 2.0 * torch.log(torch.tensor(0.5)) + 0.3 * torch.randn(B, 3, *SHAPE, generator=g)
    u = 0.1 + 0.05 * torch.randn(B, rank, 3, *SHAPE, generator=g)
    return LowRankParams(mu, log_var, u)


def _metric(kind: str):
    metric = build_metric(kind)
    if metric.encoder is not None:
        # off the Dirac init, so the features are not (almost) the identity and the check is not trivial
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in metric.encoder.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    metric.eval()
    for p in metric.parameters():
        p.requires_grad_(False)
    return metric


def _replay(state: torch.Tensor, rank: int, training: bool, dtype: torch.dtype = torch.float32):
    g = torch.Generator()
    g.set_state(state)
    eps = torch.randn((B, 3, *SHAPE), generator=g, dtype=dtype)
    xi = torch.randn((B, rank), generator=g, dtype=dtype)
    noise = None
    if training:
        halves = [torch.rand((B, 3, *SHAPE), generator=g, dtype=dtype) for _ in range(2)]
        noise = (torch.stack(halves) * 2 - 1) * NOISE
    return eps, xi, noise


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_draw_order():
    p = _params()
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    s1, s2 = antithetic_samples(p, g)
    eps, xi, _ = _replay(state, 1, training=False)
    pert = torch.exp(0.5 * p.log_var) * eps + (xi.view(B, 1, 1, 1, 1, 1) * p.u).sum(1)
    assert torch.allclose(s1, p.loc + pert, atol=1e-6), "antithetic_samples no longer draws eps then xi"
    assert torch.allclose(s2, p.loc - pert, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 3])
def test_entropy_matches(rank):
    p = _params(rank)
    assert torch.allclose(reference_entropy(p.log_var, p.u), p.entropy(), rtol=1e-6)


def _compare(kind: str, training: bool, dtype: torch.dtype):
    """Loss, its data + regulariser part, and all gradients: learnsim vs the reference, same draws."""
    torch.manual_seed(0)
    fixed, moving, mask = (x.to(dtype) for x in _images())
    metric = _metric(kind).to(dtype)
    w_reg = 2.8 if kind.endswith("lcc") else 1.8
    sobolev = SobolevSmoother(True, s=3, lam=0.5).to(dtype)
    reg = VariationalRegistration(metric, SVF(NO_STEPS), RegLossL2(w_reg), sobolev, uniform_noise=NOISE)
    p = _params()

    # learnsim, as in VariationalRegistration.fit (fixed features once, without grad)
    leaves = [t.to(dtype).requires_grad_(True) for t in p.tensors()]
    q = LowRankParams(*leaves)
    with torch.no_grad():
        feat_fixed = metric.features(fixed)
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    loss = reg.loss(q, feat_fixed, moving, mask, training, g)
    energy = loss + q.entropy()  # data + regulariser (the entropy dominates log_var's gradient and the value)
    grads = torch.autograd.grad(loss.sum(), leaves, retain_graph=True)
    grads_energy = torch.autograd.grad(energy.sum(), leaves)

    # the reference, same draws
    eps, xi, noise = _replay(state, 1, training, dtype)
    ref_leaves = [t.to(dtype).requires_grad_(True) for t in p.tensors()]
    t = reference_q_v_terms(
        fixed, moving, mask, *ref_leaves, eps, xi, metric, w_reg, NO_STEPS, sobolev.kernel, noise
    )
    ref_loss = t["data"] + t["reg"] - t["entropy"]
    ref_grads = torch.autograd.grad(ref_loss.sum(), ref_leaves, retain_graph=True)
    ref_grads_energy = torch.autograd.grad((t["data"] + t["reg"]).sum(), ref_leaves)

    err = {
        "loss": float(((loss - ref_loss).abs() / ref_loss.abs()).max().detach()),
        # rounding scales with the summands, not with their (possibly cancelling) sum
        "energy": float(
            ((energy - t["data"] - t["reg"]).abs() / (t["data"].abs() + t["reg"].abs())).max().detach()
        ),
    }
    for name, a, b, ae, be in zip(
        ("mu", "log_var", "u"), grads, ref_grads, grads_energy, ref_grads_energy, strict=True
    ):
        err[f"grad_{name}"] = _rel(a, b)
        err[f"grad_energy_{name}"] = _rel(ae, be)
    return err


KINDS = ["ssd", "lcc", "cnn_ssd", "cnn_lcc"]


@pytest.mark.parametrize("training", [False, True], ids=["no_noise", "uniform_noise"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_fp32(kind, training):
    err = _compare(kind, training, torch.float32)
    assert err["loss"] < 1e-5 and err["energy"] < 1e-5, err
    assert max(v for k, v in err.items() if k.startswith("grad")) < 1e-4, err


@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference_fp64(kind):
    """In double precision the two paths agree to rounding: any algorithmic difference would show here."""
    err = _compare(kind, True, torch.float64)
    # learnsim casts the data term to fp32 (``.float()`` after the energies, for autocast): ~1e-8 on the value
    assert err["loss"] < 1e-6 and err["energy"] < 1e-6, err
    assert max(v for k, v in err.items() if k.startswith("grad")) < 1e-10, err


def test_bench_smoke(tmp_path, monkeypatch):
    """scripts/bench.py runs end to end (tiny grid, one case) and writes its JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
    spec = importlib.util.spec_from_file_location("learnsim_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    argv = [
        "--device",
        "cpu",
        "--size",
        "16",
        "--batch",
        "1",
        "--iters",
        "2",
        "--warmup",
        "1",
        "--cases",
        "lcc",
        "--threads",
        "1",
        "--proposals",
        "--json",
        str(out),
    ]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # --threads is process-wide
    res = json.loads(out.read_text())
    (rec,) = res["q_v"]
    assert rec["learnsim_ms"] > 0 and rec["reference_ms"] > 0 and len(rec["learnsim_times_ms"]) == 2
    assert res["proposals"] == []  # --proposals is accepted; every proposal has been adopted
    assert res["integration"][0]["max_abs_diff"] < 1e-4  # learnsim and MONAI agree on the convention
