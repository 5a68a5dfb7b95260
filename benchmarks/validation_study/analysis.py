"""Pure post-processing of recorded runs: the truth's labels, ROC statistics, the onset rules and
their offline replay, the selection of every free setting on the selection seeds, and the
ablation the report quotes.

Nothing here trains, draws or writes; every function takes :class:`RunRecord` s (or results of
other functions here) and returns numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from memwatch import MEMORIZED_RATIO
from memwatch.errors import MemwatchError
from memwatch.onset import OnsetDetector

from .config import (
    BORDERLINE,
    FPRS,
    NEVER,
    NN_ONSET,
    PRIMARY_SIGNAL,
    SIGNALS,
    V3_RULE,
    Defaults,
    StudyConfig,
    library_defaults,
)
from .runs import RunRecord

COPIES, CONFIRMED, EITHER, LID_COUNT = (
    "copies",
    "confirmed sharpness",
    "copies or confirmed sharpness",
    "LID count (no training samples)",
)  # the candidates; the last is the data-free fallback
CANDIDATES = (COPIES, CONFIRMED, EITHER)  # the rules that read the training samples: one is chosen
LIBRARY, V3, GAP = "library defaults", "v3 defaults (sharp fraction)", "loss gap"  # the baselines
NO_IDS, TRUTH_COPIES = "copies, no item ids", "copies of the truth (oracle)"  # ablation rows
HS_SIGNAL = "hessian_score_norm"  # Jeon et al.'s ‖H s‖ (noisiest sampler state)
MEAN_T = "mean"  # the loss gap averaged over the fixed timesteps
#: a confirmed probe is sharp by its LID count (``"lid"``: below ``c`` dimensions) or by its sharp
#: fraction (``"sharp"``: above ``s``)
SHARP_BY = ("lid", "sharp")
FAR = 1e3  # added to a score that must never reach the flag level (a probe the rule cannot flag)


# ----------------------------------------------------------------------------- labels and signals
def labels(run: RunRecord) -> np.ndarray:
    """``[C, P]`` bool: the study's truth, memorized when ``d₁/d₂ < 1/3`` to the distinct training set."""
    return run.nn_ratio < MEMORIZED_RATIO


def nn_fraction(run: RunRecord) -> np.ndarray:
    """``[C]`` share of the probes that are memorized by the truth."""
    return labels(run).mean(1)


def gt_onset(run: RunRecord) -> int | None:
    """Ground-truth onset: step of the first check with more than ``NN_ONSET`` of its probes
    memorized (``None``: the run never gets there)."""
    hit = np.nonzero(nn_fraction(run) > NN_ONSET)[0]
    return int(run.steps[hit[0]]) if hit.size else None


def run_kind(run: RunRecord) -> str:
    """``"memorizing"`` (a check above ``NN_ONSET``), ``"never"`` (no check above ``NEVER``) or
    ``"borderline"`` (peak between the two)."""
    peak = float(nn_fraction(run).max())
    if peak > BORDERLINE:
        return "memorizing"
    return "never" if peak <= NEVER else "borderline"


def memorized_fraction(scores: np.ndarray, score_threshold: float) -> np.ndarray:
    """``[C]`` share of the finite probes of each check with ``score > score_threshold``
    (``scores`` ``[C, P]``; NaN for a check without finite probes)."""
    ok = np.isfinite(scores)
    frac = np.where(ok, scores > score_threshold, False).sum(1) / np.maximum(ok.sum(1), 1)
    return np.where(ok.any(1), frac, np.nan)


def loss_gap(run: RunRecord, t: str) -> np.ndarray:
    """``[C]`` relative held-out/train gap of the ε-loss, ``(L_held − L_train) / L_train``, at the
    fixed timestep ``t`` (``"400"``) or of the losses averaged over all of them (``MEAN_T``)."""
    if t == MEAN_T:
        held, train = run.loss_held.mean(1), run.loss_train.mean(1)
    else:
        k = int(np.nonzero(run.loss_t == int(t))[0][0])
        held, train = run.loss_held[:, k], run.loss_train[:, k]
    return (held - train) / train


def copy_ratio(run: RunRecord, which: str) -> np.ndarray:
    """``[C, P]`` a ``d₁/d₂`` of the probes: ``"monitor"`` (the monitor's own index of the batches),
    ``"plain"`` (a monitor given no item ids; NaN on runs that are not augmented) or ``"truth"``."""
    if which == "plain":
        return run.plain_ratio if run.plain_ratio is not None else np.full_like(run.nn_ratio, np.nan)
    return run.monitor_ratio if which == "monitor" else run.nn_ratio


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


def oriented(run: RunRecord, signal: str, spec: str) -> np.ndarray:
    """``[C, P]`` per-probe value ``signal`` oriented so that higher = more memorized: a copy ratio
    of :func:`copy_ratio` (``"monitor"``, ``"plain"``, negated), ``HS_SIGNAL``, or a sharpness
    signal of :data:`config.SIGNALS` / ``"denoising_lid"`` at noise level ``spec``."""
    if signal in ("monitor", "plain"):
        return -copy_ratio(run, signal)
    if signal == HS_SIGNAL:
        return run.hessian_score_norm
    sign = -1.0 if signal == "denoising_lid" else SIGNALS[signal].sign
    return sign * run.signals[spec][signal]


def probe_auroc(runs: Sequence[RunRecord], score: Callable[[RunRecord], np.ndarray]) -> RocStats:
    """:func:`roc_stats` of ``score(run)`` ``[C, P]`` against the truth, pooled over every check and run."""
    ys = np.concatenate([np.zeros(0, bool), *(labels(r).ravel() for r in runs)])
    ss = np.concatenate([np.zeros(0), *(score(r).ravel() for r in runs)])
    return roc_stats(ys, ss)


# ----------------------------------------------------------------------------- onset rules
@dataclass(frozen=True)
class Rule:
    """An onset rule, replayed offline through :class:`memwatch.onset.OnsetDetector`.

    Each rule but the loss gap flags probes; onset when more than ``onset_threshold`` of a check's
    probes are flagged at ``patience`` checks in a row. A probe is flagged by

    * ``"copies"``: its copy ratio ``r`` (``ratio``: the monitor's own index, see
      :func:`copy_ratio`) below 1/3;
    * ``"confirmed"``: an isolated peak — LID count below ``sharp_threshold`` dimensions
      (``sharp_by="lid"``) or sharp fraction above it (``"sharp"``) at ``spec`` — *and* ``r < rho``;
    * ``"either"``: ``"copies"`` or ``"confirmed"``;
    * ``"lid"``: its LID count below ``sharp_threshold`` (no training samples needed);
    * ``"sharp"``: its sharp fraction above ``sharp_threshold`` (the v3 defaults);

    and ``"gap"`` watches the relative ε-loss gap at the loss timestep ``spec`` instead.

    Attributes:
        kind: one of the above.
        onset_threshold: θ, the share of probes (or the loss gap) that must be exceeded.
        patience: checks in a row.
        sharp_threshold: ``c`` (dimensions) or ``s`` (a sharp fraction); ``None`` for copies / gap.
        sharp_by: ``"lid"`` or ``"sharp"`` (:data:`SHARP_BY`) for ``"confirmed"`` / ``"either"``.
        rho: the looser ratio of a confirmed probe.
        spec: noise level (``"auto 0.1"``) or, for the gap, the loss timestep.
        ratio: which copy ratio (``"monitor"``, ``"plain"``, ``"truth"``).
    """

    kind: str
    onset_threshold: float
    patience: int
    sharp_threshold: float | None = None
    sharp_by: str = "lid"
    rho: float | None = None
    spec: str = "auto 0.1"
    ratio: str = "monitor"

    @property
    def by_lid(self) -> bool:
        """Whether the probes' LID count (not their sharp fraction) says "isolated peak"."""
        return self.kind == "lid" or (self.kind in ("confirmed", "either") and self.sharp_by == "lid")

    def _sharp_score(self, run: RunRecord) -> np.ndarray:
        """``[C, P]`` > -1 exactly where the probe is an isolated peak (LID count or sharp fraction)."""
        assert self.sharp_threshold is not None
        if self.by_lid:
            return -run.signals[self.spec]["lid"] / self.sharp_threshold
        return run.signals[self.spec][PRIMARY_SIGNAL] / self.sharp_threshold - 2.0

    def scores(self, run: RunRecord) -> np.ndarray:
        """``[C, P]`` the rule's per-probe score, higher = more memorized, flagged exactly where it
        exceeds -1 (NaN where not measured): ``-r / (1/3)`` for a copy, ``-r / ρ`` for a confirmed
        probe (``FAR`` lower where not sharp), their maximum for ``"either"``, the LID or sharp
        fraction scaled to its threshold."""
        if self.kind in ("lid", "sharp"):
            return self._sharp_score(run)
        r = copy_ratio(run, self.ratio)
        copies = -r / MEMORIZED_RATIO
        if self.kind == "copies":
            return copies
        assert self.rho is not None
        confirmed = np.where(self._sharp_score(run) > -1.0, -r / self.rho, -r / self.rho - FAR)
        return confirmed if self.kind == "confirmed" else np.fmax(copies, confirmed)

    def series(self, run: RunRecord) -> np.ndarray:
        """``[C]`` the value the rule monitors on ``run``."""
        if self.kind == "gap":
            return loss_gap(run, self.spec)
        return memorized_fraction(self.scores(run), -1.0)

    def onset(self, run: RunRecord, defaults: Defaults) -> int | None:
        """The onset step the rule declares on ``run`` (``None``: none)."""
        return self.detect(run.steps, self.series(run), defaults)

    def detect(self, steps: np.ndarray, series: np.ndarray, defaults: Defaults) -> int | None:
        """The onset step of the monitored ``series`` ``[C]`` at check ``steps`` ``[C]`` (``None``: none)."""
        det = OnsetDetector(
            threshold=self.onset_threshold,
            min_delta=None,
            baseline_checks=defaults.baseline_checks,
            patience=self.patience,
            min_steps=defaults.min_steps,
        )
        for step, value in zip(steps, series):
            det.update(int(step), float(value))
        return det.onset_step

    def sharp_text(self) -> str:
        """``"LID < 4"`` / ``"sharp fraction > 0.9"``: what makes a probe an isolated peak."""
        if self.by_lid:
            return f"LID < {self.sharp_threshold:g}"
        return f"sharp fraction > {self.sharp_threshold:g}"

    def describe(self) -> str:
        """``"r < 1/3, onset > 0.1, patience 1"``-style summary."""
        tail = f"onset > {self.onset_threshold:g}, patience {self.patience}"
        r = {"monitor": "r", "plain": "r without ids", "truth": "truth r"}[self.ratio]
        if self.kind == "gap":
            return f"ε-loss gap at t = {self.spec} > {self.onset_threshold:g}, patience {self.patience}"
        if self.kind in ("lid", "sharp"):
            return f"{self.sharp_text()} at {self.spec}, {tail}"
        if self.kind == "copies":
            return f"{r} < 1/3, {tail}"
        confirmed = f"({self.sharp_text()} and {r} < {self.rho:g})"
        return f"{confirmed}, {tail}" if self.kind == "confirmed" else f"{r} < 1/3 or {confirmed}, {tail}"


@dataclass(frozen=True)
class OnsetRow:
    """One run under one rule: ``truth`` (ground-truth onset), ``onset`` (the rule's), ``peak``
    (highest memorized fraction of any check), ``kind`` (:func:`run_kind`); steps, ``None`` = none."""

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
    """A rule replayed on a set of runs, against the truth.

    Attributes:
        rows: one :class:`OnsetRow` per run, in the order of the runs.
        margin: min over never-memorizing runs of ``onset_threshold`` − the highest streak value,
            and over memorizing runs of the streak value at the truth onset − ``onset_threshold``
            (relative to ``onset_threshold`` for the loss gap): the selection's last tie-break.
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

    def leads(self) -> list[int]:
        """Leads of the memorizing runs that have both onsets (steps; positive = before the truth)."""
        return [r.lead for r in self.rows if r.lead is not None]

    @property
    def median_lead(self) -> float:
        """Median of :meth:`leads` (NaN when no memorizing run is flagged)."""
        leads = self.leads()
        return float(np.median(leads)) if leads else math.nan


def evaluate(runs: Sequence[RunRecord], rule: Rule, defaults: Defaults) -> Outcome:
    """Replay ``rule`` on every run and compare with the truth."""
    out = Outcome()
    scale = rule.onset_threshold if rule.kind == "gap" else 1.0
    for r in runs:
        series = rule.series(r)
        onset = rule.detect(r.steps, series, defaults)
        row = OnsetRow(r.dataset, r.n, r.seed, gt_onset(r), onset, float(nn_fraction(r).max()), run_kind(r))
        out.rows.append(row)
        streak = streak_values(np.nan_to_num(series, nan=-np.inf), rule.patience)
        if row.kind == "never":
            out.margin = min(out.margin, (rule.onset_threshold - float(streak.max())) / scale)
        elif row.truth is not None:
            at_truth = int(np.nonzero(r.steps == row.truth)[0][0])
            out.margin = min(out.margin, (float(streak[at_truth]) - rule.onset_threshold) / scale)
    return out


def rule_key(res: Outcome) -> tuple[int, int, float, float]:
    """Lexicographic preference: fewest false alarms, then most runs right, then the largest median
    lead (none flagged: last), then the widest margin."""
    lead = res.median_lead
    return (-res.count("false_alarm"), res.count("right"), -math.inf if math.isnan(lead) else lead, res.margin)


def choose(runs: Sequence[RunRecord], candidates: Sequence[Rule], defaults: Defaults) -> tuple[Rule, Outcome]:
    """The candidate with the best :func:`rule_key` on ``runs`` (the first of equals wins) and its outcome."""
    scored = [(rule, evaluate(runs, rule, defaults)) for rule in candidates]
    return max(scored, key=lambda ro: rule_key(ro[1]))


def copies_grid(cfg: StudyConfig) -> list[Rule]:
    """Copies alone: θ × patience."""
    return [Rule("copies", th, p) for p in cfg.patiences for th in cfg.copy_thresholds]


def confirmed_grid(kind: str, cfg: StudyConfig) -> list[Rule]:
    """``"confirmed"`` or ``"either"``: (LID < c for c of ``cfg.lid_thresholds``, or sharp fraction
    > s for s of ``cfg.score_thresholds``) × ρ × θ × patience, at the study's level."""
    spec = cfg.auto_specs()[0]
    sharp = [("lid", c) for c in cfg.lid_thresholds] + [("sharp", s) for s in cfg.score_thresholds]
    return [
        Rule(kind, th, p, sharp_threshold=t, sharp_by=by, rho=rho, spec=spec)
        for p in cfg.patiences
        for th in cfg.copy_thresholds
        for rho in cfg.rhos
        for by, t in sharp
    ]


def lid_grid(cfg: StudyConfig) -> list[Rule]:
    """The LID count alone (the data-free fallback): c × the onset grid × patience."""
    spec = cfg.auto_specs()[0]
    return [
        Rule("lid", th, p, sharp_threshold=c, spec=spec)
        for p in cfg.patiences
        for c in cfg.lid_thresholds
        for th in cfg.onset_thresholds
    ]


def library_rule(defaults: Defaults) -> Rule:
    """The library's default onset rule as a study :class:`Rule` (at its primary calibrated level)."""
    threshold, patience, spec = float(defaults.onset_threshold or 0.0), defaults.patience, defaults.primary_spec
    on, count = defaults.onset_on, defaults.lid_count_threshold
    if on == "auto":  # with training samples (every run of the study holds them): memwatch.signals.alarm
        return Rule("either", threshold, patience, sharp_threshold=count, rho=defaults.confirm_ratio, spec=spec)
    if on == "copies":
        return Rule("copies", threshold, patience)
    if on == "either":  # sharp or a copy: an isolated peak at any ratio
        sharp = defaults.score_threshold
        return Rule("either", threshold, patience, sharp_threshold=sharp, sharp_by="sharp", rho=math.inf, spec=spec)
    if on == "lid" and defaults.lid_statistic == "count":
        return Rule("lid", threshold, patience, sharp_threshold=count, spec=spec)
    if on == "sharpness":
        return Rule("sharp", threshold, patience, sharp_threshold=defaults.score_threshold, spec=spec)
    raise MemwatchError(f"study v4 does not replay onset.on={on!r} with lid.statistic={defaults.lid_statistic!r}")


# ----------------------------------------------------------------------------- the whole study
@dataclass(frozen=True)
class StudyAnalysis:
    """The study analysed: every choice on ``groups["selection"]``, evaluation on the others.

    Attributes:
        cfg, defaults: the study and the library's defaults when it is analysed (the runs keep
            theirs as ``RunRecord.shipped``).
        datasets: sorted data-set names.
        groups: ``"selection"``, ``"report"`` and (when given) ``"fresh"`` -> their runs.
        rules: rule name -> :class:`Rule`: the candidates (each tuned), the fallback, the baselines
            and the ablation's rows.
        winner: the candidate chosen on the selection runs (the default with training samples).
        outcomes: group -> rule name -> :class:`Outcome`.
    """

    cfg: StudyConfig
    defaults: Defaults
    datasets: list[str]
    groups: dict[str, list[RunRecord]]
    rules: dict[str, Rule]
    winner: str
    outcomes: dict[str, dict[str, Outcome]]

    def seeds(self, group: str) -> str:
        """``"seed 0"`` / ``"seeds 1, 2"``: the seeds of a group."""
        seeds = sorted({r.seed for r in self.groups[group]})
        return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))

    @property
    def spec(self) -> str:
        """The noise level measured."""
        return self.cfg.auto_specs()[0]

    @property
    def every(self) -> int:
        """The check cadence (all data sets share it)."""
        return self.cfg.data[0].every

    def auroc(self, group: str, name: str) -> RocStats | None:
        """Pooled per-probe statistics of rule ``name``'s score (``None`` for the loss gap: a run-level
        signal); a rule on the ratio without ids over the augmented runs only."""
        rule = self.rules[name]
        if rule.kind == "gap":
            return None
        return probe_auroc(applicable(self.groups[group], rule), rule.scores)


def applicable(runs: Sequence[RunRecord], rule: Rule) -> list[RunRecord]:
    """The runs ``rule`` can be replayed on: the augmented ones for the ratio without ids, else all."""
    return [r for r in runs if r.plain_ratio is not None] if rule.ratio == "plain" else list(runs)


def select_rules(sel: Sequence[RunRecord], cfg: StudyConfig, defaults: Defaults) -> tuple[dict[str, Rule], str]:
    """Every rule of the study, the tuned ones chosen on the selection runs ``sel`` only, and the
    winner among :data:`CANDIDATES`.

    Candidates (each tuned by :func:`rule_key`): ``COPIES`` (θ, patience), ``CONFIRMED`` and
    ``EITHER`` (what says "sharp", its threshold, ρ, θ, patience); the data-free fallback
    ``LID_COUNT``. Baselines, fixed: ``LIBRARY`` (the library's defaults when analysed), ``V3``
    (:data:`config.V3_RULE`), ``GAP`` (study v3's loss gap). Ablation rows: ``NO_IDS`` (the chosen
    copies rule on the ratio of a monitor given no item ids), ``TRUTH_COPIES`` (on the study's truth).
    """
    rules = {
        COPIES: choose(sel, copies_grid(cfg), defaults)[0],
        CONFIRMED: choose(sel, confirmed_grid("confirmed", cfg), defaults)[0],
        EITHER: choose(sel, confirmed_grid("either", cfg), defaults)[0],
        LID_COUNT: choose(sel, lid_grid(cfg), defaults)[0],
    }
    scored = {name: rule_key(evaluate(sel, rules[name], defaults)) for name in CANDIDATES}
    winner = max(CANDIDATES, key=lambda name: scored[name])
    spec = cfg.auto_specs()[0]
    score, onset, patience = V3_RULE
    rules.update(
        {
            LIBRARY: library_rule(defaults),
            V3: Rule("sharp", onset, patience, sharp_threshold=score, spec=spec),
            GAP: Rule("gap", cfg.gap_threshold, defaults.patience, spec=str(cfg.gap_timestep)),
            NO_IDS: replace(rules[COPIES], ratio="plain"),
            TRUTH_COPIES: replace(rules[COPIES], ratio="truth"),
        }
    )
    return rules, winner


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
    rules, winner = select_rules(groups["selection"], cfg, defaults)
    outcomes = {
        g: {name: evaluate(applicable(rs, rule), rule, defaults) for name, rule in rules.items()}
        for g, rs in groups.items()
    }
    return StudyAnalysis(
        cfg=cfg,
        defaults=defaults,
        datasets=sorted({r.dataset for r in [*runs, *fresh]}),
        groups=groups,
        rules=rules,
        winner=winner,
        outcomes=outcomes,
    )
