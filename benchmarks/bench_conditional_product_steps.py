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

``--setting text`` does the same on the trained UNet of ``examples/text_conditional.py`` (a
``UNet2DConditionModel`` on prompt embeddings, 4 prompts, digit 3's prompt = one image × 30,
700 training steps as in its test, 16 probes per prompt, 10 sampler steps): ``‖H_Δ s_Δ‖`` by the
double vjp (what the monitor runs on a UNet) and by central difference (``jvp_mode="fd"``).

Printed per seed and setting: the per-probe AUROC of the duplicated class (positives) against the
others, and the ratio of its mean to the next class's mean (> 1: it comes first).

    PYTHONPATH=. python benchmarks/bench_conditional_product_steps.py --seeds 0 1 2
    PYTHONPATH=. python benchmarks/bench_conditional_product_steps.py --setting text --seeds 0 1 2
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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DUP = 3


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"memwatch_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reading(values: torch.Tensor, labels: torch.Tensor) -> str:
    """``AUROC / ratio of the duplicated class's mean to the next class's``."""
    classes = int(labels.max()) + 1
    means = torch.stack([values[labels == c].nanmean() for c in range(classes)])
    others = means[torch.arange(classes) != DUP].max()
    auroc = roc_auc_score((labels == DUP).numpy(), torch.nan_to_num(values, nan=-1e30).numpy())
    return f"{auroc:.3f} / {float(means[DUP] / others):.2f}"


def _windows(steps: int, named: tuple[tuple[str, torch.Tensor], ...], labels: torch.Tensor) -> list[tuple[str, str]]:
    """Rows for every ``product_steps`` read off per-step values ``[n, m]`` (the whole window of ``steps``)."""
    m = default_first_steps(steps)
    rows = []
    for k in sorted({m, 8, 4, 2, 1}, reverse=True):
        idx = product_step_indices(m, k)
        rows += [(f"{name}, product_steps={k}", _reading(v[:, idx].mean(1), labels)) for name, v in named]
    return rows


def run_text_seed(example, seed: int, args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(setting, reading)`` rows for one training seed of the text-conditional UNet."""
    prompts = example.prompt_embeddings(4, seed=0)
    images, ids = example.duplicated_prompt_digits(4, DUP, 30)
    module = example.train(images, ids, torch.stack(list(prompts.values())), args.train_steps, seed=seed)
    stacked = torch.stack(list(prompts.values()))
    noise = torch.randn(args.probes, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(4).repeat_interleave(args.probes)
    kwargs = dict(noise=noise.repeat(4, 1, 1, 1), steps=args.sampler_steps, max_batch=64)
    named = tuple(
        (f"‖H_Δ s_Δ‖ {mode}", conditional_metrics(module.memwatch_score(), stacked[labels], jvp_mode=mode, **kwargs))
        for mode in ("reverse", "fd")
    )
    named = tuple((name, res.step_hessian_score_diff_norm) for name, res in named)
    return _windows(args.sampler_steps, named, labels)


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
    named = (
        ("‖H_Δ s_Δ‖", res.step_hessian_score_diff_norm),
        ("‖H_Δ s_Δ‖ plain, fd", plain.step_hessian_score_diff_norm),
        ("‖s_Δ‖", res.step_score_diff_norm),
    )
    return rows + _windows(args.sampler_steps, named, probe_labels)


#: setting -> (example, runner, training steps, probes per class, sampler steps, description)
SETTINGS = {
    "digits": ("conditional", run_seed, 3000, 32, 20, f"digits MLP, class {DUP} = one image × 100"),
    "text": ("text_conditional", run_text_seed, 700, 16, 10, f"text UNet, prompt of digit {DUP} = one image × 30"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=None, help="default 3000 (digits), 700 (text)")
    parser.add_argument("--probes", type=int, default=None, help="probes per class: 32 (digits), 16 (text)")
    parser.add_argument("--sampler-steps", type=int, default=None, help="20 (digits), 10 (text)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    name, runner, train_steps, probes, sampler_steps, what = SETTINGS[args.setting]
    args.train_steps = args.train_steps or train_steps
    args.probes = args.probes or probes
    args.sampler_steps = args.sampler_steps or sampler_steps
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    example = _example(name)
    table = {seed: runner(example, seed, args) for seed in args.seeds}
    settings = [s for s, _ in table[args.seeds[0]]]
    print(
        f"{what}, {args.train_steps} training steps, {args.probes} probes per class, "
        f"{args.sampler_steps} sampler steps; per seed: per-probe AUROC / mean ÷ next class's mean\n"
    )
    print(f"{'setting':<42}" + "".join(f"{'seed ' + str(s):>16}" for s in args.seeds))
    for i, setting in enumerate(settings):
        print(f"{setting:<42}" + "".join(f"{table[s][i][1]:>16}" for s in args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
