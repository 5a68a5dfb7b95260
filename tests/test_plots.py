"""Tests for memwatch.plots: structure of the returned figures, input kinds, saving."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from memwatch.plots import (
    plot_condition_metrics,
    plot_density_2d,
    plot_gallery,
    plot_metric_curves,
    plot_spectrum,
    save_figure,
)


def _bump(grid: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((grid - centre) / width) ** 2) / (width * np.sqrt(2 * np.pi))


GRID = np.linspace(-1.6, 0.6, 221)
MEMORIZED = _bump(GRID, -1.0, 0.05)
GENERALIZING = 0.8 * _bump(GRID, -1.0, 0.05) + 0.2 * _bump(GRID, 0.0, 0.05)


def _n_images(fig: Figure) -> int:
    return sum(len(ax.images) for ax in fig.axes)


# ------------------------------------------------------------------------------------------
# plot_spectrum
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_spectrum_lines_threshold_and_sharp_fraction_in_legend(kind: str) -> None:
    conv = torch.tensor if kind == "torch" else np.asarray
    fig = plot_spectrum({"memorized": (conv(GRID), conv(MEMORIZED)), "generalizing": (conv(GRID), conv(GENERALIZING))})
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two densities + threshold
    threshold_line = ax.lines[-1]
    assert np.allclose(threshold_line.get_xdata(), -0.5)
    assert threshold_line.get_linestyle() == "--"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "memorized  (sharp 1.00)" in labels
    assert "generalizing  (sharp 0.80)" in labels
    assert any(lab.startswith("sharp threshold") for lab in labels)
    assert "normalized eigenvalue" in ax.get_xlabel()
    assert ax.get_title() == "Hessian spectrum (SLQ density)"
    assert tuple(fig.get_size_inches()) == (6.0, 4.0)


def test_spectrum_without_threshold_and_log_scale() -> None:
    fig = plot_spectrum({"a": (GRID, MEMORIZED + 1e-8)}, threshold=None, log_y=True)
    ax = fig.axes[0]
    assert len(ax.lines) == 1
    assert ax.get_yscale() == "log"
    assert ax.get_legend().get_texts()[0].get_text() == "a"


def test_spectrum_accepts_low_precision_tensor_with_grad() -> None:
    dens = torch.tensor(MEMORIZED, dtype=torch.float32, requires_grad=True)
    fig = plot_spectrum({"bf16": (torch.tensor(GRID, dtype=torch.bfloat16), dens.to(torch.bfloat16))})
    assert len(fig.axes[0].lines) == 2


def test_spectrum_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="densities"):
        plot_spectrum({})
    with pytest.raises(ValueError, match="same length"):
        plot_spectrum({"a": (GRID, MEMORIZED[:-1])})
    with pytest.raises(ValueError, match="at least 2 points"):
        plot_spectrum({"a": ([0.0], [1.0])})
    with pytest.raises(ValueError, match="pair"):
        plot_spectrum({"a": GRID})  # type: ignore[dict-item]


# ------------------------------------------------------------------------------------------
# plot_metric_curves
# ------------------------------------------------------------------------------------------
def test_metric_curves_with_onsets_in_run_colour() -> None:
    steps = np.arange(0, 1000, 100)
    fig = plot_metric_curves(
        {
            "small": (torch.tensor(steps), torch.linspace(0.5, 0.95, 10)),
            "large": (steps, np.full(10, 0.55)),
        },
        onsets={"small": 600, "large": None},
    )
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two curves + one onset
    small, _, onset = ax.lines
    assert small.get_marker() == "o"
    assert onset.get_color() == small.get_color()
    assert np.allclose(onset.get_xdata(), 600)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "onset (small) @ step 600" in labels
    assert ax.get_xlabel() == "training step"
    assert ax.get_ylabel() == "sharp fraction"


def test_metric_curves_single_point_and_no_onsets() -> None:
    fig = plot_metric_curves({"r": ([5], [0.3])}, ylabel="LID (dimensions)")
    ax = fig.axes[0]
    assert len(ax.lines) == 1
    assert ax.get_ylabel() == "LID (dimensions)"


def test_metric_curves_rejects_unknown_onset_and_empty() -> None:
    with pytest.raises(ValueError, match="onsets"):
        plot_metric_curves({"a": ([0, 1], [0, 1])}, onsets={"b": 1})
    with pytest.raises(ValueError, match="curves"):
        plot_metric_curves({})


# ------------------------------------------------------------------------------------------
# plot_gallery
# ------------------------------------------------------------------------------------------
def test_gallery_with_neighbours_has_two_rows_and_captions() -> None:
    g = torch.Generator().manual_seed(0)
    probes = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    neighbours = np.random.default_rng(0).uniform(-1, 1, (5, 1, 8, 8))
    captions = [f"score {i / 5:.2f}\nd1/d2 0.1{i}" for i in range(5)]
    fig = plot_gallery(probes, neighbours=neighbours, captions=captions, flagged=[True, False, False, False, True])
    assert len(fig.axes) == 10
    assert _n_images(fig) == 10
    rows = {round(ax.get_position().y0, 3) for ax in fig.axes}
    assert len(rows) == 2
    cols = {round(ax.get_position().x0, 3) for ax in fig.axes}
    assert len(cols) == 5
    first = fig.axes[0]
    assert first.get_xlabel() == captions[0]
    assert list(first.get_xticks()) == [] and list(first.get_yticks()) == []
    # [-1, 1] -> [0, 1], grayscale
    img = first.images[0]
    assert img.get_cmap().name == "gray"
    assert np.allclose(img.get_array(), (probes[0, 0].double().numpy() + 1) / 2)
    assert "flagged" in fig._suptitle.get_text()


def test_gallery_grayscale_hw_single_probe_and_clipping() -> None:
    fig = plot_gallery(np.array([[[-3.0, 0.0], [1.0, 5.0]]]))  # [1, H, W], out of range
    assert len(fig.axes) == 1
    arr = fig.axes[0].images[0].get_array()
    assert np.allclose(arr, [[0.0, 0.5], [1.0, 1.0]])
    assert fig._suptitle.get_text() == "Generated probes"


def test_gallery_rgb_is_channels_last() -> None:
    probes = torch.zeros(2, 3, 4, 6)
    probes[:, 0] = 1.0  # red
    fig = plot_gallery(probes)
    arr = np.asarray(fig.axes[0].images[0].get_array())
    assert arr.shape == (4, 6, 3)
    assert np.allclose(arr[..., 0], 1.0) and np.allclose(arr[..., 1], 0.5)


def test_gallery_max_items_and_wrapping() -> None:
    fig = plot_gallery(np.zeros((20, 8, 8)), max_items=12, ncols=5)
    assert len(fig.axes) == 12
    assert len({round(ax.get_position().y0, 3) for ax in fig.axes}) == 3
    assert "first 12 of 20" in fig._suptitle.get_text()


def test_gallery_labels_its_training_row_and_takes_neighbours_of_their_own_size() -> None:
    """Original images ``[n, 1, 16, 16]`` beside decoded probes ``[n, 1, 8, 8]``, the row labelled as such."""
    fig = plot_gallery(np.zeros((3, 1, 8, 8)), neighbours=np.ones((3, 1, 16, 16)), neighbours_label="original\nimage")
    assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()] == ["generated\nprobe", "original\nimage"]
    assert np.asarray(fig.axes[1].images[0].get_array()).shape == (16, 16)
    assert plot_gallery(np.zeros((3, 8, 8)), neighbours=np.zeros((3, 8, 8))).axes[1].get_ylabel() == (
        "nearest\ntraining sample"
    )


def test_gallery_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"C = 1 or 3"):
        plot_gallery(np.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="neighbours"):
        plot_gallery(np.zeros((2, 8, 8)), neighbours=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="captions"):
        plot_gallery(np.zeros((2, 8, 8)), captions=["a"])
    with pytest.raises(ValueError, match=r"\[n, C, H, W\]"):
        plot_gallery(np.zeros((2, 64)))


# ------------------------------------------------------------------------------------------
# plot_density_2d
# ------------------------------------------------------------------------------------------
def test_density_2d_with_function_grid_and_markers() -> None:
    train = torch.randn(30, 2, generator=torch.Generator().manual_seed(0))
    points = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    seen: dict[str, tuple[int, ...]] = {}

    def log_density(x: torch.Tensor) -> torch.Tensor:
        seen["shape"] = tuple(x.shape)
        return -0.5 * (x**2).sum(-1)

    fig = plot_density_2d(
        log_density, torch.tensor(points), flagged=np.array([True, False, False]), train=train, resolution=40
    )
    assert seen["shape"] == (1600, 2)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.child_axes) == 1  # colour bar as an inset
    assert len(ax.images) == 1
    assert len(ax.collections) >= 3  # train, probes, flagged (+ contour sets)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["training points (30)", "probes (2)", "flagged as memorized (1)"]
    heat = np.asarray(ax.images[0].get_array())
    assert heat.shape == (40, 40)
    assert heat.max() == pytest.approx(heat[20, 20], abs=0.05)  # peak near the centre, origin lower


def test_density_2d_scatter_only_index_flags_and_extent() -> None:
    fig = plot_density_2d(None, [[0.0, 0.0], [1.0, 2.0]], flagged=[1], extent=(-3, 3, -3, 3))
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert len(ax.images) == 0 and len(ax.child_axes) == 0
    assert ax.get_xlim() == (-3.0, 3.0)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["probes (1)", "flagged as memorized (1)"]


def test_density_2d_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        plot_density_2d(None, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="flagged"):
        plot_density_2d(None, np.zeros((3, 2)), flagged=[True])
    with pytest.raises(ValueError, match="one value per grid point"):
        plot_density_2d(lambda x: x[:5, 0], np.zeros((3, 2)), resolution=10)


# ------------------------------------------------------------------------------------------
# save_figure and module hygiene
# ------------------------------------------------------------------------------------------
def test_save_figure_writes_png_and_creates_dirs(tmp_path) -> None:
    fig = plot_spectrum({"a": (GRID, GENERALIZING)})
    out = save_figure(fig, tmp_path / "a" / "b" / "spectrum.png")
    assert out == tmp_path / "a" / "b" / "spectrum.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (600, 400)  # 6×4 in at 100 dpi


def test_plots_does_not_touch_pyplot_state() -> None:
    plot_metric_curves({"r": ([0, 1], [0.1, 0.2])})
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # another test may have imported it; we must not have opened figures
        assert pyplot.get_fignums() == []


# ------------------------------------------------------------------------------------------
# plot_condition_metrics
# ------------------------------------------------------------------------------------------
def test_condition_metrics_one_panel_per_metric_flagged_bar_in_red() -> None:
    hsd = torch.tensor([1.0, 1.2, 0.9, 2.5, float("nan")])
    fig = plot_condition_metrics(
        {"hessian_score_diff": hsd, "sharp_fraction_mean": np.array([0.5, 0.48, 0.47, 0.6, 0.5])},
        ["0", "1", "2", "3", "4"],
        errors={"hessian_score_diff": [0.1] * 5},
        flagged=3,
    )
    assert len(fig.axes) == 2
    top, bottom = fig.axes
    assert len(top.patches) == len(bottom.patches) == 5
    colours = [p.get_facecolor() for p in top.patches]
    assert colours[3] != colours[0] and colours[0] == colours[1]
    assert top.patches[4].get_height() == 0  # NaN draws no bar
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["0", "1", "2", "3", "4"]
    assert bottom.get_xticklabels()[3].get_color() == "tab:red"
    assert "Jeon" in top.get_ylabel() and "sharp fraction" in bottom.get_ylabel()
    assert "condition 3" in fig._suptitle.get_text()
    assert [t.get_text() for t in top.texts][:4] == ["1", "1.2", "0.9", "2.5"]


def test_condition_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="`metrics` must hold"):
        plot_condition_metrics({}, ["a"])
    with pytest.raises(ValueError, match="`conditions` must hold"):
        plot_condition_metrics({"m": []}, [])
    with pytest.raises(ValueError, match=r"one value per condition \(2\), got 3"):
        plot_condition_metrics({"m": [1, 2, 3]}, ["a", "b"])
    with pytest.raises(ValueError, match="`errors` names a metric not in `metrics`"):
        plot_condition_metrics({"m": [1, 2]}, ["a", "b"], errors={"x": [0, 0]})
    with pytest.raises(ValueError, match="`flagged`"):
        plot_condition_metrics({"m": [1, 2]}, ["a", "b"], flagged=2)


def test_the_demo_curves_keep_their_whole_y_label_inside_the_figure():
    """Issue 32, item 4: ``curves.png`` cut its own y-axis label at the top and bottom."""
    from types import SimpleNamespace

    from memwatch.apps.demo_figures import curves_figure

    history = [{"step": 250.0 * i, "sharp_fraction_mean": 0.2 * i} for i in range(1, 5)]
    runs = [SimpleNamespace(label=f"N={n}", history=history, onset_step=None) for n in (8, 256)]
    fig = curves_figure(runs)
    fig.canvas.draw()
    label, frame = fig.axes[0].yaxis.label, fig.bbox
    box = label.get_window_extent()
    assert frame.y0 <= box.y0 and box.y1 <= frame.y1 and frame.x0 <= box.x0, (box, frame)
    assert " ".join(label.get_text().split()) == "mean sharp fraction of the probes (at each run's calibrated σ)"
