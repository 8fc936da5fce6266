"""Adam for q_v: :class:`torch.optim.Adam` (``fused=True``)'s update, without :class:`torch.optim.Optimizer`.

Why not ``torch.optim.Adam`` itself: constructing any :class:`torch.optim.Optimizer` imports ``torch._dynamo``
(``add_param_group`` is wrapped by ``torch._disable_dynamo``), which took 1.5-2 s of every ``learnsim-register``
process on a quiet 2-core machine (6 s on a busy one) before the first q_v step. :class:`FusedAdam` keeps the same
state (``exp_avg``, ``exp_avg_sq`` and a float32 step count per parameter) and calls the same fused kernel
(``torch._fused_adam_``: one pass per tensor for the whole update) with the step counted the same way, so its
iterates are bit-identical to ``torch.optim.Adam(params, lr, fused=True)``'s (``tests/test_fused_adam.py``).
Only what the q_v loop needs: one parameter group, no weight decay, no AMSGrad, no ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["FusedAdam"]


class FusedAdam:
    """Adam over a list of leaf tensors (CPU or CUDA, floating point), ``torch.optim.Adam(fused=True)``'s maths.

    Args:
        params: the tensors to optimise (their ``.grad`` is read by :meth:`step`).
        lr: learning rate. betas: ``(beta1, beta2)``. eps: added to the denominator.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("FusedAdam: no parameters to optimise")
        for p in self.params:
            if not (p.is_floating_point() and p.device.type in ("cpu", "cuda")):
                raise ValueError(f"FusedAdam: parameters must be floating point on the CPU or CUDA; got {p.dtype} "
                                 f"on {p.device}")
        if not lr > 0:
            raise ValueError(f"FusedAdam: lr must be > 0; got {lr!r}")
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        # the step count as the fused kernel wants it: a float32 scalar tensor per parameter, on its device
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (``None``, or zeros with ``set_to_none=False``)."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            if p.grad is not None:
                groups.setdefault((p.device, p.dtype), []).append(i)
        for idx in groups.values():  # the fused kernel takes one device and dtype per call
            steps = [self.steps[i] for i in idx]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(
                [self.params[i] for i in idx], [self.params[i].grad for i in idx],
                [self.exp_avg[i] for i in idx], [self.exp_avg_sq[i] for i in idx], [], steps,
                lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps,
                amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
            )
