"""The report's figures. Each function builds one Figure from analysis results; colours and line
styles are arguments (with the report's choices as defaults), never changed after drawing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .analysis import Outcome, Rule, gt_onset, loss_gap, nn_fraction
from .config import NN_ONSET, Defaults
from .runs import RunRecord

RUN_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ----------------------------------------------------------------------------- the monitor's copies vs the truth
def plot_ratios(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], seeds_label: str) -> Figure:
    """Per probe, a monitor's ``d₁/d₂`` (y) against the study's truth (x), one colour per label of
    ``pairs`` (label -> (truth ``[M]``, monitor ``[M]``)), the 1/3 lines dashed: the monitor
    counts a copy below the horizontal one, the truth left of the vertical one."""
    fig = _figure((6.6, 6.2))
    ax = fig.add_subplot()
    for label, (truth, mon) in pairs.items():
        ax.scatter(truth, mon, s=6, alpha=0.35, label=f"{label} ({len(truth)} probes)")
    ax.axhline(1 / 3, color="0.3", ls="--", lw=1.0)
    ax.axvline(1 / 3, color="0.3", ls="--", lw=1.0)
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("truth d1/d2 (distinct training items; per item on augmented runs)")
    ax.set_ylabel("monitor's d1/d2 (its own index of the batches)")
    ax.set_title(f"The monitor's copy ratio vs the truth ({seeds_label})")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=1, fontsize="small", markerscale=3)
    return fig


# ----------------------------------------------------------------------------- onsets of the rules
def plot_onsets(outcomes: Mapping[str, Outcome], seeds_label: str, markers: str = "osD^v") -> Figure:
    """Each rule's onset against the NN truth's, one marker per memorizing run (matplotlib's colour
    cycle, one colour and marker per rule); a run the rule misses sits on the top edge; the
    diagonal: on time below it. The legend counts on-time runs and false alarms."""
    fig = _figure((7.0, 6.2))
    ax = fig.add_subplot()
    rows_all = [r for out in outcomes.values() for r in out.rows]
    top = max([r.truth or 0 for r in rows_all] + [r.onset or 0 for r in rows_all]) * 1.15 + 1
    for i, (name, out) in enumerate(outcomes.items()):
        memo = [r for r in out.rows if r.truth is not None]
        xs = [r.truth for r in memo]
        ys = [r.onset if r.onset is not None else top for r in memo]
        jitter = 1.0 + 0.03 * (i - len(outcomes) / 2)
        label = (
            f"{name}: {out.count('on_time')}/{out.count('memorizing')} on time, {out.count('false_alarm')} false alarms"
        )
        ax.scatter(np.array(xs) * jitter, ys, marker=markers[i % len(markers)], s=28, alpha=0.7, label=label)
    lo = min([r.truth for r in rows_all if r.truth] + [r.onset for r in rows_all if r.onset] + [top]) / 1.3
    ax.plot([lo, top], [lo, top], color="0.3", lw=1.0)
    ax.axhline(top, color="0.6", lw=0.8, ls=":")
    ax.annotate("missed", (min(r.truth or top for r in rows_all), top), fontsize=8, color="0.4", va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("NN ground-truth onset step (first check with > 10 % copies)")
    ax.set_ylabel("rule's onset step (below the diagonal: on time)")
    ax.set_title(f"Onset vs ground truth, memorizing runs ({seeds_label})")
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="outside lower center", ncols=1, fontsize="small")
    return fig


# ----------------------------------------------------------------------------- loss gap
def plot_loss_gap(
    runs: Sequence[RunRecord], kinds: Sequence[str], t: str, threshold: float, seeds_label: str
) -> Figure:
    """The relative ε-loss gap at ``t`` against the training step, one line per run coloured by
    its kind (``kinds`` ``[len(runs)]``: memorizing red, borderline orange, never blue) and the
    chosen ``threshold`` (dashed)."""
    colour = {"memorizing": "tab:red", "borderline": "tab:orange", "never": "tab:blue"}
    fig = _figure((7.5, 4.8))
    ax = fig.add_subplot()
    for r, kind in zip(runs, kinds):
        ax.plot(r.steps, loss_gap(r, t), color=colour[kind], lw=1.0, alpha=0.6)
    for kind, c in colour.items():
        ax.plot([], [], color=c, label=f"{kind} runs")
    ax.axhline(threshold, color="k", ls="--", lw=1.2, label=f"chosen threshold {threshold:g}")
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("(held-out − train) / train ε-loss")
    ax.set_title(f"Loss-gap baseline at t = {t} ({seeds_label})")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=4, fontsize="small")
    return fig


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
    picked: Mapping[str, RunRecord], rule: Rule, defaults: Defaults, colours: Sequence[str] = RUN_COLOURS
) -> dict[str, Curve]:
    """Label -> :class:`Curve`: per run of ``picked`` (label -> run), the ``rule``'s flagged
    fraction (solid, filled circles, onset dashed) and the NN truth's (dashed, open squares,
    onset dotted), one colour per run."""
    curves: dict[str, Curve] = {}
    for i, (name, r) in enumerate(picked.items()):
        c = colours[i % len(colours)]
        curves[f"{name}: memwatch"] = Curve(
            r.steps,
            rule.series(r),
            rule.onset(r, defaults),
            {"color": c, "ls": "-", "marker": "o", "mfc": c},
            {"color": c, "ls": "--", "lw": 1.6},
        )
        curves[f"{name}: NN truth"] = Curve(
            r.steps,
            nn_fraction(r),
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
