"""Batched Lanczos vs per-sample ARPACK vs the dense Jacobian, and the dense/Lanczos crossover.

Part 1 -- the 8 most negative eigenvalues of ``H = ½ (J + Jᵀ)``, ``J = ∂s/∂x`` the Jacobian of the
learned score at ``t = 100`` (linear DDPM schedule), for ``n`` probes of dimension ``d``:

* (a) ``d = 64``: ``MLPDenoiser(shape=(1, 8, 8), hidden=256, depth=3)`` (forward-mode products);
* (b) ``d = 3·16·16``: a tiny diffusers ``UNet2DModel`` with one attention block (reverse-mode
  products: attention has no forward-mode formula, ``ScoreJacobian`` falls back to double vjp);
* (c) ``d = 3·32·32``: the same UNet configuration at 32×32.

Models are random-init (untrained); their spectra are semicircle-like, so the 8 smallest
eigenvalues are *not* well separated -- a hard case for Krylov methods (a memorized model, with
its outliers at ``-1/σ_t²``, converges much faster).

Methods, all to the same accuracy ``--tol`` (default: relative 1e-3 on each of the 8 values):

* batched: one ``memwatch.lanczos.lanczos`` run over all ``n`` probes (one batched HVP per step),
  ``num_iters = m*`` the fewest steps at which every probe's 8 smallest Ritz values are within
  ``tol`` (relative) of the reference. ``m*`` is read off one run of ``m_max`` steps: ``m`` steps of
  Lanczos compute exactly the first ``m`` steps of a longer run (the leading ``m×m`` block of its
  tridiagonal ``T``), and a time stamp at each product gives the time of the first ``m`` steps.
  Reference: the dense spectrum where it is computed, else the Ritz values after ``m_max`` steps
  (their residual bound is printed; ``m_max`` is well past convergence).
* ARPACK: ``scipy.sparse.linalg.eigsh(which="SA", k=8, tol=tol)`` on a ``LinearOperator`` around a
  one-probe ``ScoreJacobian``, one probe at a time (``tol`` is ARPACK's relative residual criterion,
  which bounds the relative eigenvalue error by ``tol``). For large ``d`` a few probes are timed
  and the mean is extrapolated to ``n`` (marked "extrap.").
* dense: ``ScoreJacobian.dense()`` + ``torch.linalg.eigvalsh`` (float64); for large ``d`` on a
  subset of probes, extrapolated linearly in the number of probes (marked "extrap.").

All three include building the operator (the forward pass with a graph). Bookkeeping = the
Lanczos time that is not HVP: ``T_lanczos - m* · T_hvp`` (as % of ``T_lanczos``), and, measured
directly, the same ``lanczos`` call with a free operator (``v ↦ diag · v``), as % of ``m* · T_hvp``.

Part 2 -- crossover for ``method="auto"``: ``measure_sharpness(..., method="dense")`` vs
``method="lanczos"`` (defaults ``num_iters=32``, ``num_vectors=4``) on ``MLPDenoiser`` at ``d = s²``,
with the error of the Lanczos defaults' 8 eigenvalues against the dense ones.

Timings: ``time.perf_counter``, one warm-up call, median of repeats (fewer when one measurement
exceeds ``--budget`` seconds; the count is printed). torch's default thread count is kept unless
``--threads`` is given. On a shared machine compare the ratios (measured side by side in one run),
not the absolute times. On an oversubscribed machine (other processes keeping every core busy)
torch's multi-threaded kernels wait on descheduled threads: with 2 threads on 2 busy cores the
full run took ~20× longer than with ``--threads 1`` and single timings swung 3-10×; there use
``--threads 1``.

Usage::

    python benchmarks/bench_lanczos.py --fast --threads 1  # smoke run, ~10 s (2 threads on busy cores: minutes)
    python benchmarks/bench_lanczos.py --threads 1         # full run (~5 min on one free core)
    python benchmarks/bench_lanczos.py --only "(c)" --large-probes 8 --skip-sweep
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from memwatch.apps.toymodels import MLPDenoiser
from memwatch.lanczos import LanczosResult, extreme_eigenvalues, lanczos
from memwatch.operators import ScoreJacobian
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import DENSE_MAX_DIM, measure_sharpness

K = 8  # most negative eigenvalues wanted
T_EVAL = 100  # timestep
SCHEDULE = NoiseSchedule.linear(1000)


# ----------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Median of ``count`` timed runs (seconds); ``source`` says how it was obtained."""

    median: float
    count: int
    source: str = ""
    value: object = field(default=None, repr=False)  # what the last call returned

    def __str__(self) -> str:
        return _fmt_s(self.median)


def bench(fn: Callable[[], object], repeats: int, budget: float, warmup: bool = True) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up call.

    Calls faster than 20 ms are timed in loops of ``k`` calls (about 50 ms). Stops early, after at
    least one run, once the timed runs have taken ``budget`` seconds.
    """
    value = fn() if warmup else None
    times: list[float] = []
    inner, spent = 1, 0.0
    while len(times) < repeats:
        t0 = time.perf_counter()
        for _ in range(inner):
            value = fn()
        dt = time.perf_counter() - t0
        spent += dt
        if not times and inner == 1 and dt < 0.02:  # too fast to time alone: loop it, start over
            inner = min(1000, math.ceil(0.05 / max(dt, 1e-6)))
            continue
        times.append(dt / inner)
        if spent > budget:
            break
    return Timing(statistics.median(times), len(times), value=value)


def timed_once(fn: Callable[[], object]) -> Timing:
    """One timed call, no warm-up (for calls that take minutes)."""
    t0 = time.perf_counter()
    value = fn()
    return Timing(time.perf_counter() - t0, 1, value=value)


def _fmt_s(t: float) -> str:
    if not math.isfinite(t):
        return "n/a"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


# ----------------------------------------------------------------------------- models
def tiny_unet(size: int) -> torch.nn.Module:
    """A tiny diffusers UNet2DModel, 3 channels, with exactly one attention block (reverse-mode AD)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        add_attention=False,  # no attention in the mid block: the one above is the only one
    )


UNET_DESC = "UNet2DModel(block_out_channels=(16,32), layers_per_block=1, 1 attention block)"


@dataclass
class Case:
    label: str
    model_desc: str
    shape: tuple[int, ...]
    make_model: Callable[[], torch.nn.Module]
    n: int
    dense_probes: int  # dense Jacobian on the first `dense_probes` probes (extrapolated to n)
    arpack_probes: int  # ARPACK on the first `arpack_probes` probes (extrapolated to n)
    m_max: int  # Lanczos steps of the reference run (well past convergence)
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)


def make_cases(args: argparse.Namespace) -> list[Case]:
    def mlp(shape):
        return lambda: MLPDenoiser(shape, hidden=256, depth=3)

    if args.fast:
        return [
            Case("(a) mlp", "MLPDenoiser(hidden=256, depth=3)", (1, 8, 8), mlp((1, 8, 8)), 8, 8, 2, 64),
            Case("(b') unet", UNET_DESC, (3, 8, 8), lambda: tiny_unet(8), 2, 1, 1, 64),
        ]
    n = args.probes
    return [
        Case("(a) mlp", "MLPDenoiser(hidden=256, depth=3)", (1, 8, 8), mlp((1, 8, 8)), n, n, min(n, 16), 64),
        Case("(b) unet", UNET_DESC, (3, 16, 16), lambda: tiny_unet(16), n, 2, 2, 96),
        Case("(c) unet", UNET_DESC, (3, 32, 32), lambda: tiny_unet(32), min(n, args.large_probes), 1, 1, 160),
    ]


def score_fn(score: DiffusionScore, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    tt = torch.full((n,), T_EVAL, dtype=torch.long)
    return lambda z: score(z, tt)


# ----------------------------------------------------------------------------- part 1
def ritz_prefix(res: LanczosResult, m: int) -> LanczosResult:
    """The result ``lanczos`` returns for ``num_iters = m``: the leading ``m`` steps of ``res``."""
    m_max = res.alpha.shape[1]
    if m == m_max:
        return res
    return LanczosResult(
        alpha=res.alpha[:, :m],
        beta=res.beta[:, : m - 1],
        krylov_dim=res.krylov_dim.clamp(max=m),
        residual=res.beta[:, m - 1],
    )


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``[B]`` max over the k values of ``|approx - ref| / |ref|``."""
    return ((approx - ref).abs() / ref.abs()).amax(-1)


def run_case(case: Case, args: argparse.Namespace) -> dict:
    n, dim, tol, budget, reps = case.n, case.dim, args.tol, args.budget, args.repeats
    torch.manual_seed(0)
    model = case.make_model().eval()
    score = DiffusionScore(model, SCHEDULE, prediction="epsilon")
    n_target = n if args.fast else max(n, args.probes)  # a case run with fewer probes is projected to this n
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(n_target, *case.shape, generator=gen)
    x = x_all[:n]
    v = torch.randn(n, dim, generator=gen)
    v0 = torch.randn(n, dim, generator=gen)  # Lanczos start vectors (ARPACK gets the same ones)

    modes: dict[int, str] = {}

    def mode_for(b: int) -> str:
        """The mode ``ScoreJacobian(mode="auto")`` selects for the first ``b`` probes (it can depend on b)."""
        if b not in modes:
            with warnings.catch_warnings():  # "auto" warns when it falls back to reverse mode
                warnings.simplefilter("ignore")
                modes[b] = ScoreJacobian(score_fn(score, b), x[:b], mode="auto").mode
        return modes[b]

    mode = mode_for(n)  # used for every operator below (also n=1 and ARPACK): like-for-like products
    if mode_for(1) != mode:
        case.notes.append(
            f'ScoreJacobian(mode="auto") picks {mode_for(1)!r} for one probe but {mode!r} for {n}; '
            f"all operators here use {mode!r}"
        )

    # -- operator setup (forward pass with a graph + first product) and one batched HVP
    def setup(rows: slice = slice(None)) -> ScoreJacobian:
        xs = x[rows]
        op = ScoreJacobian(score_fn(score, xs.shape[0]), xs, mode=mode)
        op.matvec(v[rows])  # first product: builds the double-vjp graph in reverse mode
        return op

    t_setup = bench(setup, reps, budget)
    op = setup()
    t_hvp = bench(lambda: op.matvec(v), reps, budget)
    op1 = setup(slice(0, 1))
    t_hvp1 = bench(lambda: op1.matvec(v[:1]), reps, budget)
    op1 = None  # free it (the closure above is done)

    # -- dense reference on the first r probes (timed; extrapolated to n)
    r = min(case.dense_probes, n)
    big = dim > 1024

    def dense_jac() -> torch.Tensor:
        opr = ScoreJacobian(score_fn(score, r), x[:r], mode="reverse")  # vjps only, as in measure_sharpness
        # all basis vectors at once, as measure_sharpness(method="dense") without max_batch; at large d
        # 64 at a time (what max_batch=64 gives for one probe), so memory stays bounded
        return opr.dense(symmetric=True, chunk_size=64 if big else None).to(torch.float64)

    if not big:
        t_jac = bench(dense_jac, reps, budget)
        t_eig = bench(lambda: torch.linalg.eigvalsh(t_jac.value), reps, budget)
    else:  # minutes: one run each; the vjp path is warm from the HVPs above
        t_jac = timed_once(dense_jac)
        t_eig = timed_once(lambda: torch.linalg.eigvalsh(t_jac.value))
        case.notes.append("dense Jacobian at this d: ScoreJacobian.dense(chunk_size=64), 64 basis vectors at a time")
    t_jac.value = None
    ref_dense = t_eig.value[:, :K]
    t_dense_total = (t_jac.median + t_eig.median) * n / r

    # -- batched Lanczos: one m_max run, time-stamping each product (start, end)
    calls: list[tuple[float, float]] = []

    def stamped(w: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = op.matvec(w)
        calls.append((t0, time.perf_counter()))
        return out

    m_max = min(case.m_max, dim)
    lanczos(op.matvec, v0, 2)  # warm-up of the code path
    t_start = time.perf_counter()
    res = lanczos(stamped, v0, m_max)
    t_end = time.perf_counter()
    # elapsed[m] = wall time of the first m steps; in_hvp[m] = the part of it spent in the products
    elapsed = [calls[m][0] - t_start for m in range(m_max)] + [t_end - t_start]
    in_hvp = [sum(b - a for a, b in calls[:m]) for m in range(m_max + 1)]

    theta_max = res.ritz()[0][:, :K]
    bound_max = (res.error_bounds()[:, :K] / theta_max.abs()).amax(-1)
    ref = theta_max.clone()
    ref[:r] = ref_dense
    has_dense = torch.zeros(n, dtype=torch.bool)
    has_dense[:r] = True
    # probes whose reference is trustworthy: dense, or Ritz values whose residual bound is far below tol
    certified = has_dense | (bound_max <= tol / 10)
    if not bool(certified.all()):
        case.notes.append(
            f"{int((~certified).sum())} of {n} probes have no converged reference after m_max={m_max} steps "
            f"(residual bound > tol/10); m* is taken over the other {int(certified.sum())}"
        )
    ms = list(range(K, m_max + 1))
    errs = torch.stack([rel_err(extreme_eigenvalues(ritz_prefix(res, m), K, "smallest"), ref)[certified] for m in ms])
    ok_all = (errs <= tol).all(1)  # [len(ms)]
    ok_dense = (errs[:, has_dense[certified]] <= tol).all(1)
    bounds = torch.stack(
        [(ritz_prefix(res, m).error_bounds()[:, :K] / ritz_prefix(res, m).ritz()[0][:, :K].abs()).amax() for m in ms]
    )

    def first_stable(ok: torch.Tensor) -> int | None:
        """Smallest m from which ``ok`` holds for every larger m too."""
        bad = (~ok).nonzero().flatten()
        idx = 0 if bad.numel() == 0 else int(bad[-1]) + 1
        return ms[idx] if idx < len(ms) else None

    m_star = first_stable(ok_all)
    m_star_dense = first_stable(ok_dense)
    m_bound = first_stable(bounds <= tol)
    reached = m_star is not None and m_star < m_max
    if m_star is None:
        m_star = m_max
        case.notes.append(f"tol {tol:g} NOT reached within m_max={m_max} steps; timing m_max")
    err_at = float(errs[ms.index(m_star)].max())

    # time of lanczos(num_iters=m*): separate calls when affordable, else the stamped prefix
    if m_star * t_hvp.median * (reps + 1) <= budget:
        lanczos(op.matvec, v0, m_star)  # warm-up
        runs = []
        for _ in range(reps):
            calls.clear()
            t0 = time.perf_counter()
            lanczos(stamped, v0, m_star)
            runs.append((time.perf_counter() - t0, sum(b - a for a, b in calls)))
        total, hvp_part = sorted(runs)[len(runs) // 2]
        t_lz = Timing(total, len(runs), "separate calls")
    else:
        total, hvp_part = elapsed[m_star], in_hvp[m_star]
        t_lz = Timing(total, 1, f"first {m_star} steps of the {m_max}-step run")
    diag = torch.linspace(-1.0, 1.0, dim)
    t_free = bench(lambda: lanczos(lambda w: w * diag, v0, m_star), reps, budget)
    op = res = None  # free the graphs (closures above are done)

    # -- ARPACK, one probe at a time
    p = min(case.arpack_probes, n)
    arpack_times, arpack_mv, arpack_err = [], [], []

    def arpack_probe(i: int, tol_i: float, k: int = K) -> tuple[float, int, np.ndarray]:
        t0 = time.perf_counter()
        op_i = ScoreJacobian(score_fn(score, 1), x[i : i + 1], mode=mode)
        count = [0]

        def mv(u: np.ndarray) -> np.ndarray:
            count[0] += 1
            ut = torch.from_numpy(np.ascontiguousarray(u, dtype=np.float32).reshape(1, dim))
            return op_i.matvec(ut).reshape(-1).to(torch.float64).numpy()

        lin = LinearOperator((dim, dim), matvec=mv, dtype=np.float64)
        try:
            w = eigsh(lin, k=k, which="SA", tol=tol_i, v0=v0[i].double().numpy(), return_eigenvectors=False)
        except ArpackNoConvergence as err:
            w = np.full(k, np.nan)
            w[: len(err.eigenvalues)] = err.eigenvalues
        return time.perf_counter() - t0, count[0], np.sort(w)

    # warm-up of the code path (scipy's ARPACK wrapper, a one-probe operator), without a full solve
    op_w = ScoreJacobian(score_fn(score, 1), x[:1], mode=mode)
    op_w.matvec(v[:1])
    eigsh(LinearOperator((30, 30), matvec=lambda u: u * np.arange(30.0), dtype=np.float64), k=2, which="SA")
    del op_w
    for i in range(p):
        dt, n_products, w = arpack_probe(i, tol)
        arpack_times.append(dt)
        arpack_mv.append(n_products)
        arpack_err.append(float(rel_err(torch.from_numpy(w), ref[i]).item()))
    t_arpack_total = statistics.mean(arpack_times) * n

    t_batched = t_setup.median + t_lz.median
    book = t_lz.median - m_star * t_hvp.median
    book_run = total - hvp_part

    # -- fewer probes than the spec: measure setup and HVP at n_target, project the batched time
    proj = None
    if n < n_target:
        vt = torch.randn(n_target, dim, generator=gen)

        def setup_target() -> ScoreJacobian:
            opt = ScoreJacobian(score_fn(score, n_target), x_all, mode=mode)
            opt.matvec(vt)
            return opt

        t_setup_t = timed_once(setup_target)
        op_t = t_setup_t.value
        t_setup_t.value = None
        t_hvp_t = bench(lambda: op_t.matvec(vt), reps, budget, warmup=False)
        op_t = None
        t_batched_t = t_setup_t.median + m_star * t_hvp_t.median * (1 + book_run / hvp_part)
        proj = {
            "n": n_target,
            "t_setup": t_setup_t,
            "t_hvp": t_hvp_t,
            "t_batched": t_batched_t,
            "arpack": statistics.mean(arpack_times) * n_target,
            "dense": (t_jac.median + t_eig.median) * n_target / r,
        }
    return {
        "case": case,
        "mode": mode,
        "n": n,
        "r": r,
        "p": p,
        "t_setup": t_setup,
        "t_hvp": t_hvp,
        "t_hvp1": t_hvp1,
        "batch_gain": n * t_hvp1.median / t_hvp.median,
        "m_max": m_max,
        "m_star": m_star,
        "n_cert": int(certified.sum()),
        "m_star_dense": m_star_dense,
        "m_bound": m_bound,
        "reached": reached,
        "err_at": err_at,
        "ref_bound": float(bound_max[~has_dense].max()) if (~has_dense).any() else float("nan"),
        "t_lz": t_lz,
        "t_free": t_free,
        "t_batched": t_batched,
        "book_pct_total": 100 * book / t_lz.median,
        "book_run_pct_total": 100 * book_run / total,
        "book_run_pct_hvp": 100 * book_run / hvp_part,
        "hvp_in_run": hvp_part / m_star,
        "book_direct_pct_hvp": 100 * t_free.median / (m_star * t_hvp.median),
        "t_arpack_probe": statistics.mean(arpack_times),
        "t_arpack_total": t_arpack_total,
        "arpack_mv": statistics.mean(arpack_mv),
        "arpack_err": max(arpack_err),
        "t_jac": t_jac,
        "t_eig": t_eig,
        "t_dense_total": t_dense_total,
        "lam": (float(ref_dense[0, 0]), float(ref_dense[0, K - 1])),
        "proj": proj,
    }


def print_case(out: dict, tol: float) -> None:
    c: Case = out["case"]
    n, r, p = out["n"], out["r"], out["p"]
    print(f"\n{c.label}: d = {c.dim} {c.shape}, n = {n} probes, {c.model_desc}, products: {out['mode']} mode")
    lam0, lam7 = out["lam"]
    print(f"  probe 0: λ1 = {lam0:.3f}, λ8 = {lam7:.3f} (σ_t² = {float(SCHEDULE.sigma(T_EVAL)) ** 2:.4f})")
    print(
        f"  operator setup (forward with graph + 1st product), n={n}: {out['t_setup']}  |  "
        f"HVP n={n}: {out['t_hvp']} (×{out['t_hvp'].count})  |  HVP n=1: {out['t_hvp1']}  |  "
        f"batching gain n·HVP(1)/HVP(n) = {out['batch_gain']:.1f}"
    )
    m_dense = out["m_star_dense"]
    print(
        f"  Lanczos steps for rel. err <= {tol:g} on all 8 values of all {out['n_cert']} probes with a reference: "
        f"m* = {out['m_star']}"
        f"{'' if out['reached'] else ' (NOT reached)'} (max err there {out['err_at']:.1e}); "
        f"on the {r} dense-reference probe(s) alone: {m_dense}; "
        f"residual bound <= tol (ARPACK's criterion): {out['m_bound'] or '> m_max'}; "
        f"reference run m_max = {out['m_max']}"
        + (f", its max rel. residual bound {out['ref_bound']:.1e}" if math.isfinite(out["ref_bound"]) else "")
    )
    print(
        f"  ARPACK: {out['arpack_mv']:.0f} products/probe, max rel. err {out['arpack_err']:.1e} (tol {tol:g}), "
        f"{_fmt_s(out['t_arpack_probe'])}/probe (build + eigsh)"
    )
    rows = [
        (
            "batched Lanczos",
            f"{out['t_batched']:.2f}",
            (
                f"setup + lanczos(m*={out['m_star']}) = "
                f"{out['t_setup']} + {out['t_lz']} [{out['t_lz'].source}, ×{out['t_lz'].count}]"
            ),
        ),
        (
            "ARPACK per probe",
            f"{out['t_arpack_total']:.2f}",
            f"{p} probe(s) timed" + (f", extrap. ×{n / p:g}" if p < n else ""),
        ),
        (
            "dense + eigvalsh",
            f"{out['t_dense_total']:.2f}",
            f"dense() {out['t_jac']} + eigvalsh {out['t_eig']} on {r} probe(s)"
            + (f", extrap. ×{n / r:g}" if r < n else ""),
        ),
    ]
    print(f"  {'method':<18} {'total [s]':>10}  detail")
    for name, tot, det in rows:
        print(f"  {name:<18} {tot:>10}  {det}")
    print(
        f"  bookkeeping (Lanczos time outside the products), same run: {out['book_run_pct_total']:.1f} % of T_lanczos "
        f"= {out['book_run_pct_hvp']:.1f} % of its HVP time (HVP in the run {_fmt_s(out['hvp_in_run'])}/step); "
        f"T_lanczos - m*·T_hvp(standalone median) = {out['book_pct_total']:.1f} % of T_lanczos; "
        f"free operator {out['t_free']} = {out['book_direct_pct_hvp']:.1f} % of m*·T_hvp"
    )
    pr = out["proj"]
    if pr is not None:
        print(
            f"  projection to n = {pr['n']} (this case ran {n} probes to save time): setup {pr['t_setup']} + "
            f"m*·HVP(n={pr['n']}) {pr['t_hvp']} (×{pr['t_hvp'].count}) × (1 + in-run bookkeeping share) = "
            f"{pr['t_batched']:.2f} s batched; ARPACK/batched = {pr['arpack'] / pr['t_batched']:.1f}, "
            f"dense/batched = {pr['dense'] / pr['t_batched']:.1f} (projection, not a measured Lanczos run)"
        )
    for note in c.notes:
        print(f"  NOTE: {note}")


def print_summary(outs: list[dict]) -> None:
    print("\nSummary (ratios of totals measured side by side in this run)")
    hdr = (
        f"  {'case':<10} {'d':>5} {'n':>3} {'m*':>4} {'ARPACK/batched':>15} {'dense/batched':>14} "
        f"{'book % tot':>10} {'book % HVP':>10} {'free % HVP':>10} {'batch gain':>10}"
    )
    print(hdr)
    for o in outs:
        c = o["case"]
        ex_a = "*" if o["p"] < o["n"] else " "
        ex_d = "*" if o["r"] < o["n"] else " "
        print(
            f"  {c.label:<10} {c.dim:>5} {o['n']:>3} {o['m_star']:>4} "
            f"{o['t_arpack_total'] / o['t_batched']:>14.1f}{ex_a} {o['t_dense_total'] / o['t_batched']:>13.1f}{ex_d} "
            f"{o['book_run_pct_total']:>10.1f} {o['book_run_pct_hvp']:>10.1f} {o['book_direct_pct_hvp']:>10.1f} "
            f"{o['batch_gain']:>10.1f}"
        )
    print("  * extrapolated from a subset of probes (see above)")
    print(
        "  book % tot / % HVP: Lanczos time outside the products in the timed run, as % of the Lanczos time /"
        " of the product time; free % HVP: lanczos() with a free operator, as % of m*·HVP"
    )
    print("  targets: ARPACK/batched >= 10 at every d; bookkeeping <= 20 % of HVP time; dense/batched > 1 at d=3072")
    for o in outs:
        c = o["case"]
        a = o["t_arpack_total"] / o["t_batched"]
        d = o["t_dense_total"] / o["t_batched"]
        print(
            f"  {c.label:<10} d={c.dim:<5} ARPACK ≥10×: {'yes' if a >= 10 else 'NO'} ({a:.1f}×)  "
            f"bookkeeping ≤20 % of HVP: {'yes' if o['book_run_pct_hvp'] <= 20 else 'NO'} "
            f"({o['book_run_pct_hvp']:.1f} % in-run, {o['book_direct_pct_hvp']:.1f} % free-operator)  "
            f"faster than dense: {'yes' if d > 1 else 'NO'} ({d:.1f}×)"
        )
        pr = o["proj"]
        if pr is not None:
            a, d = pr["arpack"] / pr["t_batched"], pr["dense"] / pr["t_batched"]
            print(f"  {'':<10} projected to n={pr['n']}: ARPACK/batched {a:.1f}×, dense/batched {d:.1f}×")


# ----------------------------------------------------------------------------- part 2
def sweep(args: argparse.Namespace) -> None:
    sides = (4, 8) if args.fast else (4, 8, 12, 16, 20, 24, 32)
    n = 8 if args.fast else args.probes
    print(
        f"\nCrossover sweep: measure_sharpness(method='dense') vs method='lanczos' (num_iters=32, "
        f"num_vectors=4), MLPDenoiser(hidden=256, depth=3), n = {n}, t = {T_EVAL}, k = {K}"
    )
    print(
        f"  {'d':>5} {'dense':>10} {'lanczos':>10} {'lz/dense':>9} {'reps d/l':>8}  "
        f"{'eig err (lz vs dense)':>22} {'|Δ sharp_frac|':>14}"
    )
    ratios = []
    for s in sides:
        dim = s * s
        torch.manual_seed(0)
        model = MLPDenoiser((1, s, s), hidden=256, depth=3).eval()
        score = DiffusionScore(model, SCHEDULE, prediction="epsilon")
        x = torch.randn(n, 1, s, s, generator=torch.Generator().manual_seed(1))

        def run(method: str, score: DiffusionScore = score, x: torch.Tensor = x):
            return measure_sharpness(score, x, T_EVAL, k=K, method=method, generator=torch.Generator().manual_seed(2))

        t_d = bench(lambda: run("dense"), args.repeats, args.budget)
        t_l = bench(lambda: run("lanczos"), args.repeats, args.budget)
        rd, rl = t_d.value, t_l.value
        err = float(rel_err(rl.eigenvalues, rd.eigenvalues).median())
        err_max = float(rel_err(rl.eigenvalues, rd.eigenvalues).max())
        dsf = float((rl.sharp_fraction - rd.sharp_fraction).abs().mean())
        ratio = t_l.median / t_d.median
        ratios.append((dim, ratio))
        print(
            f"  {dim:>5} {t_d!s:>10} {t_l!s:>10} {ratio:>9.2f} {t_d.count:>4}/{t_l.count:<3}  "
            f"{'median ' + f'{err:.1e}' + ', max ' + f'{err_max:.1e}':>22} {dsf:>14.3f}"
        )
    # crossover: first d where Lanczos is faster, log-log interpolated with the previous point
    crossing = None
    for (d0, r0), (d1, r1) in itertools.pairwise(ratios):
        if r0 >= 1 > r1:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            crossing = (d0, d1, math.exp(math.log(d0) + f * (math.log(d1) - math.log(d0))))
            break
    if ratios and ratios[0][1] < 1:
        print(f"  crossover: Lanczos is faster already at d = {ratios[0][0]}")
    elif crossing is None:
        print(f"  crossover: dense is faster at every d measured (up to {ratios[-1][0]})")
    else:
        d0, d1, dx = crossing
        print(
            f"  crossover: dense faster at d = {d0}, Lanczos faster at d = {d1}; "
            f"interpolated crossover d ≈ {dx:.0f} (memwatch.sharpness.DENSE_MAX_DIM is now {DENSE_MAX_DIM})"
        )
        later = [d for d, rr in ratios if d > d1 and rr >= 1]
        if later:
            print(f"  note: dense faster again at d = {later} (noise or non-monotone)")
    print(
        "  (eig err: relative error of the 8 most negative eigenvalues from the Lanczos defaults vs dense;"
        " random-init spectra are a hard case)"
    )


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fast", action="store_true", help="quick smoke run (small n, small d; seconds)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median; default 3)")
    ap.add_argument(
        "--budget",
        type=float,
        default=20.0,
        help="stop repeating a measurement once its timed runs took this many seconds (default 20)",
    )
    ap.add_argument("--tol", type=float, default=1e-3, help="target relative accuracy of the 8 eigenvalues (1e-3)")
    ap.add_argument("--probes", type=int, default=64, help="n, probes per case (default 64)")
    ap.add_argument(
        "--large-probes",
        type=int,
        default=64,
        help="n for case (c), d=3072 (default 64 = the spec; with fewer, the batched time at --probes "
        "is also projected from a measured HVP at --probes)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave torch's default)")
    ap.add_argument("--skip-cases", action="store_true", help="only the crossover sweep")
    ap.add_argument("--skip-sweep", action="store_true", help="only part 1")
    ap.add_argument("--only", default=None, help="run only the cases whose label contains this string, e.g. '(c)'")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.fast:
        args.repeats, args.budget = 1, min(args.budget, 2.0)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
    t_all = time.perf_counter()
    print(
        f"bench_lanczos: torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"{'torch default' if args.threads is None else '--threads'}), "
        f"scipy {scipy.__version__}, python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(
        f"schedule linear(1000), t = {T_EVAL}; k = {K}; accuracy target: relative {args.tol:g} on each of "
        f"the 8 most negative eigenvalues; repeats {args.repeats} (median), budget {args.budget:g} s/measurement"
    )
    if not args.skip_cases:
        outs = []
        for case in make_cases(args):
            if args.only and args.only not in case.label:
                continue
            t0 = time.perf_counter()
            out = run_case(case, args)
            print_case(out, args.tol)
            print(f"  [case wall time {time.perf_counter() - t0:.0f} s]")
            sys.stdout.flush()
            outs.append(out)
        if outs:
            print_summary(outs)
    if not args.skip_sweep:
        sweep(args)
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s, load avg {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
