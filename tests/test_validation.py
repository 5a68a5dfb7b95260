"""``benchmarks/validation.py --fast`` runs end to end and writes its report and figures; the
study's analysis on synthetic runs (the candidate rules and their per-probe scores, run kinds, the
loss gap, the selection order); its data (the duplicated and augmented sets, the per-item truth);
its cache format; the training order; where a smoke run writes."""

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
    CANDIDATES,
    MEAN_T,
    OnsetRow,
    Outcome,
    Rule,
    choose,
    evaluate,
    gt_onset,
    library_rule,
    loss_gap,
    memorized_fraction,
    rule_key,
    run_kind,
    streak_values,
)
from validation_study.augment import AugmentedItems, all_views, group, item_ratio, view  # noqa: E402
from validation_study.cli import PUBLISHED, main, output_dir, parser  # noqa: E402
from validation_study.config import DEFAULT, FAST, Defaults  # noqa: E402
from validation_study.runs import (  # noqa: E402
    RunRecord,
    Timing,
    jobs_of,
    load_cache,
    make_data,
    save_cache,
    training_parts,
    training_set,
)

from memwatch import nn_ratio  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "validation.py"
FIGURES = ("validation_copies_vs_truth.png", "validation_onsets.png", "validation_loss_gap.png")


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
        "## 3. What each signal adds (ablation)",
        "## 4. The monitor's copies against the truth",
        "## 7. Targets",
        "## 9. Cost of a check",
    ):
        assert heading in report
    assert all(f"| {name} |" in report or f"| **{name}** |" in report for name in CANDIDATES)
    assert "| loss gap |" in report and "| library defaults |" in report and "gmm_dup" in report
    for name in FIGURES:
        png = tmp_path / "a" / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"img/{name}" in report
    # the same runs relabelled as seeds 7, 8 stand in for fresh seeds: evaluated, never chosen on
    runs, timing = load_cache(tmp_path / "runs.pt")
    save_cache(tmp_path / "fresh.pt", [replace(r, seed=r.seed + 7) for r in runs], timing, FAST)
    args = ("--from-cache", str(tmp_path / "runs.pt"), "--fresh-cache", str(tmp_path / "fresh.pt"))
    proc = _run(*args, "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_fresh = (tmp_path / "b" / "validation.md").read_text()
    assert "**Fresh seeds 7, 8** (8 runs)" in with_fresh
    assert "**Augmented runs**" in report  # the monitor with item ids beside one without, on the same probes
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
COPIES = Rule("copies", 0.25, 2)  # more than a quarter of the probes with r < 1/3, two checks in a row


def _record(
    n_copies: Sequence[int],
    n_sharp: Sequence[int] = (0,) * 8,
    seed: int = 0,
    probes: int = 20,
    dataset: str = "toy",
    gap: Sequence[float] | None = None,
    n_near: Sequence[int] = (0,) * 8,
) -> RunRecord:
    """A run whose check ``i`` has ``n_copies[i]`` copies (truth and monitor d1/d2 = 0.1), then
    ``n_near[i]`` probes near a training sample (0.45), the others far (0.9); the first ``n_sharp[i]``
    probes sharp (sharp fraction 1, LID 1; others 0.2 and 8); a relative ε-loss gap ``gap[i]`` at
    t = 50 (train loss 1; default 0)."""
    ratio = np.full((len(STEPS), probes), 0.9)
    sharp = np.full((len(STEPS), probes), 0.2)
    lid = np.full((len(STEPS), probes), 8.0)
    for i, (c, s, near) in enumerate(zip(n_copies, n_sharp, n_near)):
        ratio[i, :c] = 0.1
        ratio[i, c : c + near] = 0.45
        sharp[i, :s] = 1.0
        lid[i, :s] = 1.0
    gap = np.zeros(len(STEPS)) if gap is None else np.asarray(gap, dtype=float)
    level = {"sharp_fraction": sharp, "lid": lid, "flipd": lid, "denoising_lid": 2 * lid}
    return RunRecord(
        dataset=dataset,
        n=len(n_copies),
        seed=seed,
        dim=2,
        median_nn=1.0,
        sigma={"auto 0.1": 0.1},
        steps=STEPS,
        nn_ratio=ratio,
        monitor_ratio=ratio.copy(),
        plain_ratio=None,
        plain_probe_gap=None,
        samples=np.zeros((len(STEPS), probes, 2), np.float32),
        signals={"auto 0.1": level},
        data_lid={"auto 0.1": 10.0},
        values={"onset": np.zeros(len(STEPS))},
        loss_t=np.array([50, 400]),
        loss_train=np.ones((len(STEPS), 2)),
        loss_held=np.stack([1 + gap, np.ones(len(STEPS))], 1),
        hessian_score_norm=np.ones((len(STEPS), probes)),
        check_seconds=np.ones(len(STEPS)),
        shipped=DEFAULTS,
        seconds=1.0,
    )


def test_onset_lead_against_the_ground_truth():
    # truth: 2/20 copies is not > 10 %, 6/20 from step 500 is; the monitor's index sees copies earlier
    run = _record([0, 2, 2, 2, 6, 10, 16, 18])
    run.monitor_ratio[2:4, :6] = 0.1  # 6/20 > 0.25 at steps 300 and 400
    assert gt_onset(run) == 500 and run_kind(run) == "memorizing"
    np.testing.assert_allclose(COPIES.series(run)[:5], [0, 0.1, 0.3, 0.3, 0.3])
    out = evaluate([run], COPIES, DEFAULTS)
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
    assert out.median_lead == 100 and out.margin == pytest.approx(0.3 - 0.25)  # streak value at the truth onset − θ
    late = evaluate([run], Rule("copies", 0.3, 2), DEFAULTS).rows[0]  # 0.3 no longer passes
    assert (late.onset, late.lead, late.on_time, late.right) == (700, -200, False, False)
    truth = evaluate([run], Rule("copies", 0.25, 2, ratio="truth"), DEFAULTS).rows[0]  # the oracle: the truth's ratio
    assert truth.onset == 600


def test_confirmed_sharpness_counts_sharp_probes_near_a_training_sample():
    # 4 copies; 6 more probes near a sample (r = 0.45), the first 8 probes sharp: 4 copies + 4 sharp-and-near
    run = _record([4] * 8, n_sharp=[8] * 8, n_near=[6] * 8)
    confirmed = Rule("confirmed", 0.1, 1, sharp_threshold=3.0, sharp_by="lid", rho=0.5)
    np.testing.assert_allclose(confirmed.series(run), 8 / 20)  # sharp and r < 0.5: the 4 copies and 4 near ones
    assert Rule("confirmed", 0.1, 1, sharp_threshold=3.0, rho=0.4).series(run)[0] == pytest.approx(4 / 20)
    either = Rule("either", 0.1, 1, sharp_threshold=0.9, sharp_by="sharp", rho=0.5)
    np.testing.assert_allclose(either.series(run), 8 / 20)
    run.signals["auto 0.1"]["lid"][:, :8] = 8.0  # no longer sharp by the LID: only the copies count
    np.testing.assert_allclose(Rule("either", 0.1, 1, sharp_threshold=3.0, rho=0.5).series(run), 4 / 20)
    np.testing.assert_allclose(confirmed.series(run), 0.0)
    # every rule's per-probe score is above -1 exactly where it flags the probe
    rules = [COPIES, confirmed, either, Rule("lid", 0.2, 2, sharp_threshold=3.0), Rule("sharp", 0.3, 2, 0.9)]
    for rule in rules:
        flagged = rule.scores(run) > -1
        np.testing.assert_allclose(memorized_fraction(rule.scores(run), -1.0), flagged.mean(1))
    assert either.describe() == "r < 1/3 or (sharp fraction > 0.9 and r < 0.5), onset > 0.1, patience 1"
    assert confirmed.describe() == "(LID < 3 and r < 0.5), onset > 0.1, patience 1"


def test_run_kinds_false_alarms_and_borderline_runs():
    sharp = Rule("sharp", 0.5, 2, sharp_threshold=0.9)
    spike = _record([0] * 8, [0, 0, 16, 0, 0, 0, 0, 0], seed=1)  # one check over the threshold: no onset
    streak = _record([0] * 8, [0, 0, 16, 14, 0, 0, 0, 0], seed=2)  # two in a row: a false alarm at step 400
    missed = _record([0, 0, 5, 5, 5, 5, 5, 5], [0] * 8, seed=3)  # memorizes (25 %), never flagged
    border = _record([0, 0, 2, 2, 0, 0, 0, 0], [0, 0, 16, 14, 0, 0, 0, 0], seed=4)  # peaks at 10 %: borderline
    just_never = _record([0, 1, 0, 0, 0, 0, 0, 0], [0] * 8, seed=5)  # peaks at 5 %: never
    out = evaluate([spike, streak, missed, border, just_never], sharp, DEFAULTS)
    assert [r.kind for r in out.rows] == ["never", "never", "memorizing", "borderline", "never"]
    assert (out.count("false_alarm"), out.count("borderline_flagged"), out.count("detected")) == (1, 1, 0)
    assert out.count("right") == 2 and out.judged == 4  # the spike and the 5 % run; borderline is not judged
    assert out.leads() == [] and np.isnan(out.median_lead)
    np.testing.assert_allclose(streak_values(np.array([0, 0.8, 0.7, 0.0]), 2), [0, 0, 0.7, 0])
    assert out.margin == pytest.approx(0 - 0.5)  # the missed run: streak 0 at its truth onset, 0.5 short


def test_selection_order_false_alarms_then_runs_right_then_median_lead():
    def outcome(*rows: tuple[str, int | None, int | None]) -> Outcome:
        return Outcome([OnsetRow("toy", 1, 0, truth, onset, 0.5, kind) for kind, truth, onset in rows])

    early = outcome(("memorizing", 500, 300), ("memorizing", 500, 500), ("never", None, None))
    late = outcome(("memorizing", 500, 500), ("memorizing", 500, 500), ("never", None, None))
    alarm = outcome(("memorizing", 500, 100), ("memorizing", 500, 100), ("never", None, 300))
    fewer = outcome(("memorizing", 500, 300), ("memorizing", 500, None), ("never", None, None))
    assert early.median_lead == 100 and late.median_lead == 0
    assert sorted([late, alarm, fewer, early], key=rule_key, reverse=True) == [early, late, fewer, alarm]
    # on runs: the earlier of two rules without false alarms wins; a rule that false-alarms loses
    runs = [_record([0, 0, 0, 0, 6, 10, 16, 18]), _record([0] * 8, seed=1)]
    runs[0].monitor_ratio[2:4, :6] = 0.1
    runs[1].monitor_ratio[3:5, :8] = 0.1  # a false alarm for θ ≤ 0.3 at patience ≤ 2
    rule, out = choose(runs, [Rule("copies", 0.2, 1), Rule("copies", 0.25, 1), Rule("copies", 0.45, 1)], DEFAULTS)
    assert rule == Rule("copies", 0.45, 1) and out.count("false_alarm") == 0


def test_loss_gap_rule_and_its_relative_margin():
    gap = [0.0, 0.1, 0.3, 0.5, 0.6, 0.8, 1.0, 1.2]
    run = _record([0, 0, 0, 0, 6, 6, 6, 6], gap=gap)
    np.testing.assert_allclose(loss_gap(run, "50"), gap)
    np.testing.assert_allclose(loss_gap(run, MEAN_T), np.asarray(gap) / 2)  # (mean held − mean train) / mean train
    rule = Rule("gap", 0.4, 2, spec="50")
    assert rule.onset(run, DEFAULTS) == 500  # 0.5 at step 400, 0.6 at 500: the second check of the streak
    out = evaluate([run], rule, DEFAULTS)
    assert out.rows[0].on_time and out.margin == pytest.approx((0.5 - 0.4) / 0.4)


def test_library_rule_follows_the_librarys_onset_setting():
    sharpness = replace(DEFAULTS, onset_on="sharpness")
    assert library_rule(sharpness) == Rule("sharp", 0.2, 2, sharp_threshold=0.9)
    assert library_rule(replace(DEFAULTS, onset_on="copies")) == Rule("copies", 0.2, 2)
    count = replace(DEFAULTS, onset_on="lid", lid_statistic="count", lid_count_threshold=3.0)
    assert library_rule(count) == Rule("lid", 0.2, 2, sharp_threshold=3.0)  # the LID itself, in dimensions
    auto = replace(DEFAULTS, onset_on="auto", lid_count_threshold=4.0, confirm_ratio=0.6)
    assert library_rule(auto) == Rule("either", 0.2, 2, sharp_threshold=4.0, sharp_by="lid", rho=0.6)
    run = _record([2] * 8, n_sharp=[6] * 8, n_near=[6] * 8)  # 2 copies, 4 sharp and near: the alarm counts 6
    np.testing.assert_allclose(library_rule(auto).series(run), 6 / 20)
    either = library_rule(replace(DEFAULTS, onset_on="either"))  # sharp (at any ratio) or a copy
    np.testing.assert_allclose(either.series(_record([2] * 8, n_sharp=[5] * 8)), 5 / 20)
    with pytest.raises(MemwatchError, match="does not replay"):
        library_rule(replace(DEFAULTS, onset_on="lid", lid_statistic="relative"))


# ----------------------------------------------------------------------------- data


def test_views_flip_then_shift_in_background_and_the_group_enumerates_them():
    x = torch.arange(9.0).reshape(1, 3, 3)
    assert torch.equal(view(x, False, 0, 0), x)
    torch.testing.assert_close(view(x, True, 0, 0), x.flip(-1))
    torch.testing.assert_close(view(x, False, 1, 0), torch.tensor([[[-1.0, -1, -1], [0, 1, 2], [3, 4, 5]]]))
    torch.testing.assert_close(view(x, True, 0, -1), torch.tensor([[[1.0, 0, -1], [4, 3, -1], [7, 6, -1]]]))
    g = group()
    assert len(g) == len(set(g)) == 6 and g[0] == (False, 0, 0) and {dy for _, dy, _ in g} == {0}
    assert len(set(group(vertical=True))) == 18 and len(set(group(2))) == 10
    items = torch.randn(5, 1, 4, 4)
    views = all_views(items)
    assert views.shape == (5, 6, 1, 4, 4) and torch.equal(views[:, 0], items)
    data = AugmentedItems(items, seed=0)
    for i in (0, 3, 3):
        v, item = data[i]
        assert item == i and any(torch.equal(v, w) for w in views[i])
    # the study's loader: the item draws and the view draws are independent, so every view of every item comes up
    _, _, augmented = training_parts("mlp")
    seen = {(int(i), tuple(v.flatten().tolist())) for vs, ids in augmented(items, 16, 60, 0).train_dataloader()
            for v, i in zip(vs, ids)}  # fmt: skip
    assert len(seen) == 5 * 6 and all(any(torch.equal(views[i].flatten(1)[k], torch.tensor(v)) for k in range(6))
                                       for i, v in seen)  # fmt: skip


def test_item_ratio_takes_each_item_at_its_nearest_view():
    items = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    views = all_views(items)
    probes = torch.cat([views[2, 5:6] + 0.01, torch.randn(3, 1, 4, 4, dtype=torch.float64)])
    dense = torch.stack([torch.stack([(p - v).norm() for v in views.flatten(0, 1)]).reshape(6, 6).amin(1)
                         for p in probes])  # fmt: skip
    d = dense.sort(1).values
    torch.testing.assert_close(item_ratio(probes, views), d[:, 0] / d[:, 1])
    assert item_ratio(probes, views)[0] < 1 / 3
    # against the views as separate samples, a view of the same item can be the second nearest
    assert nn_ratio(probes[:1], views.flatten(0, 1)) >= item_ratio(probes[:1], views)


def test_duplicated_and_augmented_data():
    x, held = make_data("gmm_dup", 50, seed=1, held_out=10)
    train = training_set("gmm_dup", x)
    assert train.shape == (50 + 4 * 2000, 16) and held.shape == (10, 16)
    torch.testing.assert_close(train[50:2050], x[:1].expand(2000, 16))
    assert torch.equal(training_set("gmm", x), x)
    aug, _ = make_data("digits_aug", 4, seed=2, held_out=8)
    torch.testing.assert_close(aug, make_data("digits", 4, seed=2, held_out=8)[0])  # the items: plain digits
    assert torch.equal(training_set("digits_aug", aug), aug)  # the views come from the Dataset


def test_scaled_digits_are_the_same_images_and_held_out_is_disjoint():
    x, held = make_data("digits", 16, seed=3, held_out=32)
    x01, held01 = make_data("digits_01", 16, seed=3, held_out=32)
    x3, _ = make_data("digits_x3", 16, seed=3, held_out=32)
    torch.testing.assert_close(x01, 0.5 * x + 0.5)
    torch.testing.assert_close(x3, 3 * x)
    torch.testing.assert_close(held01, 0.5 * held + 0.5)
    assert held.shape[0] == 32 and not (x[:, None] == held[None]).flatten(2).all(2).any()


def test_selection_seeds_train_first_longest_first():
    jobs = jobs_of(DEFAULT)
    first_report = next(i for i, j in enumerate(jobs) if j.seed not in DEFAULT.select_seeds)
    assert all(j.seed in DEFAULT.select_seeds for j in jobs[:first_report])
    assert all(j.seed not in DEFAULT.select_seeds for j in jobs[first_report:])
    costs = [j.spec.cost for j in jobs[:first_report]]
    assert costs == sorted(costs, reverse=True)


# ----------------------------------------------------------------------------- the cache and the command line


def test_cache_round_trip_several_caches_and_other_formats(tmp_path):
    run = _record([0, 2, 2, 2, 6, 10, 16, 18])
    timing = Timing(size="--fast", seconds=3.0, workers=1, machine="x")
    save_cache(tmp_path / "runs.pt", [run], timing, FAST)
    (back,), back_timing = load_cache(tmp_path / "runs.pt")
    assert back.key == run.key and back.shipped == DEFAULTS and back_timing == timing
    np.testing.assert_array_equal(back.monitor_ratio, run.monitor_ratio)
    assert back.data_lid == run.data_lid and back.plain_ratio is None
    other = replace(run, seed=1, plain_ratio=run.nn_ratio + 1, plain_probe_gap=0.0)
    save_cache(tmp_path / "more.pt", [other], replace(timing, seconds=5.0), FAST)
    both, both_timing = load_cache(tmp_path / "runs.pt", tmp_path / "more.pt")
    assert [r.key for r in both] == [run.key, other.key] and both_timing.seconds == 8.0
    np.testing.assert_array_equal(both[1].plain_ratio, other.plain_ratio)
    with pytest.raises(MemwatchError, match="more than one"):
        load_cache(tmp_path / "runs.pt", tmp_path / "runs.pt")
    for fmt in (6, 99):  # format 6: study v3, the training set as reference_data and three noise levels
        torch.save({"format": fmt, "runs": [], "timing": {}}, tmp_path / "other.pt")
        with pytest.raises(MemwatchError, match=f"cache format {fmt}"):
            load_cache(tmp_path / "other.pt")


def test_fast_never_writes_the_published_report_by_default(tmp_path):
    assert output_dir(parser().parse_args([])) == PUBLISHED
    fast = output_dir(parser().parse_args(["--fast"]))
    assert PUBLISHED not in fast.parents and fast != PUBLISHED and "memwatch_out" in fast.parts
    assert output_dir(parser().parse_args(["--fast", "--out", str(tmp_path)])) == tmp_path
