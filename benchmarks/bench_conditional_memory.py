"""Peak memory of :func:`memwatch.conditional.conditional_metrics` against ``max_batch``.

A small diffusers ``UNet2DConditionModel`` (3×16×16 images, channels (32, 64), cross-attention
on embeddings ``[L=8, E=32]``, random weights) is measured on ``C = 4`` conditions × ``P`` probes
each (condition-major, the monitor's layout), ``--sampler-steps`` DDIM steps averaged over the
default first 80 %, with the sharpness of ``p_t(x | c)`` by Lanczos at one timestep. Without a
bound the products run on all ``m · C · P`` (step, probe) rows at once; with ``max_batch`` every
model call sees at most that many rows.

Each setting runs in a fresh subprocess and reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``): ``baseline`` after importing, building the
model and one warm-up call of one row; ``peak`` at the end; ``added`` = peak − baseline is what
the measurement itself needed. The table shows ``added`` bounded by ``max_batch`` and, for a
bounded ``max_batch``, the same for every number of probes; unbounded it grows with the probes.
``bytes/row`` = ``added / min(max_batch, rows)`` per sample element per byte of float32, the
figure behind :data:`memwatch.conditional.ROW_BYTES_PER_ELEMENT`.

Run::

    python benchmarks/bench_conditional_memory.py                      # P = 8, 16; max_batch none, 64, 16, 4
    python benchmarks/bench_conditional_memory.py --probes 16 --max-batch none 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONDITIONS, TOKENS, WIDTH, SHAPE = 4, 8, 32, (3, 16, 16)


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def child(probes: int, max_batch: int | None, sampler_steps: int, threads: int) -> dict[str, float]:
    """One measurement in this process; returns baseline / peak RSS (bytes) and seconds."""
    import warnings

    import torch
    from diffusers import UNet2DConditionModel

    from memwatch.conditional import conditional_metrics, default_first_steps
    from memwatch.schedules import NoiseSchedule
    from memwatch.score import DiffusionScore

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=SHAPE[1],
        in_channels=SHAPE[0],
        out_channels=SHAPE[0],
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    schedule = NoiseSchedule.linear(1000)
    score = DiffusionScore(unet, schedule, null_cond=torch.zeros(TOKENS, WIDTH), cond_kwarg="encoder_hidden_states")
    g = torch.Generator().manual_seed(0)
    conditions = torch.randn(CONDITIONS, TOKENS, WIDTH, generator=g)
    noise = torch.randn(probes, *SHAPE, generator=g)
    with torch.no_grad():  # warm-up: lazy initialisation is part of the baseline
        score.conditional(noise[:1], 500, conditions[0])
    baseline = _maxrss_bytes()
    started = time.perf_counter()
    res = conditional_metrics(
        score,
        conditions.repeat_interleave(probes, dim=0),
        noise=noise.repeat(CONDITIONS, 1, 1, 1),
        steps=sampler_steps,
        eval_t=int(schedule.timestep_for_sigma(0.3)),
        k=2,
        method="lanczos",
        num_iters=4,
        num_vectors=2,
        max_batch=max_batch,
        jvp_mode="reverse",
        lanczos_generator=torch.Generator().manual_seed(1),
    )
    assert bool(res.finite.all())
    rows = default_first_steps(sampler_steps) * CONDITIONS * probes
    return {
        "baseline": baseline,
        "peak": _maxrss_bytes(),
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 16], help="probes per condition")
    parser.add_argument("--max-batch", nargs="+", default=["none", "64", "16", "4"], help="'none' or row counts")
    parser.add_argument("--sampler-steps", type=int, default=3, help="DDIM steps (products at the first 80 %%)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bounds = [None if b.lower() == "none" else int(b) for b in args.max_batch]
    if args.child:
        print(json.dumps(child(args.probes[0], bounds[0], args.sampler_steps, args.threads)))
        return

    root = Path(__file__).resolve().parents[1]
    dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
    print(
        f"UNet2DConditionModel {SHAPE}, {CONDITIONS} conditions [L={TOKENS}, E={WIDTH}], "
        f"{args.sampler_steps} sampler steps, {args.threads} thread(s)"
    )
    print(
        f"{'probes/cond':>11} {'max_batch':>9} {'rows':>6} {'baseline MiB':>12} {'peak MiB':>9} "
        f"{'added MiB':>9} {'bytes/row/elem':>14} {'seconds':>8}"
    )
    for probes in args.probes:
        for bound in bounds:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--probes",
                str(probes),
                "--max-batch",
                str(bound).lower(),
                "--sampler-steps",
                str(args.sampler_steps),
                "--threads",
                str(args.threads),
            ]
            out = subprocess.run(
                cmd,
                check=True,
                capture_output=True,
                text=True,
                cwd=root,
                env={**__import__("os").environ, "PYTHONPATH": str(root)},
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            added = r["peak"] - r["baseline"]
            per_row = added / min(bound or r["rows"], r["rows"]) / (dim * 4)
            print(
                f"{probes:>11} {str(bound):>9} {r['rows']:>6} {r['baseline'] / 2**20:>12.0f} "
                f"{r['peak'] / 2**20:>9.0f} {added / 2**20:>9.0f} {per_row:>14.0f} {r['seconds']:>8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
