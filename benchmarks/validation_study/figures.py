"""The report's figures. Each function builds one Figure from analysis results; colours and line
styles are arguments (with the report's choices as defaults), never changed after drawing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import AurocTable, OnsetRow, gt_onset, labels, macro, memorized_fraction, replay_onset
from .config import NN_ONSET, PRIMARY_SIGNAL, SIGNALS, Defaults, StudyConfig
from .runs import RunRecord

DATASET_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")
RUN_COLOURS = ("tab:red", "tab:blue", "tab:green")


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------- AUROC vs noise level
def plot_auroc_vs_sigma(
    table: AurocTable,
    datasets: Sequence[str],
    cfg: StudyConfig,
    chosen: Mapping[str, str],
    seeds_label: str,
    primary: str = PRIMARY_SIGNAL,
) -> Figure:
    """Mean per-probe AUROC over ``datasets`` of every signal against the noise level, absolute
    (left) and relative (right); ``chosen``: annotation -> noise level, a dotted line each;
    ``primary``: the signal drawn bold. Lines take matplotlib's colour cycle in ``SIGNALS`` order."""
    fig = _figure((10.0, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, kind, xs, xlabel in (
        (axes[0], "abs", cfg.abs_sigmas, r"absolute noise level $\sigma_t$"),
        (axes[1], "rel", cfg.rel_sigmas, r"$\sigma_t$ / median NN distance of the training set"),
    ):
        for signal, sig in SIGNALS.items():
            ys = [macro(table, datasets, f"{kind} {x:g}", signal) for x in xs]
            lw, ms = (2.4, 6) if signal == primary else (1.3, 4)
            ax.plot(xs, ys, marker="o", lw=lw, ms=ms, label=sig.label)
        _mark_chosen(ax, kind, chosen)
        ax.axhline(0.95, color="tab:red", ls="--", lw=1.0, label="target 0.95")
        ax.axhline(0.5, color="0.5", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylim(0.35, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("per-probe AUROC (mean over data sets)")
    fig.suptitle(f"Which signal and noise level separate NN-memorized probes? ({seeds_label})")
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="outside lower center", ncols=4, fontsize="small")
    return fig


def _mark_chosen(ax: Axes, kind: str, chosen: Mapping[str, str]) -> None:
    """A dotted vertical line at each chosen level of ``kind`` (``"abs"`` / ``"rel"``), with the names."""
    by_x: dict[float, list[str]] = {}
    for label, spec in chosen.items():
        if spec.startswith(kind):
            by_x.setdefault(float(spec.split()[1]), []).append(label)
    for x, names in by_x.items():
        ax.axvline(x, color="0.3", ls=":", lw=1.2)
        ax.annotate(" + ".join(names), (x, 0.36), rotation=90, fontsize=8, color="0.3", ha="right", va="bottom")


# ----------------------------------------------------------------------------- onset vs N
def plot_onset_vs_n(rows: Sequence[OnsetRow], seeds_label: str, colours: Sequence[str] = DATASET_COLOURS) -> Figure:
    """Onset step against N (log-log) of the NN truth (open squares, dashed median) and of memwatch
    (filled circles, solid median), one colour per data set (``colours``, in sorted data-set order),
    with a slope-1 line through the truth medians."""
    fig = _figure((7.5, 5.5))
    ax = fig.add_subplot()
    datasets = sorted({r.dataset for r in rows})
    colour = dict(zip(datasets, colours))
    allx: list[int] = []
    truth_pts: list[tuple[int, float]] = []
    for ds in datasets:
        sub = [r for r in rows if r.dataset == ds]
        for key, marker, fill, ls in (("truth", "s", "none", "--"), ("onset", "o", colour[ds], "-")):
            med_n, med_s = _scatter_onsets(ax, sub, key, marker, fill, colour[ds])
            ax.plot(med_n, med_s, ls=ls, color=colour[ds], lw=1.4)
            allx += med_n
            if key == "truth":
                truth_pts += list(zip(med_n, med_s))
    # legend entries: data sets by colour, kind by marker
    for ds in datasets:
        ax.plot([], [], color=colour[ds], lw=2, label=ds)
    ax.plot([], [], "s--", color="0.3", mfc="none", label="NN truth > 10 % (median: dashed)")
    ax.plot([], [], "o-", color="0.3", label="memwatch onset (median: solid)")
    if truth_pts:  # slope 1 through the truth medians (least squares in log space)
        lx, ly = np.log(np.array(truth_pts, dtype=float)).T
        xs = np.array([min(allx), max(allx)], dtype=float)
        ax.plot(xs, np.exp(np.mean(ly - lx)) * xs, color="0.3", ls=":", lw=1.6, label="slope 1 (onset ∝ N)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training-set size N")
    ax.set_ylabel("onset step (only runs that memorize)")
    ax.set_title(f"When does memorization start? ({seeds_label})")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return fig


def _scatter_onsets(
    ax: Axes, rows: Sequence[OnsetRow], key: str, marker: str, fill: str, colour: str
) -> tuple[list[int], list[float]]:
    """Scatter ``row.<key>`` of every run per N; return the sizes that have one and the medians."""
    med_n, med_s = [], []
    for n in sorted({r.n for r in rows}):
        vals = [getattr(r, key) for r in rows if r.n == n and getattr(r, key) is not None]
        ax.scatter([n] * len(vals), vals, marker=marker, s=22, facecolors=fill, edgecolors=colour, alpha=0.55, lw=1.0)
        if vals:
            med_n.append(n)
            med_s.append(float(np.median(vals)))
    return med_n, med_s


# ----------------------------------------------------------------------------- curves of a few runs
@dataclass(frozen=True)
class Curve:
    """One curve of :func:`plot_curves`: ``steps`` ``[C]``, ``values`` ``[C]``, its ``onset``
    (``None``: none) and matplotlib ``style`` (line) and ``onset_style`` (its vertical line)."""

    steps: np.ndarray
    values: np.ndarray
    onset: int | None
    style: Mapping[str, Any]
    onset_style: Mapping[str, Any]


def run_curves(
    picked: Sequence[RunRecord],
    spec: str,
    score_threshold: float,
    onset_threshold: float,
    defaults: Defaults,
    colours: Sequence[str] = RUN_COLOURS,
) -> dict[str, Curve]:
    """Label -> :class:`Curve`: per run of ``picked``, memwatch's memorized fraction (solid, filled
    circles, onset dashed) and the NN truth's (dashed, open squares, onset dotted), one colour per run."""
    curves: dict[str, Curve] = {}
    for i, r in enumerate(picked):
        c = colours[i % len(colours)]
        scores = r.signals[spec][PRIMARY_SIGNAL]
        curves[f"N={r.n}: memwatch"] = Curve(
            r.steps,
            memorized_fraction(scores, score_threshold),
            replay_onset(r.steps, scores, score_threshold, onset_threshold, defaults),
            {"color": c, "ls": "-", "marker": "o", "mfc": c},
            {"color": c, "ls": "--", "lw": 1.6},
        )
        curves[f"N={r.n}: NN truth"] = Curve(
            r.steps,
            labels(r).mean(1),
            gt_onset(r),
            {"color": c, "ls": "--", "marker": "s", "mfc": "white"},
            {"color": c, "ls": ":", "lw": 1.6},
        )
    return curves


def plot_curves(curves: Mapping[str, Curve], onset_threshold: float, title: str) -> Figure:
    """Fraction of probes flagged memorized against the training step, one line per curve (``ms``
    4, ``lw`` 1.6 unless its style says otherwise), a vertical line at each onset, and horizontal
    lines at ``onset_threshold`` and the truth's onset level ``NN_ONSET``."""
    fig = _figure((7.5, 5.0))
    ax = fig.add_subplot()
    for label, c in curves.items():
        ax.plot(c.steps, c.values, **{"ms": 4, "lw": 1.6, **c.style}, label=label)
    for label, c in curves.items():
        if c.onset is not None:
            ax.axvline(float(c.onset), **c.onset_style, label=f"onset ({label}) @ step {int(c.onset)}")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of probes flagged memorized")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.axhline(onset_threshold, color="0.35", ls="-.", lw=0.9, label=f"onset_threshold {onset_threshold:g}")
    ax.axhline(NN_ONSET, color="0.6", ls="-.", lw=0.9, label=f"truth onset level {NN_ONSET:g}")
    ax.set_ylim(-0.03, 1.03)
    handles, labels_ = ax.get_legend_handles_labels()
    fig.legend(handles, labels_, fontsize="small", loc="outside lower center", ncols=2)
    return fig
