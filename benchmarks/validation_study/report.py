"""The report: ``validation.md`` and its figures, one function per section.

Every section function takes the :class:`StudyAnalysis` (and what else it quotes) and returns its
markdown; :func:`write_report` draws the figures, joins the sections and writes the file.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from memwatch import MEMORIZED_RATIO, plots

from .analysis import (
    CANDIDATES,
    CONFIRMED,
    COPIES,
    EITHER,
    GAP,
    HS_SIGNAL,
    LIBRARY,
    LID_COUNT,
    NO_IDS,
    TRUTH_COPIES,
    V3,
    OnsetRow,
    Outcome,
    StudyAnalysis,
    evaluate,
    labels,
    oriented,
    probe_auroc,
    run_kind,
)
from .augment import SHIFT, VERTICAL, group
from .config import AUGMENTED, BORDERLINE, DUPLICATED, IMAGE_SIZES, NEVER, NN_ONSET, SCALED
from .figures import plot_curves, plot_loss_gap, plot_onsets, plot_ratios, run_curves
from .runs import RunRecord, Timing, jobs_of

ON_TIME_TARGET = 0.90
#: the per-probe table's rows: (signal, label)
DETECTION_ROWS = (
    ("monitor", "monitor's copy ratio −r"),
    ("plain", "copy ratio without item ids"),
    ("lid", "LID count"),
    ("sharp_fraction", "sharp fraction"),
    ("flipd", "FLIPD"),
    ("denoising_lid", "denoising LID"),
    (HS_SIGNAL, "‖H s‖ (Jeon)"),
)
#: the ablation's rows, in the order a signal is added
ABLATION = (LID_COUNT, COPIES, CONFIRMED, EITHER, NO_IDS, TRUTH_COPIES, GAP, V3)
HOW = {
    COPIES: "candidate (a): θ and patience tuned",
    CONFIRMED: "candidate (b): LID or sharp fraction, its threshold, ρ, θ, patience tuned",
    EITHER: "candidate (c) = (a) or (b) per probe: all of (b)'s settings tuned",
    LID_COUNT: "the data-free fallback (d): c, onset, patience tuned",
    LIBRARY: "fixed: the library's defaults when this report was made",
    V3: "fixed: the defaults of study v3",
    GAP: "fixed: study v3's loss-gap baseline (what a user would watch instead)",
    NO_IDS: "ablation: (a)'s setting on a monitor given no item ids (augmented runs only)",
    TRUTH_COPIES: "ablation: (a)'s setting on the study's truth ratio (an oracle index)",
}


# ----------------------------------------------------------------------------- formatting
def _f(x: float | None, digits_: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits_}f}"


def _cell(row: OnsetRow) -> str:
    """A rule's onset in the per-run table, with its verdict."""
    if row.onset is None:
        return "missed" if row.kind == "memorizing" else "–"
    if row.kind == "never":
        return f"{row.onset} **false alarm**"
    if row.kind == "borderline":
        return f"{row.onset} (borderline)"
    return f"{row.onset} ({row.lead:+d})" + (" late" if row.lead < 0 else "")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _join(*chunks: str) -> str:
    return "\n".join(chunks)


def _lead(out: Outcome) -> str:
    lead = out.median_lead
    return "–" if math.isnan(lead) else f"{lead:+.0f}"


def _counts(out: Outcome) -> str:
    return (
        f"{out.count('right')}/{out.judged} right, {out.count('on_time')}/{out.count('memorizing')} on time, "
        f"{out.count('false_alarm')}/{out.count('never')} false alarms, median lead {_lead(out)} steps"
    )


def _outcome_cells(out: Outcome) -> list[str]:
    """right, on time, false alarms, borderline flagged, median lead."""
    return [
        f"{out.count('right')}/{out.judged}",
        f"{out.count('on_time')}/{out.count('memorizing')}",
        f"{out.count('false_alarm')}/{out.count('never')}",
        f"{out.count('borderline_flagged')}/{out.count('borderline')}",
        _lead(out),
    ]


def _groups(an: StudyAnalysis) -> list[str]:
    """The evaluation groups present: report, then fresh."""
    return [g for g in ("report", "fresh") if g in an.groups]


def _per_seed(an: StudyAnalysis, group_: str) -> dict[int, list[RunRecord]]:
    seeds = sorted({r.seed for r in an.groups[group_]})
    return {s: [r for r in an.groups[group_] if r.seed == s] for s in seeds}


def _name(an: StudyAnalysis, name: str) -> str:
    return f"**{name}**" if name == an.winner else name


# ----------------------------------------------------------------------------- figures
def _curve_runs(an: StudyAnalysis) -> dict[str, RunRecord]:
    """One run per kind of hard case of the first report seed: the UNet and the upsampled MLP at
    their smallest and largest N, the duplication case and the augmented case."""
    rep = an.groups["report"]
    seed = min(r.seed for r in rep)
    picked = {}
    for name in [*IMAGE_SIZES, *DUPLICATED, *AUGMENTED]:
        runs = sorted((r for r in rep if r.dataset == name and r.seed == seed), key=lambda r: r.n)
        for r in {id(x): x for x in (runs[:1] + runs[-1:])}.values():
            picked[f"{name} N={r.n}"] = r
    return picked


def _ratio_pairs(runs: Sequence[RunRecord]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The scatter's point sets: every probe of the runs that are not augmented, the augmented
    runs' with item ids and without."""
    aug = [r for r in runs if r.plain_ratio is not None]
    plain = [r for r in runs if r.plain_ratio is None]

    def flat(rs: Sequence[RunRecord], attr: str) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate([r.nn_ratio.ravel() for r in rs]), np.concatenate([getattr(r, attr).ravel() for r in rs])

    pairs = {"not augmented": flat(plain, "monitor_ratio")} if plain else {}
    if aug:
        pairs |= {"augmented, item ids": flat(aug, "monitor_ratio"), "augmented, no ids": flat(aug, "plain_ratio")}
    return pairs


def write_figures(an: StudyAnalysis, img: Path) -> dict[str, str]:
    """Draw and save every figure under ``img``; figure key -> file name."""
    winner, gap = an.rules[an.winner], an.rules[GAP]
    rep, label = an.groups["report"], an.seeds("report")

    def save(fig, name: str) -> str:
        return plots.save_figure(fig, img / f"validation_{name}.png").name

    shown = {name: an.outcomes["report"][name] for name in (an.winner, LID_COUNT, V3, GAP)}
    figs = {
        "ratios": save(plot_ratios(_ratio_pairs(rep), label), "copies_vs_truth"),
        "onsets": save(plot_onsets(shown, label), "onsets"),
        "gap": save(plot_loss_gap(rep, [run_kind(r) for r in rep], gap.spec, gap.onset_threshold, label), "loss_gap"),
    }
    picked = _curve_runs(an)
    if picked:
        title = f"hard cases ({label}): {an.winner} vs truth (d1/d2 < 1/3)\n{winner.describe()}"
        curves = run_curves(picked, winner, an.defaults)
        figs["curves"] = save(plot_curves(curves, winner.onset_threshold, title), "curves_hard_cases")
    return figs


# ----------------------------------------------------------------------------- sections
def header_section(an: StudyAnalysis, timing: Timing, fresh_timing: Timing | None) -> str:
    n_runs = sum(len(rs) for rs in an.groups.values())
    fresh = "" if fresh_timing is None else f" + {fresh_timing.seconds / 60:.1f} min for the fresh seed(s)"
    missing = {g: missing_runs(an, g) for g in an.groups}
    gaps = "; ".join(f"{an.seeds(g)}: {', '.join(m)}" for g, m in missing.items() if m)
    n_missing = sum(map(len, missing.values()))
    return _join(
        "# Validation: which alarm to trust by default (study v4)\n",
        "Generated by `benchmarks/validation.py`; do not edit by hand. "
        f"Size: `{timing.size}`, {n_runs} training runs, {timing.seconds / 60:.1f} min{fresh} "
        f"on {timing.machine} ({timing.workers} worker(s)).\n",
        *(
            [f"**Runs of the grid not trained** ({n_missing}; every table counts the runs that were): {gaps}.\n"]
            if gaps
            else []
        ),  # fmt: skip
    )


def missing_runs(an: StudyAnalysis, group_: str) -> list[str]:
    """The runs of the grid at the seeds of ``group_`` (the selection and report seeds of the study,
    the fresh runs' own seeds) that are not among its runs."""
    runs = an.groups[group_]
    have = {r.key for r in runs}
    seeds = {"selection": an.cfg.select_seeds, "report": an.cfg.report_seeds}.get(group_, {r.seed for r in runs})
    cfg = replace(an.cfg, seeds=tuple(sorted(seeds)))
    return [f"{j.spec.name} N={j.n} s{j.seed}" for j in jobs_of(cfg) if (j.spec.name, j.n, j.seed) not in have]


def summary_section(an: StudyAnalysis) -> str:
    """The chosen rule and the fallback against the baselines, on every evaluation group."""
    w = an.rules[an.winner]
    lines = [
        "## Summary\n",
        f"Chosen on {an.seeds('selection')}: with training samples held, **{an.winner}** ({w.describe()}); "
        f"without them, the fallback **{LID_COUNT}** ({an.rules[LID_COUNT].describe()}). Library defaults when this "
        f"report was made: {an.rules[LIBRARY].describe()}.\n",
    ]
    for group_ in _groups(an):
        outs = an.outcomes[group_]
        auc = an.auroc(group_, an.winner)
        parts = [f"**{an.winner}** {_counts(outs[an.winner])}, per-probe AUROC {_f(auc.auroc if auc else None, 3)}"]
        parts += [f"{name}: {_counts(outs[name])}" for name in (LID_COUNT, V3, GAP)]
        lines.append(f"* {an.seeds(group_)}: " + "; ".join(parts) + ".")
    return _join(*lines, "")


def setup_section(an: StudyAnalysis) -> str:
    cfg, level = an.cfg, an.spec
    runs = [r for rs in an.groups.values() for r in rs]
    rows = []
    for spec in cfg.data:
        mine = [r for r in runs if r.dataset == spec.name]
        if not mine:
            continue
        model = (
            f"UNet2DModel ({spec.hidden}, {2 * spec.hidden}), batch {spec.batch_size or cfg.batch_size}"
            if spec.model == "unet"
            else f"MLP {spec.hidden}×{cfg.depth}"
        )
        mnn, sig, dl = ([f(r) for r in mine] for f in (lambda r: r.median_nn, lambda r: r.sigma[level],
                                                          lambda r: r.data_lid[level]))  # fmt: skip
        rows.append([spec.name, mine[0].dim, ", ".join(map(str, spec.ns)), spec.max_steps, spec.every, model,
                     f"{min(mnn):.2f}–{max(mnn):.2f}", f"{min(sig):.2f}–{max(sig):.2f}",
                     f"{np.nanmin(dl):.1f}–{np.nanmax(dl):.1f}"])  # fmt: skip
    header = ["data", "d", "N", "steps", "check every", "model", "median NN dist.", f"σ_t at {level}", "data LID"]
    scaled = ", ".join(f"`{k}` = {a:g}·x + {b:g}" for k, (_, (a, b)) in SCALED.items())
    dup = ", ".join(
        f"`{k}`: N distinct {b} samples and {i} of them repeated {t}× each" for k, (b, i, t) in DUPLICATED.items()
    )
    n_views = len(group(SHIFT))
    aug = ", ".join(f"`{k}`" for k in AUGMENTED)
    text = (
        f"\n\nDDPM ε-objective, linear schedule (T = 1000), Adam, batch {cfg.batch_size}. Data: sklearn digits in "
        f"[-1, 1] (d = 64) and the same images rescaled ({scaled}), swiss roll / S-curve embedded in R^16, an "
        "8-component GMM in R^16; the digits upsampled to 16×16 (d = 256) for an MLP (`digits16_mlp`) and for a "
        "diffusers `UNet2DModel` with a default `DDPMScheduler`, found by the monitor without glue and measured on "
        f"the trace tier (`digits16`); the duplication case {dup} (more distinct samples than the old reservoir of "
        f"4096 held); the augmented case {aug}: a `Dataset` returning (random view, item id), a view being a "
        f"horizontal flip or not and a shift of up to {SHIFT} px {'along each axis' if VERTICAL else 'sideways'} "
        f"(pad with the background −1, crop; {n_views} views per item).\n\n"
        '**One monitor per run, as the library runs by default**: `reference_data="batches"` (its own copy index '
        'of the distinct training samples it sees, in memory), `sigmas="auto"` at `sigma_factors='
        f"{tuple(cfg.sigma_factors)}`, but the study's cadence and {cfg.num_probes} probes of {cfg.sampler_steps} "
        "DDIM steps. On the augmented runs it reads the batches' item ids (`DataOptions(select=0, ids=1)`: views "
        "with one id are one item); a second monitor there reads the views alone (no ids) on the same probes, to "
        "show what the ids change. Every rule is replayed offline from the recorded checks (`RecordingMonitor`, "
        "through `on_check_end`): the monitor's per-probe copy ratio r = d₁/d₂ (`check.nn_ratio`), the LID count "
        "(`res.lid`), the sharp fraction, FLIPD, the LID signal's denoising LID, Jeon et al.'s ‖H s‖.\n\n"
        f"**Loss-gap baseline.** At every check the ε-objective on {cfg.held_out} training samples and on "
        f"{cfg.held_out} held-out ones (the study's split), at fixed t ∈ "
        f"{{{', '.join(map(str, cfg.loss_timesteps))}}} and noises; the gap is (L_held − L_train) / L_train.\n\n"
        "**Ground truth, the study's own** (not the monitor's): a probe is memorized when d₁/d₂ < 1/3 to the "
        "distinct training set (`memwatch.nn_ratio`); on the augmented runs per item: the distance to an item is "
        "the least over its views, d₁/d₂ over items. A run *memorizes* when a check has more than "
        f"{NN_ONSET:.0%} of its probes memorized (onset: the first such check); it *never memorizes* when no check "
        f"exceeds {NEVER:.0%}; runs in between ({NEVER:.0%}–{BORDERLINE:.0%}) are *borderline* (neither right nor "
        "wrong). **Right** = a memorizing run flagged no later than the truth, or a never-memorizing run never "
        "flagged. Lead = truth − onset in steps (positive: earlier).\n"
    )
    fresh = an.groups.get("fresh")
    protocol = (
        f"**Protocol.** Every free setting is chosen on {an.seeds('selection')} ({len(an.groups['selection'])} "
        f"runs) only; {an.seeds('report')} ({len(an.groups['report'])} runs) report. "
        + (
            f"The fresh {an.seeds('fresh')} ({len(fresh)} runs, same grid) was trained once, after every choice was "
            "fixed.\n"
            if fresh
            else "No fresh seed in this run.\n"
        )
    )
    return _join("## Setup\n", md_table(header, rows), text, protocol)


def rules_section(an: StudyAnalysis) -> str:
    sel = an.outcomes["selection"]
    header = ["rule", "setting", "how", "right", "on time", "false alarms", "borderline flagged", "median lead"]
    rows = [[_name(an, n), rule.describe(), HOW[n], *_outcome_cells(sel[n])] for n, rule in an.rules.items()]
    cfg = an.cfg
    text = (
        f"Counts on the selection {an.seeds('selection')}. A probe is flagged by (a) r < 1/3; (b) an isolated peak "
        "(LID count < c, or sharp fraction > s) whose nearest training sample is close (r < ρ); (c) either; (d) "
        "LID count < c. Onset when more than θ of a check's probes are flagged at `patience` checks in a row. Tuned "
        "rules are chosen by: fewest false alarms, then most runs right, then the largest median lead, then the "
        "widest margin of the monitored value around its threshold; the chosen rule is the best of (a)–(c) by the "
        f"same order. Grids: θ ∈ {cfg.copy_thresholds} ((d): {cfg.onset_thresholds}), patience ∈ {cfg.patiences}, "
        f"c ∈ {cfg.lid_thresholds}, s ∈ {cfg.score_thresholds}, ρ ∈ {cfg.rhos}.\n"
    )
    return _join("## 1. Rules compared\n", md_table(header, rows), "", text)


def comparison_section(an: StudyAnalysis) -> str:
    parts = ["## 2. The rules side by side\n"]
    header = ["rule", "right", "on time", "false alarms", "borderline flagged", "median lead (steps)", "detected",
              "AUROC (pooled)", "TPR @1 % / 5 % FPR"]  # fmt: skip
    for group_ in _groups(an):
        rows = []
        for name, out in an.outcomes[group_].items():
            st = an.auroc(group_, name)
            rows.append([_name(an, name), *_outcome_cells(out), f"{out.count('detected')}/{out.count('memorizing')}",
                         _f(st.auroc if st else None, 3),
                         "–" if st is None else f"{_f(st.tpr[0.01])} / {_f(st.tpr[0.05])}"])  # fmt: skip
        parts += [f"**{group_.capitalize()} {an.seeds(group_)}** ({len(an.groups[group_])} runs)\n",
                  md_table(header, rows), ""]  # fmt: skip
    parts.append(
        "AUROC: the rule's per-probe score (flagged exactly where it exceeds its threshold: −r·3 for a copy, −r/ρ "
        "for a confirmed probe, the LID or sharp fraction scaled to its threshold) against the truth, pooled over "
        "every check and run of the group; the loss gap is a run-level signal and has none. The rule without item "
        "ids is counted on the augmented runs only.\n"
    )
    return _join(*parts)


def ablation_section(an: StudyAnalysis, groups_: Sequence[str] | None = None) -> str:
    """What each signal adds, on the same runs (``groups_``; default: every group): the rules in
    the order a signal is added."""
    groups_ = ["selection", *_groups(an)] if groups_ is None else groups_
    header = ["rule", "setting", *[f"{an.seeds(g)}: right / on time / false alarms / median lead" for g in groups_]]
    rows = []
    for name in ABLATION:
        cells = []
        for g in groups_:
            out = an.outcomes[g][name]
            right, on_time, false, _, lead = _outcome_cells(out)
            cells.append(f"{right} / {on_time} / {false} / {lead}")
        rows.append([_name(an, name), an.rules[name].describe(), *cells])
    aug_rows = []
    for g in groups_:
        for r in (r for r in an.groups[g] if r.plain_ratio is not None):
            with_ids, no_ids = (float((x < MEMORIZED_RATIO).mean(1).max()) for x in (r.monitor_ratio, r.plain_ratio))
            aug_rows.append([r.dataset, r.n, r.seed, f"{float(labels(r).mean(1).max()):.2f}", f"{with_ids:.2f}",
                             f"{no_ids:.2f}", _f(r.plain_probe_gap, 1)])  # fmt: skip
    parts = [
        "## 3. What each signal adds (ablation)\n",
        "The same runs under each rule: the LID count alone (no training samples), then copies, then "
        "sharpness confirmed by proximity, then both; then what the index loses without item ids and against the "
        "study's own truth; then what a user would watch instead (the loss gap) and the v3 defaults.\n",
        md_table(header, rows),
        "",
    ]
    if aug_rows:
        parts += [
            "**Augmented runs**: the highest share of a check's probes counted as copies (r < 1/3) by the truth, "
            "the monitor with item ids and a monitor without (on the same probes: their largest difference in the "
            "last column).\n",
            md_table(["data", "N", "seed", "truth", "with ids", "no ids", "probe Δ"], aug_rows),
            "",
        ]
    return _join(*parts)


def agreement_section(an: StudyAnalysis, figs: Mapping[str, str]) -> str:
    """The monitor's copy ratio against the truth, per data set."""
    runs = [r for g in _groups(an) for r in an.groups[g]]
    rows = []
    for ds in an.datasets:
        mine = [r for r in runs if r.dataset == ds]
        if not mine:
            continue
        truth = np.concatenate([labels(r).ravel() for r in mine])
        for which in ("monitor", "plain"):
            got = [r for r in mine if which == "monitor" or r.plain_ratio is not None]
            if not got:
                continue
            ratio = np.concatenate([(r.monitor_ratio if which == "monitor" else r.plain_ratio).ravel() for r in got])
            ok = np.isfinite(ratio)
            said = ratio[ok] < MEMORIZED_RATIO
            st = probe_auroc(got, lambda r, w=which: oriented(r, w, an.spec))
            label = "monitor" if which == "monitor" else "monitor, no ids"
            rows.append([ds, label, f"{truth.mean():.3f}", f"{said.mean():.3f}", f"{(said == truth[ok]).mean():.3f}",
                         f"{(~ok).sum()}", _f(st.auroc, 3)])  # fmt: skip
    return _join(
        f"## 4. The monitor's copies against the truth ({', '.join(an.seeds(g) for g in _groups(an))})\n",
        "Per probe and check: the share the truth calls copies, the share the monitor's own index of the batches "
        "calls copies, how often they agree, probes without a ratio (the index held fewer than two samples), and "
        "the AUROC of −r against the truth.\n",
        md_table(["data", "ratio", "truth copies", "monitor copies", "agree", "no ratio", "AUROC"], rows),
        "",
        f"![copies vs truth](img/{figs['ratios']})\n",
    )


def detection_section(an: StudyAnalysis) -> str:
    group_ = "report"
    runs = an.groups[group_]
    rows = []
    for signal, label in DETECTION_ROWS:
        cells = []
        for ds in [*an.datasets, "all"]:
            mine = [r for r in runs if ds in ("all", r.dataset) and (signal != "plain" or r.plain_ratio is not None)]
            cells.append(_f(probe_auroc(mine, lambda r, s=signal: oriented(r, s, an.spec)).auroc) if mine else "–")
        rows.append([label, *cells])
    return _join(
        f"## 5. Per-probe detection ({an.seeds(group_)}, {an.spec})\n",
        "AUROC of each per-probe value against the truth (oriented: lower ratio or LID = more memorized), pooled "
        "over every check and run of a data set. On the UNet the LID count is the trace tier's FLIPD.\n",
        md_table(["signal", *an.datasets, "all"], rows),
        "",
    )


def onset_tables(an: StudyAnalysis, groups_: Sequence[str]) -> list[str]:
    """Per group, every run's onset under the chosen rule, the other candidates, the fallback and the baselines."""
    names = [an.winner, *(n for n in (*CANDIDATES, LID_COUNT, GAP, V3, LIBRARY) if n != an.winner)]
    parts = []
    for group_ in groups_:
        outs = an.outcomes[group_]
        rows = []
        for i, r0 in enumerate(outs[names[0]].rows):
            truth = "–" if r0.truth is None else str(r0.truth)
            rows.append([r0.dataset, r0.n, r0.seed, f"{r0.peak:.2f}", r0.kind, truth,
                         *(_cell(outs[n].rows[i]) for n in names)])  # fmt: skip
        header = ["data", "N", "seed", "peak copies", "kind", "truth onset", *names]
        parts += [f"**{an.seeds(group_)}.** Onset step (lead vs truth in brackets).\n", md_table(header, rows), ""]
    return parts


def onset_section(an: StudyAnalysis, figs: Mapping[str, str]) -> str:
    parts = ["## 6. Onset per run\n", *onset_tables(an, _groups(an))]
    parts.append(f"![onsets](img/{figs['onsets']})\n")
    if "curves" in figs:
        parts.append(f"![hard cases](img/{figs['curves']})\n")
    parts.append(f"![loss gap](img/{figs['gap']})\n")
    return _join(*parts)


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _seed_rows(an: StudyAnalysis) -> list[list[str]]:
    """The issue's targets for the chosen rule (and the fallback's), one block per evaluation seed."""
    rule, fallback, gap = an.rules[an.winner], an.rules[LID_COUNT], an.rules[GAP]
    rows = []
    for group_ in _groups(an):
        for seed, runs in _per_seed(an, group_).items():
            out, g, fb = (evaluate(runs, x, an.defaults) for x in (rule, gap, fallback))
            memo, on_time = out.count("memorizing"), out.count("on_time")
            late = ", ".join(f"{r.dataset} N={r.n}" for r in out.rows if r.kind == "memorizing" and not r.on_time)
            false = ", ".join(f"{r.dataset} N={r.n}" for r in out.rows if r.false_alarm)
            fb_false = ", ".join(f"{r.dataset} N={r.n}" for r in fb.rows if r.false_alarm)
            right, gap_right = out.count("right"), g.count("right")
            falses, fb_falses = out.count("false_alarm"), fb.count("false_alarm")
            rows += [
                [f"seed {seed}", "0 false alarms on never-memorizing runs",
                 f"{falses}/{out.count('never')}" + (f" ({false})" if false else ""), _yes(falses == 0)],
                [f"seed {seed}", "strictly more runs right than the loss gap",
                 f"{right} vs {gap_right} of {out.judged}", _yes(right > gap_right)],
                [f"seed {seed}", f"≥ {ON_TIME_TARGET:.0%} of memorizing runs flagged no later than the truth",
                 f"{on_time}/{memo}, median lead {_lead(out)} steps" + (f"; late or missed: {late}" if late else ""),
                 _yes(memo > 0 and on_time >= ON_TIME_TARGET * memo)],
                [f"seed {seed}", "no training samples held (the fallback): 0 false alarms",
                 f"{fb_falses}/{fb.count('never')}" + (f" ({fb_false})" if fb_false else ""), _yes(fb_falses == 0)],
            ]  # fmt: skip
    return rows


def targets_section(an: StudyAnalysis) -> str:
    return _join(
        "## 7. Targets\n",
        f"**{an.winner}** ({an.rules[an.winner].describe()}); without training samples **{LID_COUNT}** "
        f"({an.rules[LID_COUNT].describe()}).\n",
        md_table(["seeds", "target", "measured", "met"], _seed_rows(an)),
        "",
    )


def diagnostics_section(an: StudyAnalysis) -> str:
    parts = ["## 8. Where the rules go wrong\n"]
    for group_ in _groups(an):
        for name in dict.fromkeys([an.winner, LID_COUNT, GAP]):
            out = an.outcomes[group_][name]
            late = [f"{r.dataset} N={r.n} s{r.seed} by {-r.lead // an.every} check(s)" for r in out.rows
                    if r.lead is not None and r.lead < 0]  # fmt: skip
            missed = [f"{r.dataset} N={r.n} s{r.seed} (peak {r.peak:.0%})" for r in out.rows
                      if r.kind == "memorizing" and r.onset is None]  # fmt: skip
            false = [f"{r.dataset} N={r.n} s{r.seed} (peak {r.peak:.0%})" for r in out.rows if r.false_alarm]
            bits = [f"{what}: {', '.join(xs)}" for what, xs in (("late", late), ("missed", missed),
                                                               ("false alarms", false)) if xs]  # fmt: skip
            parts.append(f"* **{name}** ({an.seeds(group_)}): " + ("; ".join(bits) if bits else "none") + ".")
    return _join(*parts, "")


def cost_section(an: StudyAnalysis) -> str:
    runs = [r for rs in an.groups.values() for r in rs]
    rows = []
    for ds in an.datasets:
        mine = [r for r in runs if r.dataset == ds]
        secs = np.concatenate([r.check_seconds for r in mine])
        rows.append([ds, mine[0].dim, f"{np.median(secs):.2f}", f"{np.max(secs):.2f}"])
    return _join(
        "## 9. Cost of a check\n",
        "Wall time of one check of the study's monitor (sampling, sharpness, ‖H s‖, the LID signal, the copy "
        "index search), one thread, on a CPU shared with other work. The cost of each part against the sampling "
        "at image scale is `benchmarks/bench_check_cost.py`'s.\n",
        md_table(["data", "d", "median s per check", "max s per check"], rows),
        "",
    )


def runtime_section(an: StudyAnalysis, timing: Timing, fresh_timing: Timing | None) -> str:
    runs = [r for rs in an.groups.values() for r in rs]
    cpu = [r.cpu_seconds or math.nan for r in runs]
    text = (
        f"Main study: {timing.seconds:.0f} s wall ({timing.workers} worker(s))"
        + ("" if fresh_timing is None else f"; fresh seed(s): {fresh_timing.seconds:.0f} s")
        + f". Per run {min(r.seconds for r in runs):.0f}–{max(r.seconds for r in runs):.0f} s wall, "
        f"CPU {np.nansum(cpu):.0f} s in all (one thread per run). torch {torch.__version__}, Python "
        f"{platform.python_version()}, {os.cpu_count()} CPU(s)."
    )
    notes = [t.note for t in (timing, fresh_timing) if t is not None and t.note]
    return _join("## Runtime\n", " ".join([text, *notes]) + "\n")


# ----------------------------------------------------------------------------- the selection, early
def selection_report(an: StudyAnalysis) -> str:
    """What the selection seeds chose, as soon as they are trained (before the report seeds): the
    chosen rule, the rules compared, the ablation and every selection run's onsets."""
    w, fb = an.rules[an.winner], an.rules[LID_COUNT]
    runs = an.groups["selection"]
    missing = missing_runs(an, "selection")
    return _join(
        f"# Study v4: the rule chosen on the selection {an.seeds('selection')}\n",
        "Generated by `benchmarks/validation.py --selection-out`; do not edit by hand. "
        f"{len(runs)} selection runs ({', '.join(sorted({r.dataset for r in runs}))}); the report and fresh seeds "
        "play no part in it. "
        + (f"**Not trained yet** ({len(missing)}): {', '.join(missing)}.\n" if missing else "Every selection run.\n"),
        f"* With training samples held: **{an.winner}**: {w.describe()}.",
        f"* Without them (the data-free fallback): **{LID_COUNT}**: {fb.describe()}.",
        f"* The library's defaults when this was made: {an.rules[LIBRARY].describe()}.\n",
        rules_section(an),
        ablation_section(an, ["selection"]),
        "## Onset per run\n",
        *onset_tables(an, ["selection"]),
    )


# ----------------------------------------------------------------------------- the file
def write_report(an: StudyAnalysis, out: Path, timing: Timing, fresh_timing: Timing | None = None) -> str:
    """Write ``<out>/validation.md`` and ``<out>/img/validation_*.png``; return the markdown."""
    img = out / "img"
    img.mkdir(parents=True, exist_ok=True)
    figs = write_figures(an, img)
    sections = [
        header_section(an, timing, fresh_timing),
        summary_section(an),
        setup_section(an),
        rules_section(an),
        comparison_section(an),
        ablation_section(an),
        agreement_section(an, figs),
        detection_section(an),
        onset_section(an, figs),
        targets_section(an),
        diagnostics_section(an),
        cost_section(an),
        runtime_section(an, timing, fresh_timing),
    ]
    text = "\n".join(sections)
    (out / "validation.md").write_text(text)
    return text
