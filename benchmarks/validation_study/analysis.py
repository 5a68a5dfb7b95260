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
from sklearn.metrics import roc_auc_score, roc_curve

from memwatch import MEMORIZED_RATIO
from memwatch.onset import OnsetDetector

from .config import (
    ABSOLUTE_RULE,
    ABSOLUTE_SPEC,
    BORDERLINE,
    FPRS,
    NEVER,
    NN_ONSET,
    PRIMARY_SIGNAL,
    SCALED,
    SIGNALS,
    Defaults,
    StudyConfig,
    library_defaults,
)
from .runs import RunRecord

TODAY, TRACE, AUTO_TODAY, ABS_TUNED, AUTO, LID, JEON, COPIES, COPIES_TUNED, EITHER, GAP = (
    "absolute σ",
    "absolute σ, trace tier",
    "library defaults",
    "absolute, tuned",
    "auto, tuned",
    "LID, tuned",
    "Jeon ‖H s‖, tuned",
    "copies of the batches",
    "copies, tuned",
    "sharp or copy",
    "loss gap",
)  # the rules compared, in the report's order
MEAN_T = "mean"  # the loss gap averaged over the fixed timesteps
NOISIEST, HS_SIGNAL = "noisiest", "hessian_score_norm"  # Jeon et al.'s ‖H s‖: its one state, its signal name
HS_RATIOS = (1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)  # ‖H s‖ thresholds tried, × its median at the run's first check
COPY_PATIENCES = (1, 2)  # a copy is observed, not inferred: the copy rule may also act on one check


# ----------------------------------------------------------------------------- labels and signals
def copy_ratios(run: RunRecord, spec: str) -> np.ndarray:
    """``[C, P]`` the ``d₁/d₂`` of the probes of the monitor that measured ``spec``: the ``auto``
    monitor's to the training set (the truth's probes), the absolute monitor's to the training
    samples it saw itself (``reference_data="batches"``; the trace monitor shares its probes)."""
    return run.nn_ratio_abs if spec.startswith(("abs", "trace")) else run.nn_ratio


def labels(run: RunRecord, spec: str = "auto") -> np.ndarray:
    """``[C, P]`` bool: the NN labels of the probes measured at ``spec`` (:func:`copy_ratios`),
    memorized when ``d₁/d₂ < 1/3``."""
    return copy_ratios(run, spec) < MEMORIZED_RATIO


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


def oriented(run: RunRecord, spec: str, signal: str) -> np.ndarray:
    """``[C, P]`` the signal at noise level ``spec``, oriented so that higher = more memorized
    (``HS_SIGNAL``: Jeon et al.'s ‖H s‖ at the noisiest state, ``spec`` ``NOISIEST``)."""
    if signal == HS_SIGNAL:
        assert run.hessian_score_norm is not None
        return run.hessian_score_norm
    return SIGNALS[signal].sign * run.signals[spec][signal]


def memorized_fraction(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """``[C]`` share of the finite probes of each check with ``score > score_threshold``
    (``scores`` ``[C, P]``; NaN for a check without finite probes)."""
    ok = np.isfinite(scores)
    frac = np.where(ok, scores > score_threshold, False).sum(1) / np.maximum(ok.sum(1), 1)
    return np.where(ok.any(1), frac, np.nan)


def flagged_fraction(sharp: np.ndarray, ratio: np.ndarray, score_threshold: float) -> np.ndarray:
    """``[C]`` share of the probes that are sharp (``sharp > score_threshold``) or copies
    (``ratio < 1/3``), among probes with both values finite; NaN for a check without any."""
    ok = np.isfinite(sharp) & np.isfinite(ratio)
    hit = ok & ((sharp > score_threshold) | (ratio < MEMORIZED_RATIO))
    return np.where(ok.any(1), hit.sum(1) / np.maximum(ok.sum(1), 1), np.nan)


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
    ys = [labels(r, spec).ravel() for r in runs]
    ss = [oriented(r, spec, signal).ravel() for r in runs]
    return np.concatenate(ys), np.concatenate(ss)


def auroc_table(runs: Sequence[RunRecord], specs: Sequence[str]) -> AurocTable:
    """:func:`roc_stats` per data set (and ``"all"``), noise level and signal, pooled over the checks of all runs."""
    table = {}
    datasets = sorted({r.dataset for r in runs})
    for spec in specs:
        for signal in SIGNALS:
            for ds in datasets:
                table[(ds, spec, signal)] = roc_stats(*pooled([r for r in runs if r.dataset == ds], spec, signal))
            table[("all", spec, signal)] = roc_stats(*pooled(runs, spec, signal))
    if all(r.hessian_score_norm is not None for r in runs):
        for ds in datasets:
            table[(ds, NOISIEST, HS_SIGNAL)] = roc_stats(
                *pooled([r for r in runs if r.dataset == ds], NOISIEST, HS_SIGNAL)
            )
        table[("all", NOISIEST, HS_SIGNAL)] = roc_stats(*pooled(runs, NOISIEST, HS_SIGNAL))
    return table


# ----------------------------------------------------------------------------- onset rules
@dataclass(frozen=True)
class Rule:
    """An onset rule, replayed offline through :class:`memwatch.onset.OnsetDetector` (the
    callback's ``patience`` etc.).

    Attributes:
        kind: ``"sharp"`` (share of probes whose sharp fraction at ``spec`` exceeds
            ``score_threshold``), ``"lid"`` (share of probes whose LID at ``spec`` is below
            ``score_threshold``, in dimensions: a threshold that does not scale with ``d``),
            ``"hs"`` (share of probes whose Jeon et al. ‖H s‖ exceeds ``score_threshold`` × its
            median at the run's first check: the run's own early baseline; ``spec`` ``NOISIEST``),
            ``"copies"`` (share of the ``spec`` monitor's probes with ``d₁/d₂ < 1/3``: the
            callback's ``onset_on="copies"``), ``"either"`` (sharp or a copy: ``onset_on="either"``)
            or ``"gap"`` (the relative ε-loss gap at timestep ``spec``).
        spec: noise level (``"abs 0.3"``, ``"auto 0.1"``) or loss timestep (``"50"``, ``MEAN_T``).
        score_threshold: per-probe threshold (``"sharp"``, ``"either"``: a sharp fraction;
            ``"lid"``: an LID).
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
        if self.kind == "copies":
            return memorized_fraction(-copy_ratios(run, self.spec), -MEMORIZED_RATIO)
        assert self.score_threshold is not None
        if self.kind == "lid":
            return memorized_fraction(-run.signals[self.spec]["lid"], -self.score_threshold)
        if self.kind == "hs":
            hs = oriented(run, NOISIEST, HS_SIGNAL)
            return memorized_fraction(hs / np.nanmedian(hs[0]), self.score_threshold)
        sharp = run.signals[self.spec][PRIMARY_SIGNAL]
        if self.kind == "either":
            return flagged_fraction(sharp, copy_ratios(run, self.spec), self.score_threshold)
        return memorized_fraction(sharp, self.score_threshold)

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
        """``"sharp fraction > 0.9 at abs 0.3, onset > 0.2"``-style summary."""
        if self.kind == "gap":
            where = "all loss timesteps" if self.spec == MEAN_T else f"t = {self.spec}"
            return f"ε-loss gap at {where} > {self.onset_threshold:g}"
        if self.kind == "copies":
            return f"copies (d₁/d₂ < 1/3 to the batches seen), onset > {self.onset_threshold:g}" + (
                "" if self.patience is None else f", patience {self.patience}"
            )
        if self.kind == "lid":
            return f"LID < {self.score_threshold:g} at {self.spec}, onset > {self.onset_threshold:g}"
        if self.kind == "hs":
            return f"‖H s‖ > {self.score_threshold:g} × its first-check median, onset > {self.onset_threshold:g}"
        sharp = f"sharp fraction > {self.score_threshold:g} at {self.spec}"
        if self.kind == "either":
            return f"{sharp} or a copy of the batches seen, onset > {self.onset_threshold:g}"
        return f"{sharp}, onset > {self.onset_threshold:g}"


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
    """Every LID rule of ``specs`` × ``cfg.lid_thresholds`` × ``cfg.onset_thresholds``."""
    return [Rule("lid", spec, lt, ot) for spec in specs for lt in cfg.lid_thresholds for ot in cfg.onset_thresholds]


def hs_grid(cfg: StudyConfig) -> list[Rule]:
    """Every Jeon et al. ‖H s‖ rule: ``HS_RATIOS`` × ``cfg.onset_thresholds``."""
    return [Rule("hs", NOISIEST, r, ot) for r in HS_RATIOS for ot in cfg.onset_thresholds]


def gap_grid(cfg: StudyConfig) -> list[Rule]:
    """Every loss-gap rule: each fixed timestep and their mean × ``cfg.gap_thresholds``."""
    ts = [str(t) for t in cfg.loss_timesteps] + [MEAN_T]
    return [Rule("gap", t, None, th) for t in ts for th in cfg.gap_thresholds]


def select_rules(sel: Sequence[RunRecord], cfg: StudyConfig, defaults: Defaults) -> dict[str, Rule]:
    """Every rule of the study; the tuned ones chosen on the selection runs ``sel`` only.

    * ``TODAY``: the fixed absolute rule :data:`config.ABSOLUTE_RULE` (the library's former
      defaults);
    * ``TRACE``: the same, measured by the cheap trace tier on the same probes (fixed; when measured);
    * ``AUTO_TODAY``: the library's defaults (``defaults``: ``sigmas="auto"`` at its first
      factor and its thresholds; fixed; only when that factor is measured);
    * ``ABS_TUNED``: the shipped absolute level, both thresholds tuned;
    * ``AUTO``: factor and both thresholds tuned;
    * ``LID``: an LID threshold instead of a sharp-fraction one (not a callback option), noise
      level (absolute or any factor) and both thresholds tuned;
    * ``JEON``: Jeon et al.'s ‖H s‖ (the monitor's ``hessian_score_norm``) against its own
      first check, both thresholds tuned (when recorded: cache format 5);
    * ``COPIES``: ``reference_data="batches"``, ``onset_on="copies"``, the absolute rule's onset threshold (fixed);
    * ``COPIES_TUNED``: the same, onset threshold and patience (``COPY_PATIENCES``) tuned;
    * ``EITHER``: ``onset_on="either"`` with the absolute rule (fixed);
    * ``GAP``: the loss-gap baseline, timestep and threshold tuned.
    """
    abs_spec, score, onset = ABSOLUTE_SPEC, ABSOLUTE_RULE["score_threshold"], ABSOLUTE_RULE["onset_threshold"]
    rules = {TODAY: Rule("sharp", abs_spec, score, onset)}
    trace_spec = abs_spec.replace("abs", "trace")
    if trace_spec in sel[0].signals:
        rules[TRACE] = Rule("sharp", trace_spec, score, onset)
    auto_spec = f"auto {float(defaults.sigma_factors[0]):g}"
    if defaults.sigmas == ("auto",) and auto_spec in cfg.auto_specs():
        rules[AUTO_TODAY] = Rule("sharp", auto_spec, defaults.score_threshold, float(defaults.onset_threshold or 0.0))
    rules[ABS_TUNED] = choose(sel, sharp_grid([abs_spec], cfg), defaults)[0]
    rules[AUTO] = choose(sel, sharp_grid(cfg.auto_specs(), cfg), defaults)[0]
    rules[LID] = choose(sel, lid_grid([abs_spec, *cfg.auto_specs()], cfg), defaults)[0]
    if all(r.hessian_score_norm is not None for r in sel):
        rules[JEON] = choose(sel, hs_grid(cfg), defaults)[0]
    rules[COPIES] = Rule("copies", abs_spec, None, onset)
    copy_grid = [Rule("copies", abs_spec, None, t, p) for p in COPY_PATIENCES for t in cfg.onset_thresholds]
    rules[COPIES_TUNED] = choose(sel, copy_grid, defaults)[0]
    rules[EITHER] = Rule("either", abs_spec, score, onset)
    rules[GAP] = choose(sel, gap_grid(cfg), defaults)[0]
    return rules


def replay_agreement(runs: Sequence[RunRecord], rule: Rule) -> int:
    """Runs on which ``rule`` (the absolute noise level) replayed offline puts the onset exactly
    where the absolute monitor itself declared it during training."""
    return sum(rule.onset(r, r.shipped) == r.shipped_onset for r in runs)


# ----------------------------------------------------------------------------- rescaling
@dataclass(frozen=True)
class RescaleRow:
    """One digits run (``n``, ``seed``) against its rescaled copy ``variant``: the rule's onsets
    and the truth's, base first."""

    n: int
    seed: int
    variant: str
    base_onset: int | None
    onset: int | None
    base_truth: int | None
    truth: int | None


def checks_apart(a: int | None, b: int | None, every: int) -> float:
    """``|a − b|`` in checks; 0 when neither exists, ``inf`` when only one does."""
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    return abs(a - b) / every


def rescale_rows(runs: Sequence[RunRecord], rule: Rule, defaults: Defaults) -> list[RescaleRow]:
    """Every digits run that has a rescaled copy in ``runs`` (same N and seed): one row per copy."""
    by_key = {r.key: r for r in runs}
    rows = []
    for (name, n, seed), scaled in sorted(by_key.items()):
        base = by_key.get((SCALED[name][0], n, seed)) if name in SCALED else None
        if base is not None:
            rows.append(
                RescaleRow(
                    n,
                    seed,
                    name,
                    rule.onset(base, defaults),
                    rule.onset(scaled, defaults),
                    gt_onset(base),
                    gt_onset(scaled),
                )
            )
    return rows


def rescale_summary(rows: Sequence[RescaleRow], every: int) -> tuple[int, int, float]:
    """``(within one check, pairs, largest change in checks)`` of the rule's onsets under rescaling."""
    changes = [checks_apart(r.base_onset, r.onset, every) for r in rows]
    return sum(c <= 1 for c in changes), len(changes), max(changes, default=math.nan)


# ----------------------------------------------------------------------------- the whole study
@dataclass(frozen=True)
class StudyAnalysis:
    """The study analysed: every choice on ``groups["selection"]``, evaluation on the others.

    Attributes:
        cfg, defaults: the study and the library's defaults when it is analysed (the runs keep
            theirs as ``RunRecord.shipped``; the fixed absolute rule does not depend on either).
        datasets: sorted data-set names.
        groups: ``"selection"``, ``"report"`` and (when given) ``"fresh"`` -> their runs.
        rules: rule name -> :class:`Rule` (see :func:`select_rules`).
        outcomes: group -> rule name -> :class:`Outcome`.
        aurocs: group -> :class:`AurocTable` over every noise level measured.
        replayed: runs (all groups) whose own absolute-default onset the replay reproduces.
    """

    cfg: StudyConfig
    defaults: Defaults
    datasets: list[str]
    groups: dict[str, list[RunRecord]]
    rules: dict[str, Rule]
    outcomes: dict[str, dict[str, Outcome]]
    aurocs: dict[str, AurocTable]
    replayed: int

    def seeds(self, group: str) -> str:
        """``"seed 0"`` / ``"seeds 1, 2"``: the seeds of a group."""
        seeds = sorted({r.seed for r in self.groups[group]})
        return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))

    @property
    def specs(self) -> list[str]:
        """Every noise level measured, absolute first."""
        return list(self.groups["selection"][0].signals)

    @property
    def every(self) -> int:
        """The check cadence (all data sets share it)."""
        return self.cfg.data[0].every

    def two_tier_runs(self, group: str) -> list[RunRecord]:
        """The runs of ``group`` whose absolute and trace rules are two measurements (dense and
        trace tier): every run but the UNet's, which measure on the trace tier only."""
        unet = {d.name for d in self.cfg.data if d.model == "unet"}
        return [r for r in self.groups[group] if r.dataset not in unet]

    def auroc(self, group: str, rule: Rule) -> RocStats | None:
        """Pooled per-probe statistics of the rule's per-probe score (``None`` for the loss gap and
        the copy rules: their probes are not the truth's)."""
        signal = {"sharp": PRIMARY_SIGNAL, "lid": "lid", "hs": HS_SIGNAL}.get(rule.kind)
        return None if signal is None else self.aurocs[group][("all", rule.spec, signal)]


def analyse(runs: list[RunRecord], cfg: StudyConfig, fresh: Sequence[RunRecord] = ()) -> StudyAnalysis:
    """Choose on the selection seeds of ``cfg``, replay everything on the report seeds and on ``fresh``."""
    defaults = library_defaults()  # today's, which the report calls the library's defaults
    groups = {
        "selection": [r for r in runs if r.seed in cfg.select_seeds],
        "report": [r for r in runs if r.seed not in cfg.select_seeds],
    }
    if fresh:
        groups["fresh"] = list(fresh)
    groups = {g: rs for g, rs in groups.items() if rs}
    rules = select_rules(groups["selection"], cfg, defaults)
    specs = list(runs[0].signals)
    every_run = [*runs, *fresh]
    return StudyAnalysis(
        cfg=cfg,
        defaults=defaults,
        datasets=sorted({r.dataset for r in every_run}),
        groups=groups,
        rules=rules,
        outcomes={g: {name: evaluate(rs, rule, defaults) for name, rule in rules.items()} for g, rs in groups.items()},
        aurocs={g: auroc_table(rs, specs) for g, rs in groups.items()},
        replayed=replay_agreement(every_run, rules[TODAY]),
    )
