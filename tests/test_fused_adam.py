"""learnsim.fused_adam.FusedAdam: torch.optim.Adam(fused=True)'s iterates, bit for bit, without torch.optim."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from learnsim.fused_adam import FusedAdam


def _quadratic_run(opt_factory, dtype: torch.dtype, steps: int = 25) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(2, 3, 4, 5, generator=gen, dtype=dtype).requires_grad_(True),
              torch.randn(7, generator=gen, dtype=dtype).requires_grad_(True)]
    target = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in params]
    opt = opt_factory(params)
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = sum(((p - t) ** 2 * (1 + k % 3)).sum() for p, t in zip(params, target, strict=True))
        loss.backward()
        if k == 5:
            params[1].grad = None  # a parameter without a gradient is skipped, as torch.optim does
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iterates_equal_torch_fused_adam(dtype):
    ours = _quadratic_run(lambda ps: FusedAdam(ps, lr=0.05), dtype)
    theirs = _quadratic_run(lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True), dtype)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    plain = _quadratic_run(lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=False), dtype)
    for a, b in zip(ours, plain, strict=True):  # and the textbook update, to rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adam_moves_against_the_gradient_by_lr_at_first():
    p = torch.zeros(3, requires_grad=True)
    opt = FusedAdam([p], lr=0.1)
    p.grad = torch.tensor([2.0, -0.5, 0.0])
    opt.step()
    # first step: m / sqrt(v) = sign(g) after bias correction, so the update is lr * sign(g)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, 0.0]), atol=1e-6, rtol=0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        FusedAdam([], lr=0.1)
    with pytest.raises(ValueError, match="floating point"):
        FusedAdam([torch.zeros(2, dtype=torch.int64)], lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        FusedAdam([torch.zeros(2)], lr=0.0)


def test_q_v_fit_does_not_import_dynamo():
    code = ("import sys, torch; from learnsim.api import register; "
            "f = torch.zeros(8, 8, 8); f[2:6, 2:6, 2:6] = 1; m = torch.roll(f, 1, 0); "
            "register(f, m, 'ssd', level_iters=[2, 2], no_samples=0, device='cpu'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
