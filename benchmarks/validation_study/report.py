"""The report: ``validation.md`` and its figures, one function per section.

Every section function takes the :class:`StudyAnalysis` (and what else it quotes) and returns its
markdown; :func:`write_report` draws the figures, joins the sections and writes the file.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from memwatch import plots

from .analysis import (
    ALL_LEVELS,
    CANDIDATES,
    GAP,
    HS_SIGNAL,
    JEON,
    LIBRARY,
    NOISIEST,
    SHARP,
    V22,
    OnsetRow,
    Outcome,
    StudyAnalysis,
    evaluate,
    run_kind,
)
from .config import BORDERLINE, DUPLICATED, IMAGE_SIZES, NEVER, NN_ONSET, SCALED
from .figures import plot_auroc_vs_factor, plot_curves, plot_loss_gap, plot_onsets, run_curves
from .runs import RunRecord, Timing

AUROC_TARGET, ON_TIME_TARGET = 0.95, 0.90
#: the per-probe table's rows: (signal, label); the LID statistics first
DETECTION_ROWS = (
    ("relative", "relative LID (FLIPD / data LID)"),
    ("drawdown", "LID drawdown (FLIPD / first checks)"),
    ("denoising", "denoising LID / data LID"),
    ("denoising_lid", "denoising LID"),
    ("flipd", "FLIPD"),
    ("lid", "LID count"),
    ("sharp_fraction", "sharp fraction"),
)


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


def _counts(out: Outcome) -> str:
    return (
        f"{out.count('right')}/{out.judged} right, {out.count('on_time')}/{out.count('memorizing')} on time, "
        f"{out.count('false_alarm')}/{out.count('never')} false alarms"
    )


def _groups(an: StudyAnalysis) -> list[str]:
    """The evaluation groups present: report, then fresh."""
    return [g for g in ("report", "fresh") if g in an.groups]


def _per_seed(an: StudyAnalysis, group: str) -> dict[int, list[RunRecord]]:
    seeds = sorted({r.seed for r in an.groups[group]})
    return {s: [r for r in an.groups[group] if r.seed == s] for s in seeds}


def memorizes(run: RunRecord) -> bool:
    """Whether ``run`` memorizes (a check above the truth's onset level)."""
    return run_kind(run) == "memorizing"


# ----------------------------------------------------------------------------- figures
def _curve_runs(an: StudyAnalysis) -> dict[str, RunRecord]:
    """One run per kind of hard case of the first report seed: the UNet and the upsampled MLP at
    their smallest and largest N, and the duplication case."""
    rep = an.groups["report"]
    seed = min(r.seed for r in rep)
    picked = {}
    for name in [*IMAGE_SIZES, *DUPLICATED]:
        runs = sorted((r for r in rep if r.dataset == name and r.seed == seed), key=lambda r: r.n)
        for r in {id(x): x for x in (runs[:1] + runs[-1:])}.values():
            picked[f"{name} N={r.n}"] = r
    return picked


def write_figures(an: StudyAnalysis, img: Path) -> dict[str, str]:
    """Draw and save every figure under ``img``; figure key -> file name."""
    winner, gap = an.rules[an.winner], an.rules[GAP]
    rep, label = an.groups["report"], an.seeds("report")

    def save(fig, name: str) -> str:
        return plots.save_figure(fig, img / f"validation_{name}.png").name

    shown = {
        name: an.outcomes["report"][name] for name in (an.winner, LIBRARY, V22, GAP) if name in an.outcomes["report"]
    }
    figs = {
        "auroc": save(
            plot_auroc_vs_factor(an.aurocs["report"], an.cfg.sigma_factors, winner.spec, label), "auroc_vs_factor"
        ),
        "onsets": save(plot_onsets(shown, label), "onsets"),
        "gap": save(plot_loss_gap(rep, [run_kind(r) for r in rep], gap.spec, gap.onset_threshold, label), "loss_gap"),
    }
    picked = _curve_runs(an)
    if picked:
        title = f"hard cases ({label}): {an.winner} vs NN truth (d1/d2 < 1/3)\n{winner.describe()}"
        curves = run_curves(picked, winner, an.defaults)
        figs["curves"] = save(plot_curves(curves, winner.onset_threshold, title), "curves_hard_cases")
    return figs


# ----------------------------------------------------------------------------- sections
def header_section(an: StudyAnalysis, timing: Timing, fresh_timing: Timing | None) -> str:
    n_runs = sum(len(rs) for rs in an.groups.values())
    fresh = "" if fresh_timing is None else f" + {fresh_timing.seconds / 60:.1f} min for the fresh seed(s)"
    return _join(
        "# Validation: does memwatch detect memorization, and when? (study v3)\n",
        "Generated by `benchmarks/validation.py`; do not edit by hand. "
        f"Size: `{timing.size}`, {n_runs} training runs, {timing.seconds / 60:.1f} min{fresh} "
        f"on {timing.machine} ({timing.workers} worker(s)).\n",
    )


def summary_section(an: StudyAnalysis) -> str:
    """The winning candidate (chosen on the selection seeds) against the library's defaults and the
    baselines, on every evaluation group."""
    w = an.rules[an.winner]
    lines = [
        "## Summary\n",
        f"Candidate chosen on {an.seeds('selection')}: **{an.winner}** ({w.describe()}, patience "
        f"{w.patience_of(an.defaults)}). Library defaults when this report was made: {an.rules[LIBRARY].describe()}.\n",
    ]
    for group in _groups(an):
        outs = an.outcomes[group]
        auc = an.auroc(group, w)
        parts = [f"**{an.winner}** {_counts(outs[an.winner])}, per-probe AUROC {_f(auc.auroc if auc else None, 3)}"]
        parts += [f"{name}: {_counts(outs[name])}" for name in (LIBRARY, V22, JEON, GAP)]
        lines.append(f"* {an.seeds(group)}: " + "; ".join(parts) + ".")
    return _join(*lines, "")


def setup_section(an: StudyAnalysis) -> str:
    cfg = an.cfg
    runs = [r for rs in an.groups.values() for r in rs]
    level = an.rules[an.winner].spec if an.rules[an.winner].spec != ALL_LEVELS else an.specs[0]
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
        mnn = [r.median_nn for r in mine]
        sig = [r.sigma[level] for r in mine]
        dl = [r.data_lid[level] for r in mine]
        rows.append(
            [
                spec.name,
                mine[0].dim,
                ", ".join(map(str, spec.ns)),
                spec.max_steps,
                spec.every,
                model,
                f"{min(mnn):.2f}–{max(mnn):.2f}",
                f"{min(sig):.2f}–{max(sig):.2f}",
                f"{min(dl):.1f}–{max(dl):.1f}",
            ]
        )
    header = ["data", "d", "N", "steps", "check every", "model", "median NN dist.", f"σ_t at {level}", "data LID"]
    scaled = ", ".join(f"`{k}` = {a:g}·x + {b:g}" for k, (_, (a, b)) in SCALED.items())
    dup = ", ".join(
        f"`{k}`: N distinct {b} samples and {i} of them repeated {t}× each" for k, (b, i, t) in DUPLICATED.items()
    )
    text = (
        f"\n\nDDPM ε-objective, linear schedule (T = 1000), Adam, batch {cfg.batch_size}. Data: sklearn digits in "
        f"[-1, 1] (d = 64) and the same images rescaled ({scaled}), swiss roll / S-curve embedded in R^16, an "
        "8-component GMM in R^16; the digits upsampled to 16×16 (d = 256) for an MLP (`digits16_mlp`) and for a "
        "diffusers `UNet2DModel` with a default `DDPMScheduler`, found by the monitor without glue and measured on "
        f"the trace tier (`digits16`); the duplication case {dup} (more distinct samples than the monitor's "
        "reservoir of 4096 holds; its truth is against the distinct samples).\n\n"
        "**One monitor per run**, the library's defaults but `sigma_factors="
        f"{tuple(cfg.sigma_factors)}` (calibrated by the monitor from its reservoir at the first check), "
        f"{cfg.num_probes} probes of {cfg.sampler_steps} DDIM steps, and the training set as `reference_data` for "
        "the truth. Every candidate and baseline is read from its checks (`RecordingMonitor`, through "
        "`on_check_end`): the sharpness signal (dense spectrum on the MLPs, trace tier on the UNet), Jeon et al.'s "
        "‖H s‖, and the LID signal (`memwatch.signals.lid`): the data LID by local PCA of the reservoir at the "
        f"first check, FLIPD and the denoising LID ({an.defaults.lid_statistic!r} etc. are its statistics).\n\n"
        "**Candidates** (each the LID signal's `lid.statistic`, replayed offline with the library's own "
        "functions of `memwatch.lid`): *relative LID* = FLIPD / data LID at one level; *multi-scale profile* = "
        "that ratio averaged over every level measured; *LID drawdown* = FLIPD / the median of the probe's own "
        "first checks; *denoising LID* = the probe's ε-loss ‖ε + σ s(αx + σε)‖² (8 draws, forward passes only) / "
        "data LID. A probe is memorized when its ratio is below a threshold; onset when more than a share of the "
        "probes is, at `patience` checks in a row.\n\n"
        f"**Loss-gap baseline.** At every check the ε-objective on {cfg.held_out} training samples and on "
        f"{cfg.held_out} held-out ones, at fixed t ∈ {{{', '.join(map(str, cfg.loss_timesteps))}}} and noises; the "
        "gap is (L_held − L_train) / L_train.\n\n"
        f"**Ground truth.** A probe is memorized when d₁/d₂ < 1/3 to the training set. A run *memorizes* when a "
        f"check has more than {NN_ONSET:.0%} of its probes memorized (onset: the first such check); it *never "
        f"memorizes* when no check exceeds {NEVER:.0%}; runs in between ({NEVER:.0%}–{BORDERLINE:.0%}) are "
        "*borderline* (neither right nor wrong). **Right** = a memorizing run flagged no later than the truth, or "
        "a never-memorizing run never flagged.\n"
    )
    fresh = an.groups.get("fresh")
    protocol = (
        f"**Protocol.** Every free setting is chosen on {an.seeds('selection')} ({len(an.groups['selection'])} "
        f"runs) only; {an.seeds('report')} ({len(an.groups['report'])} runs) report. "
        + (
            f"The fresh {an.seeds('fresh')} ({len(fresh)} runs, same grid) was trained once, after every choice and "
            "the library's defaults were fixed.\n"
            if fresh
            else "No fresh seed in this run.\n"
        )
    )
    return _join("## Setup\n", md_table(header, rows), text, protocol)


def rules_section(an: StudyAnalysis) -> str:
    sel = an.outcomes["selection"]
    how = {
        LIBRARY: "fixed: the library's defaults",
        V22: "fixed: the defaults of study v2.2",
        SHARP: "factor and thresholds tuned",
        "LID count, tuned": 'an LID threshold in dimensions (`sharpness.lid.statistic="count"`); '
        "level and thresholds tuned",
        JEON: "Jeon et al.'s ‖H s‖ against the run's first check; both thresholds tuned",
        GAP: "timestep and threshold tuned",
        **{name: "candidate: level and both thresholds tuned" for name in CANDIDATES},
    }
    rows = [
        [
            f"**{name}**" if name == an.winner else name,
            rule.describe(),
            how[name],
            f"{sel[name].count('right')}/{sel[name].judged}",
            f"{sel[name].count('on_time')}/{sel[name].count('memorizing')}",
            f"{sel[name].count('false_alarm')}/{sel[name].count('never')}",
        ]
        for name, rule in an.rules.items()
    ]
    header = ["rule", "setting", "how", "right (sel.)", "on time (sel.)", "false alarms (sel.)"]
    cfg = an.cfg
    text = (
        "Tuned rules are chosen on the selection seeds by: fewest false alarms, then fewest borderline runs "
        "flagged, then most runs right, then most memorizing runs flagged, then the widest margin of the monitored "
        f"value around the threshold; the winner among the candidates by the same order. Grids: level ∈ "
        f"{tuple(cfg.auto_specs())}, ratio threshold ∈ {cfg.ratio_thresholds}, sharp fraction ∈ "
        f"{cfg.score_thresholds}, LID ∈ {cfg.lid_thresholds}, onset threshold ∈ {cfg.onset_thresholds}, loss gap ∈ "
        f"{cfg.gap_thresholds} at each loss timestep and their mean. Patience {an.defaults.patience}.\n"
    )
    return _join("## 1. Rules compared\n", md_table(header, rows), "", text)


def _lead_text(out: Outcome) -> str:
    leads = out.leads()
    return f"{int(np.median(leads)):+d}" if leads else "–"


def comparison_section(an: StudyAnalysis) -> str:
    parts = ["## 2. The rules side by side\n"]
    header = ["rule", "right", "on time", "detected", "false alarms", "borderline flagged", "median lead (steps)",
              "AUROC (pooled)", "TPR @1 % / 5 % FPR"]  # fmt: skip
    for group in _groups(an):
        rows = []
        for name, out in an.outcomes[group].items():
            st = an.auroc(group, an.rules[name])
            rows.append(
                [
                    f"**{name}**" if name == an.winner else name,
                    f"{out.count('right')}/{out.judged}",
                    f"{out.count('on_time')}/{out.count('memorizing')}",
                    f"{out.count('detected')}/{out.count('memorizing')}",
                    f"{out.count('false_alarm')}/{out.count('never')}",
                    f"{out.count('borderline_flagged')}/{out.count('borderline')}",
                    _lead_text(out),
                    _f(st.auroc if st else None, 3),
                    "–" if st is None else f"{_f(st.tpr[0.01])} / {_f(st.tpr[0.05])}",
                ]
            )
        parts += [
            f"**{group.capitalize()} {an.seeds(group)}** ({len(an.groups[group])} runs)\n",
            md_table(header, rows),
            "",
        ]
    parts.append(
        "AUROC: the rule's per-probe score against the NN labels, pooled over every check and run of the group (the "
        "loss gap is a run-level signal and has none). Lead = truth − onset (positive: earlier), median over "
        "memorizing runs flagged.\n"
    )
    return _join(*parts)


def detection_section(an: StudyAnalysis, figs: Mapping[str, str]) -> str:
    group = "report"
    table, datasets = an.aurocs[group], an.datasets

    def row(spec: str, signal: str, label: str) -> list[str]:
        cells = [_f(table[(ds, spec, signal)].auroc) for ds in datasets]
        st = table[("all", spec, signal)]
        return [spec, label, *cells, _f(st.auroc, 3), _f(st.tpr[0.01]), _f(st.tpr[0.05])]

    rows = [row(spec, sig, label) for spec in an.specs for sig, label in DETECTION_ROWS]
    rows.append(row(ALL_LEVELS, "profile", "multi-scale profile"))
    rows.append(row(NOISIEST, HS_SIGNAL, "‖H s‖ (Jeon)"))
    header = ["σ", "signal", *datasets, "all", "TPR@1%", "TPR@5%"]
    return _join(
        f"## 3. Per-probe detection ({an.seeds(group)})\n",
        "AUROC of each per-probe value against the NN labels (oriented: lower LID or ratio = more memorized), "
        "pooled over every check and run of a data set. On the UNet every LID is the trace tier's.\n",
        md_table(header, rows),
        "",
        f"![AUROC vs noise level](img/{figs['auroc']})\n",
    )


def onset_section(an: StudyAnalysis, figs: Mapping[str, str]) -> str:
    names = list(an.rules)
    parts = ["## 4. Onset per run\n"]
    for group in _groups(an):
        outs = an.outcomes[group]
        rows = []
        for i, r0 in enumerate(outs[names[0]].rows):
            peak = f"{r0.peak:.2f}"
            truth = "–" if r0.truth is None else str(r0.truth)
            rows.append([r0.dataset, r0.n, r0.seed, peak, r0.kind, truth, *(_cell(outs[n].rows[i]) for n in names)])
        header = ["data", "N", "seed", "peak NN", "kind", "NN truth onset", *names]
        parts += [f"**{an.seeds(group)}.** Onset step (lead vs truth in brackets).\n", md_table(header, rows), ""]
    parts.append(f"![onsets](img/{figs['onsets']})\n")
    if "curves" in figs:
        parts.append(f"![hard cases](img/{figs['curves']})\n")
    parts.append(f"![loss gap](img/{figs['gap']})\n")
    return _join(*parts)


def _seed_rows(an: StudyAnalysis, name: str) -> list[list[str]]:
    """The issue's targets for rule ``name``, one block per evaluation seed."""
    rule = an.rules[name]
    rows = []
    for group in _groups(an):
        for seed, runs in _per_seed(an, group).items():
            out, gap = evaluate(runs, rule, an.defaults), evaluate(runs, an.rules[GAP], an.defaults)
            memo = out.count("memorizing")
            on_time = out.count("on_time")
            late = ", ".join(f"{r.dataset} N={r.n}" for r in out.rows if r.kind == "memorizing" and not r.on_time)
            false = ", ".join(f"{r.dataset} N={r.n}" for r in out.rows if r.false_alarm)
            right, gap_right = out.count("right"), gap.count("right")
            falses = out.count("false_alarm")
            rows += [
                [f"seed {seed}", "more runs right than the loss gap", f"{right} vs {gap_right} of {out.judged}",
                 _yes(right > gap_right)],
                [f"seed {seed}", "0 false alarms", f"{falses}/{out.count('never')}" + (f" ({false})" if false else ""),
                 _yes(falses == 0)],
                [f"seed {seed}", f"≥ {ON_TIME_TARGET:.0%} of memorizing runs on time",
                 f"{on_time}/{memo}" + (f"; late or missed: {late}" if late else ""),
                 _yes(memo > 0 and on_time >= ON_TIME_TARGET * memo)],
            ]  # fmt: skip
        st = an.auroc(group, rule)
        auc = None if st is None else st.auroc
        rows.append(
            [
                an.seeds(group),
                f"per-probe AUROC ≥ {AUROC_TARGET} (pooled)",
                _f(auc, 3),
                _yes(auc is not None and auc >= AUROC_TARGET),
            ]
        )
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def targets_section(an: StudyAnalysis) -> str:
    parts = ["## 5. Targets\n"]
    for name in dict.fromkeys([an.winner, LIBRARY]):
        parts += [
            f"**{name}** ({an.rules[name].describe()})\n",
            md_table(["seeds", "target", "measured", "met"], _seed_rows(an, name)),
            "",
        ]
    return _join(*parts)


def diagnostics_section(an: StudyAnalysis) -> str:
    parts = ["## 6. Where the rules go wrong\n"]
    for group in _groups(an):
        for name in dict.fromkeys([an.winner, LIBRARY, GAP]):
            out = an.outcomes[group][name]
            late = [
                f"{r.dataset} N={r.n} s{r.seed} by {-r.lead // an.every} check(s)"
                for r in out.rows
                if r.lead is not None and r.lead < 0
            ]
            missed = [
                f"{r.dataset} N={r.n} s{r.seed} (peak {r.peak:.0%})"
                for r in out.rows
                if r.kind == "memorizing" and r.onset is None
            ]
            false = [f"{r.dataset} N={r.n} s{r.seed} (peak {r.peak:.0%})" for r in out.rows if r.false_alarm]
            bits = [
                f"{what}: {', '.join(xs)}"
                for what, xs in (("late", late), ("missed", missed), ("false alarms", false))
                if xs
            ]
            parts.append(f"* **{name}** ({an.seeds(group)}): " + ("; ".join(bits) if bits else "none") + ".")
    return _join(*parts, "")  # fmt: skip


def liberal_section(an: StudyAnalysis) -> str:
    """Each signal at its most runs right on the selection seeds, false alarms allowed."""
    groups = ["selection", *_groups(an)]
    header = ["signal", "setting (most runs right on the selection seeds)"]
    header += [f"{an.seeds(g)}: right / on time / false alarms" for g in groups]
    rows = []
    for name, rule in an.liberal.items():
        cells = []
        for g in groups:
            out = an.liberal_outcomes[g][name]
            cells.append(
                f"{out.count('right')}/{out.judged} / {out.count('on_time')}/{out.count('memorizing')} / "
                f"{out.count('false_alarm')}/{out.count('never')}"
            )
        rows.append([name, rule.describe(), *cells])
    return _join(
        "## 6b. Each signal at its most runs right\n",
        "The rules of section 1 put false alarms first (the target is none). Here each candidate, the LID count and "
        "the loss gap take the setting with the most runs right on the selection seeds, false alarms allowed (then "
        "fewest of them): how far the signal itself goes.\n",
        md_table(header, rows),
        "",
    )


def lid_table_section(an: StudyAnalysis) -> str:
    """The LIDs behind the candidates, per run of the first report seed, at the library's level."""
    seed = min(r.seed for r in an.groups["report"])
    spec = an.defaults.primary_spec
    rows = []
    for r in (r for r in an.groups["report"] if r.seed == seed):
        sig = r.signals[spec]

        def med(name: str, check: int, sig: Mapping[str, np.ndarray] = sig) -> str:
            return _f(float(np.nanmedian(sig[name][check])), 1)

        rows.append([r.dataset, r.n, run_kind(r), _f(r.data_lid[spec], 1), med("lid", 0), med("lid", -1),
                     med("flipd", -1), med("denoising_lid", -1)])  # fmt: skip
    header = ["data", "N", "kind", "data LID", "LID count, first check", "LID count, last", "FLIPD, last",
              "denoising LID, last"]  # fmt: skip
    return _join(
        f"## 8. The LIDs behind the candidates (seed {seed}, {spec})\n",
        "Medians over the probes; the data LID is the LID signal's own (local PCA of the monitor's reservoir at its "
        "first check). On the UNet the LID count is the trace tier's FLIPD.\n",
        md_table(header, rows),
        "",
    )


def cost_section(an: StudyAnalysis) -> str:
    runs = [r for rs in an.groups.values() for r in rs]
    rows = []
    for ds in an.datasets:
        mine = [r for r in runs if r.dataset == ds]
        secs = np.concatenate([r.check_seconds for r in mine])
        rows.append([ds, mine[0].dim, f"{np.median(secs):.2f}", f"{np.max(secs):.2f}"])
    return _join(
        "## 7. Cost of a check\n",
        "Wall time of one check of the study's monitor (sampling, sharpness at every level, ‖H s‖, the LID "
        "signal's denoising LID, the copies' ground truth), one thread, on a CPU shared by two runs. The cost of "
        "each part against the sampling at image scale is `benchmarks/bench_check_cost.py`'s.\n",
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
    if timing.note:
        text += " " + timing.note
    return _join("## Runtime\n", text + "\n")


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
        detection_section(an, figs),
        onset_section(an, figs),
        targets_section(an),
        diagnostics_section(an),
        liberal_section(an),
        cost_section(an),
        lid_table_section(an),
        runtime_section(an, timing, fresh_timing),
    ]
    text = "\n".join(sections)
    (out / "validation.md").write_text(text)
    return text
