"""What one check costs: probe sampling against each measurement tier, side by side in one run.

For each model and 32 probes (``--probes``) the script times, after one discarded warm-up:

* ``sampling``: :func:`memwatch.sample_trajectory`, 50 DDIM steps (``--steps``), keeping the
  state at the evaluation timestep — the part of a check every tier shares;
* ``dense``: the full Hessian and ``eigvalsh`` (only where ``d <= DENSE_MAX_DIM``);
* ``lanczos``: :func:`memwatch.measure_sharpness` at its defaults (k = 8, 32 steps, 4 SLQ vectors);
* ``trace``: the cheap tier at its defaults (Hutchinson, 4 reverse-mode products per probe), and
  with Hutch++ on 6;
* ``‖Hs‖``: :func:`memwatch.sharpness.hessian_score_norm` (one reverse-mode product per probe);
* ``denoising LID``: :func:`memwatch.lid.denoising_lid` at the probes' final samples, 8 noise
  draws (forward passes only; the LID signal's per level and check);
* ``data LID``: :func:`memwatch.lid.data_lid` on 4096 training-sized samples at 3 levels (the
  LID signal's once per run, at the first check);

and prints wall and process-CPU seconds, Jacobian-vector products per probe (a jvp and a vjp
count one each; a Lanczos step on the symmetrized Jacobian is one of each) and the ratio
measurement / sampling. A warm-up call on 2 probes precedes the timed calls. ``--lanczos-probes``
times the Lanczos tier on fewer probes and scales it to all (marked ``×``): its cost is linear
in the number of probes, and it is the one tier that would otherwise dominate the run time.

Models (random init, float32, CPU):

* ``mlp``: :class:`memwatch.apps.toymodels.MLPDenoiser` ε-net on ``d = 64`` (forward-mode jvps);
* ``unet16`` / ``unet32``: a tiny diffusers ``UNet2DModel`` (block_out_channels=(16, 32), one
  attention block) on ``3×16×16`` / ``3×32×32`` (attention has no forward-mode formula: the
  Lanczos tier falls back to double vjps);
* ``latent32``: the same UNet on a ``4×32×32`` "latent".
* ``digits16``: the validation study's UNet (:func:`memwatch.apps.toymodels.tiny_unet`, widths 16/32)
  on ``1×16×16``, ``d = 256``: small enough for the dense spectrum beside the trace tier.

    python benchmarks/bench_check_cost.py                  # all models, 32 probes, 50 steps
    python benchmarks/bench_check_cost.py --fast           # smoke run: mlp and unet16, 4 probes, 5 steps
    python benchmarks/bench_check_cost.py --threads 1 --lanczos-probes 4   # the slow tier on 4 probes, scaled
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import memwatch
from memwatch.apps.toymodels import MLPDenoiser, tiny_unet
from memwatch.lid import data_lid, denoising_lid
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import DENSE_MAX_DIM, SharpnessOptions, hessian_score_norm, measure_sharpness

EVAL_T = 200  # σ_t ≈ 0.44 on the linear 1000-step schedule
DRAWS = 8  # the denoising LID's noise draws per probe (memwatch.LidOptions().draws)


@dataclass(frozen=True)
class Model:
    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.nn.Module]


def _tiny_unet(channels: int, size: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        add_attention=False,
    )


MODELS = {
    "mlp": Model("MLP ε-net", (64,), lambda: MLPDenoiser((64,))),
    "digits16": Model("UNet 1×16×16 (the study's)", (1, 16, 16), lambda: tiny_unet(1, 16, widths=(16, 32))),
    "unet16": Model("UNet 3×16×16", (3, 16, 16), lambda: _tiny_unet(3, 16)),
    "unet32": Model("UNet 3×32×32", (3, 32, 32), lambda: _tiny_unet(3, 32)),
    "latent32": Model("UNet 4×32×32 (latent)", (4, 32, 32), lambda: _tiny_unet(4, 32)),
}


@dataclass(frozen=True)
class Timing:
    wall: float  # seconds, median over repeats
    cpu: float  # process CPU seconds, median over repeats (steadier on a shared machine)


def _timed(fn: Callable[[], object], warm_up: Callable[[], object], repeats: int) -> tuple[Timing, object]:
    """Median wall and CPU seconds of ``repeats`` calls of ``fn`` after one ``warm_up`` call; the last result."""
    warm_up()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus)), out


def _tiers(dim: int) -> list[tuple[str, SharpnessOptions | None, int]]:
    """(label, options or None for ‖Hs‖, Jacobian-vector products per probe)."""
    lanczos = SharpnessOptions(method="lanczos")
    tiers = []
    if dim <= DENSE_MAX_DIM:
        tiers.append(("dense", SharpnessOptions(method="dense"), dim))
    tiers += [
        ("lanczos (k=8, m=32, 4 vec)", lanczos, 2 * lanczos.num_iters * lanczos.num_vectors),
        ("trace hutchinson (4 vjp)", SharpnessOptions(method="trace"), 4),
        ("trace hutch++ (6 vjp)", SharpnessOptions(method="trace", trace_estimator="hutch++", num_vectors=6), 6),
        ("‖Hs‖ (1 vjp)", None, 1),
    ]
    return tiers


def run_model(model: Model, probes: int, steps: int, repeats: int, lanczos_probes: int) -> list[tuple[str, ...]]:
    """Table rows for one model: sampling, then every tier on the sampled states."""
    torch.manual_seed(0)
    net = model.make().eval()
    schedule = NoiseSchedule.linear(1000)
    score = DiffusionScore(net, schedule, prediction="epsilon")
    dim = math.prod(model.shape)
    sigma3 = float(schedule.sigma(torch.tensor(EVAL_T))) ** 3

    def draw(n: int, num_steps: int) -> memwatch.Trajectory:
        gen = torch.Generator().manual_seed(0)
        return memwatch.sample_trajectory(score, n, model.shape, num_steps, generator=gen, states_at=(EVAL_T,))

    sampling, traj = _timed(lambda: draw(probes, steps), lambda: draw(2, 2), repeats)
    states = traj.states[float(EVAL_T)]
    rows = [_row(model, dim, "sampling", sampling, sampling, f"{steps} fwd", 1, "")]
    for label, options, products in _tiers(dim):
        used = min(probes, lanczos_probes) if label.startswith("lanczos") else probes
        x = states[:used]
        if options is None:
            timing, values = _timed(lambda x=x: hessian_score_norm(score, x, EVAL_T), lambda: None, repeats)
            reading = f"σ³‖Hs‖ {float(values.mean()) * sigma3:.3g}"
        else:

            def measure(x: torch.Tensor = x, o: SharpnessOptions = options) -> memwatch.SharpnessResult:
                return measure_sharpness(score, x, EVAL_T, o, generator=torch.Generator().manual_seed(1))

            timing, res = _timed(measure, lambda m=measure: m(states[:2]), repeats)
            reading = f"LID {float(res.lid.nanmean()):.1f}"
            if res.method == "lanczos":
                reading += f", converged {float(res.converged.double().mean()):.0%}"
        rows.append(_row(model, dim, label, timing, sampling, str(products), probes / used, reading))
    return rows + _lid_rows(model, score, traj.samples, sampling, repeats)


def _lid_rows(
    model: Model, score: DiffusionScore, samples: torch.Tensor, sampling: Timing, repeats: int
) -> list[tuple[str, ...]]:
    """The LID signal's own costs: the denoising LID per level and check, the data LID once per run."""
    dim = math.prod(model.shape)
    noise = torch.randn((DRAWS, *samples.shape), generator=torch.Generator().manual_seed(2))
    timing, dlid = _timed(lambda: denoising_lid(score, samples, EVAL_T, noise), lambda: None, repeats)
    rows = [_row(model, dim, f"denoising LID ({DRAWS} fwd)", timing, sampling, "0", 1, f"LID {float(dlid.mean()):.1f}")]
    data = torch.randn((4096, *model.shape), generator=torch.Generator().manual_seed(3))
    scales = torch.tensor([0.1, 0.2, 0.4])
    timing, lid = _timed(lambda: data_lid(data, scales), lambda: None, repeats)
    reading = f"LID {float(lid[0]):.1f} (once per run)"
    return rows + [_row(model, dim, "data LID (4096 samples, 3 σ)", timing, sampling, "0", 1, reading)]


def _row(model: Model, dim: int, label: str, t: Timing, sampling: Timing, products: str, scale: float, reading: str):
    """One table row; a tier timed on fewer probes is scaled to all of them (cost is linear in probes)."""
    mark = "" if scale == 1 else f" (×{scale:g})"
    wall, cpu = t.wall * scale, t.cpu * scale
    return (
        model.name,
        str(dim),
        label + mark,
        f"{wall:.2f}",
        f"{cpu:.2f}",
        products,
        f"{wall / sampling.wall:.2f}",
        f"{cpu / sampling.cpu:.2f}",
        reading,
    )


HEADER = ("model", "d", "step", "wall s", "cpu s", "products/probe", "÷ sampling wall", "÷ sampling cpu", "reading")
WIDTHS = (21, 5, 31, 7, 7, 14, 15, 14, 26)


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    """Rows in fixed-width columns, printed as each model finishes."""
    for row in rows:
        cells = (c.ljust(w) if j in (0, 2, 8) else c.rjust(w) for j, (c, w) in enumerate(zip(row, WIDTHS)))
        print("  ".join(cells).rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="models to run")
    parser.add_argument("--probes", type=int, default=32, help="probes per check (default 32)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of probe sampling (default 50)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after the warm-up; median (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument(
        "--lanczos-probes",
        type=int,
        default=None,
        help="time the Lanczos tier on this many probes and scale to all (default: all probes)",
    )
    parser.add_argument("--fast", action="store_true", help="smoke run: mlp and unet16, 4 probes, 5 steps")
    args = parser.parse_args(argv)
    if args.fast:
        args.models, args.probes, args.steps = ["mlp", "unet16"], 4, 5
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*forward-mode AD is not supported.*")  # expected for UNets
    warnings.filterwarnings("ignore", message=".*have not all converged.*")  # read in the "converged" column

    print(
        f"{args.probes} probes, {args.steps} DDIM steps, t = {EVAL_T}, {torch.get_num_threads()} thread(s), "
        f"torch {torch.__version__}, median of {args.repeats} after a warm-up on 2 probes\n",
        flush=True,
    )
    _print_rows([HEADER, tuple("-" * w for w in WIDTHS)])
    for key in args.models:
        _print_rows(run_model(MODELS[key], args.probes, args.steps, args.repeats, args.lanczos_probes or args.probes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
