"""``benchmarks/validation.py --fast`` runs end to end and writes its report and figures; the
study's analysis on synthetic runs; its cache format; where a smoke run writes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from memwatch.errors import MemwatchError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the study's package, as `python benchmarks/validation.py` sees it

from validation_study.analysis import evaluate_onsets, gt_onset, memorized_fraction, streak_values  # noqa: E402
from validation_study.cli import PUBLISHED, output_dir, parser  # noqa: E402
from validation_study.config import FAST, Defaults  # noqa: E402
from validation_study.runs import RunRecord, Timing, load_cache, save_cache  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "validation.py"
FIGURES = ("validation_auroc_vs_sigma.png", "validation_onset_vs_n.png", "validation_curves_gmm.png")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.timeout(120)
def test_fast_validation_writes_tables_and_plots(tmp_path):
    proc = _run("--out", str(tmp_path), "--cache", str(tmp_path / "runs.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = (tmp_path / "validation.md").read_text()
    for heading in ("## 1. Per-probe detection", "## 2. Recommended defaults", "## 3. Onset", "## 4. Targets"):
        assert heading in report
    assert "| **sharp fraction** |" in report  # the per-signal AUROC table
    assert "| data | N | seed | NN truth onset | memwatch onset | lead |" in report
    # the offline replay of the onset rule agrees with the callback's own onset
    assert "reproduces the callback's own onset on 4/4 runs" in report
    for name in FIGURES:
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"img/{name}" in report


@pytest.mark.timeout(180)
def test_fresh_seeds_are_only_evaluated(tmp_path):
    assert _run("--seeds", "2").returncode == 2  # no selection seed and nowhere to save the runs
    proc = _run("--seeds", "2", "--cache", str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0 and "saved 2 runs" in proc.stdout, proc.stderr[-3000:]
    proc = _run("--cache", str(tmp_path / "runs.pt"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(
        "--from-cache",
        str(tmp_path / "runs.pt"),
        "--fresh-cache",
        str(tmp_path / "fresh.pt"),
        "--out",
        str(tmp_path / "b"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "b" / "validation.md").read_text()
    assert "## 6. Fresh seeds (seeds 2)" in report and "equals the offline replay on 2/2 runs" in report
    # the fresh runs change nothing that was chosen: sections 1-5 are those of the report without them
    before = (tmp_path / "a" / "validation.md").read_text()
    assert report.split("## 6.")[0] == before.split("## Runtime")[0]


# ----------------------------------------------------------------------------- analysis on synthetic runs

STEPS = np.arange(100, 900, 100)  # 8 checks
DEFAULTS = Defaults(
    sigmas=(0.3,),
    threshold=0.5,
    score_threshold=0.9,
    onset_threshold=0.2,
    onset_min_delta=None,
    patience=2,
    min_steps=0,
    baseline_checks=3,
)


def _record(n_copies: Sequence[int], n_sharp: Sequence[int], seed: int = 0, probes: int = 10) -> RunRecord:
    """A run whose check ``i`` has ``n_copies[i]`` NN-memorized probes (d1/d2 = 0.1, others 0.9) and
    ``n_sharp[i]`` probes with sharp fraction 1 (others 0.2) at noise level ``"abs 0.3"``."""
    ratio = np.full((len(STEPS), probes), 0.9)
    sharp = np.full((len(STEPS), probes), 0.2)
    for i, (c, s) in enumerate(zip(n_copies, n_sharp)):
        ratio[i, :c] = 0.1
        sharp[i, :s] = 1.0
    return RunRecord(
        dataset="toy",
        n=len(n_copies),
        seed=seed,
        dim=16,
        median_nn=1.0,
        sigma={"abs 0.3": 0.3},
        steps=STEPS,
        nn_ratio=ratio,
        signals={"abs 0.3": {"sharp_fraction": sharp}},
        shipped=DEFAULTS,
        shipped_primary_score=sharp,
        shipped_onset=None,
        seconds=1.0,
    )


def test_onset_lead_against_the_ground_truth():
    # truth: 1/10 copies is not > 10 %, 3/10 from step 500 is; memwatch: 6/10 sharp from step 300
    run = _record([0, 1, 1, 1, 3, 5, 8, 9], [0, 0, 6, 6, 6, 9, 9, 9])
    assert gt_onset(run) == 500
    np.testing.assert_allclose(memorized_fraction(run.signals["abs 0.3"]["sharp_fraction"], 0.9)[:4], [0, 0, 0.6, 0.6])
    out = evaluate_onsets([run], "abs 0.3", 0.9, 0.5, DEFAULTS)
    (row,) = out.rows
    # patience 2: the second check of the streak (step 400) is the onset, one check before the truth
    assert (row.truth, row.onset, row.lead, row.false_alarm) == (500, 400, 100, False)
    assert (out.memorizing, out.detected, out.on_time, out.never, out.false_alarms) == (1, 1, 1, 0, 0)
    assert out.det_margin == pytest.approx(0.6 - 0.5)  # streak value at the truth onset minus onset_threshold
    late = evaluate_onsets([run], "abs 0.3", 0.9, 0.7, DEFAULTS).rows[0]  # 0.6 no longer passes
    assert (late.onset, late.lead) == (700, -200)


def test_false_alarms_count_only_streaks_on_never_memorizing_runs():
    spike = _record([0] * 8, [0, 0, 8, 0, 0, 0, 0, 0], seed=1)  # one check over the threshold: no onset
    streak = _record([0] * 8, [0, 0, 8, 7, 0, 0, 0, 0], seed=2)  # two in a row: a false alarm at step 400
    missed = _record([0, 0, 5, 5, 5, 5, 5, 5], [0] * 8, seed=3)  # memorizes, never flagged
    out = evaluate_onsets([spike, streak, missed], "abs 0.3", 0.9, 0.5, DEFAULTS)
    assert (out.never, out.false_alarms, out.memorizing, out.detected) == (2, 1, 1, 0)
    assert [(r.seed, r.onset) for r in out.alarms()] == [(2, 400)]
    assert out.missed() == 1 and out.leads() == [] and out.late() == []
    # margin: onset_threshold minus the highest patience-long streak (0.7 on the false alarm)
    np.testing.assert_allclose(streak_values(np.array([0, 0.8, 0.7, 0.0]), 2), [0, 0, 0.7, 0])
    assert out.margin == pytest.approx(0.5 - 0.7)


def test_cache_round_trip_and_the_unnumbered_format(tmp_path):
    run = _record([0, 1, 1, 1, 3, 5, 8, 9], [0, 0, 6, 6, 6, 9, 9, 9])
    timing = Timing(size="--fast", seconds=3.0, workers=1, machine="x")
    save_cache(tmp_path / "runs.pt", [run], timing, FAST)
    (back,), back_timing = load_cache(tmp_path / "runs.pt")
    assert back.key == run.key and back.shipped == DEFAULTS and back_timing == timing
    np.testing.assert_array_equal(back.signals["abs 0.3"]["sharp_fraction"], run.signals["abs 0.3"]["sharp_fraction"])
    # a cache from before the format was numbered: no "format", no cpu_seconds, sigmas as a list
    legacy = run.to_dict()
    del legacy["cpu_seconds"]
    torch.save({"runs": [legacy], "timing": timing.to_dict(), "config": {}}, tmp_path / "old.pt")
    (old,), _ = load_cache(tmp_path / "old.pt")
    assert old.cpu_seconds is None and old.shipped.sigmas == (0.3,)
    torch.save({"format": 99, "runs": [], "timing": {}}, tmp_path / "new.pt")
    with pytest.raises(MemwatchError, match="cache format 99"):
        load_cache(tmp_path / "new.pt")


def test_fast_never_writes_the_published_report_by_default(tmp_path):
    assert output_dir(parser().parse_args([])) == PUBLISHED
    fast = output_dir(parser().parse_args(["--fast"]))
    assert PUBLISHED not in fast.parents and fast != PUBLISHED and "memwatch_out" in fast.parts
    assert output_dir(parser().parse_args(["--fast", "--out", str(tmp_path)])) == tmp_path
