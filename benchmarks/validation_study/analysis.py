"""Pure post-processing of recorded runs: labels, ROC statistics, the offline onset replay, the
selection of noise level and thresholds, and the diagnostics the report quotes.

Nothing here trains, draws or writes; every function takes :class:`RunRecord` s (or results of
other functions here) and returns numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from memwatch import MEMORIZED_RATIO
from memwatch.onset import OnsetDetector

from .config import ALTERNATIVE_SIGNAL, FPRS, NN_ONSET, PRIMARY_SIGNAL, SIGNALS, Defaults, StudyConfig
from .runs import RunRecord

RECOMMENDED, ABSOLUTE, ALTERNATIVE = "recommended", "absolute σ only", "alternative"  # the rules of section 2


# ----------------------------------------------------------------------------- labels and signals
def labels(run: RunRecord) -> np.ndarray:
    """``[C, P]`` bool: the NN ground truth, probe memorized when ``d₁/d₂ < 1/3``."""
    return run.nn_ratio < MEMORIZED_RATIO


def gt_onset(run: RunRecord) -> int | None:
    """Ground-truth onset: step of the first check with more than ``NN_ONSET`` of its probes
    NN-memorized (``None``: the run never memorizes)."""
    hit = np.nonzero(labels(run).mean(1) > NN_ONSET)[0]
    return int(run.steps[hit[0]]) if hit.size else None


def oriented(run: RunRecord, spec: str, signal: str) -> np.ndarray:
    """``[C, P]`` the signal at noise level ``spec``, oriented so that higher = more memorized."""
    return SIGNALS[signal].sign * run.signals[spec][signal]


def memorized_fraction(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """``[C]`` share of the finite probes of each check with ``score > score_threshold``
    (``scores`` ``[C, P]``; 0 for a check without finite probes)."""
    ok = np.isfinite(scores)
    return np.where(ok, scores > score_threshold, False).sum(1) / np.maximum(ok.sum(1), 1)


def streak_values(frac: np.ndarray, patience: int) -> np.ndarray:
    """``[C]`` the value of the ``patience``-long streak ending at each check (its minimum): what
    the onset detector compares with ``onset_threshold``."""
    return np.array([frac[max(0, i - patience + 1) : i + 1].min() for i in range(len(frac))])


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


def auroc_table(runs: Sequence[RunRecord], specs: Sequence[str]) -> AurocTable:
    """:func:`roc_stats` per data set (and ``"all"``), noise level and signal, pooled over the checks of all runs."""
    table = {}
    datasets = sorted({r.dataset for r in runs})
    for spec in specs:
        for signal in SIGNALS:
            for ds in datasets:
                table[(ds, spec, signal)] = roc_stats(*pooled([r for r in runs if r.dataset == ds], spec, signal))
            table[("all", spec, signal)] = roc_stats(*pooled(runs, spec, signal))
    return table


def macro(table: AurocTable, datasets: Sequence[str], spec: str, signal: str) -> float:
    """Mean AUROC over ``datasets`` (the finite ones; NaN if none is)."""
    vals = [table[(ds, spec, signal)].auroc for ds in datasets]
    vals = [v for v in vals if math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


def nan_low(x: float) -> float:
    """``x``, or ``-inf`` when it is not finite (so NaN never wins a ``max``)."""
    return x if math.isfinite(x) else -math.inf


# ----------------------------------------------------------------------------- onset replay
def replay_onset(
    steps: np.ndarray, scores: np.ndarray, score_threshold: float, onset_threshold: float, defaults: Defaults
) -> int | None:
    """The onset the callback would declare: ``memorized_fraction`` = share of finite probes with
    ``score > score_threshold`` per check (``scores`` ``[C, P]``), through an
    :class:`memwatch.onset.OnsetDetector` with ``onset_threshold`` and the rest of ``defaults``."""
    det = OnsetDetector(
        threshold=onset_threshold,
        min_delta=defaults.onset_min_delta,
        baseline_checks=defaults.baseline_checks,
        patience=defaults.patience,
        min_steps=defaults.min_steps,
        monitor="memorized_fraction",
    )
    for step, row in zip(steps, scores):
        ok = np.isfinite(row)
        frac = float((row[ok] > score_threshold).mean()) if ok.any() else math.nan
        det.update(int(step), frac)
    return det.onset_step


def replay_agreement(runs: Sequence[RunRecord]) -> int:
    """How many runs the offline replay of the callback's own rule (its settings in each run, its
    primary score) puts the onset exactly where the callback itself declared it."""
    return sum(
        replay_onset(r.steps, r.shipped_primary_score, r.shipped.score_threshold, r.shipped.onset_threshold, r.shipped)
        == r.shipped_onset
        for r in runs
    )


@dataclass(frozen=True)
class OnsetRow:
    """One run under one onset rule: ``truth`` (NN ground-truth onset), ``onset`` (the rule's),
    ``shipped_onset`` (the callback's own during training), ``max_nn`` (highest NN-memorized
    fraction of any check); steps, ``None`` = none."""

    dataset: str
    n: int
    seed: int
    truth: int | None
    onset: int | None
    shipped_onset: int | None
    max_nn: float

    @property
    def lead(self) -> int | None:
        """``truth - onset`` in steps (positive: memwatch earlier); ``None`` unless both exist."""
        return None if (self.truth is None or self.onset is None) else self.truth - self.onset

    @property
    def false_alarm(self) -> bool:
        """An onset on a run that never memorizes."""
        return self.truth is None and self.onset is not None


@dataclass
class OnsetOutcome:
    """An onset rule replayed on a set of runs, against the NN truth.

    Attributes:
        rows: one :class:`OnsetRow` per run, in the order of the runs.
        false_alarms, never: runs with an onset among those that never memorize, and their number.
        on_time, detected, memorizing: memorizing runs flagged no later than the truth, flagged at
            all, and their number.
        margin: min over never-memorizing runs of ``onset_threshold`` − the highest streak value.
        det_margin: min over memorizing runs of the streak value at the truth onset − ``onset_threshold``.
    """

    rows: list[OnsetRow] = field(default_factory=list)
    false_alarms: int = 0
    never: int = 0
    memorizing: int = 0
    on_time: int = 0
    detected: int = 0
    margin: float = math.inf
    det_margin: float = math.inf

    def alarms(self) -> list[OnsetRow]:
        """The false alarms."""
        return [r for r in self.rows if r.false_alarm]

    def late(self) -> list[int]:
        """By how many steps each late onset is late, ascending."""
        return sorted(-r.lead for r in self.rows if r.lead is not None and r.lead < 0)

    def missed(self) -> int:
        """Memorizing runs the rule never flags."""
        return sum(r.truth is not None and r.onset is None for r in self.rows)

    def leads(self) -> list[int]:
        """Leads of the runs that have both onsets."""
        return [r.lead for r in self.rows if r.lead is not None]


def evaluate_onsets(
    runs: Sequence[RunRecord],
    spec: str,
    score_threshold: float,
    onset_threshold: float,
    defaults: Defaults,
    signal: str = PRIMARY_SIGNAL,
) -> OnsetOutcome:
    """Replay the onset rule on every run: a probe counts as memorized when its oriented ``signal``
    at ``spec`` exceeds ``score_threshold``; compare with the NN truth."""
    out = OnsetOutcome()
    for r in runs:
        scores = oriented(r, spec, signal)
        row = OnsetRow(
            r.dataset,
            r.n,
            r.seed,
            truth=gt_onset(r),
            onset=replay_onset(r.steps, scores, score_threshold, onset_threshold, defaults),
            shipped_onset=r.shipped_onset,
            max_nn=float(labels(r).mean(1).max()),
        )
        out.rows.append(row)
        streak = streak_values(memorized_fraction(scores, score_threshold), defaults.patience)
        if row.truth is None:
            out.never += 1
            out.false_alarms += row.onset is not None
            out.margin = min(out.margin, onset_threshold - float(streak.max()))
        else:
            at_truth = int(np.nonzero(r.steps == row.truth)[0][0])
            out.det_margin = min(out.det_margin, float(streak[at_truth]) - onset_threshold)
            out.memorizing += 1
            out.detected += row.onset is not None
            out.on_time += row.onset is not None and row.onset <= row.truth
    return out


# ----------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class Rule:
    """An onset rule: ``signal`` > ``score_threshold`` at noise level ``spec`` per probe, onset when
    more than ``onset_threshold`` of the probes are; ``selection``: its outcome on the runs it was
    chosen on (``None`` for a rule that was not chosen here)."""

    signal: str
    spec: str
    score_threshold: float
    onset_threshold: float | None
    selection: OnsetOutcome | None = None


def rule_key(res: OnsetOutcome) -> tuple[int, int, int, float]:
    """Lexicographic preference: fewest false alarms, most on time, most detected, widest margin
    on both sides (the smaller of the false-alarm and the detection margin)."""
    return (-res.false_alarms, res.on_time, res.detected, min(res.margin, res.det_margin))


def _selection_key(rule: Rule) -> tuple[int, int, int, float]:
    assert rule.selection is not None
    return rule_key(rule.selection)


def choose_thresholds(
    runs: Sequence[RunRecord], spec: str, defaults: Defaults, cfg: StudyConfig, signal: str = PRIMARY_SIGNAL
) -> Rule:
    """Grid search over ``cfg.score_thresholds[signal]`` × ``cfg.onset_thresholds`` at ``spec``
    by :func:`rule_key` (the first of equals wins)."""
    rules = (
        Rule(signal, spec, st, ot, evaluate_onsets(runs, spec, st, ot, defaults, signal))
        for st in cfg.score_thresholds[signal]
        for ot in cfg.onset_thresholds
    )
    return max(rules, key=_selection_key)


def choose_rule(
    runs: Sequence[RunRecord], specs: Sequence[str], defaults: Defaults, cfg: StudyConfig, signal: str = PRIMARY_SIGNAL
) -> Rule:
    """The noise level and both thresholds, jointly, by the key of :func:`rule_key` (the first of equals wins)."""
    return max((choose_thresholds(runs, spec, defaults, cfg, signal) for spec in specs), key=_selection_key)


@dataclass(frozen=True)
class Selection:
    """What is chosen on the selection seeds.

    Attributes:
        best_spec: signal -> the noise level of its highest mean AUROC.
        best_abs: the absolute noise level of the primary signal's highest mean AUROC.
        best_signal: the signal with the highest mean AUROC at its ``best_spec``.
        rules: ``RECOMMENDED`` (primary signal, any level), ``ABSOLUTE`` (primary signal,
            absolute levels only), ``ALTERNATIVE`` (``ALTERNATIVE_SIGNAL``, any level).
    """

    best_spec: dict[str, str]
    best_abs: str
    best_signal: str
    rules: dict[str, Rule]


def select(
    sel: Sequence[RunRecord], table: AurocTable, datasets: Sequence[str], cfg: StudyConfig, defaults: Defaults
) -> Selection:
    """Every choice of the study, made on the selection runs ``sel`` (``table``: their AUROC table)."""
    specs, abs_specs = cfg.specs(), cfg.abs_specs()

    def best(candidates: Sequence[str], signal: str) -> str:
        return max(candidates, key=lambda sp: nan_low(macro(table, datasets, sp, signal)))

    best_spec = {s: best(specs, s) for s in SIGNALS}
    return Selection(
        best_spec=best_spec,
        best_abs=best(abs_specs, PRIMARY_SIGNAL),
        best_signal=max(SIGNALS, key=lambda s: nan_low(macro(table, datasets, best_spec[s], s))),
        rules={
            RECOMMENDED: choose_rule(sel, specs, defaults, cfg),
            ABSOLUTE: choose_rule(sel, abs_specs, defaults, cfg),
            ALTERNATIVE: choose_rule(sel, specs, defaults, cfg, ALTERNATIVE_SIGNAL),
        },
    )


# ----------------------------------------------------------------------------- the whole study
@dataclass(frozen=True)
class StudyAnalysis:
    """The study analysed: selection on ``sel`` (the selection seeds), evaluation on ``rep``.

    Attributes:
        cfg, runs, defaults: the study, all its runs, the callback defaults they were made with.
        datasets: sorted data-set names.
        sel, rep: the runs of the selection seeds and of the report seeds.
        t_sel, t_rep: their AUROC tables.
        selection: the choices (on ``sel``).
        outcomes: rule name -> the rule replayed on ``rep``.
        shipped_outcome: the shipped rule replayed on ``rep`` (``None`` if its level was not measured).
        replayed: runs whose callback onset the offline replay reproduces exactly.
    """

    cfg: StudyConfig
    runs: list[RunRecord]
    defaults: Defaults
    datasets: list[str]
    sel: list[RunRecord]
    rep: list[RunRecord]
    t_sel: AurocTable
    t_rep: AurocTable
    selection: Selection
    outcomes: dict[str, OnsetOutcome]
    shipped_outcome: OnsetOutcome | None
    replayed: int

    @property
    def sel_label(self) -> str:
        return "seed " + ", ".join(map(str, self.cfg.select_seeds))

    @property
    def rep_label(self) -> str:
        return "seeds " + ", ".join(map(str, self.cfg.report_seeds))


def replay_rule(runs: Sequence[RunRecord], rule: Rule, defaults: Defaults) -> OnsetOutcome:
    """``rule`` replayed on ``runs``."""
    return evaluate_onsets(runs, rule.spec, rule.score_threshold, rule.onset_threshold, defaults, rule.signal)


def analyse(runs: list[RunRecord], cfg: StudyConfig) -> StudyAnalysis:
    """Choose on the selection seeds of ``cfg``, replay everything on the report seeds."""
    defaults = runs[0].shipped
    datasets = sorted({r.dataset for r in runs})
    sel = [r for r in runs if r.seed in cfg.select_seeds]
    rep = [r for r in runs if r.seed not in cfg.select_seeds]
    t_sel = auroc_table(sel, cfg.specs())
    selection = select(sel, t_sel, datasets, cfg, defaults)
    shipped_spec = defaults.primary_spec
    shipped_outcome = None
    if shipped_spec in cfg.specs():
        st, ot = defaults.score_threshold, defaults.onset_threshold
        shipped_outcome = evaluate_onsets(rep, shipped_spec, st, ot, defaults)
    return StudyAnalysis(
        cfg=cfg,
        runs=runs,
        defaults=defaults,
        datasets=datasets,
        sel=sel,
        rep=rep,
        t_sel=t_sel,
        t_rep=auroc_table(rep, cfg.specs()),
        selection=selection,
        outcomes={name: replay_rule(rep, rule, defaults) for name, rule in selection.rules.items()},
        shipped_outcome=shipped_outcome,
        replayed=replay_agreement(runs),
    )


# ----------------------------------------------------------------------------- diagnostics
def median_sigma(runs: Sequence[RunRecord], dataset: str, n: int, spec: str) -> float:
    """Median σ_t of noise level ``spec`` over the runs of ``dataset`` at size ``n``."""
    return float(np.median([r.sigma[spec] for r in runs if r.dataset == dataset and r.n == n]))


@dataclass(frozen=True)
class SizeSummary:
    """The rows of one data set and size: memorizing runs of all, median truth onset, median
    onset, median lead (``None``: no value), false alarms among the never-memorizing runs."""

    memorizing: int
    runs: int
    truth: int | None
    onset: int | None
    lead: int | None
    false_alarms: int
    never: int


def _median(xs: Sequence[int]) -> int | None:
    return int(np.median(xs)) if xs else None


def size_summary(rows: Sequence[OnsetRow], dataset: str, n: int) -> SizeSummary:
    """Summary of the ``rows`` of ``dataset`` at size ``n``."""
    sub = [r for r in rows if r.dataset == dataset and r.n == n]
    truths = [r.truth for r in sub if r.truth is not None]
    return SizeSummary(
        memorizing=len(truths),
        runs=len(sub),
        truth=_median(truths),
        onset=_median([r.onset for r in sub if r.onset is not None]),
        lead=_median([r.lead for r in sub if r.lead is not None]),
        false_alarms=sum(r.false_alarm for r in sub),
        never=sum(r.truth is None for r in sub),
    )


def onset_slope(rows: Sequence[OnsetRow]) -> dict[str, dict[str, float]]:
    """data set -> ``{"truth": slope, "onset": slope}``: least-squares slope of log(median onset
    step) against log N over the sizes with an onset (NaN with fewer than two sizes)."""
    out: dict[str, dict[str, float]] = {}
    for ds in sorted({r.dataset for r in rows}):
        out[ds] = {}
        for key in ("truth", "onset"):
            pts = []
            for n in sorted({r.n for r in rows if r.dataset == ds}):
                vals = [getattr(r, key) for r in rows if r.dataset == ds and r.n == n and getattr(r, key) is not None]
                if vals:
                    pts.append((math.log(n), math.log(max(float(np.median(vals)), 1.0))))
            out[ds][key] = float(np.polyfit(*zip(*pts), 1)[0]) if len({p[0] for p in pts}) >= 2 else math.nan
    return out


@dataclass(frozen=True)
class FalsePositives:
    """Probe-checks flagged (score above the threshold) but not NN-memorized: ``total``; ``late``:
    those in checks whose run already has more than ``NN_ONSET`` NN-memorized probes;
    ``late_ratios`` ``[late]``: their ``d₁/d₂``."""

    total: int
    late: int
    late_ratios: np.ndarray


def false_positives(runs: Sequence[RunRecord], spec: str, score_threshold: float) -> FalsePositives:
    """:class:`FalsePositives` of the primary signal at ``spec`` over ``runs``."""
    total = late = 0
    ratios: list[np.ndarray] = [np.zeros(0)]
    for r in runs:
        y = labels(r)
        wrong = (r.signals[spec][PRIMARY_SIGNAL] > score_threshold) & ~y
        in_late = wrong & (y.mean(1) > NN_ONSET)[:, None]
        total += int(wrong.sum())
        late += int(in_late.sum())
        ratios.append(r.nn_ratio[in_late])
    return FalsePositives(total, late, np.concatenate(ratios))


def run_of(runs: Sequence[RunRecord], row: OnsetRow) -> RunRecord:
    """The run of ``row``."""
    return next(r for r in runs if r.key == (row.dataset, row.n, row.seed))


def curve_runs(
    runs: Sequence[RunRecord], dataset: str, seed: int, spec: str, score_threshold: float
) -> list[RunRecord]:
    """The runs whose curves the report draws for ``dataset`` and ``seed``: the smallest N that
    memorizes, and the never-memorizing run with the highest memorized fraction (else the largest N)."""
    sub = sorted((r for r in runs if r.dataset == dataset and r.seed == seed), key=lambda r: r.n)
    memo = [r for r in sub if gt_onset(r) is not None]
    never = [r for r in sub if gt_onset(r) is None]
    hardest = max(
        never,
        key=lambda r: np.max(memorized_fraction(r.signals[spec][PRIMARY_SIGNAL], score_threshold)),
        default=sub[-1],
    )
    first = memo[:1]
    return first + ([hardest] if all(hardest.key != r.key for r in first) else [])


def fresh_outcomes(
    fresh: Sequence[RunRecord], rules: Mapping[str, Rule], defaults: Defaults
) -> list[tuple[str, Rule, OnsetOutcome]]:
    """The rules of section 2 (with the ``defaults`` of the study's runs), then the callback's
    own rule with its defaults at the time of the ``fresh`` runs, each replayed on ``fresh``:
    ``(name, rule, outcome)``."""
    now = fresh[0].shipped
    candidates = [(f"{name}: {SIGNALS[rule.signal].label}", rule, defaults) for name, rule in rules.items()]
    own = Rule(PRIMARY_SIGNAL, now.primary_spec, now.score_threshold, now.onset_threshold)
    candidates.append(("callback defaults of these runs: sharp fraction", own, now))
    return [(name, rule, replay_rule(fresh, rule, d)) for name, rule, d in candidates]
