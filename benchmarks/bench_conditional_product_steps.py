"""What the conditional check's cheap settings cost in detection: ``product_steps`` and the sharpness tier.

The digits setting of ``examples/conditional.py`` (class 3 = one image × 100 among ~1700 distinct
digits, a class-conditional MLP trained ``--train-steps`` steps, ten classes × ``--probes`` probes,
``--sampler-steps`` DDIM steps) is trained once per seed. One :func:`memwatch.conditional_metrics`
call with every step of the default window gives the per-step values; the mean over
``product_steps = k`` of them (:func:`memwatch.conditional.product_step_indices`) is exactly what
``conditional_metrics(..., product_steps=k)`` returns (``tests/test_conditional.py``), so every
``k`` is read off that one call. The sharp fraction of ``p_t(x | c)`` at σ_t = 0.2 is measured
with the dense spectrum (what the monitor runs at d ≤ 384) and with the trace tier; ``‖H_Δ s_Δ‖``
also with the plain Jacobian by a central difference (``symmetric=False, jvp_mode="fd"``:
forward passes only, the cheapest product on a UNet, whose attention has no forward-mode formula).

Printed per seed and setting: the per-probe AUROC of the duplicated class (positives) against the
other nine, and the ratio of its mean to the next class's mean (> 1: it comes first).

    python benchmarks/bench_conditional_product_steps.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

from memwatch.conditional import conditional_metrics, default_first_steps, product_step_indices

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conditional.py"
DUP = 3


def _example():
    spec = importlib.util.spec_from_file_location("memwatch_example_conditional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reading(values: torch.Tensor, labels: torch.Tensor) -> str:
    """``AUROC / ratio of the duplicated class's mean to the next class's``."""
    means = torch.stack([values[labels == c].nanmean() for c in range(10)])
    others = means[torch.arange(10) != DUP].max()
    auroc = roc_auc_score((labels == DUP).numpy(), torch.nan_to_num(values, nan=-1e30).numpy())
    return f"{auroc:.3f} / {float(means[DUP] / others):.2f}"


def run_seed(example, seed: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(setting, reading)`` rows for one training seed."""
    images, labels, _ = example.duplicated_class_digits(dup_class=DUP, copies=100)
    with tempfile.TemporaryDirectory() as root:
        module = example.train(images, labels, args.train_steps, root=root, seed=seed)
    score = module.memwatch_score()
    probe_labels = torch.arange(10).repeat_interleave(args.probes)
    noise = torch.randn(args.probes, *module.hparams.shape, generator=torch.Generator().manual_seed(seed))
    kwargs = dict(noise=noise.repeat(10, *[1] * (noise.ndim - 1)), steps=args.sampler_steps, k=4)
    t_eval = int(score.schedule.timestep_for_sigma(0.2))
    rows = []
    for method in ("dense", "trace"):
        res = conditional_metrics(score, probe_labels, eval_t=t_eval, method=method, **kwargs)
        rows.append((f"sharp fraction, {method}", _reading(res.sharp_fraction, probe_labels)))
    plain = conditional_metrics(score, probe_labels, symmetric=False, jvp_mode="fd", **kwargs)
    m = default_first_steps(args.sampler_steps)
    for k in sorted({m, 8, 4, 2, 1}, reverse=True):
        idx = product_step_indices(m, k)
        for name, steps in (
            ("‖H_Δ s_Δ‖", res.step_hessian_score_diff_norm),
            ("‖H_Δ s_Δ‖ plain, fd", plain.step_hessian_score_diff_norm),
            ("‖s_Δ‖", res.step_score_diff_norm),
        ):
            rows.append((f"{name}, product_steps={k}", _reading(steps[:, idx].mean(1), probe_labels)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--probes", type=int, default=32, help="probes per class")
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    example = _example()
    table = {seed: run_seed(example, seed, args) for seed in args.seeds}
    settings = [s for s, _ in table[args.seeds[0]]]
    print(
        f"digits, class {DUP} = one image × 100, {args.train_steps} training steps, {args.probes} probes per class, "
        f"{args.sampler_steps} sampler steps; per seed: per-probe AUROC / mean ÷ next class's mean\n"
    )
    print(f"{'setting':<42}" + "".join(f"{'seed ' + str(s):>16}" for s in args.seeds))
    for i, setting in enumerate(settings):
        print(f"{setting:<42}" + "".join(f"{table[s][i][1]:>16}" for s in args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
