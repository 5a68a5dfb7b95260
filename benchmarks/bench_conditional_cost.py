"""Where a conditional check's time goes: sampling, the Hessian-vector products, the sharpness tiers.

One check of a :class:`memwatch.MemorizationMonitor` with ``conditions=`` runs
:meth:`memwatch.probes.ProbeSet.measure` (the same path as the callback, ``memwatch scan`` and the
demo) on a small diffusers ``UNet2DConditionModel`` (random weights, float32, CPU), ``--prompts``
prompt embeddings ``[L=4, E=16]`` × ``--probes`` probes, ``--sampler-steps`` DDIM steps. The
functions the check calls are wrapped in timers (the real call path, measured in one run), so the
phases add up to the check:

* unconditional: ``sampling`` (the probes' trajectory), ``sharpness`` at the evaluation timestep
  (the adjoint test that picks the J·v path included), ``‖Hs‖`` (Jeon's unconditional detector);
* conditional (:func:`memwatch.conditional.conditional_metrics`): ``model check`` (one call with
  ``cond``), ``sampling`` (every prompt's probes, ``P · n`` rows), ``products`` (``s_Δ`` and
  ``A s_Δ`` at the first ``m`` steps, ``m · P · n`` rows), ``sharpness`` of ``p_t(x | c)``.

Each row prints the wall and process-CPU seconds, the rows that went through the network (one row
= one sample through one forward call; the backward passes are not counted) and the ratio to the
conditional sampling. The knobs: ``--sharpness`` the tier of both sharpness measurements (``auto``
= what the monitor runs: dense up to d = 384, the trace tier above), ``--first-steps`` the
products' window, ``--product-steps`` how many steps of it the products are computed at
(:func:`memwatch.conditional.product_step_indices`), ``--asymmetric`` the plain Jacobian (one
jvp instead of a jvp and a vjp), ``--jvp-mode`` the J·v path (``reverse``: the double vjp the
monitor's adjoint test picks for this UNet; ``fd``: forward passes only).

    python benchmarks/bench_conditional_cost.py --threads 1                       # the issue's setting
    python benchmarks/bench_conditional_cost.py --threads 1 --sharpness trace --product-steps 4
    python benchmarks/bench_conditional_cost.py --threads 1 --size 16 --channels 3   # d = 768
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import torch

import memwatch.conditional as conditional
import memwatch.probes as probes
from memwatch.memory import default_max_batch
from memwatch.probes import ProbeSet, evaluation_timesteps
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.sharpness import DENSE_MAX_DIM, SharpnessOptions

TOKENS, WIDTH = 4, 16  # L, E of a prompt embedding, as in examples/text_conditional.py
#: (label, module, attribute): the functions of a check that are timed, in the order they run
PHASES = (
    ("unconditional sampling", probes, "sample_trajectory"),
    ("unconditional sharpness", probes, "measure_sharpness"),
    ("unconditional ‖Hs‖", probes, "hessian_score_norm"),
    ("conditional model check", conditional, "_check_model_accepts"),
    ("conditional sampling", conditional, "_sample_states"),
    ("conditional products", conditional, "_chunked_hvp"),
    ("conditional sharpness", conditional, "measure_sharpness"),
)


def make_score(channels: int, size: int, widths: tuple[int, ...]) -> DiffusionScore:
    """The example's ε-prediction ``UNet2DConditionModel`` (random weights, no download) as a score."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=widths,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(widths) - 1),
        up_block_types=("UpBlock2D",) * (len(widths) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    for p in unet.parameters():
        p.requires_grad_(False)
    return DiffusionScore(
        unet, NoiseSchedule.linear(1000), null_cond=torch.zeros(TOKENS, WIDTH), cond_kwarg="encoder_hidden_states"
    )


@contextlib.contextmanager
def timed_phases(unet: torch.nn.Module) -> Iterator[dict[str, list[float]]]:
    """Wrap every function of ``PHASES`` in a timer: ``{label: [wall s, cpu s, network rows]}``."""
    totals = {label: [0.0, 0.0, 0] for label, _, _ in PHASES}
    current: list[str] = []
    forward = unet.forward

    def counting(x: torch.Tensor, *args: object, **kwargs: object) -> object:
        if current:
            totals[current[-1]][2] += x.shape[0]
        return forward(x, *args, **kwargs)

    def timer(label: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            current.append(label)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label][0] += time.perf_counter() - wall
                totals[label][1] += time.process_time() - cpu
                current.pop()

        return wrapped

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(unet, "forward", counting))
        for label, module, name in PHASES:
            stack.enter_context(mock.patch.object(module, name, timer(label, getattr(module, name))))
        yield totals


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """``args.repeats`` checks on the model of ``args`` after a warm-up: per phase and for the whole
    check (``"check"``) the median wall and CPU seconds and the network rows of one check."""
    score = make_score(args.channels, args.size, tuple(args.widths))
    shape = (args.channels, args.size, args.size)
    dim = args.channels * args.size * args.size
    method = args.sharpness
    if method == "auto":  # what the monitor's check runs (callback._check_shape)
        method = "trace" if dim > DENSE_MAX_DIM else "dense"
    options = SharpnessOptions(k=4, method=method, max_batch=default_max_batch(dim), jvp_mode=args.jvp_mode)
    probe_set = ProbeSet(shape, args.probes, args.sampler_steps, evaluation_timesteps(score.schedule, (0.2,)))
    g = torch.Generator().manual_seed(0)
    prompts = {f"a photo of digit {c}": torch.randn(TOKENS, WIDTH, generator=g) for c in range(args.prompts)}
    first = args.first_steps
    fixed = _with(conditional.conditional_metrics, symmetric=not args.asymmetric, product_steps=args.product_steps)
    with mock.patch.object(conditional, "conditional_metrics", fixed):
        probe_set.measure(score, options=options, conditions=prompts, condition_first_steps=first)  # warm-up
        runs = []
        for _ in range(args.repeats):
            with timed_phases(score.model) as totals:
                wall, cpu = time.perf_counter(), time.process_time()
                probe_set.measure(score, options=options, conditions=prompts, condition_first_steps=first)
                totals["check"] = [time.perf_counter() - wall, time.process_time() - cpu, 0]
            totals["check"][2] = sum(v[2] for k, v in totals.items() if k != "check")
            runs.append(totals)
    return {key: [statistics.median(r[key][j] for r in runs) for j in range(3)] for key in runs[0]}


def _with(fn: Callable[..., object], **fixed: object) -> Callable[..., object]:
    """``fn`` with the keywords ``fixed`` (settings the monitor does not pass: their defaults otherwise)."""
    return lambda *a, **kw: fn(*a, **fixed, **kw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4, help="conditions watched (default 4)")
    parser.add_argument("--probes", type=int, default=4, help="probes per check (default 4)")
    parser.add_argument("--sampler-steps", type=int, default=20, help="DDIM steps of the probes (default 20)")
    parser.add_argument("--first-steps", type=int, default=None, help="products' window (default 80 %% of the steps)")
    parser.add_argument("--sharpness", choices=("auto", "dense", "trace", "lanczos"), default="auto")
    parser.add_argument("--product-steps", type=int, default=None, help="steps of the window with products")
    parser.add_argument("--asymmetric", action="store_true", help="plain Jacobian H_Δ s_Δ (symmetric=False)")
    parser.add_argument("--jvp-mode", choices=("reverse", "forward", "autograd", "fd"), default="reverse")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=8, help="image side (default 8: the example's digits)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32], help="block_out_channels")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed checks after the warm-up; medians (default 3)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the reverse-mode fallback and convergence notes are expected
    totals = run(args)
    dim = args.channels * args.size * args.size
    base = totals["conditional sampling"]
    print(
        f"UNet2DConditionModel {args.channels}×{args.size}×{args.size} (d = {dim}), widths {tuple(args.widths)}, "
        f"{args.prompts} prompts × {args.probes} probes, {args.sampler_steps} sampler steps, first_steps = "
        f"{args.first_steps or conditional.default_first_steps(args.sampler_steps)}, product_steps = "
        f"{args.product_steps or 'all'}, sharpness {args.sharpness}, symmetric = {not args.asymmetric}, "
        f"jvp_mode {args.jvp_mode}, {torch.get_num_threads()} thread(s), median of {args.repeats}\n"
    )
    print(f"{'phase':<26} {'wall s':>8} {'cpu s':>8} {'net rows':>9} {'÷ cond sampling (cpu)':>22}")
    for label, (wall, cpu, rows) in totals.items():
        print(f"{label:<26} {wall:>8.2f} {cpu:>8.2f} {int(rows):>9} {cpu / base[1]:>22.2f}")
    beyond = sum(totals[k][1] for k in ("conditional products", "conditional sharpness"))
    print(
        f"\nconditional measurement beyond its sampling (products + sharpness): {beyond / base[1]:.2f} × the sampling"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
