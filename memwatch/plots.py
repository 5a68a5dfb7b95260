"""Matplotlib figures for memwatch results.

Every function builds a fresh :class:`matplotlib.figure.Figure` on the non-interactive Agg canvas
(no ``pyplot``, so no global state changes and no display is needed) and returns it; nothing here
computes a metric beyond what a picture needs (a mass fraction for a legend, a grid to evaluate a
toy density on). Inputs may be torch Tensors (any device, any floating dtype, with or without
grad), numpy arrays or nested sequences.

Example:
    >>> import numpy as np
    >>> grid = np.linspace(-1.5, 0.5, 201)
    >>> dens = np.exp(-0.5 * ((grid + 1) / 0.05) ** 2)
    >>> fig = plot_spectrum({"probe 0": (grid, dens)})
    >>> len(fig.axes[0].lines)   # the density and the threshold line
    2

Over 600 lines, as one module: one function per figure the reporter, the demo and ``memwatch scan``
draw, on shared axes helpers and no state; split, the helpers would be imported back by every part.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from memwatch.errors import MemwatchError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "plot_condition_metrics",
    "plot_density_2d",
    "plot_gallery",
    "plot_metric_curves",
    "plot_spectrum",
    "save_figure",
]

ArrayLike = Any  # torch.Tensor | numpy.ndarray | nested sequence of numbers

_FIGSIZE = (6.0, 4.0)  # inches
_DPI = 100
_YLABEL_CHARS = 36  # characters of a y-axis label per line: what the axes' height holds at the default font

# numpy >= 2.0 renamed trapz to trapezoid; the project supports numpy >= 1.24
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    """Convert a Tensor / ndarray / sequence to a numpy array (floats become float64).

    Tensors are detached and moved to the CPU; low-precision floats (bf16, fp16) are upcast,
    since numpy has no bfloat16. Boolean and integer inputs keep their kind.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, without importing torch
        t = x.detach().cpu()
        if t.is_floating_point():
            t = t.double()
        x = t.numpy()
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise MemwatchError(f"`{name}` must be a Tensor or array-like, got {type(x).__name__}") from err
    if arr.dtype.kind == "f":
        arr = arr.astype(np.float64, copy=False)
    elif arr.dtype.kind not in "biu":
        raise MemwatchError(f"`{name}` must hold numbers, got dtype {arr.dtype}")
    return arr


def _num(x: float) -> str:
    """Format a number with a typographic minus sign (``−0.5``, not ``-0.5``)."""
    return f"{x:g}".replace("-", "\u2212")


def _new_figure(figsize: tuple[float, float] = _FIGSIZE) -> Figure:
    """A Figure on an Agg canvas with constrained (tight) layout."""
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _curve_pair(label: str, pair: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate one ``label -> (x [N], y [N])`` entry."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise MemwatchError(f"`{what}[{label!r}]` must be a pair (x, y), got {type(pair).__name__}")
    x = _to_numpy(pair[0], f"{what}[{label!r}][0]").astype(np.float64).reshape(-1)
    y = _to_numpy(pair[1], f"{what}[{label!r}][1]").astype(np.float64).reshape(-1)
    if x.shape != y.shape:
        raise MemwatchError(
            f"`{what}[{label!r}]`: x and y must have the same length, got {x.shape[0]} and {y.shape[0]}"
        )
    return x, y


# --------------------------------------------------------------------------------------------
# spectrum
# --------------------------------------------------------------------------------------------
def plot_spectrum(
    densities: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    threshold: float | None = -0.5,
    title: str = "Hessian spectrum (SLQ density)",
    log_y: bool = False,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    legend_below: bool = False,
) -> Figure:
    """Plot spectral densities of the score Hessian over normalized eigenvalues ``σ_t² λ``.

    A memorized probe has (almost) all its mass near ``σ_t² λ = −1`` (sharp in every direction);
    a probe that generalizes on a k-dimensional manifold has a second bump near 0 holding a
    share ``k/d`` of the mass. Each legend entry states the share of mass left of ``threshold``
    (the sharp fraction read off the plotted curve, ``∫_{x<−τ} ρ / ∫ ρ`` by the trapezoid rule).

    Args:
        densities: ``label -> (grid [G], density [G])``; ``grid`` holds normalized eigenvalues
            ``σ_t² λ`` (dimensionless), ``density`` the (not necessarily normalized) density on it.
            Grids may differ between entries.
        threshold: the sharpness threshold ``−τ`` on the x axis; drawn as a dashed vertical line
            with the region left of it lightly shaded. ``None`` draws neither.
        title: figure title.
        log_y: use a logarithmic density axis (shows small bumps next to a large one).
        styles: ``label -> matplotlib line keywords`` (``color``, ``linestyle``, ``lw``, …) for
            that entry's line, plus ``fill_alpha`` for the shading under it (default 0.12).
        legend_below: put the legend below the axes instead of inside them.

    Returns:
        A 6×4 in Figure with one Axes: one line per entry (plus one for the threshold).

    Raises:
        ValueError: ``densities`` is empty, or an entry is not a pair of equal-length arrays of
            at least 2 points.

    Example:
        >>> import numpy as np
        >>> g = np.linspace(-1.5, 0.5, 101)
        >>> fig = plot_spectrum({"a": (g, np.ones(101))}, threshold=None, log_y=True)
        >>> fig.axes[0].get_yscale()
        'log'
    """
    if not densities:
        raise MemwatchError("`densities` must hold at least one entry, got an empty mapping")
    fig = _new_figure()
    ax = fig.add_subplot()
    lo, hi, peak = math.inf, -math.inf, 0.0
    for label, pair in densities.items():
        grid, dens = _sorted_density(label, pair)
        lo, hi = min(lo, float(grid.min())), max(hi, float(grid.max()))
        peak = max(peak, float(np.nanmax(dens)) if dens.size else 0.0)
        share = None if threshold is None else _sharp_share(grid, dens, threshold)
        shown = label if share is None else f"{label}  (sharp {share:.2f})"
        style = dict((styles or {}).get(label, {}))
        fill_alpha = style.pop("fill_alpha", 0.12)
        (line,) = ax.plot(grid, dens, **{"lw": 1.8, **style, "label": shown})
        ax.fill_between(grid, dens, color=line.get_color(), alpha=fill_alpha, lw=0)
    if threshold is not None:
        ax.axvspan(min(lo, threshold), threshold, color="0.5", alpha=0.1, lw=0)
        ax.axvline(threshold, color="0.25", ls="--", lw=1.2, label=f"sharp threshold at {_num(threshold)}")
    _spectrum_axes(ax, (min(lo, threshold if threshold is not None else lo), hi), peak, log_y, title)
    if legend_below:
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=2)
    else:
        ax.legend(fontsize="small", loc="best")
    return fig


def _sorted_density(label: str, pair: Any) -> tuple[np.ndarray, np.ndarray]:
    """One ``densities`` entry checked (``>= 2`` points) and sorted by its grid: ``(grid [G], density [G])``."""
    grid, dens = _curve_pair(label, pair, "densities")
    if grid.size < 2:
        raise MemwatchError(f"`densities[{label!r}]` needs a grid of at least 2 points, got {grid.size}")
    order = np.argsort(grid)
    return grid[order], dens[order]


def _sharp_share(grid: np.ndarray, dens: np.ndarray, threshold: float) -> float | None:
    """``∫_{x<threshold} ρ / ∫ ρ`` by the trapezoid rule on a sorted ``grid`` (the partial cell the
    threshold falls in included); ``None`` when the total mass is not positive."""
    total = float(_trapezoid(dens, grid))
    left = grid <= threshold
    xs = np.append(grid[left], threshold) if left.any() and threshold < grid[-1] else grid[left]
    ys = np.interp(xs, grid, dens)
    part = float(_trapezoid(ys, xs)) if xs.size > 1 else 0.0
    return part / total if total > 0 else None


def _spectrum_axes(ax: Any, xlim: tuple[float, float], peak: float, log_y: bool, title: str) -> None:
    """Limits, scales, labels and grid of a spectrum's Axes (``peak``: the highest density drawn)."""
    ax.set_xlim(*xlim)
    if log_y:
        ax.set_yscale("log")
        if peak > 0:  # six decades below the highest peak; the fill to 0 would drag it to 1e-300
            ax.set_ylim(peak * 1e-6, peak * 3.0)
    else:
        ax.set_ylim(0, peak * 1.3 if peak > 0 else 1.0)  # headroom for the legend
    ax.set_xlabel(r"$\sigma_t^2\,\lambda$ (normalized eigenvalue, dimensionless)")
    ax.set_ylabel("spectral density (per unit $\\sigma_t^2\\lambda$)")
    ax.set_title(title)
    ax.grid(alpha=0.3)


# --------------------------------------------------------------------------------------------
# metric curves
# --------------------------------------------------------------------------------------------
def plot_metric_curves(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    onsets: Mapping[str, int | None] | None = None,
    ylabel: str = "sharp fraction",
    title: str = "Memorization metric during training",
    styles: Mapping[str, Mapping[str, Any]] | None = None,
    onset_labels: Mapping[str, str] | None = None,
    hlines: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """Plot one metric against the training step for one or more runs, with onset markers.

    Args:
        curves: ``label -> (steps [S], values [S])``; one point per check, drawn with a marker.
        onsets: ``label -> step`` of declared memorization onset (``None``: no onset). Each is a
            dashed vertical line in its run's colour, labelled ``"onset (label) @ step N"``.
            Labels must be keys of ``curves``.
        ylabel: y-axis label (the metric and its unit, e.g. ``"sharp fraction"``).
        title: figure title.
        styles: ``label -> matplotlib line keywords`` (``color``, ``linestyle``, ``marker``, …)
            for that curve (default: the next colour, round markers).
        onset_labels: ``label -> name`` used in the onset line's legend entry (default: the label).
        hlines: ``legend text -> y`` of dotted horizontal reference lines (e.g. a threshold).
        ylim: y-axis limits.

    Returns:
        A 6×4 in Figure with one Axes: one line per curve, one per non-``None`` onset, one per
        ``hlines`` entry.

    Raises:
        ValueError: ``curves`` is empty, an entry is malformed, or ``onsets`` names an unknown run.

    Example:
        >>> fig = plot_metric_curves({"run": ([0, 100, 200], [0.5, 0.6, 0.9])}, onsets={"run": 200})
        >>> len(fig.axes[0].lines)
        2
    """
    if not curves:
        raise MemwatchError("`curves` must hold at least one entry, got an empty mapping")
    onsets = dict(onsets or {})
    unknown = sorted(set(onsets) - set(curves))
    if unknown:
        raise MemwatchError(f"`onsets` names runs not in `curves`: {unknown}; known: {sorted(curves)}")
    fig = _new_figure()
    ax = fig.add_subplot()
    colours: dict[str, str] = {}
    for label, pair in curves.items():
        steps, values = _curve_pair(label, pair, "curves")
        order = np.argsort(steps, kind="stable")
        style = {"marker": "o", "ms": 4, "lw": 1.6, **(styles or {}).get(label, {}), "label": label}
        (line,) = ax.plot(steps[order], values[order], **style)
        colours[label] = line.get_color()
    for label, step in onsets.items():
        if step is None:
            continue
        name = (onset_labels or {}).get(label, label)
        ax.axvline(float(step), color=colours[label], ls="--", lw=1.3, label=f"onset ({name}) @ step {int(step)}")
    for text, y in (hlines or {}).items():
        ax.axhline(y, color="0.4", ls=":", lw=1.2, label=text)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("training step")
    ax.set_ylabel(textwrap.fill(ylabel, _YLABEL_CHARS))  # a longer line is cut at the figure's edges
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    # below the plot: a legend inside would hide the top of the onset lines or late checks
    fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(2, len(handles)))
    return fig


# --------------------------------------------------------------------------------------------
# gallery
# --------------------------------------------------------------------------------------------
def _images(x: ArrayLike, name: str) -> np.ndarray:
    """``[n, C, H, W]`` (C = 1 or 3) or ``[n, H, W]`` in [−1, 1] → ``[n, H, W]`` / ``[n, H, W, 3]`` in [0, 1]."""
    arr = _to_numpy(x, name).astype(np.float64)
    if arr.ndim == 4:
        if arr.shape[1] not in (1, 3):
            raise MemwatchError(
                f"`{name}` must be [n, C, H, W] with C = 1 or 3 (channels first), got shape {tuple(arr.shape)}"
            )
        arr = arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)
    elif arr.ndim != 3:
        raise MemwatchError(f"`{name}` must be [n, C, H, W] or [n, H, W], got shape {tuple(arr.shape)}")
    return (np.clip(np.nan_to_num(arr), -1.0, 1.0) + 1.0) / 2.0


def plot_gallery(
    probes: ArrayLike,
    *,
    neighbours: ArrayLike | None = None,
    captions: Sequence[str] | None = None,
    flagged: ArrayLike | None = None,
    title: str | None = None,
    max_items: int = 16,
    ncols: int = 8,
    neighbours_label: str | None = None,
) -> Figure:
    """Show generated probes (and optionally their nearest training samples) as an image grid.

    One column per probe; with ``neighbours`` each probe has the training sample below it. More
    than ``ncols`` probes wrap onto further row blocks. Pixel values in [−1, 1] are clipped and
    mapped to [0, 1]; single-channel images are shown in grayscale with nearest-neighbour
    interpolation (small images stay crisp).

    Args:
        probes: ``[n, C, H, W]`` (C = 1 or 3) or ``[n, H, W]`` images in [−1, 1].
        neighbours: the nearest training sample of each probe, ``[n, C', H', W']`` or ``[n, H', W']``
            (its own size may differ from the probes', e.g. original images beside decoded latents).
        captions: ``n`` strings shown under each probe (e.g. ``"score 0.97\\nd1/d2 0.12"``).
        flagged: ``[n]`` booleans; flagged (memorized) probes get a red frame.
        title: figure title; default ``"Generated probes"`` (``"… and nearest training samples"``
            with ``neighbours``). States how many were left out when ``n > max_items``.
        max_items: show at most this many probes (the first ones).
        ncols: columns per row block.
        neighbours_label: the training row's label (say which images it shows, e.g. decoded latents);
            default ``"nearest training sample"``.

    Returns:
        A Figure with one Axes per shown image (``m`` or ``2m`` for ``m = min(n, max_items)``),
        laid out in ``ceil(m / ncols)`` blocks of 1 or 2 rows.

    Raises:
        ValueError: bad shapes, ``neighbours``/``captions``/``flagged`` not matching ``n``,
            ``n = 0`` or ``max_items``/``ncols`` < 1.

    Example:
        >>> import numpy as np
        >>> fig = plot_gallery(np.zeros((3, 8, 8)), neighbours=np.zeros((3, 1, 8, 8)))
        >>> len(fig.axes)
        6
    """
    imgs, nbrs, flags = _gallery_inputs(probes, neighbours, captions, flagged, max_items, ncols)
    n = imgs.shape[0]
    m = min(n, max_items)
    cols = min(m, ncols)
    rows_per_block = 2 if nbrs is not None else 1
    if title is None:
        title = "Generated probes" + (" and nearest training samples" if nbrs is not None else "")
    if flags[:m].any():
        title += " (red frame: flagged as memorized)"
    if n > m:
        title = f"{title} (first {m} of {n})"
    fig, gs = _gallery_figure(m, cols, rows_per_block, (captions or [])[:m], title)
    for i in range(m):
        block, col = divmod(i, cols)
        ax = fig.add_subplot(gs[block * rows_per_block, col])
        _show_image(ax, imgs[i], bool(flags[i]))
        if captions is not None:
            ax.set_xlabel(captions[i], fontsize=7.5, linespacing=1.1)
        if col == 0:
            ax.set_ylabel("generated\nprobe" if nbrs is not None else "probe", fontsize=8)
        if nbrs is not None:
            axn = fig.add_subplot(gs[block * rows_per_block + 1, col])
            _show_image(axn, nbrs[i], False)
            if col == 0:
                axn.set_ylabel(neighbours_label or "nearest\ntraining sample", fontsize=8)
    return fig


def _gallery_inputs(
    probes: ArrayLike,
    neighbours: ArrayLike | None,
    captions: Sequence[str] | None,
    flagged: ArrayLike | None,
    max_items: int,
    ncols: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """:func:`plot_gallery`'s inputs checked: ``(probes, neighbours or None, flags [n] bool)`` as images in [0, 1]."""
    if max_items < 1:
        raise MemwatchError(f"`max_items` must be >= 1, got {max_items}")
    if ncols < 1:
        raise MemwatchError(f"`ncols` must be >= 1, got {ncols}")
    imgs = _images(probes, "probes")
    n = imgs.shape[0]
    if n == 0:
        raise MemwatchError("`probes` must hold at least one image, got n = 0")
    nbrs = None
    if neighbours is not None:
        nbrs = _images(neighbours, "neighbours")
        if nbrs.shape[0] != n:
            raise MemwatchError(
                f"`neighbours` must hold one image per probe ({n}), got shape {tuple(nbrs.shape)} for probes "
                f"{tuple(imgs.shape)}"
            )
    if captions is not None and len(captions) != n:
        raise MemwatchError(f"`captions` must hold one string per probe ({n}), got {len(captions)}")
    flags = np.zeros(n, dtype=bool)
    if flagged is not None:
        flags = _to_numpy(flagged, "flagged").astype(bool).reshape(-1)
        if flags.shape[0] != n:
            raise MemwatchError(f"`flagged` must hold one boolean per probe ({n}), got {flags.shape[0]}")
    return imgs, nbrs, flags


def _gallery_figure(m: int, cols: int, rows_per_block: int, captions: Sequence[str], title: str) -> tuple[Figure, Any]:
    """The titled Figure and GridSpec of ``m`` images in ``cols`` columns, blocks of ``rows_per_block`` rows.

    ~1 in per image (100 px: an 8×8 digit at 12 px per pixel, a 32×32 image at 3); constrained
    layout reserves the caption and row-label space, so every image gets the same size. The title
    is wrapped to the figure's width (a narrow gallery does not cut it off), 0.2 in per line.
    """
    blocks = math.ceil(m / cols)
    n_caption_lines = max((s.count("\n") + 1 for s in captions), default=0)
    cell = 1.0
    caption_h = 0.15 * n_caption_lines + (0.05 if n_caption_lines else 0.0)
    width = max(cols * cell + (0.45 if rows_per_block == 2 else 0.3), 3.0)
    wrapped = textwrap.fill(title, width=max(int(width * 12), 20))
    title_h = 0.45 + 0.2 * wrapped.count("\n")
    height = blocks * (rows_per_block * cell + caption_h) + 0.2 * (blocks - 1) + title_h
    fig = _new_figure((width, height))
    fig.suptitle(wrapped, fontsize=11)
    return fig, fig.add_gridspec(blocks * rows_per_block, cols)


def _show_image(ax: Any, img: np.ndarray, frame_red: bool) -> None:
    """One image without ticks, framed in red (flagged) or light grey."""
    ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("red" if frame_red else "0.7")
        spine.set_linewidth(2.5 if frame_red else 0.8)


# --------------------------------------------------------------------------------------------
# 2-D toy density
# --------------------------------------------------------------------------------------------
def _point_mask(flagged: ArrayLike, n: int) -> np.ndarray:
    """Boolean mask ``[n]`` from a boolean mask ``[n]`` or integer indices ``[m]``."""
    arr = _to_numpy(flagged, "flagged").reshape(-1)
    if arr.dtype.kind == "b":
        if arr.shape[0] != n:
            raise MemwatchError(f"`flagged` as a boolean mask must have length {n}, got {arr.shape[0]}")
        return arr
    if arr.dtype.kind in "iu":
        if arr.size and (arr.min() < -n or arr.max() >= n):
            raise MemwatchError(f"`flagged` indices must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]")
        mask = np.zeros(n, dtype=bool)
        mask[arr] = True
        return mask
    raise MemwatchError(f"`flagged` must be a boolean mask [n] or integer indices, got dtype {arr.dtype}")


def _points2(x: ArrayLike, name: str) -> np.ndarray:
    arr = _to_numpy(x, name).astype(np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise MemwatchError(f"`{name}` must be [n, 2] points, got shape {tuple(arr.shape)}")
    return arr


def plot_density_2d(
    log_density_fn: Callable[[Tensor], Tensor] | None,
    points: ArrayLike,
    *,
    flagged: ArrayLike | None = None,
    train: ArrayLike | None = None,
    extent: tuple[float, float, float, float] | None = None,
    title: str = "Probes on the learned density",
    value_label: str = "log density",
    resolution: int = 150,
    floor_quantile: float | None = 0.05,
) -> Figure:
    """Show probes of a 2-D toy model over a heatmap of its learned log-density (or ‖score‖).

    When ``log_density_fn`` is given it is called once on all ``resolution²`` grid points
    (``[G, 2]`` float32 CPU tensor, ``G = resolution²``, not under ``no_grad`` so a function that
    differentiates internally works) and must return ``[G]`` values, e.g. ``log p_t(x)`` or
    ``‖s(x, t)‖``. Values below the ``floor_quantile`` quantile are clipped so that the far
    tails (log-densities of −1000) do not wash out the structure near the data.

    Args:
        log_density_fn: ``[G, 2] -> [G]`` or ``None`` for a scatter plot only.
        points: probes ``[n, 2]`` (blue dots).
        flagged: memorized probes, a boolean mask ``[n]`` or integer indices; drawn as red X.
        train: training points ``[N, 2]`` (small grey dots).
        extent: ``(xmin, xmax, ymin, ymax)``; default: all points plus a 15 % margin.
        title: figure title.
        value_label: colour-bar label (what ``log_density_fn`` returns, with its unit).
        resolution: grid points per axis.
        floor_quantile: lower clipping quantile of the heatmap values, ``None`` for no clipping.

    Returns:
        A Figure with one Axes; when a function is given it holds the heatmap image and has the
        colour bar as its inset (``fig.axes[0].child_axes[0]``). The legend is below the plot.

    Raises:
        ValueError: points not ``[n, 2]``, a bad ``flagged``, ``resolution`` < 2, or
            ``log_density_fn`` returning the wrong number of values.

    Example:
        >>> import numpy as np
        >>> fig = plot_density_2d(lambda x: -(x**2).sum(-1), np.zeros((4, 2)), flagged=[0])
        >>> len(fig.axes), len(fig.axes[0].images), len(fig.axes[0].child_axes)   # plot, heatmap, colour bar
        (1, 1, 1)
    """
    pts = _points2(points, "points")
    n = pts.shape[0]
    mask = _point_mask(flagged, n) if flagged is not None else np.zeros(n, dtype=bool)
    trn = _points2(train, "train") if train is not None else None
    if resolution < 2:
        raise MemwatchError(f"`resolution` must be >= 2, got {resolution}")
    xmin, xmax, ymin, ymax = extent if extent is not None else _default_extent(pts, trn)
    xmin, xmax, ymin, ymax = float(xmin), float(xmax), float(ymin), float(ymax)

    # fit the figure to the equal-aspect plot: its width (6 in less the labels and colour bar),
    # times the data aspect, plus title, axis label and legend
    aspect = (ymax - ymin) / max(xmax - xmin, 1e-12)
    plot_w = 4.4 if log_density_fn is not None else 5.2
    fig = _new_figure((6.0, float(np.clip(plot_w * aspect + 1.7, 3.0, 8.0))))
    ax = fig.add_subplot()
    if log_density_fn is not None:
        _heatmap(fig, ax, log_density_fn, (xmin, xmax, ymin, ymax), resolution, floor_quantile, value_label)
    _scatter_points(ax, pts, mask, trn)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$ (data units)")
    ax.set_ylabel("$x_2$ (data units)")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # below the plot, so it never hides a probe
        fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=min(3, len(handles)))
    return fig


def _default_extent(pts: np.ndarray, trn: np.ndarray | None) -> tuple[float, float, float, float]:
    """``(xmin, xmax, ymin, ymax)`` of all points ``[n, 2]`` (and ``[N, 2]``) plus a 15 % margin of the
    larger span; ``(-1, 1, -1, 1)`` without points."""
    allp = pts if trn is None else np.concatenate([pts, trn], axis=0)
    if allp.shape[0] == 0:
        return (-1.0, 1.0, -1.0, 1.0)
    (x0, y0), (x1, y1) = allp.min(0), allp.max(0)
    margin = 0.15 * max(x1 - x0, y1 - y0, 1e-6)
    return (x0 - margin, x1 + margin, y0 - margin, y1 + margin)


def _density_grid(
    log_density_fn: Callable[[Tensor], Tensor],
    extent: tuple[float, float, float, float],
    resolution: int,
    floor_quantile: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xx, yy, values)`` ``[R, R]`` (row = y) of ``log_density_fn`` on the grid, clipped from below
    at its ``floor_quantile`` quantile (non-finite values set to that floor)."""
    import torch  # only needed to call the user's function

    xmin, xmax, ymin, ymax = extent
    xx, yy = np.meshgrid(np.linspace(xmin, xmax, resolution), np.linspace(ymin, ymax, resolution))
    grid = torch.from_numpy(np.stack([xx.ravel(), yy.ravel()], axis=1)).float()
    vals = _to_numpy(log_density_fn(grid), "log_density_fn(grid)").astype(np.float64).reshape(-1)
    if vals.shape[0] != grid.shape[0]:
        raise MemwatchError(
            f"`log_density_fn` must return one value per grid point ({grid.shape[0]}), got {vals.shape[0]}"
        )
    finite = np.isfinite(vals)
    if not finite.any():
        raise MemwatchError("`log_density_fn` returned no finite value on the grid")
    lo = float(np.quantile(vals[finite], floor_quantile)) if floor_quantile is not None else vals[finite].min()
    return xx, yy, np.clip(np.where(finite, vals, lo), lo, None).reshape(resolution, resolution)


def _heatmap(
    fig: Figure,
    ax: Any,
    log_density_fn: Callable[[Tensor], Tensor],
    extent: tuple[float, float, float, float],
    resolution: int,
    floor_quantile: float | None,
    value_label: str,
) -> None:
    """The function's values on ``ax`` as an image with contours and an inset colour bar."""
    xx, yy, vals = _density_grid(log_density_fn, extent, resolution, floor_quantile)
    im = ax.imshow(vals, origin="lower", extent=extent, cmap="viridis", aspect="equal", interpolation="bilinear")
    ax.contour(xx, yy, vals, levels=8, colors="white", linewidths=0.5, alpha=0.5)
    # an inset, so the bar is exactly as tall as the equal-aspect plot (a figure-level
    # colour bar would span the whole height); it is ``ax.child_axes[0]``, not in fig.axes
    cax = ax.inset_axes((1.03, 0.0, 0.04, 1.0))
    fig.colorbar(im, cax=cax).set_label(value_label)


def _scatter_points(ax: Any, pts: np.ndarray, mask: np.ndarray, trn: np.ndarray | None) -> None:
    """Training points (grey), probes (blue) and flagged probes ``pts[mask]`` (red X) on ``ax``."""
    if trn is not None:
        # dark with a thin white rim: visible on the bright (dense) and the dark parts of the map;
        # many points get small plain dots, so they do not paint over the density
        few = len(trn) <= 200
        ax.scatter(
            trn[:, 0],
            trn[:, 1],
            s=10 if few else 2,
            c="0.15",
            marker="D" if few else "o",
            edgecolors="white" if few else "none",
            linewidths=0.4,
            alpha=1.0 if few else 0.5,
            label=f"training points ({len(trn)})",
        )
    ok = ~mask
    if ok.any():
        ax.scatter(
            pts[ok, 0],
            pts[ok, 1],
            s=18,
            c="tab:blue",
            edgecolors="white",
            linewidths=0.5,
            label=f"probes ({int(ok.sum())})",
        )
    if mask.any():
        ax.scatter(
            pts[mask, 0],
            pts[mask, 1],
            s=60,
            c="red",
            marker="X",
            edgecolors="white",
            linewidths=0.6,
            label=f"flagged as memorized ({int(mask.sum())})",
        )


# --------------------------------------------------------------------------------------------
# per-condition metrics
# --------------------------------------------------------------------------------------------
#: axis labels (metric and unit) of the metrics memwatch logs per condition
CONDITION_METRIC_LABELS = {
    "hessian_score_diff": "$\\|H_c s_\\Delta - H_{uc} s_\\Delta\\|$\n(Jeon et al., 1/[x]$^3$)",
    "score_diff": "$\\|s_c - s_{uc}\\|$\n(Wen et al., 1/[x])",
    "sharp_fraction_mean": "sharp fraction\nof $p_t(x\\mid c)$",
}


def plot_condition_metrics(
    metrics: Mapping[str, ArrayLike],
    conditions: Sequence[str],
    *,
    errors: Mapping[str, ArrayLike] | None = None,
    flagged: int | None = None,
    title: str = "Memorization metrics per condition",
) -> Figure:
    """Bar charts of per-condition metrics (one panel per metric), the flagged condition in red.

    Made for :mod:`memwatch.conditional`: e.g. the mean Hessian-weighted score difference, score
    difference and sharp fraction of each class of a class-conditional model; the class that
    memorizes stands out in every panel. Each bar carries its value; metric names listed in
    ``CONDITION_METRIC_LABELS`` get a descriptive axis label, others their name.

    Args:
        metrics: ``name -> values [C]``, one value per condition (NaN draws no bar).
        conditions: the ``C`` condition labels (x axis).
        errors: ``name -> [C]`` half-heights of error bars (e.g. the standard deviation over
            probes); names must be keys of ``metrics``.
        flagged: index of the condition flagged as memorized (red bar, red tick label).
        title: figure title.

    Returns:
        A Figure with one Axes per metric, stacked, sharing the x axis; each Axes holds ``C``
        bars (``ax.patches``).

    Raises:
        ValueError: no metrics or conditions, a value array not of length ``C``, ``errors``
            naming an unknown metric, or ``flagged`` not an index in ``[0, C)``.

    Example:
        >>> fig = plot_condition_metrics({"score_diff": [1.0, 3.0, 1.2]}, ["0", "1", "2"], flagged=1)
        >>> len(fig.axes), len(fig.axes[0].patches)
        (1, 3)
    """
    if not metrics:
        raise MemwatchError("`metrics` must hold at least one entry, got an empty mapping")
    labels = [str(c) for c in conditions]
    c = len(labels)
    if c == 0:
        raise MemwatchError("`conditions` must hold at least one label, got none")
    values = {name: _per_condition(v, f"metrics[{name!r}]", c) for name, v in metrics.items()}
    errs = {}
    for name, e in (errors or {}).items():
        if name not in values:
            raise MemwatchError(f"`errors` names a metric not in `metrics`: {name!r}; known: {sorted(values)}")
        errs[name] = _per_condition(e, f"errors[{name!r}]", c)
    is_index = isinstance(flagged, (int, np.integer)) and not isinstance(flagged, bool)
    if flagged is not None and (not is_index or not 0 <= flagged < c):
        raise MemwatchError(f"`flagged` must be None or a condition index in [0, {c}), got {flagged!r}")

    fig = _new_figure((max(6.0, 0.5 * c + 2.0), 1.9 * len(values) + 0.9))
    axes = fig.subplots(len(values), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, vals) in zip(axes, values.items()):
        _condition_bars(ax, vals, errs.get(name), flagged)
        ax.set_ylabel(CONDITION_METRIC_LABELS.get(name, name), fontsize=8.5)
    x = np.arange(c)
    axes[-1].set_xticks(x, labels)
    axes[-1].set_xlabel("condition")
    if flagged is not None:
        axes[-1].get_xticklabels()[flagged].set_color("tab:red")
        axes[-1].get_xticklabels()[flagged].set_fontweight("bold")
        title = f"{title}\n(red: most memorized, condition {labels[flagged]})"
    fig.suptitle(title, fontsize=11)
    return fig


def _per_condition(values: ArrayLike, name: str, c: int) -> np.ndarray:
    """``values`` as a float64 ``[C]`` array; the error names ``name`` when it does not hold ``C`` values."""
    arr = _to_numpy(values, name).astype(np.float64).reshape(-1)
    if arr.shape[0] != c:
        raise MemwatchError(f"`{name}` must hold one value per condition ({c}), got {arr.shape[0]}")
    return arr


def _condition_bars(ax: Any, vals: np.ndarray, err: np.ndarray | None, flagged: int | None) -> None:
    """One panel: a bar per condition (``flagged`` in red, NaN drawn as no bar), its value above it
    (above its error bar ``err``, if any), and the y range with headroom for the labels."""
    c = vals.shape[0]
    x = np.arange(c)
    colours = ["tab:red" if i == flagged else "tab:blue" for i in range(c)]
    ax.bar(
        x,
        np.nan_to_num(vals, nan=0.0),
        color=colours,
        alpha=0.85,
        yerr=err,
        capsize=3 if err is not None else 0,
        error_kw={"elinewidth": 1, "ecolor": "0.3"},
    )
    err = np.zeros(c) if err is None else err
    top = float(np.nanmax(vals + np.nan_to_num(err))) if np.isfinite(vals).any() else 1.0
    for i, v in enumerate(vals):
        if np.isfinite(v):
            ax.annotate(
                f"{v:.3g}",
                (i, v + np.nan_to_num(err[i])),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
                color="tab:red" if i == flagged else "0.2",
            )
    ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
    ax.grid(axis="y", alpha=0.3)


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Save ``fig`` as a PNG at 100 dpi, creating parent directories; return the path.

    The file is PNG whatever the suffix of ``path``.

    Example:
        >>> import tempfile, os
        >>> p = save_figure(plot_metric_curves({"r": ([0, 1], [0.1, 0.2])}),
        ...                 os.path.join(tempfile.mkdtemp(), "sub", "curve.png"))
        >>> p.stat().st_size > 0
        True
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI, format="png")
    return out
