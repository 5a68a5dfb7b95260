"""Pure post-processing of recorded runs: labels, ROC statistics, onset rules and their offline
replay, the selection of every free setting on the selection seeds, and the comparisons the
report quotes (per-run outcomes, rescaling stability).

Nothing here trains, draws or writes; every function takes :class:`RunRecord` s (or results of
other functions here) and returns numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from memwatch import MEMORIZED_RATIO, lid
from memwatch.onset import OnsetDetector
from memwatch.signals.lid import DESCRIPTIONS

from .config import (
    BORDERLINE,
    FPRS,
    NEVER,
    NN_ONSET,
    PRIMARY_SIGNAL,
    SIGNALS,
    V22_RULE,
    Defaults,
    StudyConfig,
    library_defaults,
)
from .runs import RunRecord

LIBRARY, V22, SHARP, LID_COUNT, JEON, GAP = (
    "library defaults",
    "v2.2 defaults (sharp fraction)",
    "sharp fraction, tuned",
    "LID count, tuned",
    "Jeon ‖H s‖, tuned",
    "loss gap",
)  # the baselines
RELATIVE, PROFILE, DRAWDOWN, DENOISING = (
    "relative LID",
    "multi-scale profile",
    "LID drawdown",
    "denoising LID",
)  # the candidates: the LID signal's statistics (memwatch.signals.lid.STATISTICS), each tuned
CANDIDATES = {RELATIVE: "relative", PROFILE: "profile", DRAWDOWN: "drawdown", DENOISING: "denoising"}
MEAN_T = "mean"  # the loss gap averaged over the fixed timesteps
ALL_LEVELS = "all"  # the profile's spec: every noise level measured
NOISIEST, HS_SIGNAL = "noisiest", "hessian_score_norm"  # Jeon et al.'s ‖H s‖: its one state, its signal name
HS_RATIOS = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)  # ‖H s‖ thresholds tried, × its median at the run's first check


# ----------------------------------------------------------------------------- labels and signals
def labels(run: RunRecord) -> np.ndarray:
    """``[C, P]`` bool: the NN labels of the probes, memorized when ``d₁/d₂ < 1/3`` to the training set."""
    return run.nn_ratio < MEMORIZED_RATIO


def nn_fraction(run: RunRecord) -> np.ndarray:
    """``[C]`` share of the ``auto`` monitor's probes that are NN-memorized: the run's ground truth."""
    return labels(run).mean(1)


def gt_onset(run: RunRecord) -> int | None:
    """Ground-truth onset: step of the first check with more than ``NN_ONSET`` of its probes
    NN-memorized (``None``: the run never gets there)."""
    hit = np.nonzero(nn_fraction(run) > NN_ONSET)[0]
    return int(run.steps[hit[0]]) if hit.size else None


def run_kind(run: RunRecord) -> str:
    """``"memorizing"`` (a check above ``NN_ONSET``), ``"never"`` (no check above ``NEVER``) or
    ``"borderline"`` (peak between the two)."""
    peak = float(nn_fraction(run).max())
    if peak > BORDERLINE:
        return "memorizing"
    return "never" if peak <= NEVER else "borderline"


def lid_statistic(run: RunRecord, statistic: str, spec: str, baseline_checks: int = 2) -> np.ndarray:
    """``[C, P]`` the LID signal's per-probe ``statistic`` (``memwatch.signals.lid.STATISTICS``) at
    noise level ``spec`` (the profile: every level), computed as the signal computes it at each
    check (:mod:`memwatch.lid`; the drawdown's baseline from the first ``baseline_checks`` checks)."""
    first = next(iter(run.signals)) if spec == ALL_LEVELS else spec
    levels = [first, *(k for k in run.signals if k != first)]  # ``spec`` primary, as the signal's first level
    flipd = {k: torch.from_numpy(run.signals[k]["flipd"]) for k in levels}
    denoising = {k: torch.from_numpy(run.signals[k]["denoising_lid"]) for k in levels}
    early = flipd[first]  # [C, P]; the signal's baseline at check c: its first min(c + 1, baseline_checks) checks
    baseline = torch.stack([lid.baseline_of(early[: min(c + 1, baseline_checks)]) for c in range(early.shape[0])])
    return lid.statistics(flipd, run.data_lid, baseline, denoising=denoising)[statistic].numpy()


def oriented(run: RunRecord, spec: str, signal: str) -> np.ndarray:
    """``[C, P]`` the signal at noise level ``spec``, oriented so that higher = more memorized
    (``HS_SIGNAL``: Jeon et al.'s ‖H s‖ at the noisiest state, ``spec`` ``NOISIEST``; an LID
    statistic of :data:`CANDIDATES`: its ratio negated)."""
    if signal == HS_SIGNAL:
        return run.hessian_score_norm
    if signal in CANDIDATES.values():
        return -lid_statistic(run, signal, spec)
    sign = -1.0 if signal == "denoising_lid" else SIGNALS[signal].sign  # the raw LIDs: lower = more memorized
    return sign * run.signals[spec][signal]


def memorized_fraction(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """``[C]`` share of the finite probes of each check with ``score > score_threshold``
    (``scores`` ``[C, P]``; NaN for a check without finite probes)."""
    ok = np.isfinite(scores)
    frac = np.where(ok, scores > score_threshold, False).sum(1) / np.maximum(ok.sum(1), 1)
    return np.where(ok.any(1), frac, np.nan)


def loss_gap(run: RunRecord, t: str) -> np.ndarray:
    """``[C]`` relative held-out/train gap of the ε-loss, ``(L_held − L_train) / L_train``, at the
    fixed timestep ``t`` (``"50"``) or of the losses averaged over all of them (``MEAN_T``)."""
    if t == MEAN_T:
        held, train = run.loss_held.mean(1), run.loss_train.mean(1)
    else:
        k = int(np.nonzero(run.loss_t == int(t))[0][0])
        held, train = run.loss_held[:, k], run.loss_train[:, k]
    return (held - train) / train


def streak_values(values: np.ndarray, patience: int) -> np.ndarray:
    """``[C]`` the value of the ``patience``-long streak ending at each check (its minimum): what
    the onset detector compares with its threshold."""
    return np.array([np.min(values[max(0, i - patience + 1) : i + 1]) for i in range(len(values))])


# ----------------------------------------------------------------------------- per-probe ROC
@dataclass(frozen=True)
class RocStats:
    """``auroc`` (NaN when a class is absent), ``tpr`` at each FPR of ``FPRS`` (largest TPR with
    FPR ≤ target; no interpolation), ``n_pos`` positives of ``n`` finite probes."""

    auroc: float
    tpr: dict[float, float]
    n_pos: int
    n: int


AurocTable = dict[tuple[str, str, str], RocStats]  # (data set or "all", spec, signal) -> stats


def roc_stats(y: np.ndarray, s: np.ndarray) -> RocStats:
    """ROC statistics of scores ``s`` ``[M]`` (higher = positive) against labels ``y`` ``[M]``;
    non-finite scores are left out."""
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if y.size == 0 or y.all() or not y.any():
        return RocStats(math.nan, {f: math.nan for f in FPRS}, int(y.sum()), int(y.size))
    fpr, tpr, _ = roc_curve(y, s)
    rates = {f: float(tpr[fpr <= f].max()) for f in FPRS}
    return RocStats(float(roc_auc_score(y, s)), rates, int(y.sum()), int(y.size))


def pooled(runs: Sequence[RunRecord], spec: str, signal: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and oriented scores of every probe of every check of ``runs``, flattened."""
    ys = [labels(r).ravel() for r in runs]
    ss = [oriented(r, spec, signal).ravel() for r in runs]
    return np.concatenate(ys), np.concatenate(ss)


def scored_signals(specs: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``(spec, signal)`` the per-probe table scores: the sharpness signals and the LID
    statistics at each level, the profile over all of them, Jeon et al.'s ‖H s‖."""
    per_level = [*SIGNALS, "denoising_lid", "relative", "drawdown", "denoising"]
    return [(spec, sig) for spec in specs for sig in per_level] + [(ALL_LEVELS, "profile"), (NOISIEST, HS_SIGNAL)]


def auroc_table(runs: Sequence[RunRecord], specs: Sequence[str]) -> AurocTable:
    """:func:`roc_stats` per data set (and ``"all"``), noise level and signal, pooled over the checks of all runs."""
    table = {}
    datasets = sorted({r.dataset for r in runs})
    for spec, signal in scored_signals(specs):
        for ds in datasets:
            table[(ds, spec, signal)] = roc_stats(*pooled([r for r in runs if r.dataset == ds], spec, signal))
        table[("all", spec, signal)] = roc_stats(*pooled(runs, spec, signal))
    return table


# ----------------------------------------------------------------------------- onset rules
@dataclass(frozen=True)
class Rule:
    """An onset rule, replayed offline through :class:`memwatch.onset.OnsetDetector` (the
    callback's ``patience`` etc.).

    Attributes:
        kind: ``"sharp"`` (share of probes whose sharp fraction at ``spec`` exceeds
            ``score_threshold``: the v2.2 callback), ``"lid"`` (share whose LID at ``spec`` is below
            ``score_threshold`` dimensions), ``"hs"`` (share whose Jeon et al. ‖H s‖ exceeds
            ``score_threshold`` × its median at the run's first check; ``spec`` ``NOISIEST``),
            ``"gap"`` (the relative ε-loss gap at timestep ``spec``), or one of the LID signal's
            statistics (:data:`CANDIDATES`: share of probes whose ratio is below ``score_threshold``;
            the callback's ``onset.on="lid"``).
        spec: noise level (``"auto 0.1"``; ``ALL_LEVELS`` for the profile) or loss timestep
            (``"50"``, ``MEAN_T``).
        score_threshold: per-probe threshold (a sharp fraction, an LID, a ratio).
        onset_threshold: onset when the monitored value exceeds it at ``patience`` checks in a row.
        patience: checks in a row; ``None``: the callback default's.
    """

    kind: str
    spec: str
    score_threshold: float | None
    onset_threshold: float
    patience: int | None = None

    def patience_of(self, defaults: Defaults) -> int:
        """The rule's patience, else the callback default's."""
        return defaults.patience if self.patience is None else self.patience

    def series(self, run: RunRecord) -> np.ndarray:
        """``[C]`` the value the rule monitors on ``run``."""
        if self.kind == "gap":
            return loss_gap(run, self.spec)
        assert self.score_threshold is not None
        if self.kind == "lid":
            return memorized_fraction(-run.signals[self.spec]["lid"], -self.score_threshold)
        if self.kind == "hs":
            hs = oriented(run, NOISIEST, HS_SIGNAL)
            return memorized_fraction(hs / np.nanmedian(hs[0]), self.score_threshold)
        if self.kind in CANDIDATES.values():
            return memorized_fraction(-lid_statistic(run, self.kind, self.spec), -self.score_threshold)
        return memorized_fraction(run.signals[self.spec][PRIMARY_SIGNAL], self.score_threshold)

    def onset(self, run: RunRecord, defaults: Defaults) -> int | None:
        """The onset step the rule declares on ``run`` (``None``: none)."""
        det = OnsetDetector(
            threshold=self.onset_threshold,
            min_delta=None if self.kind == "gap" else defaults.onset_min_delta,
            baseline_checks=defaults.baseline_checks,
            patience=self.patience_of(defaults),
            min_steps=defaults.min_steps,
        )
        for step, value in zip(run.steps, self.series(run)):
            det.update(int(step), float(value))
        return det.onset_step

    def describe(self) -> str:
        """``"relative LID < 0.3 at auto 0.1, onset > 0.2"``-style summary."""
        onset = f"onset > {self.onset_threshold:g}"
        if self.kind == "gap":
            where = "all loss timesteps" if self.spec == MEAN_T else f"t = {self.spec}"
            return f"ε-loss gap at {where} > {self.onset_threshold:g}"
        if self.kind == "lid":
            return f"LID < {self.score_threshold:g} at {self.spec}, {onset}"
        if self.kind == "hs":
            return f"‖H s‖ > {self.score_threshold:g} × its first-check median, {onset}"
        if self.kind in CANDIDATES.values():
            what = DESCRIPTIONS[self.kind]
            where = "" if self.spec == ALL_LEVELS else f" at {self.spec}"
            return f"{what} < {self.score_threshold:g}{where}, {onset}"
        return f"sharp fraction > {self.score_threshold:g} at {self.spec}, {onset}"


@dataclass(frozen=True)
class OnsetRow:
    """One run under one rule: ``truth`` (NN ground-truth onset), ``onset`` (the rule's), ``peak``
    (highest NN-memorized fraction of any check), ``kind`` (:func:`run_kind`); steps, ``None`` = none."""

    dataset: str
    n: int
    seed: int
    truth: int | None
    onset: int | None
    peak: float
    kind: str

    @property
    def lead(self) -> int | None:
        """``truth - onset`` in steps (positive: the rule earlier); ``None`` unless both exist."""
        return None if (self.truth is None or self.onset is None) else self.truth - self.onset

    @property
    def false_alarm(self) -> bool:
        """An onset on a run that never exceeds ``NEVER`` copies."""
        return self.kind == "never" and self.onset is not None

    @property
    def on_time(self) -> bool:
        """A memorizing run flagged no later than the truth."""
        return self.truth is not None and self.onset is not None and self.onset <= self.truth

    @property
    def right(self) -> bool:
        """On time, or a never-memorizing run never flagged (borderline runs are neither)."""
        return self.on_time or (self.kind == "never" and self.onset is None)


@dataclass
class Outcome:
    """A rule replayed on a set of runs, against the NN truth.

    Attributes:
        rows: one :class:`OnsetRow` per run, in the order of the runs.
        margin: min over never-memorizing runs of ``onset_threshold`` − the highest streak value,
            and over memorizing runs of the streak value at the truth onset − ``onset_threshold``
            (relative to ``onset_threshold`` for the loss gap): the selection's tie-break.
    """

    rows: list[OnsetRow] = field(default_factory=list)
    margin: float = math.inf

    def count(self, what: str) -> int:
        """Rows that are ``what``: ``"memorizing"``, ``"never"``, ``"borderline"`` (kinds), or
        ``"on_time"``, ``"right"``, ``"false_alarm"``, ``"detected"``, ``"borderline_flagged"``."""
        if what in ("memorizing", "never", "borderline"):
            return sum(r.kind == what for r in self.rows)
        if what == "detected":
            return sum(r.kind == "memorizing" and r.onset is not None for r in self.rows)
        if what == "borderline_flagged":
            return sum(r.kind == "borderline" and r.onset is not None for r in self.rows)
        return sum(bool(getattr(r, what)) for r in self.rows)

    @property
    def judged(self) -> int:
        """Runs that can be right: memorizing and never-memorizing ones."""
        return self.count("memorizing") + self.count("never")

    def late(self) -> list[int]:
        """By how many steps each late onset is late, ascending."""
        return sorted(-r.lead for r in self.rows if r.lead is not None and r.lead < 0)

    def leads(self) -> list[int]:
        """Leads of the memorizing runs that have both onsets."""
        return [r.lead for r in self.rows if r.lead is not None]


def evaluate(runs: Sequence[RunRecord], rule: Rule, defaults: Defaults) -> Outcome:
    """Replay ``rule`` on every run and compare with the NN truth."""
    out = Outcome()
    scale = rule.onset_threshold if rule.kind == "gap" else 1.0
    for r in runs:
        row = OnsetRow(
            r.dataset, r.n, r.seed, gt_onset(r), rule.onset(r, defaults), float(nn_fraction(r).max()), run_kind(r)
        )
        out.rows.append(row)
        streak = streak_values(np.nan_to_num(rule.series(r), nan=-np.inf), rule.patience_of(defaults))
        if row.kind == "never":
            out.margin = min(out.margin, (rule.onset_threshold - float(streak.max())) / scale)
        elif row.truth is not None:
            at_truth = int(np.nonzero(r.steps == row.truth)[0][0])
            out.margin = min(out.margin, (float(streak[at_truth]) - rule.onset_threshold) / scale)
    return out


def rule_key(res: Outcome) -> tuple[int, int, int, int, float]:
    """Lexicographic preference: fewest false alarms, then fewest borderline runs flagged, most
    runs right, most memorizing runs flagged, widest margin."""
    return (
        -res.count("false_alarm"),
        -res.count("borderline_flagged"),
        res.count("right"),
        res.count("detected"),
        res.margin,
    )


def choose(runs: Sequence[RunRecord], candidates: Sequence[Rule], defaults: Defaults) -> tuple[Rule, Outcome]:
    """The candidate with the best :func:`rule_key` on ``runs`` (the first of equals wins) and its outcome."""
    scored = [(rule, evaluate(runs, rule, defaults)) for rule in candidates]
    return max(scored, key=lambda ro: rule_key(ro[1]))


def sharp_grid(specs: Sequence[str], cfg: StudyConfig) -> list[Rule]:
    """Every sharp-fraction rule of ``specs`` × ``cfg.score_thresholds`` × ``cfg.onset_thresholds``."""
    return [Rule("sharp", spec, st, ot) for spec in specs for st in cfg.score_thresholds for ot in cfg.onset_thresholds]


def lid_grid(specs: Sequence[str], cfg: StudyConfig) -> list[Rule]:
    """Every LID-count rule of ``specs`` × ``cfg.lid_thresholds`` × ``cfg.onset_thresholds``."""
    return [Rule("lid", spec, lt, ot) for spec in specs for lt in cfg.lid_thresholds for ot in cfg.onset_thresholds]


def ratio_grid(statistic: str, specs: Sequence[str], cfg: StudyConfig) -> list[Rule]:
    """Every rule of an LID statistic: ``specs`` (the profile: all levels) × ``cfg.ratio_thresholds``
    × ``cfg.onset_thresholds``."""
    specs = [ALL_LEVELS] if statistic == "profile" else specs
    thresholds = cfg.ratio_thresholds
    return [Rule(statistic, spec, rt, ot) for spec in specs for rt in thresholds for ot in cfg.onset_thresholds]


def hs_grid(cfg: StudyConfig) -> list[Rule]:
    """Every Jeon et al. ‖H s‖ rule: ``HS_RATIOS`` × ``cfg.onset_thresholds``."""
    return [Rule("hs", NOISIEST, r, ot) for r in HS_RATIOS for ot in cfg.onset_thresholds]


def gap_grid(cfg: StudyConfig) -> list[Rule]:
    """Every loss-gap rule: each fixed timestep and their mean × ``cfg.gap_thresholds``."""
    ts = [str(t) for t in cfg.loss_timesteps] + [MEAN_T]
    return [Rule("gap", t, None, th) for t in ts for th in cfg.gap_thresholds]


def select_rules(sel: Sequence[RunRecord], cfg: StudyConfig, defaults: Defaults) -> dict[str, Rule]:
    """Every rule of the study; the tuned ones chosen on the selection runs ``sel`` only.

    ``LIBRARY``: the library's defaults when analysed (:func:`library_rule`, fixed). Baselines:
    ``V22`` the v2.2 defaults (:data:`config.V22_RULE`, fixed: sharp fraction at the
    calibrated level); ``SHARP`` the same signal with factor and thresholds tuned; ``LID_COUNT``
    an LID threshold in dimensions, tuned; ``JEON`` Jeon et al.'s ‖H s‖ against its own first
    check, tuned; ``GAP`` the loss gap, timestep and threshold tuned. Candidates: each statistic
    of the LID signal (:data:`CANDIDATES`), noise level and both thresholds tuned.
    """
    specs = cfg.auto_specs()
    rules = {LIBRARY: library_rule(defaults), V22: Rule("sharp", *V22_RULE)}
    rules[SHARP] = choose(sel, sharp_grid(specs, cfg), defaults)[0]
    rules[LID_COUNT] = choose(sel, lid_grid(specs, cfg), defaults)[0]
    rules[JEON] = choose(sel, hs_grid(cfg), defaults)[0]
    rules[GAP] = choose(sel, gap_grid(cfg), defaults)[0]
    for name, statistic in CANDIDATES.items():
        rules[name] = choose(sel, ratio_grid(statistic, specs, cfg), defaults)[0]
    return rules


def most_right(sel: Sequence[RunRecord], cfg: StudyConfig, defaults: Defaults) -> dict[str, Rule]:
    """Each candidate, the LID count and the loss gap at the setting with the most runs right on
    the selection runs, false alarms allowed (then fewest of them): how far each signal can go
    when the 0-false-alarm priority of :func:`rule_key` is dropped."""
    specs = cfg.auto_specs()
    grids = {name: ratio_grid(stat, specs, cfg) for name, stat in CANDIDATES.items()}
    grids.update({LID_COUNT: lid_grid(specs, cfg), GAP: gap_grid(cfg)})

    def key(ro: tuple[Rule, Outcome]) -> tuple[int, int]:
        return (ro[1].count("right"), -ro[1].count("false_alarm"))

    return {name: max(((r, evaluate(sel, r, defaults)) for r in grid), key=key)[0] for name, grid in grids.items()}


def library_rule(defaults: Defaults) -> Rule:
    """The library's default onset rule as a study :class:`Rule` (its primary calibrated level)."""
    threshold = float(defaults.onset_threshold or 0.0)
    if defaults.onset_on == "lid" and defaults.lid_statistic == "count":  # the LID itself: the LID-count rule
        return Rule("lid", defaults.primary_spec, defaults.lid_count_threshold, threshold)
    if defaults.onset_on == "lid":
        spec = ALL_LEVELS if defaults.lid_statistic == "profile" else defaults.primary_spec
        return Rule(defaults.lid_statistic, spec, defaults.lid_ratio_threshold, threshold)
    return Rule("sharp", defaults.primary_spec, defaults.score_threshold, threshold)


def best_candidate(outcomes: dict[str, Outcome]) -> str:
    """The candidate (of :data:`CANDIDATES`) with the best :func:`rule_key` on the selection runs."""
    return max(CANDIDATES, key=lambda name: rule_key(outcomes[name]))


# ----------------------------------------------------------------------------- the whole study
@dataclass(frozen=True)
class StudyAnalysis:
    """The study analysed: every choice on ``groups["selection"]``, evaluation on the others.

    Attributes:
        cfg, defaults: the study and the library's defaults when it is analysed (the runs keep
            theirs as ``RunRecord.shipped``).
        datasets: sorted data-set names.
        groups: ``"selection"``, ``"report"`` and (when given) ``"fresh"`` -> their runs.
        rules: rule name -> :class:`Rule` (see :func:`select_rules`).
        winner: the candidate chosen on the selection runs (:func:`best_candidate`).
        outcomes: group -> rule name -> :class:`Outcome`.
        liberal: :func:`most_right`'s rules; liberal_outcomes: group -> their outcomes.
        aurocs: group -> :class:`AurocTable` over every noise level measured.
    """

    cfg: StudyConfig
    defaults: Defaults
    datasets: list[str]
    groups: dict[str, list[RunRecord]]
    rules: dict[str, Rule]
    winner: str
    outcomes: dict[str, dict[str, Outcome]]
    aurocs: dict[str, AurocTable]
    liberal: dict[str, Rule]
    liberal_outcomes: dict[str, dict[str, Outcome]]

    def seeds(self, group: str) -> str:
        """``"seed 0"`` / ``"seeds 1, 2"``: the seeds of a group."""
        seeds = sorted({r.seed for r in self.groups[group]})
        return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))

    @property
    def specs(self) -> list[str]:
        """Every noise level measured."""
        return list(self.groups["selection"][0].signals)

    @property
    def every(self) -> int:
        """The check cadence (all data sets share it)."""
        return self.cfg.data[0].every

    def auroc(self, group: str, rule: Rule) -> RocStats | None:
        """Pooled per-probe statistics of the rule's per-probe score (``None`` for the loss gap: a run-level signal)."""
        signal = {"sharp": PRIMARY_SIGNAL, "lid": "lid", "hs": HS_SIGNAL}.get(rule.kind, rule.kind)
        return None if rule.kind == "gap" else self.aurocs[group][("all", rule.spec, signal)]


def analyse(runs: list[RunRecord], cfg: StudyConfig, fresh: Sequence[RunRecord] = ()) -> StudyAnalysis:
    """Choose on the selection seeds of ``cfg``, replay everything on the report seeds and on ``fresh``."""
    defaults = library_defaults()
    groups = {
        "selection": [r for r in runs if r.seed in cfg.select_seeds],
        "report": [r for r in runs if r.seed not in cfg.select_seeds],
    }
    if fresh:
        groups["fresh"] = list(fresh)
    groups = {g: rs for g, rs in groups.items() if rs}
    rules = select_rules(groups["selection"], cfg, defaults)
    specs = list(runs[0].signals)
    outcomes = {g: {name: evaluate(rs, rule, defaults) for name, rule in rules.items()} for g, rs in groups.items()}
    liberal = most_right(groups["selection"], cfg, defaults)
    return StudyAnalysis(
        cfg=cfg,
        defaults=defaults,
        datasets=sorted({r.dataset for r in [*runs, *fresh]}),
        groups=groups,
        rules=rules,
        winner=best_candidate(outcomes["selection"]),
        outcomes=outcomes,
        aurocs={g: auroc_table(rs, specs) for g, rs in groups.items()},
        liberal=liberal,
        liberal_outcomes={g: {n: evaluate(rs, r, defaults) for n, r in liberal.items()} for g, rs in groups.items()},
    )
