"""Issue 29 (crash and silent-wrong-result items): non-finite values never reach memory outside a kernel's arrays, a
diverged fit is detected, inputs that cannot be registered are refused, and every numeric setting of
``learnsim-register``, ``learnsim-test`` and ``learnsim-train`` is either refused with one line naming the key and its
range or runs to a finite result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("numba")

# A crash here (a NaN coordinate sent a tap index past the array) kills the interpreter: run it in a child process.
_KERNEL_PROBE = textwrap.dedent('''
    import torch
    from learnsim.kernels import ops

    for dtype in (torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf"), 1e30, -1e30):
            for where in ("one", "all"):
                v = torch.zeros(2, 3, 8, 9, 10, dtype=dtype)
                if where == "one":
                    v[0, 0, 3, 4, 5] = bad
                    v[1, 2, 0, 0, 0] = bad
                else:
                    v.fill_(bad)
                leaf = v.clone().requires_grad_(True)
                ops.integrate_svf(leaf, 4).sum().backward()
                img = torch.rand(1, 1, 8, 9, 10, dtype=dtype, requires_grad=True)
                disp = v.clone().requires_grad_(True)
                warped = ops.warp(img, disp)
                warped.sum().backward()
                assert torch.isfinite(img.grad).any() or where == "all"
                ops.smooth(v, [0.25, 0.5, 0.25])
                ops.l2_gradient_energy(v.clone().requires_grad_(True), 1.0)
                m = warped.detach()[:1].clone().requires_grad_(True)
                ops.lcc(img.detach(), m, None, 1).sum().backward()
                lv = v[:, :1].clone().requires_grad_(True)
                pair, ent = ops.antithetic_pair(v[:, :1], lv, v[:, None, :1].clone(), torch.randn_like(lv),
                                                torch.randn(2, 1, dtype=dtype))
                (pair.sum() + ent.sum()).backward()
    print("kernels ok")
''')


def test_kernels_survive_nan_inf_and_huge_coordinates():
    """Issue 29 item 7: every numba kernel run on fields holding NaN, +-inf and +-1e30 returns (exit 0, no signal)."""
    proc = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert "kernels ok" in proc.stdout
