#!/usr/bin/env python
"""Benchmark one q_v iteration: learnsim's optimised path against the plain re-statement of the original.

    python scripts/bench.py --device auto --size 128 --batch 1 5 --iters 20 --warmup 3 --json bench.json
    python scripts/bench.py --quick                      # CI-sized smoke run (CPU, 32^3)

What is timed, per metric (ssd, lcc, cnn_ssd, cnn_lcc) and batch size:

(a) **learnsim**: ``VariationalRegistration.fit`` itself, training mode (uniform noise on), 12 squarings, with a
    ``progress`` callback every iteration that only records a timestamp (a CUDA event on GPU, no host sync;
    ``perf_counter`` on CPU, or the CPU-time clock with ``--cpu-time``). One iteration is the interval between two consecutive callbacks: antithetic draws,
    Sobolev smoothing, integration, noise, warp, features, energy, regulariser, entropy, ``autograd.grad``, Adam
    step, exactly the code ``fit`` runs. ``fit``'s set-up (the fixed features, parameter clones) happens before
    the first callback and is therefore excluded; iteration 0 and the next ``--warmup - 1`` are dropped.
(b) **reference**: :func:`learnsim.reference.reference_q_v_loss` in a loop shaped like the original trainer
    (draws, loss, ``zero_grad(set_to_none=True)``, ``backward``, Adam step), timed the same way, same inputs.
    Speed-up = reference / learnsim (medians).
(c) **integration + warp alone**: ``integrate_svf`` + ``warp`` against MONAI's ``DVF2DDF`` + ``Warp`` (both
    trilinear, border padding, 12 squarings; MONAI's DDF uses the same convention as learnsim: channel ``c`` along
    tensor axis ``2 + c``, voxels), forward only and forward + backward, and the achieved bandwidth of
    ``integrate_svf`` (see :func:`squaring_bytes_per_voxel` for the byte count).

Peak memory: what a path allocates beyond what was allocated when its case started (inputs excluded). CUDA:
``torch.cuda.max_memory_allocated`` (reset per case and path) minus ``memory_allocated`` at the start; CPU: the
peak growth of the process's resident set (``/proc/self/statm`` sampled every 2 ms in a thread, after
``malloc_trim``), approximate (n/a off Linux).

``--dtype bf16`` runs learnsim with ``amp=True`` (energies in bf16 autocast on CUDA) and the reference under the
same autocast; on CPU learnsim's amp is off, so bf16 is refused there.

Also prints VoxelMorph inference time per pair when ``learnsim.voxelmorph.VoxelMorphNet`` is importable.
``--proposals`` is kept for old command lines: every hot-path proposal it timed has been adopted (shifted-view
filters, fused Adam), so there is nothing left to time and its table is empty.

On a CPU shared with other jobs use ``--threads 1 --cpu-time``: two OpenMP threads next to a busy process ran
elementwise ops ~10x slower in wall time here, and wall time counts time the scheduler gave to others.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

# isort: off
import learnsim  # noqa: F401  (before torch: sets the OpenMP spin policy both runtimes read when they load)
import torch

# isort: on

from learnsim.defaults import PAPER
from learnsim.energies import EnergyKind
from learnsim.kernels import get_backend, use_backend
from learnsim.metric import build_metric
from learnsim.reference import reference_q_v_loss
from learnsim.registration import VariationalRegistration
from learnsim.sobolev import SobolevSmoother
from learnsim.spatial import gaussian_smooth, integrate_svf, warp
from learnsim.transformation import SVF

KINDS = ("ssd", "lcc", "cnn_ssd", "cnn_lcc")
NO_STEPS = PAPER[EnergyKind.SSD].no_steps  # 12 squarings, both energies
FAST_MODE = {"no_steps": "auto", "int_downsize": 2}  # transformation settings of learnsim's fast mode
UNIFORM_NOISE = PAPER[EnergyKind.SSD].uniform_noise  # 0.1 voxel, both energies


def paper(kind: str):
    """The paper's q_v settings of a case (``"cnn_lcc"`` -> LCC's): :data:`learnsim.defaults.PAPER`."""
    return PAPER[EnergyKind(kind.removeprefix("cnn_"))]


# ------------------------------------------------------------------------------------------------ timing
CPU_CLOCK: Callable[[], float] = time.perf_counter  # set by --cpu-time


def cpu_time_clock() -> Callable[[], float]:
    """CPU time of this process (of this thread when torch runs single-threaded): immune to other processes
    taking the cores, which wall time on a shared machine is not."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


class Timer:
    """Marks iteration boundaries; CUDA events (no host sync until :meth:`intervals_ms`) or :data:`CPU_CLOCK`."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self, *_args) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(CPU_CLOCK())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return [(b - a) * 1e3 for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _libc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim  # noqa: B018 (glibc only)
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


class PeakMemory:
    """Peak memory a block allocates beyond what was allocated when it started.

    CUDA: ``max_memory_allocated - memory_allocated`` at entry (exact, tensor memory). CPU: peak growth of the
    resident set, sampled every 2 ms, after ``malloc_trim`` (approximate: short-lived peaks between samples are
    missed, fragmentation is counted; n/a off Linux).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return None

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(0.002):
            rss = self._rss() or start
            peak = max(peak, rss)
        peak = max(peak, self._rss() or start)
        self.peak_bytes = float(peak - start)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            # hand the allocator's free pages back first, so that the block's allocations show up as RSS growth
            gc.collect()
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            start = self._rss()
            if start is not None:
                self._thread = threading.Thread(target=self._sample, args=(start,), daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = float(torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**30


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(shape: tuple[int, int, int], batch: int, device: torch.device, seed: int = 0):
    """Smooth random images in [0, 1] (fixed ``[1,1,...]``, moving ``[B,1,...]``) and a mask with a zero rim."""
    g = torch.Generator().manual_seed(seed)
    norm = lambda x: (x - x.amin()) / (x.amax() - x.amin())  # noqa: E731
    fixed = norm(gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.0))
    moving = torch.cat(
        [norm(gaussian_smooth(torch.rand(1, 1, *shape, generator=g), 1.0)) for _ in range(batch)]
    )
    mask = torch.zeros_like(fixed)
    r = [max(1, s // 16) for s in shape]
    mask[..., r[0] : -r[0], r[1] : -r[1], r[2] : -r[2]] = 1
    return fixed.to(device), moving.to(device), mask.to(device)


def make_metric(kind: str, device: torch.device):
    metric = build_metric(kind).to(device)
    if metric.encoder is not None:
        # off the Dirac init (the cost does not depend on the weights; this keeps the features non-trivial)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in metric.encoder.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(device))
    return metric


def make_registration(
    kind: str, metric, device: torch.device, amp: bool, transformation: SVF | None = None
) -> VariationalRegistration:
    """The q_v fitter with the paper's settings (:meth:`VariationalRegistration.paper`: 12 squarings, Sobolev s=3
    lambda=0.5, noise 0.1 voxel), or with another ``transformation`` (fast mode: :data:`FAST_MODE`)."""
    return VariationalRegistration.paper(metric, transformation=transformation, amp=amp)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ (a) learnsim
def time_learnsim(
    reg: VariationalRegistration, fixed, moving, mask, warmup: int, iters: int
) -> tuple[list[float], float | None]:
    """Time ``reg.fit`` per iteration: marks after every iteration (progress callback); interval k = iteration k.

    Needs ``warmup >= 1``: iteration 0 has no mark before it (that would include fit's set-up).
    """
    device = moving.device
    timer = Timer(device)
    with PeakMemory(device) as mem:
        reg.fit(fixed, moving, mask, no_iters=warmup + iters, training=True, progress=timer.mark, log_every=1)
        _sync(device)
    return timer.intervals_ms()[warmup - 1 :], mem.gib


# ------------------------------------------------------------------------------------------------ (b) reference
def time_reference(
    kind: str, metric, fixed, moving, mask, warmup: int, iters: int, bf16: bool
) -> tuple[list[float], float | None]:
    device = moving.device
    b, shape = moving.shape[0], tuple(moving.shape[2:])
    settings = paper(kind)
    kernel = SobolevSmoother(True, settings.sobolev_s, settings.sobolev_lambda).kernel.to(device)
    metric.eval()
    requires = [p.requires_grad for p in metric.parameters()]
    for p in metric.parameters():
        p.requires_grad_(False)  # frozen during the q_v step, as in the original trainer
    timer = Timer(device)
    try:
        with PeakMemory(device) as mem:
            # q_v and its optimiser inside the measured block, as fit's clones and Adam are for learnsim
            mu = torch.zeros(b, 3, *shape, device=device, requires_grad=True)
            log_var = torch.full((b, 3, *shape), 2 * math.log(0.5), device=device, requires_grad=True)
            u = torch.full((b, 1, 3, *shape), 0.1, device=device, requires_grad=True)
            opt = torch.optim.Adam([mu, log_var, u], lr=settings.lr)
            timer.mark()
            for _ in range(warmup + iters):
                eps = torch.randn(b, 3, *shape, device=device)
                xi = torch.randn(b, 1, device=device)
                noise = (torch.rand(2, b, 3, *shape, device=device) * 2 - 1) * UNIFORM_NOISE
                with _autocast(device, bf16):
                    loss = reference_q_v_loss(
                        fixed,
                        moving,
                        mask,
                        mu,
                        log_var,
                        u,
                        eps,
                        xi,
                        metric,
                        settings.w_reg,
                        NO_STEPS,
                        kernel,
                        noise,
                    )
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
                timer.mark()
            _sync(device)
    finally:
        for p, r in zip(metric.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return timer.intervals_ms()[warmup:], mem.gib


# ------------------------------------------------------------------------------------------------ (c) integration
def squaring_bytes_per_voxel(itemsize: int = 4) -> int:
    """Bytes moved per voxel per squaring step, by this definition (fp32: 120 B):

    read the field once (3 channels) to form the sampling coordinates, 8 trilinear neighbour taps x 3 channels
    gathered by grid_sample, write the updated field (3 channels): ``(3 + 24 + 3) * itemsize``. It counts each
    gather tap as a memory read, i.e. no cache reuse between neighbouring voxels (an upper bound on traffic; with
    perfect reuse the compulsory traffic is ``(3 + 3 + 3) * itemsize``, field read, gathered field read once,
    write). The materialised grid and the separate add of the current implementation are not counted: this is
    the traffic of an ideal fused squaring step.
    """
    return (3 + 8 * 3 + 3) * itemsize


def device_peak_gbs(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return 4800.0
    if "H100" in name:
        return 2000.0 if "PCIe" in name else 3350.0
    return None


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    timer = Timer(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    timer.mark()
    for _ in range(iters):
        fn()
        timer.mark()
    return timer.intervals_ms()


def bench_integration(moving: torch.Tensor, warmup: int, iters: int, peak_gbs: float | None) -> dict:
    from monai.networks.blocks import DVF2DDF, Warp

    device = moving.device
    b, shape = moving.shape[0], tuple(moving.shape[2:])
    g = torch.Generator().manual_seed(3)
    v = (gaussian_smooth(torch.randn(b, 3, *shape, generator=g), 2.0) * 4.0).to(device)
    with contextlib.redirect_stderr(open(os.devnull, "w")), _quiet_warnings():
        dvf2ddf = DVF2DDF(num_steps=NO_STEPS, mode="bilinear", padding_mode="border")
        monai_warp = Warp(mode="bilinear", padding_mode="border")

    def ls():
        return warp(moving, integrate_svf(v, NO_STEPS))

    def mo():
        return monai_warp(moving, dvf2ddf(v))

    vg = v.clone().requires_grad_(True)

    def ls_bwd():
        warp(moving, integrate_svf(vg, NO_STEPS)).sum().backward()

    def mo_bwd():
        monai_warp(moving, dvf2ddf(vg)).sum().backward()

    out: dict = {}
    with torch.no_grad():
        out["max_abs_diff"] = float((ls() - mo()).abs().max())  # same convention: should be ~1e-5
        t_int = _median(time_fn(lambda: integrate_svf(v, NO_STEPS), device, warmup, iters))
        out["learnsim_fwd_ms"] = _median(time_fn(ls, device, warmup, iters))
        out["monai_fwd_ms"] = _median(time_fn(mo, device, warmup, iters))
    out["learnsim_fwd_bwd_ms"] = _median(time_fn(ls_bwd, device, warmup, iters))
    out["monai_fwd_bwd_ms"] = _median(time_fn(mo_bwd, device, warmup, iters))
    nbytes = squaring_bytes_per_voxel(4) * b * math.prod(shape) * NO_STEPS
    out["integrate_ms"] = t_int
    out["integrate_gbs"] = nbytes / (t_int * 1e-3) / 1e9
    out["peak_gbs"] = peak_gbs
    out["integrate_pct_peak"] = None if peak_gbs is None else 100.0 * out["integrate_gbs"] / peak_gbs
    return out


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ VoxelMorph
def bench_voxelmorph(fixed, moving, warmup: int, iters: int) -> dict:
    """Inference per pair (network + integration + warp of the moving image) of ``learnsim.voxelmorph.VoxelMorphNet``
    with its default construction, or the reason it is n/a."""
    try:
        from learnsim.voxelmorph import VoxelMorphNet  # another engineer's module; optional here
    except ImportError as exc:
        return {"status": f"n/a ({exc})"}
    device = moving.device
    try:
        net = VoxelMorphNet().to(device).eval()
        m1 = moving[:1]
        n_args = len(
            [
                p
                for p in inspect.signature(net.forward).parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        )
        call = (lambda: net(m1, fixed)) if n_args >= 2 else (lambda: net(torch.cat([m1, fixed], 1)))

        def infer():
            out = call()
            if isinstance(out, (tuple, list)):  # (velocity, displacement): warp with the displacement
                return warp(m1, out[-1])
            # a bare field: treat it as an SVF, integrate and warp
            return warp(m1, integrate_svf(out, NO_STEPS))

        with torch.no_grad():
            ms = _median(time_fn(infer, device, warmup, iters))
        return {"status": "ok", "ms_per_pair": ms}
    except Exception as exc:  # its API is not settled yet: report, do not fail the benchmark
        return {"status": f"n/a ({type(exc).__name__}: {exc})"}


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Record:
    device: str
    dtype: str
    case: str
    batch: int
    size: list[int]
    learnsim_ms: float
    reference_ms: float | None
    speedup: float | None
    learnsim_peak_gib: float | None
    reference_peak_gib: float | None
    learnsim_times_ms: list[float] = field(default_factory=list)
    reference_times_ms: list[float] = field(default_factory=list)
    kernels: str = "auto"
    torch_path_ms: float | None = None
    fast_ms: float | None = None
    fast_speedup: float | None = None
    fast_peak_gib: float | None = None
    learnsim_min_ms: float | None = None
    reference_min_ms: float | None = None
    fast_min_ms: float | None = None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--size", type=int, nargs="+", default=[128], help="grid size: one int (cube) or D H W")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 5])
    p.add_argument("--iters", type=int, default=20, help="timed iterations per case (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--cases", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--quick", action="store_true", help="CI smoke run: CPU, 32^3, batch 1, 2 iterations")
    p.add_argument("--no-reference", action="store_true", help="time learnsim only")
    p.add_argument("--no-fast", action="store_true", help="skip learnsim's fast mode (auto squarings, int_downsize 2)")
    p.add_argument(
        "--torch-path",
        action="store_true",
        help="also time learnsim's plain PyTorch path (LEARNSIM_KERNELS=torch), the implementation before the kernels",
    )
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all paths (noisy machines: 2-3)")
    p.add_argument("--no-integration", action="store_true", help="skip (c), integration + warp vs MONAI")
    p.add_argument("--proposals", action="store_true", help="kept for old command lines; all proposals adopted (no-op)")
    p.add_argument(
        "--peak-gbs",
        type=float,
        default=None,
        help="device memory bandwidth in GB/s (default: 3350 H100 SXM, 2000 H100 PCIe, 4800 H200, else n/a)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)"
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU runs: time with the process's CPU time (the thread's with --threads 1) instead of wall "
        "time, for a machine shared with other jobs",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.device, args.size, args.batch, args.iters, args.warmup = "cpu", [32], [1], 2, 1
    args.warmup = max(1, args.warmup)
    if len(args.size) == 1:
        args.size = args.size * 3
    if len(args.size) != 3:
        p.error("--size takes one int or three")
    return args


def _device(args: argparse.Namespace) -> torch.device | None:
    """The device to time on, or None (after printing why) when the request cannot run here."""
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but CUDA is not available", file=sys.stderr)
        return None
    return device


def _environment(args: argparse.Namespace, device: torch.device, shape: tuple[int, ...], clock: str) -> dict:
    dev_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    )
    return {
        "device_name": dev_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": list(shape),
        "iters": args.iters,
        "warmup": args.warmup,
        "no_steps": NO_STEPS,
        "uniform_noise": UNIFORM_NOISE,
        "dtype": args.dtype,
        "clock": "cuda events" if device.type == "cuda" else clock,
    }


def _bench_case(kind: str, batch: int, shape: tuple[int, ...], device: torch.device, args: argparse.Namespace) -> Record:
    """One (metric, batch) case: every path timed in ``args.rounds`` interleaved rounds."""
    bf16 = args.dtype == "bf16"
    fixed, moving, mask = make_inputs(shape, batch, device)
    metric = make_metric(kind, device)
    reg = make_registration(kind, metric, device, amp=bf16)
    fast_reg = make_registration(kind, metric, device, amp=bf16, transformation=SVF(**FAST_MODE))
    times: dict[str, list[float]] = {"ls": [], "ref": [], "fast": [], "torch": []}
    mem: dict[str, float | None] = {"ls": None, "ref": None, "fast": None}
    for _ in range(max(1, args.rounds)):  # interleaved: drifting background load hits every path alike
        t, mem["ls"] = time_learnsim(reg, fixed, moving, mask, args.warmup, args.iters)
        times["ls"] += t
        if args.torch_path:
            with use_backend("torch"):
                times["torch"] += time_learnsim(reg, fixed, moving, mask, args.warmup, args.iters)[0]
        if not args.no_fast:
            t, mem["fast"] = time_learnsim(fast_reg, fixed, moving, mask, args.warmup, args.iters)
            times["fast"] += t
        if not args.no_reference:
            t, mem["ref"] = time_reference(kind, metric, fixed, moving, mask, args.warmup, args.iters, bf16)
            times["ref"] += t
    med = {k: (_median(v) if v else None) for k, v in times.items()}
    return Record(
        device.type, args.dtype, kind, batch, list(shape), med["ls"], med["ref"],
        (med["ref"] / med["ls"]) if med["ref"] else None, mem["ls"], mem["ref"], times["ls"], times["ref"],
        kernels=get_backend(), torch_path_ms=med["torch"], fast_ms=med["fast"],
        fast_speedup=(med["ref"] / med["fast"]) if (med["ref"] and med["fast"]) else None, fast_peak_gib=mem["fast"],
        learnsim_min_ms=min(times["ls"]), reference_min_ms=min(times["ref"]) if times["ref"] else None,
        fast_min_ms=min(times["fast"]) if times["fast"] else None,
    )


def _print_records(records: list[Record], device: torch.device) -> None:
    print(
        "\n| device | grid | case | batch | reference ms/iter (min/med) | exact ms/iter (min/med) | exact speed-up |"
        " fast ms/iter (min/med) | fast speed-up | PyTorch path ms/iter | peak GiB reference / exact / fast |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        grid = "x".join(str(n) for n in r.size)
        print(
            f"| {r.device} | {grid} | {r.case} | {r.batch} | {_fmt(r.reference_min_ms, '.0f')} / {_fmt(r.reference_ms, '.0f')} | "
            f"{_fmt(r.learnsim_min_ms, '.0f')} / {_fmt(r.learnsim_ms, '.0f')} | {_fmt(r.speedup, '.2f')} | "
            f"{_fmt(r.fast_min_ms, '.0f')} / {_fmt(r.fast_ms, '.0f')} | {_fmt(r.fast_speedup, '.2f')} | "
            f"{_fmt(r.torch_path_ms, '.0f')} | {_fmt(r.reference_peak_gib, '.2f')} / {_fmt(r.learnsim_peak_gib, '.2f')} / "
            f"{_fmt(r.fast_peak_gib, '.2f')} |"
        )
    print("(speed-ups: reference median / learnsim median, timed in the same run)")
    if device.type == "cpu":
        print("\n(CPU peak memory: growth of the resident set during the case, sampled; approximate)")


def _integration_table(args: argparse.Namespace, shape: tuple[int, ...], device: torch.device, peak_gbs) -> list[dict]:
    """(c): integration + warp against MONAI's, per batch size."""
    print(
        "\n| batch | integrate+warp fwd learnsim ms | MONAI DVF2DDF+Warp fwd ms | fwd+bwd learnsim ms | fwd+bwd MONAI ms |"
        " integrate_svf ms | GB/s | % of peak | max |diff| |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    integration = []
    for batch in args.batch:
        _, moving, _ = make_inputs(shape, batch, device)
        res = bench_integration(moving, max(1, args.warmup), max(3, args.iters), peak_gbs)
        res["batch"] = batch
        integration.append(res)
        print(
            f"| {batch} | {_fmt(res['learnsim_fwd_ms'])} | {_fmt(res['monai_fwd_ms'])} | {_fmt(res['learnsim_fwd_bwd_ms'])} | "
            f"{_fmt(res['monai_fwd_bwd_ms'])} | {_fmt(res['integrate_ms'])} | {_fmt(res['integrate_gbs'])} | "
            f"{_fmt(res['integrate_pct_peak'])} | {res['max_abs_diff']:.1e} |"
        )
    print(
        f"\n(bandwidth: {squaring_bytes_per_voxel()} B/voxel/squaring, fp32: read field 3 ch + 8 gather taps x 3 ch"
        f" + write 3 ch, no cache reuse counted; peak {_fmt(peak_gbs, '.0f')} GB/s)"
    )
    return integration


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = _device(args)
    if device is None:
        return 2
    if args.dtype == "bf16" and device.type != "cuda":
        print("bench: --dtype bf16 needs CUDA (learnsim's amp autocasts on CUDA only)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    global CPU_CLOCK
    clock = "wall"
    if args.cpu_time and device.type == "cpu":
        CPU_CLOCK = cpu_time_clock()
        clock = CPU_CLOCK.__name__
    shape = tuple(args.size)
    env = _environment(args, device, shape, clock)
    print(
        f"# learnsim q_v benchmark: {env['device_name']}, torch {torch.__version__}, threads {env['threads']}, "
        f"grid {shape}, {args.iters} iters (+{args.warmup} warm-up), {NO_STEPS} squarings, {args.dtype}, "
        f"clock {env['clock']}",
        flush=True,
    )
    records: list[Record] = []
    for batch in args.batch:
        for kind in args.cases:
            rec = _bench_case(kind, batch, shape, device, args)
            records.append(rec)
            print(
                f"  {kind:8s} B={batch}: learnsim exact {_fmt(rec.learnsim_ms)} ms (x{_fmt(rec.speedup, '.2f')}), "
                f"fast {_fmt(rec.fast_ms)} ms (x{_fmt(rec.fast_speedup, '.2f')}), reference {_fmt(rec.reference_ms)} ms"
                + (f", PyTorch path {_fmt(rec.torch_path_ms)} ms" if rec.torch_path_ms else ""),
                flush=True,
            )
    _print_records(records, device)
    if args.proposals:
        print("\n(--proposals: every hot-path proposal has been adopted; nothing left to time)")
    peak_gbs = device_peak_gbs(device, args.peak_gbs)
    integration = [] if args.no_integration else _integration_table(args, shape, device, peak_gbs)
    _, moving1, _ = make_inputs(shape, 1, device)
    vxm = bench_voxelmorph(make_inputs(shape, 1, device)[0], moving1, max(1, args.warmup), max(3, args.iters))
    print(f"\nVoxelMorph inference per pair: {_fmt(vxm.get('ms_per_pair'))} ms" if vxm["status"] == "ok"
          else f"\nVoxelMorph inference per pair: {vxm['status']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "q_v": [asdict(r) for r in records], "proposals": [], "integration": integration,
                       "voxelmorph": vxm}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
