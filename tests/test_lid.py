"""The LID signal's numbers against closed forms (:mod:`memwatch.lid`), and the signal through
real fits (:mod:`memwatch.signals.lid`): onset on it, its state across a resume, its faults."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from callback_setup import (
    SlightlyOverconfident,
    datamodule,
    generalizing_data,
    memorizing_data,
    module_2d,
    trainer,
)

from memwatch import (
    CheckpointOptions,
    LidOptions,
    MemorizationMonitor,
    OnsetOptions,
    ProbeOptions,
    ReportOptions,
    SharpnessCheckOptions,
)
from memwatch.data import GaussianMixture
from memwatch.errors import MemwatchError
from memwatch.lid import baseline_of, data_lid, denoising_lid, drawdown, local_variances, profile, relative, soft_count
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

SCHEDULE = NoiseSchedule.linear(1000)


# ----------------------------------------------------------------------------- the data's LID
def test_soft_count_is_flipd_of_locally_gaussian_data():
    s = torch.tensor([[4.0, 1.0, 0.0]])
    tau = torch.tensor([1.0, 2.0])
    expected = [4 / 5 + 1 / 2, 4 / 8 + 1 / 5]
    torch.testing.assert_close(soft_count(s, tau)[0], torch.tensor(expected, dtype=torch.float64))


def test_local_pca_of_a_linear_sheet_counts_its_dimensions():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(10, 3, generator=g, dtype=torch.float64))[0]  # a 3-d plane in R^10
    x = (torch.rand(3000, 3, generator=g, dtype=torch.float64) * 2 - 1) @ basis.T
    order = torch.cdist(x[:50], x).argsort(1)
    v = local_variances(x, order, 40)
    assert v.shape == (50, 10) and float(v[:, 3:].max()) < 1e-20  # off the plane: no spread
    lid = data_lid(x, torch.tensor([1e-3, 1e3]), neighbours=40, generator=g)
    assert lid[0] == pytest.approx(3.0, abs=0.02)  # noise far below the spacing: every tangent direction counts
    assert lid[1] < 1e-3  # noise far above the whole sheet: nothing does


def test_the_neighbourhood_reaches_beyond_the_noise():
    """A dense curve seen at a noise level far above its spacing: 32 neighbours span less than the
    noise, the neighbourhood of radius 6τ spans the curve (one dimension)."""
    t = torch.linspace(0, 2 * math.pi, 4000, dtype=torch.float64)
    x = torch.stack([t.cos(), t.sin()], 1)  # spacing 0.0016
    tau = torch.tensor([0.02])
    assert float(data_lid(x, tau, neighbours=32, reach=0.0)[0]) < 0.4  # 32 neighbours: a radius of 0.025
    assert float(data_lid(x, tau, neighbours=32)[0]) == pytest.approx(1.0, abs=0.1)


def test_local_pca_at_the_noise_scale_is_the_soft_count_of_the_neighbourhood():
    """A direction with variance s counts s/(s+τ²): at τ² = s it is half a dimension."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-3], dtype=torch.float64)
    s = local_variances(x, torch.arange(500)[None], 500)[0]  # one neighbourhood: the whole set
    torch.testing.assert_close(s, torch.linalg.eigvalsh(x.T.cov()).flip(0))
    assert float(data_lid(x, torch.tensor([1.0]), neighbours=500, anchors=1)[0]) == pytest.approx(
        float((s / (s + 1)).sum())
    )


def test_local_pca_refuses_what_it_cannot_measure():
    with pytest.raises(MemwatchError, match="at least two"):
        data_lid(torch.zeros(1, 3), torch.tensor([0.1]))
    with pytest.raises(MemwatchError, match="neighbours"):
        data_lid(torch.zeros(5, 3), torch.tensor([0.1]), neighbours=1)


# ----------------------------------------------------------------------------- the model's LID without a Jacobian
def _gaussian(std: float, dim: int = 6) -> tuple[GaussianMixture, DiffusionScore]:
    gm = GaussianMixture.isotropic(torch.zeros(1, dim), std=std)
    return gm, DiffusionScore(gm.as_model(SCHEDULE), SCHEDULE)


def test_denoising_lid_at_a_point_matches_the_closed_form_of_a_gaussian():
    """For N(0, s I) and x₀ fixed: E‖ε + σ s(αx₀ + σε)‖² = Σ_i (α²s/v)² + σ²α²x₀ᵢ²/v², v = α²s + σ²."""
    std, t = 0.7, 150.0
    gm, score = _gaussian(std)
    a, sg = float(SCHEDULE.alpha(t)), float(SCHEDULE.sigma(t))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    noise = torch.randn(20000, 3, 6, generator=g, dtype=torch.float64)
    got = denoising_lid(score, x0, t, noise)
    v = a**2 * std**2 + sg**2
    expected = 6 * (a**2 * std**2 / v) ** 2 + sg**2 * a**2 * (x0**2).sum(1) / v**2
    torch.testing.assert_close(got, expected, rtol=0.03, atol=0.0)


def test_denoising_lid_over_the_data_is_the_data_lid_and_zero_at_a_copy():
    std, t = 0.5, 100.0
    gm, score = _gaussian(std)
    tau = float(SCHEDULE.sigma(t) / SCHEDULE.alpha(t))
    g = torch.Generator().manual_seed(3)
    x0 = gm.sample(4000, generator=g)
    mean = float(denoising_lid(score, x0, t, torch.randn(2, *x0.shape, generator=g, dtype=torch.float64)).mean())
    assert mean == pytest.approx(6 * std**2 / (std**2 + tau**2), rel=0.03)
    copies = GaussianMixture.isotropic(torch.randn(5, 6, generator=g), std=0.0)
    at_copies = denoising_lid(
        DiffusionScore(copies.as_model(SCHEDULE), SCHEDULE), copies.means, t, torch.randn(4, 5, 6, generator=g)
    )
    assert float(at_copies.max()) < 0.02 * mean  # a copy is denoised back to itself: (almost) no dimension left


def test_denoising_lid_checks_its_noise_and_batches_the_model_calls():
    _, score = _gaussian(0.5)
    x0 = torch.randn(4, 6)
    with pytest.raises(MemwatchError, match=r"\[draws, 4, 6\]"):
        denoising_lid(score, x0, 50.0, torch.randn(3, 4, 5))
    noise = torch.randn(3, 4, 6)
    torch.testing.assert_close(
        denoising_lid(score, x0, 50.0, noise, max_batch=5), denoising_lid(score, x0, 50.0, noise)
    )


# ----------------------------------------------------------------------------- the statistics
def test_statistics_are_ratios_and_nan_where_the_reference_is_not_positive():
    lid = torch.tensor([2.0, 0.5, math.nan])
    torch.testing.assert_close(
        relative(lid, 4.0), torch.tensor([0.5, 0.125, math.nan], dtype=torch.float64), equal_nan=True
    )
    assert relative(lid, 0.0).isnan().all() and relative(lid, math.nan).isnan().all()
    base = baseline_of([torch.tensor([4.0, 1.0, 0.0]), torch.tensor([2.0, math.nan, 0.0])])
    torch.testing.assert_close(base, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))  # lower median, NaN ignored
    torch.testing.assert_close(
        drawdown(torch.tensor([1.0, 1.0, 1.0]), base),
        torch.tensor([0.5, 1.0, math.nan], dtype=torch.float64),
        equal_nan=True,
    )
    prof = profile([torch.tensor([0.2, math.nan]), torch.tensor([0.4, math.nan])])
    assert prof[0] == pytest.approx(0.3) and prof[1].isnan()


def test_lid_options_name_the_field_and_its_range():
    with pytest.raises(MemwatchError, match=r"`sharpness\.lid\.statistic` must be one of .*'nope'"):
        LidOptions(statistic="nope")
    with pytest.raises(MemwatchError, match=r"sharpness\.lid\.ratio_threshold"):
        LidOptions(ratio_threshold=0.0)
    with pytest.raises(MemwatchError, match=r"lid\.neighbours"):
        LidOptions(neighbours=1)
    with pytest.raises(MemwatchError, match=r"`sharpness\.lid\.count_threshold` must be a finite number > 0, got 0"):
        LidOptions(count_threshold=0)
    with pytest.raises(MemwatchError, match=r"lid\.draws"):
        LidOptions(statistic="denoising", draws=0)


# ----------------------------------------------------------------------------- the signal in a fit
def _monitor(**kwargs) -> MemorizationMonitor:
    kwargs.setdefault("onset", OnsetOptions(on="lid", threshold=0.3, patience=1))
    kwargs.setdefault("reference_data", None)  # the LID signal alone reads the batches, until its data LID is fixed
    kwargs.setdefault("report", ReportOptions(figures=False, verbose=True, raise_errors=True))
    lid = kwargs.pop("lid", LidOptions())
    return MemorizationMonitor(
        every_n_train_steps=100,
        num_probes=16,
        probes=ProbeOptions(sampler_steps=20, sigma_factors=(0.1, 0.2)),
        sharpness=SharpnessCheckOptions(k=2, lid=lid),
        checkpoint=CheckpointOptions(save=False),
        **kwargs,
    )


@pytest.mark.parametrize("statistic", ["relative", "profile", "drawdown", "denoising", "count"])
def test_onset_on_lid_fires_on_a_memorizing_run_with_finite_values(tmp_path, statistic):
    ratio = 0.7 if statistic == "drawdown" else 0.5
    monitor = _monitor(lid=LidOptions(statistic=statistic, ratio_threshold=ratio, count_threshold=1.0))
    trainer(tmp_path, [monitor], max_steps=600).fit(module_2d(), datamodule(memorizing_data()))
    assert len(monitor.history) == 6
    for h in monitor.history:
        assert math.isfinite(h["lid_memorized_fraction"]) and math.isfinite(h[f"lid/{statistic}"])
        assert h["lid/data_lid"] == pytest.approx(monitor.history[0]["lid/data_lid"])  # fixed at the first check
    reading = monitor.last_check.lid
    assert set(reading.flipd) == set(monitor.last_check.results)  # every level, primary first
    assert reading.memorized.shape == (16,) and reading.memorized.float().mean() == pytest.approx(
        monitor.history[-1]["lid_memorized_fraction"]
    )
    if statistic == "count":  # the LID itself: the sharpness measurement's count of flat directions
        torch.testing.assert_close(reading.statistics["count"], monitor.last_check.primary.lid.double())
    assert monitor.onset_step is not None, [h["lid_memorized_fraction"] for h in monitor.history]
    assert monitor.held_samples is None  # the reservoir is freed once calibrated and the data LID is fixed


def test_the_relative_lid_stays_high_on_a_generalizing_run(tmp_path):
    monitor = _monitor()
    trainer(tmp_path, [monitor], max_steps=400).fit(module_2d(), datamodule(generalizing_data()))
    assert 0.5 < monitor.history[0]["lid/data_lid"] <= 1.01  # the moons: a curve, seen at 0.1 of its spacing
    assert monitor.onset_step is None and monitor.history[-1]["lid/relative"] > 0.5


def test_the_data_lid_survives_a_resume_and_the_samples_are_not_held_again(tmp_path):
    first = _monitor()
    trainer(tmp_path, [first], max_steps=200).fit(module_2d(), datamodule(memorizing_data()))
    state = first.state_dict()
    assert state["signals"]["lid"]["reference"] and len(state["signals"]["lid"]["history"]) == 2
    resumed = _monitor()
    resumed.load_state_dict(state)
    assert resumed.signals["lid"].reference == first.signals["lid"].reference
    assert resumed.held_samples is None  # nothing left to hold for: levels and data LID are known


def test_a_data_lid_that_cannot_be_had_is_nan_and_said(tmp_path):
    """One distinct training sample (absolute levels, so the check itself runs): the LID signal
    says it has no data LID and reports no ratio against one it did not measure."""
    monitor = _monitor(sigmas=(0.3,), onset=OnsetOptions(), report=ReportOptions(figures=False, verbose=False))
    one = torch.ones(64, 2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer(tmp_path, [monitor], max_steps=200).fit(module_2d(), datamodule(one))
    assert any("data's LID could not be estimated" in str(w.message) for w in seen)
    assert all(math.isnan(h["lid/relative"]) and math.isnan(h["lid_memorized_fraction"]) for h in monitor.history)
    assert all(math.isfinite(h["lid/drawdown"]) for h in monitor.history)  # against the probe's own past: measured


def test_a_data_lid_below_one_dimension_is_said():
    """A noise level far above the training samples' spread (e.g. clamped at the schedule's ceiling):
    the data's LID is ≈ 0 there and every ratio to it would be noise, so the signal says so."""
    from memwatch.signals.lid import LidSignal

    signal = LidSignal(LidOptions(), 8, held=lambda: None, timesteps=lambda: [10.0, 990.0], seed=0)
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"below one dimension at t=990"):
        signal.fit_reference(x, [10.0, 990.0], SCHEDULE)
    assert signal.reference[10.0] > 1.0 and signal.reference[990.0] < 1.0


# ----------------------------------------------------------------------------- no impossible dimension
@pytest.mark.parametrize("method", ["dense", "trace"])
def test_no_logged_dimension_or_ratio_leaves_its_range_and_the_clamped_probes_are_counted(tmp_path, method):
    """Issue 32, item 1: a fit once logged ``lid/model_lid`` −1.03 and ``lid/relative`` −0.09. Every
    LID is now in ``[0, d]``, every ratio ``>= 0``, the sharp fraction in ``[0, 1]`` (the trace tier
    estimates it from FLIPD), and the probes whose estimate was clamped are counted."""
    monitor = MemorizationMonitor(
        every_n_train_steps=50, num_probes=8, probes=ProbeOptions(sampler_steps=10),
        sharpness=SharpnessCheckOptions(k=2, method=method), report=ReportOptions(figures=False, raise_errors=True),
        checkpoint=CheckpointOptions(save=False),
    )  # fmt: skip
    trainer(tmp_path, [monitor], max_steps=50).fit(
        SlightlyOverconfident(shape=(2,), hidden=32, depth=2), datamodule(memorizing_data())
    )
    (h,) = monitor.history
    flipd = monitor.last_check.primary.flipd  # NaN where impossible (memwatch.lid.possible): unmeasured
    assert flipd[~flipd.isnan()].min() < 0  # the raw estimate really left the range
    dims = ("lid_mean", "lid/flipd", "lid/denoising_lid", "lid/count", "lid/data_lid")
    assert all(0 <= h[k] <= 2 for k in dims), {k: h[k] for k in dims}
    ratios = {k: h[f"lid/{k}"] for k in ("relative", "profile", "drawdown", "denoising")}
    assert not any(v < 0 for v in ratios.values()) and math.isfinite(ratios["relative"]), ratios  # NaN: 0 / 0
    assert 0 <= h["sharp_fraction_mean"] <= 1 and h["lid/clamped_count"] >= 1
    assert int(monitor.last_check.lid.clamped.sum()) == h["lid/clamped_count"]


def test_the_data_lid_is_the_same_one_neighbourhood_at_a_time(monkeypatch):
    """The local PCA's memory is bounded by chunking the anchors (issue 32, item 2); the result
    does not depend on the chunk size (here: one neighbourhood per chunk against all at once)."""
    import memwatch.lid

    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 5, generator=g) * torch.tensor([1.0, 1.0, 0.3, 0.01, 0.01])
    scale = torch.tensor([0.02, 0.2, 2.0])  # the widest reaches MAX_NEIGHBOURS_FACTOR × neighbours points
    whole = data_lid(x, scale, neighbours=16, anchors=64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(memwatch.lid, "LOCAL_PCA_BYTES", 1)
    chunked = data_lid(x, scale, neighbours=16, anchors=64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)


def test_the_data_lid_of_the_held_samples_copies_out_only_the_rows_it_uses():
    """Issue 32, item 2: the first check copied every sample held (50 000 rows) out of the
    reservoir to use 4096 of them; now only those rows are read, with the same result."""
    from memwatch import defaults
    from memwatch.calibration import Reservoir
    from memwatch.signals.lid import LidSignal

    g = torch.Generator().manual_seed(4)
    reservoir = Reservoir(defaults.CALIBRATION_CAPACITY + 500, seed=0, distinct=True)
    reservoir.update(torch.randn(defaults.CALIBRATION_CAPACITY + 500, 3, generator=g) * torch.tensor([1.0, 1.0, 0.01]))
    schedule = NoiseSchedule.linear(100)
    fits = []
    for held in (reservoir.samples, reservoir):
        signal = LidSignal(LidOptions(anchors=32), 8, held=lambda: None, timesteps=lambda: [5.0], seed=0)
        signal.fit_reference(held, [5.0], schedule)
        fits.append(signal.reference)
    assert fits[0] == fits[1] and math.isfinite(fits[0][5.0])
    pick = torch.tensor([3, 0, 7])
    torch.testing.assert_close(reservoir.rows(pick), reservoir.samples[pick])
