"""``benchmarks/validation.py --fast`` runs end to end and writes its report and figures; the
study's analysis on synthetic runs (onset rules, run kinds, the loss gap, the LID statistics as
the callback computes them); its data; its cache format; where a smoke run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from memwatch.errors import MemwatchError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the study's package, as `python benchmarks/validation.py` sees it

from validation_study.analysis import (  # noqa: E402
    ALL_LEVELS,
    MEAN_T,
    Rule,
    evaluate,
    gt_onset,
    library_rule,
    lid_statistic,
    loss_gap,
    memorized_fraction,
    run_kind,
    streak_values,
)
from validation_study.cli import PUBLISHED, main, output_dir, parser  # noqa: E402
from validation_study.config import FAST, Defaults  # noqa: E402
from validation_study.runs import RunRecord, Timing, load_cache, make_data, save_cache, training_set  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "validation.py"
FIGURES = ("validation_auroc_vs_factor.png", "validation_onsets.png", "validation_loss_gap.png")
CANDIDATES = ("relative LID", "multi-scale profile", "LID drawdown", "denoising LID")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=150,
    )


@pytest.mark.timeout(240)
def test_fast_validation_writes_tables_and_plots_and_fresh_seeds_change_no_choice(tmp_path):
    proc = _run("--out", str(tmp_path / "a"), "--cache", str(tmp_path / "runs.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "a" / "validation.md").read_text()
    for heading in (
        "## 1. Rules compared",
        "## 2. The rules side by side",
        "## 3. Per-probe detection",
        "## 5. Targets",
        "## 7. Cost of a check",
    ):
        assert heading in report
    assert all(f"| {name} |" in report or f"| **{name}** |" in report for name in CANDIDATES)
    assert "| loss gap |" in report and "| library defaults |" in report and "gmm_dup" in report
    for name in FIGURES:
        png = tmp_path / "a" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"img/{name}" in report
    # the same runs relabelled as seed 7 stand in for fresh seeds: evaluated, never chosen on
    runs, timing = load_cache(tmp_path / "runs.pt")
    save_cache(tmp_path / "fresh.pt", [replace(r, seed=7) for r in runs], timing, FAST)
    args = ("--from-cache", str(tmp_path / "runs.pt"), "--fresh-cache", str(tmp_path / "fresh.pt"))
    proc = _run(*args, "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_fresh = (tmp_path / "b" / "validation.md").read_text()
    assert "**Fresh seed 7** (6 runs)" in with_fresh
    rules = report.split("## 1. Rules compared")[1].split("## 2.")[0]
    assert rules == with_fresh.split("## 1. Rules compared")[1].split("## 2.")[0]


@pytest.mark.parametrize("args", [["--seeds", "2"], ["--train-only"], ["--fresh"]])
def test_runs_that_are_not_analysed_need_a_cache(args):
    with pytest.raises(SystemExit) as exc:  # no selection seed, or no report: nowhere to save the runs
        main(["--fast", *args])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- analysis on synthetic runs

STEPS = np.arange(100, 900, 100)  # 8 checks
DEFAULTS = Defaults(
    sigmas=("auto",),
    threshold=0.5,
    score_threshold=0.9,
    onset_threshold=0.2,
    onset_min_delta=None,
    patience=2,
    min_steps=0,
    baseline_checks=3,
    sigma_factors=(0.1,),
)
SHARP = Rule("sharp", "auto 0.1", 0.9, 0.5)
LEVELS = ("auto 0.1", "auto 0.2")


def _record(
    n_copies: Sequence[int],
    n_sharp: Sequence[int],
    seed: int = 0,
    probes: int = 20,
    dataset: str = "toy",
    gap: Sequence[float] | None = None,
) -> RunRecord:
    """A run whose check ``i`` has ``n_copies[i]`` NN-memorized probes (d1/d2 = 0.1, others 0.9),
    ``n_sharp[i]`` probes with sharp fraction 1 and FLIPD 0.5 (others 0.2 and 8) at both levels
    (data LID 10 and 5), and a relative ε-loss gap ``gap[i]`` at t = 50 (train loss 1; default 0)."""
    ratio = np.full((len(STEPS), probes), 0.9)
    sharp = np.full((len(STEPS), probes), 0.2)
    flipd = np.full((len(STEPS), probes), 8.0)
    for i, (c, s) in enumerate(zip(n_copies, n_sharp)):
        ratio[i, :c] = 0.1
        sharp[i, :s] = 1.0
        flipd[i, :s] = 0.5
    gap = np.zeros(len(STEPS)) if gap is None else np.asarray(gap, dtype=float)
    train = np.ones((len(STEPS), 2))
    level = {"sharp_fraction": sharp, "flipd": flipd, "denoising_lid": 2 * flipd}
    return RunRecord(
        dataset=dataset,
        n=len(n_copies),
        seed=seed,
        dim=16,
        median_nn=1.0,
        sigma={"auto 0.1": 0.1, "auto 0.2": 0.2},
        steps=STEPS,
        nn_ratio=ratio,
        signals={spec: dict(level) for spec in LEVELS},
        data_lid={"auto 0.1": 10.0, "auto 0.2": 5.0},
        loss_t=np.array([50, 200]),
        loss_train=train,
        loss_held=np.stack([1 + gap, np.ones(len(STEPS))], 1),
        hessian_score_norm=np.ones((len(STEPS), probes)),
        check_seconds=np.ones(len(STEPS)),
        shipped=DEFAULTS,
        seconds=1.0,
    )


def test_onset_lead_against_the_ground_truth():
    # truth: 2/20 copies is not > 10 %, 6/20 from step 500 is; the rule: 12/20 sharp from step 300
    run = _record([0, 2, 2, 2, 6, 10, 16, 18], [0, 0, 12, 12, 12, 18, 18, 18])
    assert gt_onset(run) == 500 and run_kind(run) == "memorizing"
    np.testing.assert_allclose(memorized_fraction(run.signals["auto 0.1"]["sharp_fraction"], 0.9)[:4], [0, 0, 0.6, 0.6])
    out = evaluate([run], SHARP, DEFAULTS)
    (row,) = out.rows
    # patience 2: the second check of the streak (step 400) is the onset, one check before the truth
    assert (row.truth, row.onset, row.lead, row.false_alarm, row.on_time, row.right) == (
        500,
        400,
        100,
        False,
        True,
        True,
    )
    assert (out.count("memorizing"), out.count("detected"), out.count("on_time"), out.count("never")) == (1, 1, 1, 0)
    assert out.margin == pytest.approx(0.6 - 0.5)  # streak value at the truth onset minus onset_threshold
    late = evaluate([run], Rule("sharp", "auto 0.1", 0.9, 0.7), DEFAULTS).rows[0]  # 0.6 no longer passes
    assert (late.onset, late.lead, late.on_time, late.right) == (700, -200, False, False)


def test_run_kinds_false_alarms_and_borderline_runs():
    spike = _record([0] * 8, [0, 0, 16, 0, 0, 0, 0, 0], seed=1)  # one check over the threshold: no onset
    streak = _record([0] * 8, [0, 0, 16, 14, 0, 0, 0, 0], seed=2)  # two in a row: a false alarm at step 400
    missed = _record([0, 0, 5, 5, 5, 5, 5, 5], [0] * 8, seed=3)  # memorizes (25 %), never flagged
    border = _record([0, 0, 2, 2, 0, 0, 0, 0], [0, 0, 16, 14, 0, 0, 0, 0], seed=4)  # peaks at 10 %: borderline
    just_never = _record([0, 1, 0, 0, 0, 0, 0, 0], [0] * 8, seed=5)  # peaks at 5 %: never
    out = evaluate([spike, streak, missed, border, just_never], SHARP, DEFAULTS)
    assert [r.kind for r in out.rows] == ["never", "never", "memorizing", "borderline", "never"]
    assert (out.count("false_alarm"), out.count("borderline_flagged"), out.count("detected")) == (1, 1, 0)
    assert out.count("right") == 2 and out.judged == 4  # the spike and the 5 % run; borderline is not judged
    assert out.leads() == [] and out.late() == []
    # margin: the smallest of onset_threshold − the highest streak of a never run (0.5 − 0.7 on the false alarm)
    np.testing.assert_allclose(streak_values(np.array([0, 0.8, 0.7, 0.0]), 2), [0, 0, 0.7, 0])
    assert out.margin == pytest.approx(0 - 0.5)  # the missed run: streak 0 at its truth onset, 0.5 short


def test_loss_gap_rule_and_its_relative_margin():
    gap = [0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 1.0, 1.2]
    run = _record([0, 0, 0, 0, 6, 6, 6, 6], [0] * 8, gap=gap)
    np.testing.assert_allclose(loss_gap(run, "50"), gap)
    np.testing.assert_allclose(loss_gap(run, MEAN_T), np.asarray(gap) / 2)  # (mean held − mean train) / mean train
    rule = Rule("gap", "50", None, 0.4)
    assert rule.onset(run, DEFAULTS) == 500  # 0.5 at step 400, 0.6 at 500: the second check of the streak
    out = evaluate([run], rule, DEFAULTS)
    assert out.rows[0].on_time and out.margin == pytest.approx((0.5 - 0.4) / 0.4)


def test_lid_statistics_are_the_callbacks_own():
    """The study replays the LID signal's statistics with the library's functions: FLIPD / data LID,
    its mean over the levels, FLIPD / the median of the first two checks, the denoising LID / data LID."""
    run = _record([0, 0, 0, 0, 6, 6, 6, 6], [0, 0, 0, 0, 8, 8, 8, 8])
    rel = lid_statistic(run, "relative", "auto 0.1")
    np.testing.assert_allclose(rel[0], 0.8)
    np.testing.assert_allclose(rel[4, :8], 0.05)
    prof = lid_statistic(run, "profile", ALL_LEVELS)
    np.testing.assert_allclose(prof[0], (8 / 10 + 8 / 5) / 2)
    draw = lid_statistic(run, "drawdown", "auto 0.1")
    np.testing.assert_allclose(draw[0], 1.0)
    np.testing.assert_allclose(draw[4, :8], 0.5 / 8)
    np.testing.assert_allclose(lid_statistic(run, "denoising", "auto 0.2")[0], 16 / 5)
    rule = Rule("relative", "auto 0.1", 0.3, 0.3)
    np.testing.assert_allclose(rule.series(run), [0, 0, 0, 0, 0.4, 0.4, 0.4, 0.4])
    assert rule.onset(run, DEFAULTS) == 600  # patience 2
    assert "FLIPD / data LID < 0.3 at auto 0.1" in rule.describe()
    assert library_rule(DEFAULTS) == Rule("sharp", "auto 0.1", 0.9, 0.2)
    lid_defaults = replace(DEFAULTS, onset_on="lid", lid_statistic="profile", lid_ratio_threshold=0.4)
    assert library_rule(lid_defaults) == Rule("profile", ALL_LEVELS, 0.4, 0.2)
    count_defaults = replace(DEFAULTS, onset_on="lid", lid_statistic="count", lid_count_threshold=3.0)
    assert library_rule(count_defaults) == Rule("lid", "auto 0.1", 3.0, 0.2)  # the LID itself, in dimensions


def test_duplicated_data_repeats_a_few_distinct_items():
    x, held = make_data("gmm_dup", 50, seed=1, held_out=10)
    train = training_set("gmm_dup", x)
    assert train.shape == (50 + 4 * 500, 16) and held.shape == (10, 16)
    torch.testing.assert_close(train[50:550], x[:1].expand(500, 16))
    assert torch.equal(training_set("gmm", x), x)


def test_scaled_digits_are_the_same_images_and_held_out_is_disjoint():
    x, held = make_data("digits", 16, seed=3, held_out=32)
    x01, held01 = make_data("digits_01", 16, seed=3, held_out=32)
    x3, _ = make_data("digits_x3", 16, seed=3, held_out=32)
    torch.testing.assert_close(x01, 0.5 * x + 0.5)
    torch.testing.assert_close(x3, 3 * x)
    torch.testing.assert_close(held01, 0.5 * held + 0.5)
    assert held.shape[0] == 32 and not (x[:, None] == held[None]).flatten(2).all(2).any()


def test_cache_round_trip_and_other_formats(tmp_path):
    run = _record([0, 2, 2, 2, 6, 10, 16, 18], [0, 0, 12, 12, 12, 18, 18, 18])
    timing = Timing(size="--fast", seconds=3.0, workers=1, machine="x")
    save_cache(tmp_path / "runs.pt", [run], timing, FAST)
    (back,), back_timing = load_cache(tmp_path / "runs.pt")
    assert back.key == run.key and back.shipped == DEFAULTS and back_timing == timing
    np.testing.assert_array_equal(back.signals["auto 0.1"]["flipd"], run.signals["auto 0.1"]["flipd"])
    assert back.data_lid == run.data_lid
    np.testing.assert_array_equal(back.loss_held, run.loss_held)
    for fmt in (5, 99):  # format 5: study v2.2, three monitors and no LID signal
        torch.save({"format": fmt, "runs": [], "timing": {}}, tmp_path / "other.pt")
        with pytest.raises(MemwatchError, match=f"cache format {fmt}"):
            load_cache(tmp_path / "other.pt")


def test_fast_never_writes_the_published_report_by_default(tmp_path):
    assert output_dir(parser().parse_args([])) == PUBLISHED
    fast = output_dir(parser().parse_args(["--fast"]))
    assert PUBLISHED not in fast.parents and fast != PUBLISHED and "memwatch_out" in fast.parts
    assert output_dir(parser().parse_args(["--fast", "--out", str(tmp_path)])) == tmp_path
