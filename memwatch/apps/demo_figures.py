"""The demo's PNGs, drawn from what its runs' checks measured (:mod:`memwatch.apps.demo`).

Every figure is one call of a :mod:`memwatch.plots` function with its colours and line styles
passed in: run ``i`` is drawn in colour ``Ci`` throughout, early curves dotted, ground truth
dashed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from memwatch import defaults, plots
from memwatch.groundtruth import MEMORIZED_RATIO

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from memwatch.apps.demo_settings import DemoSettings, RunResult

__all__ = ["curves_figure", "gallery_figure", "memorized_figure", "save_figures", "sigma_label", "spectrum_figure"]


def sigma_label(result: RunResult) -> str:
    """``"σ=0.22"``: the primary noise level a run's monitor calibrated and measured at."""
    return f"σ={result.sigma:.2g}"


def curves_figure(results: Sequence[RunResult]) -> Figure:
    """Mean sharp fraction of the probes per check, one curve per run, onsets marked."""
    curves = {r.label: ([h["step"] for h in r.history], [h["sharp_fraction_mean"] for h in r.history]) for r in results}
    return plots.plot_metric_curves(
        curves,
        onsets={r.label: r.onset_step for r in results},
        ylabel="mean sharp fraction of the probes (at each run's calibrated σ)",
        title="Sharpness of the learned density during training",
        styles={r.label: {"color": f"C{i}"} for i, r in enumerate(results)},
        ylim=(-0.02, 1.02),
    )


def memorized_figure(results: Sequence[RunResult]) -> Figure:
    """Share of probes flagged by memwatch (solid) vs share that are copies (dashed), per run."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    onsets: dict[str, int | None] = {}
    names: dict[str, str] = {}
    for i, r in enumerate(results):
        steps = [h["step"] for h in r.history]
        flagged, copies = f"{r.label}: flagged by memwatch", f"{r.label}: copies of training images"
        curves[flagged] = (steps, [h[r.onset_key] for h in r.history])
        curves[copies] = (steps, [h.get("nn_memorized_fraction", math.nan) for h in r.history])
        styles[flagged] = {"color": f"C{i}"}
        styles[copies] = {"color": f"C{i}", "linestyle": "--", "marker": "s"}
        onsets[flagged], names[flagged] = r.onset_step, r.label
    return plots.plot_metric_curves(
        curves,
        onsets=onsets,
        ylabel="share of the probes",
        title="Memorized probes: memwatch's flag vs ground truth",
        styles=styles,
        onset_labels=names,
        hlines={_threshold_label(results[0].onset_patience): results[0].onset_threshold},
        ylim=(-0.02, 1.02),
    )


def _threshold_label(patience: int) -> str:
    """The onset threshold's legend entry: above it at one check, or ``patience`` in a row."""
    return "onset threshold" + (f" ({patience} checks in a row above it)" if patience > 1 else "")


def spectrum_figure(results: Sequence[RunResult], settings: DemoSettings) -> Figure:
    """Hessian spectrum at the probes, early (dotted, first check) vs late (solid), per run."""
    densities: dict[str, tuple[Any, Any]] = {}
    styles: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(results):
        if r.early is not None:
            label = f"{r.label}, step {settings.check_every}"
            densities[label] = (r.early.grid, r.early.density)
            styles[label] = {"color": f"C{i}", "linestyle": ":", "fill_alpha": 0.05}
        label = f"{r.label}, step {r.steps}"
        densities[label] = (r.late.grid, r.late.density)
        styles[label] = {"color": f"C{i}", "fill_alpha": 0.15}
    levels = ", ".join(f"{r.label}: {sigma_label(r)}" for r in results)
    return plots.plot_spectrum(
        densities,
        threshold=-defaults.SHARPNESS.threshold,
        title=f"Hessian spectrum at the probes ({levels}), early vs late",
        styles=styles,
        legend_below=True,
    )


def gallery_figure(result: RunResult, n: int = 8) -> Figure:
    """``n`` probes of a run beside their nearest training digits: those the monitor flags first,
    then the sharpest."""
    rep = result.late
    order = (2 * rep.flagged.double() + torch.nan_to_num(rep.score, nan=-1.0)).argsort(descending=True)[:n]
    captions = [
        f"sharp {float(rep.score[i]):.2f}\nd1/d2 {float(rep.nn_ratio[i]):.2f}"
        + (" copy" if float(rep.nn_ratio[i]) < MEMORIZED_RATIO else "")
        for i in order
    ]
    return plots.plot_gallery(
        rep.samples[order],
        neighbours=result.train_data[rep.nearest[order]],
        captions=captions,
        flagged=rep.flagged[order],
        title=f"{result.label}: {len(order)} probes, flagged first (top), and their nearest training digits",
    )


def save_figures(results: Sequence[RunResult], settings: DemoSettings, folder: str | Path) -> dict[str, Path]:
    """Write the demo's PNGs into ``folder``; return ``name -> path``.

    ``curves.png`` (sharp fraction per check, onset marked), ``memorized.png`` (share flagged vs
    share that are copies), ``spectrum.png`` (early vs late), ``probes_<run>.png`` (galleries).
    """
    folder = Path(folder)
    figures = {
        "curves": curves_figure(results),
        "memorized": memorized_figure(results),
        "spectrum": spectrum_figure(results, settings),
    }
    for r in results:
        figures[f"probes_{r.name}"] = gallery_figure(r)
    paths = {name: plots.save_figure(fig, folder / f"{name}.png") for name, fig in figures.items()}
    for r in results:
        r.figures = dict(paths)
    return paths
