"""Tests for memwatch.calibration: reservoir sampling, the data's NN scale, relative noise levels."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from scipy import stats

from memwatch.calibration import RESOLVED_FRACTION, DataScale, Reservoir, data_scale, relative_sigmas
from memwatch.errors import MemwatchError
from memwatch.groundtruth import median_nn_distance
from memwatch.probes import evaluation_timesteps
from memwatch.schedules import NoiseSchedule


def _stream(n: int, sizes: list[int]) -> list[torch.Tensor]:
    """Batches of ids ``[b, 1]`` (float) covering ``0 … n-1`` in order."""
    assert sum(sizes) == n
    return list(torch.arange(n, dtype=torch.float64).reshape(n, 1).split(sizes))


def _kept_ids(reservoir: Reservoir) -> list[int]:
    return sorted(int(v) for v in reservoir.samples.flatten())


def _reference_algorithm_r(batches: list[torch.Tensor], capacity: int, seed: int) -> list[int]:
    """Algorithm R one sample at a time, taking the uniforms per batch in the same order as the reservoir."""
    g = torch.Generator().manual_seed(seed)
    slots: list[int | None] = [None] * capacity
    i = 0
    for batch in batches:
        tail = max(0, i + batch.shape[0] - max(i, capacity))
        u = torch.rand(tail, dtype=torch.float64, generator=g).tolist()
        for row in batch:
            if i < capacity:
                slots[i] = int(row)
            else:
                j = min(math.floor(u.pop(0) * (i + 1)), i)
                if j < capacity:
                    slots[j] = int(row)
            i += 1
    return sorted(s for s in slots if s is not None)


# ------------------------------------------------------------------ reservoir


@pytest.mark.parametrize("sizes", [[7] * 8 + [4], [60], [1] * 60])
def test_reservoir_keeps_each_sample_with_probability_capacity_over_n(sizes: list[int]) -> None:
    n, capacity, runs = 60, 12, 400
    p = capacity / n
    counts = torch.zeros(n)
    for seed in range(runs):
        r = Reservoir(capacity, seed=seed)
        for batch in _stream(n, sizes):
            r.update(batch)
        counts[_kept_ids(r)] += 1
    expected = runs * p
    # per sample: Binomial(runs, p), 5 standard deviations
    sd = math.sqrt(runs * p * (1 - p))
    assert float((counts - expected).abs().max()) < 5 * sd
    # jointly: the counts sum to runs·capacity, so Σ(c-E)²/(R p(1-p)) · (n-1)/n ≈ χ²(n-1)
    stat = float(((counts - expected) ** 2).sum()) / (runs * p * (1 - p)) * (n - 1) / n
    assert stats.chi2.sf(stat, n - 1) > 1e-4
    # early and late samples are kept alike (no position bias)
    assert abs(float(counts[: n // 2].mean() - counts[n // 2 :].mean())) < 3 * sd / math.sqrt(n // 2) * math.sqrt(2)


@pytest.mark.parametrize("sizes", [[7] * 8 + [4], [60], [5, 1, 30, 24]])
def test_reservoir_matches_one_at_a_time_algorithm_r(sizes: list[int]) -> None:
    for seed in range(20):
        r = Reservoir(12, seed=seed)
        for batch in _stream(60, sizes):
            r.update(batch)
        assert _kept_ids(r) == _reference_algorithm_r(_stream(60, sizes), 12, seed)


def test_reservoir_capacity_bound_and_seen() -> None:
    r = Reservoir(10, seed=0)
    seen = 0
    for batch in _stream(25, [4, 4, 4, 13]):
        r.update(batch)
        seen += batch.shape[0]
        assert r.seen == seen
        assert len(r) == min(r.seen, 10) == r.samples.shape[0]
    assert r.shape == (1,)
    assert r.samples.dtype == torch.float32
    assert len(set(_kept_ids(r))) == 10  # distinct stream positions


def test_reservoir_below_capacity_keeps_everything_in_order() -> None:
    r = Reservoir(100, seed=3)
    x = torch.randn(30, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r.update(x[:10])
    r.update(x[10:])
    torch.testing.assert_close(r.samples, x.float(), rtol=0, atol=0)


def test_reservoir_is_deterministic_given_the_seed() -> None:
    def run(seed: int) -> list[int]:
        r = Reservoir(16, seed=seed)
        for batch in _stream(200, [50] * 4):
            r.update(batch)
        return _kept_ids(r)

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_reservoir_copies_detached_float32() -> None:
    r = Reservoir(8, seed=0)
    x = torch.ones(4, 3, requires_grad=True)
    r.update(x * 2)
    y = torch.full((4, 3), 7, dtype=torch.int64)
    r.update(y)
    y.fill_(0)  # the reservoir holds copies
    s = r.samples
    assert not s.requires_grad and s.dtype == torch.float32 and s.device.type == "cpu"
    assert sorted(s[:, 0].tolist()) == [2.0] * 4 + [7.0] * 4


def test_reservoir_rejects_bad_batches_and_arguments() -> None:
    r = Reservoir(8, seed=0)
    with pytest.raises(MemwatchError, match="holds no samples"):
        _ = r.samples
    r.update(torch.zeros(3, 2, 2))
    with pytest.raises(MemwatchError, match=r"`batch`.*\(2, 2\).*\(4,\)"):
        r.update(torch.zeros(3, 4))
    with pytest.raises(MemwatchError, match="`batch`"):
        r.update(torch.tensor(1.0))
    with pytest.raises(MemwatchError, match="`batch`"):
        r.update([1.0, 2.0])  # type: ignore[arg-type]
    for bad in (1, 0, 2.5, True):
        with pytest.raises(MemwatchError, match="`capacity`"):
            Reservoir(bad)  # type: ignore[arg-type]
    with pytest.raises(MemwatchError, match="`seed`"):
        Reservoir(4, seed=-1)
    assert r.seen == 3  # a rejected batch changes nothing


def test_state_dict_holds_no_samples() -> None:
    r = Reservoir(8, seed=0)
    marker = torch.full((5, 4), 1234.5678)  # a bit pattern that the saved state must not contain
    r.update(marker)
    state = r.state_dict()
    assert set(state) == {"capacity", "seed", "seen", "rng_state"}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert key == "rng_state" and value.dtype == torch.uint8
        else:
            assert isinstance(value, int)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert marker[0, 0].numpy().tobytes() not in buffer.getvalue()


def test_load_state_dict_resumes_the_stream() -> None:
    batches = [torch.randn(9, 3, generator=torch.Generator().manual_seed(k)) for k in range(12)]
    whole = Reservoir(16, seed=1)
    for b in batches:
        whole.update(b)
    first = Reservoir(16, seed=1)
    for b in batches[:6]:
        first.update(b)
    resumed = Reservoir(16)
    resumed.load_state_dict(first.state_dict())
    assert len(resumed) == 0 and resumed.seen == 54
    for b in batches[6:]:
        resumed.update(b)
    assert resumed.seen == whole.seen
    # exactly the uninterrupted reservoir's samples that arrived after the resume
    late = torch.cat(batches[6:])
    kept = whole.samples
    from_late = kept[(kept[:, None, :] == late[None]).all(-1).any(-1)]
    assert len(from_late) > 0
    torch.testing.assert_close(resumed.samples, from_late, rtol=0, atol=0)


def test_load_state_dict_rejects_other_capacity_or_missing_keys() -> None:
    state = Reservoir(8).state_dict()
    with pytest.raises(MemwatchError, match="capacity"):
        Reservoir(9).load_state_dict(state)
    del state["rng_state"]
    with pytest.raises(MemwatchError, match="rng_state"):
        Reservoir(8).load_state_dict(state)


# ------------------------------------------------------------------ data scale


def test_data_scale_on_a_1d_grid() -> None:
    h, n = 0.37, 50
    x = (torch.arange(n, dtype=torch.float64) * h)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    s = data_scale(x[:, None])
    assert s.median == pytest.approx(h, rel=1e-12)
    assert s.q10 == pytest.approx(h, rel=1e-12) and s.q90 == pytest.approx(h, rel=1e-12)
    # unbiased variance of h·{0 … n-1}: h² n (n + 1) / 12
    assert s.dim_std == pytest.approx(h * math.sqrt(n * (n + 1) / 12), rel=1e-12)
    assert (s.n, s.num_queries, s.num_duplicates) == (n, n, 0)


def test_data_scale_on_a_2d_lattice_with_repeats_and_subsampled_queries() -> None:
    h = 0.25
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(6.0), indexing="ij"), -1).reshape(-1, 2) * h
    repeated = torch.cat([grid, grid[:20], grid]).double()  # a reservoir over several epochs
    s = data_scale(repeated.reshape(-1, 1, 2), max_queries=10, generator=torch.Generator().manual_seed(0))
    assert s.median == pytest.approx(h, rel=1e-12) and s.q10 == pytest.approx(h) and s.q90 == pytest.approx(h)
    assert (s.n, s.num_queries, s.num_duplicates) == (48, 10, 68)


def test_data_scale_quantiles_and_agreement_with_median_nn_distance() -> None:
    # NN distances of 0, 1, 3, 7, 8: 1, 1, 2, 1, 1 -> median 1, quantiles by linear interpolation
    s = data_scale(torch.tensor([[0.0], [1.0], [3.0], [7.0], [8.0]], dtype=torch.float64))
    nn = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    assert (s.median, s.q10, s.q90) == (1.0, float(nn.quantile(0.1)), float(nn.quantile(0.9)))
    x = torch.randn(300, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sub = data_scale(x, max_queries=64, generator=torch.Generator().manual_seed(9))
    x_sorted = torch.unique(x, dim=0)  # data_scale draws its queries among the distinct points, sorted
    ref = median_nn_distance(x_sorted, max_queries=64, generator=torch.Generator().manual_seed(9))
    assert sub.median == ref


def test_data_scale_rejects_bad_input() -> None:
    with pytest.raises(MemwatchError, match="2 distinct"):
        data_scale(torch.ones(5, 3))
    with pytest.raises(MemwatchError, match="`samples`"):
        data_scale(torch.ones(5))
    with pytest.raises(MemwatchError, match="finite"):
        data_scale(torch.tensor([[0.0], [math.nan]]))
    with pytest.raises(MemwatchError, match="`max_queries`"):
        data_scale(torch.randn(5, 2), max_queries=0)


def test_extrapolated_median_closed_form_and_on_a_lattice() -> None:
    s = DataScale(median=2.0, q10=1.0, q90=3.0, dim_std=1.0, n=100, num_queries=100, num_duplicates=0)
    assert s.extrapolated_median(total=100 * 2**3, intrinsic_dim=3) == pytest.approx(1.0, rel=1e-12)
    assert s.extrapolated_median(total=100, intrinsic_dim=2) == 2.0
    with pytest.raises(MemwatchError, match="`total`"):
        s.extrapolated_median(total=50, intrinsic_dim=2)
    with pytest.raises(MemwatchError, match="`intrinsic_dim`"):
        s.extrapolated_median(total=200, intrinsic_dim=0)
    # every 4th point of a 1-D grid (k = 1) has NN distance 4h: the correction recovers h
    h = 0.1
    sub = data_scale((torch.arange(0, 400, 4, dtype=torch.float64) * h)[:, None])
    assert sub.extrapolated_median(total=400, intrinsic_dim=1) == pytest.approx(h, rel=1e-12)


def test_data_scale_and_sigmas_are_scale_equivariant() -> None:
    x = torch.randn(200, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    schedule = NoiseSchedule.edm(sigma_min=1e-4, sigma_max=1e4)
    base = data_scale(x)
    base_levels = relative_sigmas(base, schedule, (0.1, 0.2, 0.5))
    for c in (0.01, 0.5, 4.0, 100.0):
        s = data_scale(x * c)
        for name in ("median", "q10", "q90", "dim_std"):
            assert getattr(s, name) == pytest.approx(c * getattr(base, name), rel=1e-10)
        levels = relative_sigmas(s, schedule, (0.1, 0.2, 0.5))
        assert levels == pytest.approx(tuple(c * v for v in base_levels), rel=1e-10)


# ------------------------------------------------------------------ relative sigmas


def _scale(median: float) -> DataScale:
    return DataScale(median=median, q10=median, q90=median, dim_std=1.0, n=10, num_queries=10, num_duplicates=0)


def test_relative_sigmas_inside_the_range_do_not_warn() -> None:
    schedule = NoiseSchedule.linear(1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        levels = relative_sigmas(_scale(2.0), schedule, (0.1, 0.2, 0.4))
    assert levels == pytest.approx((0.2, 0.4, 0.8), rel=1e-12)
    assert evaluation_timesteps(schedule, levels) == [float(schedule.timestep_for_sigma(s)) for s in levels]


def test_relative_sigmas_default_floor_and_ceiling() -> None:
    schedule = NoiseSchedule.linear(1000)
    floor = float(schedule.sigma(round(RESOLVED_FRACTION * 999)))
    ceiling = float(schedule.sigma(round((1 - RESOLVED_FRACTION) * 999)))
    with pytest.warns(RuntimeWarning, match=r"clamped.*0\.01 × 2 = 0\.02"):
        low = relative_sigmas(_scale(2.0), schedule, (0.01, 0.2))
    assert low == (floor, pytest.approx(0.4, rel=1e-12))
    assert floor == pytest.approx(0.0791, abs=1e-4)
    with pytest.warns(RuntimeWarning, match=r"clamped.*3 × 2 = 6"):
        high = relative_sigmas(_scale(2.0), schedule, (3.0,))
    assert high == (ceiling,) and ceiling < float(schedule.sigma(999))
    for sched in (NoiseSchedule.cosine(1000), NoiseSchedule.vp(), NoiseSchedule.edm()):
        with pytest.warns(RuntimeWarning):
            levels = relative_sigmas(_scale(1e-6), sched, (1.0,)) + relative_sigmas(_scale(1e6), sched, (1.0,))
        assert len(evaluation_timesteps(sched, levels)) == 2  # both ends usable by the monitor, distinct


def test_relative_sigmas_explicit_floor_and_ceiling() -> None:
    schedule = NoiseSchedule.edm()
    with pytest.warns(RuntimeWarning, match="floor"):
        assert relative_sigmas(_scale(1.0), schedule, (0.2, 1.0, 5.0), floor=0.5, ceiling=2.0) == (0.5, 1.0, 2.0)
    for kwargs in ({"floor": 1e-5}, {"ceiling": 100.0}, {"floor": 0.0}):
        with pytest.raises(MemwatchError, match="σ range"):
            relative_sigmas(_scale(1.0), schedule, **kwargs)
    with pytest.raises(MemwatchError, match="floor.*ceiling"):
        relative_sigmas(_scale(1.0), schedule, floor=2.0, ceiling=1.0)


def test_relative_sigmas_rejects_bad_factors_and_scale() -> None:
    schedule = NoiseSchedule.linear(1000)
    for factors in ((), (0.0,), (-0.2,), (math.inf,), (0.2, math.nan)):
        with pytest.raises(MemwatchError, match="`factors`"):
            relative_sigmas(_scale(1.0), schedule, factors)
    with pytest.raises(MemwatchError, match="median"):
        relative_sigmas(_scale(math.nan), schedule)


def test_same_relative_levels_across_data_ranges() -> None:
    """Digits-like data in [-1, 1], [0, 1], ×4 and standardized latents: the same levels relative to the data."""
    g = torch.Generator().manual_seed(4)
    centres = torch.rand(6, 16, dtype=torch.float64, generator=g) * 2 - 1
    x = (centres[torch.arange(240) % 6] + 0.15 * torch.randn(240, 16, dtype=torch.float64, generator=g)).clamp(-1, 1)
    standardized = (x - x.mean(0)) / x.std(0)
    variants = {"[-1, 1]": (x, 1.0), "[0, 1]": ((x + 1) / 2, 0.5), "x4": (4 * x, 4.0), "latents": (standardized, None)}
    schedule = NoiseSchedule.edm()
    base = data_scale(x)
    for name, (data, c) in variants.items():
        s = data_scale(data)
        levels = relative_sigmas(s, schedule, (0.1, 0.2))
        assert [v / s.median for v in levels] == pytest.approx([0.1, 0.2], rel=1e-12), name
        if c is not None:
            assert s.median == pytest.approx(c * base.median, rel=1e-10), name
        else:
            assert s.dim_std == pytest.approx(1.0, rel=1e-12)
            assert s.median == median_nn_distance(standardized)
    # the absolute default σ = 0.3 sits at a different place relative to each: the reason for this module
    ratios = [0.3 / data_scale(d).median for d, _ in variants.values()]
    assert max(ratios) / min(ratios) > 4


# ---------------------------------------------------------------------- through the monitor
def test_the_default_monitor_calibrates_its_noise_levels_from_the_training_batches(tmp_path):
    """No σ set: the levels follow the data's scale (×1, ×0.5). Batches that already have the
    probes' shape are taken as they are even with an `encode_fn` (latent batches, pixel
    reference data), and the monitor says so; pixel batches through `encode_fn`:
    tests/test_models.py::test_a_latent_model_trained_on_pixel_batches_calibrates_in_latent_space."""
    import lightning.pytorch as pl
    from callback_setup import datamodule, module_2d, trainer

    from memwatch import MemorizationMonitor
    from memwatch.groundtruth import median_nn_distance

    data = torch.tensor([[-2.0, -2.0], [2.0, -2.0], [-2.0, 2.0], [2.0, 2.0]])  # NN distance 4
    levels = {}
    for name, scale, encode_fn in (("x1", 1.0, None), ("x0.5", 0.5, None), ("in space", 1.0, lambda x: x / 3)):
        pl.seed_everything(0, verbose=False)
        monitor = MemorizationMonitor(
            every_n_train_steps=10, num_probes=4, sampler_steps=5, k=2, verbose=False, raise_errors=True,
            save_clean_checkpoint=False, encode_fn=encode_fn,
        )  # fmt: skip
        assert monitor.calibrating  # the default: sigmas="auto"
        fit = trainer(tmp_path / name, [monitor], max_steps=20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit.fit(module_2d(hidden=32, depth=1), datamodule(data * scale))
        said = [str(w.message) for w in caught if "taken as latents" in str(w.message)]
        assert len(said) == (1 if encode_fn else 0)
        assert len(monitor.history) == 2 and all(math.isfinite(h["sharp_fraction_mean"]) for h in monitor.history)
        assert monitor.data_scale.median == pytest.approx(median_nn_distance(data * scale))
        levels[name] = monitor.calibrated_sigmas
        state = monitor.state_dict()
        assert state["calibrated_sigmas"] == levels[name] and "samples" not in str(state)  # no training data
        held = monitor.held_samples  # calibrated: only the copy index of the batches (the default) holds them
        assert held is not None and held.reservoir is None and len(held.index) == len(data)
    assert levels["x1"] == pytest.approx((0.1 * 4,)) and levels["x0.5"] == pytest.approx(
        (0.1 * 2,)
    )  # scale-equivariant
    assert levels["in space"] == levels["x1"]


def test_explicit_levels_or_timesteps_do_not_calibrate_and_calibrate_says_why() -> None:
    from callback_setup import module_2d

    from memwatch import MemorizationMonitor

    assert not MemorizationMonitor(sigmas=(0.3,)).calibrating
    assert not MemorizationMonitor(timesteps=(100,)).calibrating  # the timesteps win over the default levels
    with pytest.raises(MemwatchError, match=r'calibrate\(\) needs sigmas="auto".*\(0.3,\)'):
        MemorizationMonitor(sigmas=(0.3,)).calibrate(torch.randn(8, 2))
    monitor = MemorizationMonitor()
    with pytest.raises(MemwatchError, match=r"call prepare\(pl_module\) first"):
        monitor.calibrate(torch.randn(8, 2))
    monitor.prepare(module_2d(hidden=8, depth=1))
    with pytest.raises(MemwatchError, match="distinct"):
        monitor.calibrate(torch.ones(8, 2))
    assert monitor.calibrate(torch.tensor([[0.0, 0.0], [0.0, 4.0], [4.0, 0.0]])) == pytest.approx((0.4,))


def test_a_distinct_reservoir_holds_a_training_set_up_to_capacity_whole_over_many_epochs() -> None:
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    stream, distinct = Reservoir(400, seed=0), Reservoir(400, seed=0, distinct=True)
    for _ in range(200):  # 200 batches of 64 drawn with replacement: every sample seen ~43 times
        batch = x[torch.randint(0, 300, (64,), generator=g)]
        stream.update(batch)
        distinct.update(batch)
    held = {tuple(r.tolist()) for r in distinct.samples}
    assert len(distinct) == 300 and held == {tuple(r.tolist()) for r in x}  # all of them, once each
    assert distinct.seen == 300
    assert len({tuple(r.tolist()) for r in stream.samples}) < 300  # the stream reservoir lost some


def test_a_distinct_reservoir_beyond_capacity_stays_bounded_and_forgets_evicted_samples() -> None:
    x = torch.arange(100.0).reshape(50, 2)
    r = Reservoir(8, seed=0, distinct=True)
    for _ in range(5):
        r.update(x)
        r.update(x[:10])  # repeats within and across batches
    assert len(r) == 8 and len({tuple(v.tolist()) for v in r.samples}) == 8
    assert set(r._key_at) == set(range(8)) and len(r._slot_of) == 8  # one key per held sample, no leak
    r.load_state_dict(r.state_dict())
    assert len(r) == 0 and not r._slot_of


def test_a_transform_sees_only_the_kept_rows_and_equality_is_decided_before_it() -> None:
    """An encoder runs on the rows the reservoir keeps (few, once it is full), and a sampling
    encoder does not make an image seen twice look like two samples."""
    seen_rows: list[int] = []
    noise = torch.Generator().manual_seed(5)

    def sampling_encoder(x: torch.Tensor) -> torch.Tensor:
        seen_rows.append(x.shape[0])
        return torch.cat([x, torch.randn(x.shape[0], 1, generator=noise)], dim=1)  # [r, 3]: another shape

    images = torch.arange(40.0).reshape(20, 2)
    r = Reservoir(8, seed=0, distinct=True)
    for _ in range(5):  # five epochs of the same 20 images
        for batch in images.split(5):
            r.update(batch, transform=sampling_encoder)
    assert r.shape == (3,) and len(r) == 8
    assert sum(seen_rows) < 5 * 20 and max(seen_rows) <= 5
    held = r.samples[:, :2]
    assert len({tuple(row.tolist()) for row in held}) == 8  # no image held twice, despite the encoder's noise
    assert all(any(torch.equal(h, img) for img in images) for h in held)

    plain = Reservoir(8, seed=0)
    plain.update(images, transform=sampling_encoder)
    assert seen_rows[-1] == 8  # the first batch fills all 8 slots; the other 12 rows are never encoded


def test_a_bad_transform_is_named_and_changes_nothing() -> None:
    r = Reservoir(4, seed=0)
    r.update(torch.zeros(2, 3), transform=lambda x: x * 2)
    state = r.state_dict()
    with pytest.raises(MemwatchError, match=r"`transform` must map 2 rows"):
        r.update(torch.ones(2, 3), transform=lambda x: x[:1])
    with pytest.raises(MemwatchError, match=r"`transform` must keep the shape of its first output, \(3,\)"):
        r.update(torch.ones(2, 3), transform=lambda x: x[:, :2])
    assert r.seen == 2 and torch.equal(r.state_dict()["rng_state"], state["rng_state"])
