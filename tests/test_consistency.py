"""Whether a prediction type and a schedule fit the network: exact denoisers of a Gaussian mixture
read with their own pair and with others, an untrained network, and the monitor's one warning,
NaN values and no onset through a real ``Trainer.fit``."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import datamodule, fit
from model_setups import AnyDiffusion, schedule_of, time_input

from memwatch import DiffusionScore, MemorizationMonitor, NoiseSchedule
from memwatch.apps.toymodels import MLPDenoiser
from memwatch.consistency import check_consistency, timestep_for_level
from memwatch.data import GaussianMixture, digits
from memwatch.score import PREDICTION_TYPES

SCHEDULES = {
    "linear": NoiseSchedule.linear(1000),
    "vp": NoiseSchedule.vp(),
    "edm": NoiseSchedule.edm(),
    "flow": NoiseSchedule.flow(1000),
}
REFUSED = {("flow_prediction", k) for k in ("linear", "vp", "edm")} | {("v_prediction", "flow")}
PAIRS = [(k, p) for k in SCHEDULES for p in PREDICTION_TYPES if (p, k) not in REFUSED]
LEVEL = 0.15  # about the spread of a mixture component (std 0.1 in 16 dimensions)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    gmm = GaussianMixture.isotropic(torch.randn(8, 16, generator=g, dtype=torch.float64), std=0.1)
    return gmm, gmm.sample(128, generator=g).float()


def _check(model, schedule, prediction, x0, **kwargs):
    score = DiffusionScore(model, schedule, prediction, **kwargs)
    return check_consistency(score, x0, LEVEL, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("kind", "prediction"), PAIRS)
def test_the_exact_denoiser_fits_its_own_pair(mixture, kind, prediction):
    gmm, x0 = mixture
    schedule = SCHEDULES[kind]
    found = _check(gmm.as_model(schedule, prediction), schedule, prediction, x0)
    assert found.verdict == "fits", found.describe()
    assert found.errors[prediction][0] < 0.5  # it removes most of the noise at the small level


@pytest.mark.parametrize(
    ("kind", "trained", "read"), [(k, p, q) for k, p in PAIRS for k2, q in PAIRS if k2 == k and q != p]
)
def test_an_exact_denoiser_read_as_another_prediction_is_wrong_and_the_right_one_named(mixture, kind, trained, read):
    """Every wrong prediction on every schedule (issue 30: ε read as v and an ε network read as the
    flow velocity among them)."""
    gmm, x0 = mixture
    schedule = SCHEDULES[kind]
    found = _check(gmm.as_model(schedule, trained), schedule, read, x0)
    assert (found.verdict, found.better, found.better_schedule) == ("wrong", trained, None), found.describe()
    message = found.describe()
    assert f"prediction={read!r}" in message and schedule.kind in message and f"prediction={trained!r}" in message


OTHER_FAMILY = [  # (trained schedule, its prediction, read schedule, read prediction), one time axis each
    (NoiseSchedule.flow(1000), "flow_prediction", NoiseSchedule.linear(1000), "v_prediction"),
    (NoiseSchedule.flow(1000), "flow_prediction", NoiseSchedule.linear(1000), "epsilon"),
    (NoiseSchedule.flow(), "flow_prediction", NoiseSchedule.vp(), "v_prediction"),  # the issue's own mix-up
]


@pytest.mark.parametrize(("trained", "prediction", "read", "read_as"), OTHER_FAMILY)
def test_a_network_of_the_other_family_is_wrong_and_its_schedule_named(mixture, trained, prediction, read, read_as):
    """A flow-matching network read on a DDPM / VP schedule, and back: told, naming what it reads as."""
    gmm, x0 = mixture
    found = _check(gmm.as_model(trained, prediction), read, read_as, x0)
    assert (found.verdict, found.better, found.better_schedule) == ("wrong", prediction, trained.kind), found.describe()
    assert f"prediction={prediction!r} on a {trained.kind} schedule instead" in found.describe()


@pytest.mark.parametrize(("kind", "prediction"), PAIRS)
def test_an_untrained_network_cannot_be_told(mixture, kind, prediction):
    _, x0 = mixture
    torch.manual_seed(0)
    net = MLPDenoiser((16,), hidden=64, depth=2)
    found = _check(net, SCHEDULES[kind], prediction, x0, time_fn=lambda t: t.float())
    assert found.verdict == "undecided", found.describe()


def test_levels_are_in_data_units_on_every_schedule():
    for kind, schedule in SCHEDULES.items():
        for level in (0.1, 1.0, 3.0):
            t = timestep_for_level(schedule, level)
            ratio = float(schedule.sigma(t) / schedule.alpha(t))
            assert math.isclose(ratio, level, rel_tol=0.05), (kind, level, ratio)


# ------------------------------------------------------------------ through a real fit
def _fit_read_as(tmp_path, trained, read, steps=300):
    """A 64-dimensional digits MLP trained ``steps`` steps with the pair ``trained``, monitored
    (one check, at the end) with the pair ``read``."""
    pl.seed_everything(0, verbose=False)
    module = AnyDiffusion(*trained, shape=(64,), hidden=128)
    schedule = schedule_of(read[0])
    time_fn = None if schedule.is_discrete else (lambda t: time_input(schedule, t).float())
    monitor = MemorizationMonitor(
        every_n_train_steps=steps,
        num_probes=8,
        score_fn=lambda m: DiffusionScore(m.net, schedule, read[1], time_fn=time_fn),
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data = datamodule(digits(64).flatten(1), batch_size=64)
        fit(tmp_path, data, monitor, steps, seed=None, module=module, deterministic=False)
    told = [str(w.message) for w in seen if "memwatch:" in str(w.message) and "fit" in str(w.message)]
    return monitor, told


@pytest.mark.parametrize(
    ("trained", "read"),
    [
        (("flow", "flow_prediction"), ("flow", "epsilon")),
        (("flow", "flow_prediction"), ("flow", "sample")),
        (("linear", "sample"), ("linear", "epsilon")),
        (("linear", "sample"), ("flow", "flow_prediction")),
        (("vp", "v_prediction"), ("vp", "epsilon")),  # untold before the unexplained share
        (("flow", "flow_prediction"), ("vp", "v_prediction")),  # the issue's own mix-up: a wrong schedule
    ],
)
def test_a_wrong_pair_is_told_once_and_its_values_are_nan(tmp_path, trained, read):
    monitor, told = _fit_read_as(tmp_path, trained, read)
    assert len(told) == 1 and "does not fit" in told[0], told
    # an x₀ network explains as x₀ on any schedule; a flow velocity only on a flow schedule, which is named
    where = " on a flow schedule" if "flow_prediction" in trained and read[0] != "flow" else ""
    assert f"prediction={read[1]!r}" in told[0] and f"prediction={trained[1]!r}{where} instead" in told[0]
    assert monitor.signals["consistency"].verdict == "wrong" and monitor.onset_step is None
    (check,) = monitor.history
    bookkeeping = ("step", "onset", "check_seconds", "intake_skipped_batches", "intake_dropped_rows", "clean_step")
    numbers = {
        k: v
        for k, v in check.items()
        if not k.endswith("_count") and k not in bookkeeping and not k.startswith("time/")
    }  # the phases' times are measured whatever the verdict
    assert all(math.isnan(v) for v in numbers.values()), {k: v for k, v in numbers.items() if not math.isnan(v)}
    assert not bool(monitor.last_check.primary.finite.any()) and bool(monitor.last_check.primary.lid.isnan().all())


@pytest.mark.parametrize(
    ("trained", "read"),
    [
        (("flow", "flow_prediction"), ("linear", "sample")),
        (("linear", "epsilon"), ("edm", "epsilon")),
        (("linear", "epsilon"), ("linear", "v_prediction")),  # near pairs: "cannot tell", values kept
        (("flow", "epsilon"), ("flow", "flow_prediction")),
    ],
)
def test_a_wrong_schedule_is_told_and_logs_no_impossible_lid(tmp_path, trained, read):
    monitor, told = _fit_read_as(tmp_path, trained, read)
    assert told and f"prediction={read[1]!r}" in told[0] and monitor.onset_step is None, told
    (check,) = monitor.history
    for key in ("lid_mean", "lid/flipd", "lid/count"):
        assert math.isnan(check[key]) or check[key] >= 0, (key, check[key])


def test_the_right_pair_is_not_told(tmp_path):
    monitor, told = _fit_read_as(tmp_path, ("flow", "flow_prediction"), ("flow", "flow_prediction"))
    assert not told and monitor.signals["consistency"].verdict == "fits"
    assert math.isfinite(monitor.history[-1]["lid/flipd"]) and math.isfinite(monitor.history[-1]["lid_mean"])


class _TooSharp(torch.nn.Module):
    """ε̂ = 10 x: a score -10 x / σ_t whose FLIPD d (1 - 10 σ_t) is negative above σ_t = 0.1."""

    def forward(self, x, t):
        return 10 * x


@pytest.mark.parametrize("method", ["dense", "trace"])
def test_a_negative_lid_is_never_logged_and_names_the_pair(tmp_path, method):
    pl.seed_everything(0, verbose=False)
    schedule = NoiseSchedule.linear(200)
    monitor = MemorizationMonitor(
        every_n_train_steps=5, num_probes=8, sigmas=(0.3,), method=method, k=2,
        score_fn=lambda m: DiffusionScore(_TooSharp(), schedule, "epsilon"),
    )  # fmt: skip
    module, data = AnyDiffusion("linear", "epsilon"), datamodule(torch.randn(64, 2))
    with pytest.warns(UserWarning, match=r"LID below 0 of 2 dimensions.*prediction='epsilon' on this discrete"):
        fit(tmp_path, data, monitor, 10, seed=None, module=module, deterministic=False)
    assert monitor.onset_step is None and len(monitor.history) == 2
    for check in monitor.history:
        for key in ("lid_mean", "lid/flipd", "lid/count", "sharp_fraction_mean", "memorized_fraction"):
            assert math.isnan(check[key]), (key, check[key])
