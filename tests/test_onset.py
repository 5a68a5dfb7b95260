"""Tests for memwatch.onset: the numbered rules of OnsetDetector, its errors, and resume."""

import copy
import io
import math

import pytest
import torch

from memwatch.errors import MemwatchError
from memwatch.onset import OnsetDecision, OnsetDetector


def _run(det, values, start=100, every=100):
    return [det.update(start + i * every, v) for i, v in enumerate(values)]


def _flags(decisions):
    return [(d.onset, d.memorizing, d.clean) for d in decisions]


def test_patience_streak_reset_by_clean_check():
    det = OnsetDetector(threshold=0.5, patience=3)
    ds = _run(det, [0.6, 0.7, 0.1, 0.6, 0.7, 0.8, 0.9, 0.2])
    assert [d.onset for d in ds] == [False] * 5 + [True, False, False]
    assert [d.memorizing for d in ds] == [False] * 5 + [True] * 3
    assert [d.clean for d in ds] == [False, False, True, False, False, False, False, False]
    assert det.onset_step == 600 and det.last_clean_step == 300
    assert "for 3 consecutive checks since step 400" in ds[5].reason
    assert ds[5].reason.startswith("value=0.8 > 0.5")
    assert "memorizing since step 600" in ds[7].reason
    assert det.history[-1] == (800, 0.2)


def test_patience_one_and_strict_inequality():
    det = OnsetDetector(threshold=0.5, patience=1)
    assert _flags(_run(det, [0.5, 0.51])) == [(False, False, True), (True, True, False)]


def test_min_steps_ignores_early_exceedances():
    det = OnsetDetector(threshold=0.5, patience=2, min_steps=300)
    ds = _run(det, [0.9, 0.9, 0.9, 0.9])  # steps 100..400
    assert _flags(ds) == [(False, False, False)] * 3 + [(True, True, False)]
    assert "not counted before min_steps=300" in ds[0].reason
    assert det.onset_step == 400 and det.last_clean_step is None
    assert "since step 300" in ds[3].reason


def test_clean_before_min_steps_and_baseline_after_it():
    det = OnsetDetector(threshold=0.5, baseline_checks=2, min_steps=250)
    ds = _run(det, [0.1, 0.2, 0.3, 0.4])
    assert all(d.clean for d in ds) and det.last_clean_step == 400
    assert det.baseline == pytest.approx(0.35)  # only steps 300 and 400


def test_baseline_plus_min_delta():
    det = OnsetDetector(threshold=None, min_delta=0.1, baseline_checks=3, patience=2)
    # the baseline checks themselves are never compared with the baseline; 0.9 is one of them
    ds = _run(det, [0.0, 0.9, 0.3, 0.45, 0.48, 0.55, 0.6])
    assert det.baseline == pytest.approx(0.4)
    assert [d.clean for d in ds] == [True, True, True, True, True, False, False]
    assert [d.onset for d in ds] == [False] * 6 + [True]
    assert det.onset_step == 700
    assert "> baseline 0.4 + 0.1" in ds[-1].reason


def test_threshold_needs_no_baseline_but_min_delta_does():
    both = OnsetDetector(threshold=0.8, min_delta=0.05, baseline_checks=5, patience=1)
    assert both.update(0, 0.9).onset  # threshold rule before the baseline is complete
    delta = OnsetDetector(threshold=None, min_delta=0.0, baseline_checks=5, patience=1)
    assert not any(d.onset for d in _run(delta, [0.1, 0.9, 5.0, 7.0, 9.0]))
    assert delta.baseline == pytest.approx(4.4)


def test_mode_min():
    det = OnsetDetector(threshold=2.0, min_delta=1.0, baseline_checks=2, patience=2, mode="min")
    # baseline 8.5; then 7.0 < 8.5 - 1 passes, 9.0 resets, 6.0 and 1.0 pass
    ds = _run(det, [9.0, 8.0, 7.0, 9.0, 6.0, 1.0])
    assert [d.onset for d in ds] == [False] * 5 + [True]
    assert [d.clean for d in ds] == [True, True, False, True, False, False]
    assert "< 2 and < baseline 8.5 - 1" in ds[-1].reason
    assert "since step 500" in ds[-1].reason


def test_nonfinite_neither_clean_nor_resetting():
    det = OnsetDetector(threshold=0.5, patience=2, baseline_checks=2)
    ds = _run(det, [float("nan"), 0.1, 0.7, float("nan"), float("inf"), 0.8])
    assert [d.clean for d in ds] == [False, True, False, False, False, False]
    assert [d.onset for d in ds] == [False] * 5 + [True]
    assert "not finite" in ds[3].reason and "streak unchanged at 1/2" in ds[3].reason
    assert det.baseline == pytest.approx(0.4)  # NaN/inf are not part of the baseline
    assert math.isnan(det.history[0][1])
    after = det.update(700, float("nan"))
    assert (after.onset, after.memorizing, after.clean) == (False, True, False)


def test_accepts_tensor_step_and_value():
    det = OnsetDetector(threshold=0.5, patience=1)
    d = det.update(torch.tensor(3), torch.tensor(0.7))
    assert d.onset and det.onset_step == 3 and isinstance(det.history[0][0], int)
    with pytest.raises(MemwatchError, match=r"`step` must be an int, got float"):
        det.update(1.5, 0.1)
    with pytest.raises(MemwatchError, match=r"`value` must be a float, got 'abc'"):
        det.update(1, "abc")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 0}, r"`patience` must be a positive integer, got 0"),
        ({"baseline_checks": 0}, r"`baseline_checks` must be a positive integer, got 0"),
        ({"min_steps": -1}, r"`min_steps` must be an integer >= 0, got -1"),
        ({"mode": "maximize"}, r"`mode` must be one of \('max', 'min'\), got 'maximize'"),
        ({"threshold": None, "min_delta": None}, r"`threshold` and `min_delta` are both None"),
        ({"min_delta": -0.1}, r"`min_delta` must be a finite float >= 0 or None, got -0.1"),
        ({"threshold": float("inf")}, r"`threshold` must be a finite float or None, got inf"),
        ({"patience": 1.5}, r"`patience` must be a positive integer, got 1.5"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnsetDetector(**kwargs)


SEQUENCES = [
    ({"threshold": 0.5, "patience": 2}, [0.1, 0.6, 0.2, 0.7, float("nan"), 0.9, 0.3, 0.1]),
    (
        {"threshold": None, "min_delta": 0.1, "baseline_checks": 3, "patience": 2, "min_steps": 200},
        [0.9, 0.0, 0.2, 0.1, 0.25, 0.3, 0.1, 0.4, 0.5, 0.6],
    ),
    (
        {"threshold": 3.0, "min_delta": 0.5, "baseline_checks": 2, "patience": 3, "mode": "min"},
        [5.0, 5.2, 4.0, 4.1, 5.5, 4.2, 2.0, float("inf"), 3.9, 1.0],
    ),
]


def _roundtrip_torch(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("kwargs", "values"), SEQUENCES)
@pytest.mark.parametrize("transport", [copy.deepcopy, _roundtrip_torch])
def test_resume_equivalence(kwargs, values, transport):
    steps = [100 * (i + 1) for i in range(len(values))]
    ref = OnsetDetector(**kwargs)
    expected = [ref.update(s, v) for s, v in zip(steps, values)]
    assert any(d.onset for d in expected)
    for split in range(len(values) + 1):
        first = OnsetDetector(**kwargs)
        got = [first.update(s, v) for s, v in zip(steps[:split], values[:split])]
        resumed = OnsetDetector(**kwargs)
        resumed.load_state_dict(transport(first.state_dict()))
        got += [resumed.update(s, v) for s, v in zip(steps[split:], values[split:])]
        assert got == expected, f"split at {split}"
        for attr in ("baseline", "onset_step", "last_clean_step", "streak"):
            assert getattr(resumed, attr) == getattr(ref, attr), (split, attr)
        assert _same_state(resumed.state_dict(), ref.state_dict()), split


def _same_state(a, b):
    ha = [(s, v if math.isfinite(v) else repr(v)) for s, v in a.pop("history")]
    hb = [(s, v if math.isfinite(v) else repr(v)) for s, v in b.pop("history")]
    return ha == hb and a == b


def test_state_dict_is_plain_python():
    det = OnsetDetector(threshold=0.5, min_delta=0.1)
    _run(det, [0.1, 0.2, 0.9, 0.9])

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or type(x) in (int, float, str, bool)

    assert plain(det.state_dict())
    assert set(det.state_dict()) >= {"history", "baseline", "streak", "onset_step", "last_clean_step"}


def test_decision_is_a_dataclass():
    d = OnsetDecision(onset=False, memorizing=False, clean=True, reason="ok")
    assert d == OnsetDecision(False, False, True, "ok")


def test_the_reason_never_counts_the_onset_check_in_its_own_baseline():
    """Issue 32, item 1: at the default baseline_checks=3, patience=2, an onset at the third check
    reported a baseline that averaged the onset check itself (0.1, 0.7, 0.8 → 0.5333)."""
    det = OnsetDetector(threshold=0.5, baseline_checks=3, patience=2, monitor="memorized_fraction")
    reasons = [det.update(step, v).reason for step, v in [(100, 0.1), (200, 0.7), (300, 0.8)]]
    assert det.onset_step == 300 and det.baseline == pytest.approx(1.6 / 3)  # the baseline itself is complete
    assert reasons == [
        "memorized_fraction=0.1 within limits (no baseline yet)",
        "memorized_fraction=0.7 > 0.5 for 1 consecutive check since step 200 (baseline 0.1 of the 1 check so far); "
        "onset at 2",
        "memorized_fraction=0.8 > 0.5 for 2 consecutive checks since step 200 (baseline 0.4 of the 2 checks so far)",
    ]
    assert det.update(400, 0.9).reason == "memorized_fraction=0.9; memorizing since step 300"
