"""Publishing a finished check: what a person reads, on every logger, from a :class:`CheckResult`.

The monitor measures and decides; :class:`CheckReporter` only turns a finished check into
scalars, histograms, figures, tables, galleries, the onset alert and the console lines, through
:class:`memwatch.loggers.MonitorLogger`. Every publishing step is guarded on its own: a failing
figure is a warning (or, with ``raise_errors=True``, an error) and the scalars of the check are
still logged.

Privacy: galleries show probes beside their nearest training samples, so they are drawn only
with ``log_media=True``; every other output holds numbers only. A gallery shows only training
samples the user passed as ``reference_data``; those seen in the batches
(``reference_data="batches"``) are held in memory only and never drawn, and the gallery's title
says so. Its row label says which images the training row holds: the reference as given, decoded
from the latent reference with ``decode_fn``, or the user's original images (``reference_images``).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from memwatch.attribution import CopiedItem
from memwatch.errors import MemwatchError
from memwatch.lid import LidReading
from memwatch.loggers import MonitorLogger
from memwatch.onset import OnsetDecision
from memwatch.probes import CONDITION_METRICS
from memwatch.sampling import sampler_summary
from memwatch.sharpness import SharpnessResult

__all__ = [
    "CONSOLE_LID",
    "RULES",
    "CheckReporter",
    "CheckResult",
    "console_lid",
    "copies_verdict",
    "format_timestep",
    "onset_rule",
]

_SPECTRUM_GRID = torch.linspace(-1.6, 0.4, 201)  # normalized eigenvalues σ_t²λ shown in spectra
_GALLERY_SIZE = 8
#: a check's phases get a console line of their own once it has run this long (seconds; with ``verbose``)
PROGRESS_AFTER_S = 5.0
PROGRESS_MIN_S = 0.05  #: and a phase shorter than this gets none


@dataclass(frozen=True)
class CheckResult:
    """Everything one check measured on this rank (see :meth:`MemorizationMonitor.on_check_end`).

    Attributes:
        step: the trainer's global step of the check.
        values: the logged scalars without the ``memwatch/`` prefix (synced over ranks), including
            ``onset`` and ``check_seconds``.
        results: evaluation timestep → :class:`memwatch.SharpnessResult` of this rank's probes.
        samples: ``[n, *shape]`` this rank's probes (final samples), on the CPU.
        nn_ratio: ``[n]`` the probes' ``d₁/d₂`` to ``reference_data`` (``None`` without it).
        decision: the onset detector's decision at this check.
        nearest: ``[n]`` index of each probe's nearest reference item (``None`` without it).
        spectrum: the Lanczos spectrum at the primary timestep at checks that measured one on
            top of the trace tier (image-scale ``method="auto"``), else ``None``.
        hessian_score_norm: ``[n]`` Jeon et al.'s ``‖H s‖`` of this rank's probes at the
            noisiest sampler state (larger = more memorized; ``None`` when not measured).
        readings: signal name → what the signal read at this check (its
            :meth:`memwatch.signals.base.Signal.contribute`; absent where it read nothing): e.g.
            ``"lid"`` a :class:`memwatch.lid.LidReading`, ``"alarm"`` an
            :class:`memwatch.signals.alarm.AlarmReading`, ``"copies"`` the items copied. The
            properties below name the readings of memwatch's own signals.
    """

    step: int
    values: dict[str, float]
    results: dict[float, SharpnessResult]
    samples: Tensor
    nn_ratio: Tensor | None
    decision: OnsetDecision
    nearest: Tensor | None = None
    spectrum: SharpnessResult | None = None
    hessian_score_norm: Tensor | None = None
    readings: dict[str, Any] = field(default_factory=dict)

    @property
    def conditions(self) -> dict[str, dict[str, float]]:
        """Condition name → its synced metric means (empty without ``probes.conditions``)."""
        reading = self.readings.get("conditional")
        return {} if reading is None else reading.conditions

    @property
    def most_memorized_condition(self) -> str | None:
        """The condition with the largest Hessian-weighted score difference (``None`` without conditions)."""
        reading = self.readings.get("conditional")
        return None if reading is None else reading.most_memorized

    @property
    def copied(self) -> list[CopiedItem]:
        """The training items the probes of every rank copy, most copied first (empty without a
        reference tensor); see :func:`memwatch.attribution.copied_items`."""
        return self.readings.get("copies", [])

    @property
    def lid(self) -> LidReading | None:
        """The LID signal's reading of every rank's probes (:class:`memwatch.lid.LidReading`)."""
        return self.readings.get("lid")

    @property
    def alarm(self) -> Tensor | None:
        """``[n]`` bool, this rank's probes the default onset rule counts (``alarm_fraction``'s;
        ``None`` where it could not tell them)."""
        reading = self.readings.get("alarm")
        return None if reading is None else reading.counted

    @property
    def rule(self) -> str:
        """The default onset rule in words, as it decided at this check (``""`` where no alarm ran)."""
        reading = self.readings.get("alarm")
        return "" if reading is None else reading.rule

    @property
    def primary(self) -> SharpnessResult:
        """The result at the primary (first) evaluation timestep."""
        return next(iter(self.results.values()))

    @property
    def eigen(self) -> SharpnessResult | None:
        """The primary result that holds eigenvalues (its spectrum on trace-tier checks), or ``None``."""
        return self.primary if self.primary.method != "trace" else self.spectrum


def format_timestep(t: float) -> str:
    """A timestep as it appears in metric names: ``46`` for integer steps, else ``%g``."""
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


class CheckReporter:
    """Publishes each finished check of a monitor on a :class:`MonitorLogger`.

    Args:
        logger: where everything goes (``MonitorLogger.from_trainer``).
        threshold: ``τ`` of the spectrum (drawn as the sharp line ``σ_t² λ = -τ``).
        log_figures: spectrum / curve / condition plots and the probe table.
        log_media: galleries of probes beside their nearest training samples (privacy).
        decode_fn: maps probes ``[n, *shape]`` to images ``[n, C, H, W]`` for galleries (e.g. a
            VAE decoder for latent models); ``None``: the probes are the images.
        verbose: print a line per check (rank zero).
        raise_errors: re-raise a failing publishing step instead of warning.
        onset_key: the value the onset rule watches (``memorized_fraction``, ``lid_memorized_fraction``, …):
            the result line's "memorized" and the curve the onset is drawn on.
        lid_statistic: the LID signal's ``sharpness.lid.statistic``: the result line's one "LID" is
            the probes' median LID that statistic reads (:data:`CONSOLE_LID`).
    """

    def __init__(
        self,
        logger: MonitorLogger,
        *,
        threshold: float,
        log_figures: bool = True,
        log_media: bool = False,
        decode_fn: Callable[[Tensor], Tensor] | None = None,
        verbose: bool = True,
        raise_errors: bool = False,
        onset_key: str = "memorized_fraction",
        lid_statistic: str = "relative",
    ) -> None:
        self.logger = logger
        self.lid_statistic = lid_statistic
        self.onset_key = onset_key
        self.threshold = threshold
        self.log_figures = log_figures
        self.log_media = log_media
        self.decode_fn = decode_fn
        self.verbose = verbose
        self.raise_errors = raise_errors
        self.sampler_text = ""  # the probes' sampler in a few words, once known (:meth:`use_sampler`)
        self.cadence_text = ""  # the cadence in force and why (:meth:`use_cadence`)
        self._first_density: Tensor | None = None
        self._first_step = 0
        self._gallery_warned = False

    # ------------------------------------------------------------------ public
    def publish(
        self,
        check: CheckResult,
        history: Sequence[dict[str, float]],
        *,
        onset_step: int | None,
        clean_checkpoint: str | None,
        reference: Tensor | None = None,
        reference_images: Tensor | None = None,
    ) -> None:
        """Log one finished check: scalars first, then media (rank zero), then alert / lines.

        Args:
            check: the check, its values already synced over ranks.
            history: every check's values so far, this one last (for the curves).
            onset_step: the detector's onset step (``None`` before onset).
            clean_checkpoint: where the last clean checkpoint is (for the alert text).
            reference: ``[N, *shape]`` training samples in the probes' space (for the gallery's neighbours).
            reference_images: ``[N, C, H, W]`` the same samples as the user's own images, before
                ``encode_fn`` (a latent model with pixel ``reference_data``): the gallery shows these
                instead of decoding ``reference``.
        """
        with self._step("scalars"):
            self.logger.define_metrics()
            self.logger.log_scalars(check.values, check.step)
        if self.logger.is_global_zero and self.logger.loggers:
            with self._step("histograms"):
                if check.eigen is not None:
                    self.logger.log_histogram("normalized_eigenvalues", check.eigen.normalized.flatten(), check.step)
                self.logger.log_histogram("probe_score", check.primary.memorization_score, check.step)
            if self.log_figures:
                with self._step("figures"):
                    self._figures(check, history, onset_step)
                with self._step("tables"):
                    self._tables(check)
            if self.log_media:
                with self._step("gallery"):
                    self._gallery(check, reference, reference_images)
        with self._step("console"):
            self._announce(check, clean_checkpoint)

    def publish_unmeasured(self, step: int, values: dict[str, float], reason: str) -> None:
        """A check that could not be measured: its values (NaN) are logged, and with ``verbose``
        a line says why (the warning that names the cause is the monitor's, once per run)."""
        with self._step("scalars"):
            self.logger.define_metrics()
            self.logger.log_scalars(values, step)
        if self.verbose:
            rank_zero_info(f"memwatch step {step}: not measured: {reason}")

    def use_sampler(self, settings: dict[str, Any]) -> None:
        """The settings the probes are drawn with (:func:`memwatch.sampling.sampler_settings`): into
        the run's config once (``memwatch/probe_sampler``), and named in every result line."""
        self.sampler_text = sampler_summary(settings)
        with self._step("run config"):
            self.logger.log_config("probe_sampler", settings)

    def use_cadence(self, text: str) -> None:
        """The cadence in force and why (:meth:`memwatch.cadence.BudgetCadence.describe`), named in
        the next result lines."""
        self.cadence_text = text

    def start_line(self, step: int, num_probes: int, num_timesteps: int) -> None:
        """The line that opens a check (with ``verbose``)."""
        if self.verbose:
            rank_zero_info(f"memwatch step {step}: checking {num_probes} probes at {num_timesteps} timestep(s)…")

    def progress_line(self, step: int, text: str) -> None:
        """A progress line within a long check (with ``verbose``)."""
        if self.verbose:
            rank_zero_info(f"memwatch step {step}: {text}")

    def progress(self, step: int, started: float) -> Callable[[str, float, float], None]:
        """``(phase, seconds, peak_mb) -> None`` (a :class:`memwatch.timing.PhaseClock` listener): a
        line per phase of a check that has run longer than ``PROGRESS_AFTER_S`` seconds since ``started``
        (``time.perf_counter()``), with that phase's own time and peak-memory rise — never the
        time since the check started, which would credit one phase with another's cost. Phases
        shorter than ``PROGRESS_MIN_S`` are not shown (they are logged as ``time/<phase>``)."""

        def report(phase: str, seconds: float, peak_mb: float) -> None:
            if time.perf_counter() - started > PROGRESS_AFTER_S and seconds >= PROGRESS_MIN_S:
                memory = f", peak memory +{peak_mb:.0f} MB" if peak_mb >= 1 else ""
                self.progress_line(step, f"{phase}: {seconds:.1f}s{memory}")

        return report

    def publish_time(self, step: int, seconds: float) -> None:
        """Log ``time/publishing`` (known only once the check's other values are published)."""
        with self._step("scalars"):
            self.logger.log_scalars({"time/publishing": seconds}, step)

    # ------------------------------------------------------------------ private
    def _sampler_part(self) -> str:
        """``"; probes: <sampler>"`` for the result line (empty before :meth:`use_sampler`)."""
        return f"; probes: {self.sampler_text}" if self.sampler_text else ""

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        """Run one publishing step; its failure is a warning unless ``raise_errors``."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - publishing must never stop training
            if self.raise_errors:
                raise
            warnings.warn(
                f"memwatch: publishing the check's {what} failed and was skipped: {type(err).__name__}: {err}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _figures(self, check: CheckResult, history: Sequence[dict[str, float]], onset_step: int | None) -> None:
        from memwatch import plots

        if check.eigen is not None:  # the spectrum panel updates at checks that measured one
            density = torch.nanmean(check.eigen.density(_SPECTRUM_GRID), 0)
            if self._first_density is None:
                self._first_density, self._first_step = density, check.step
            spectra = {
                f"first spectrum (step {self._first_step})": (_SPECTRUM_GRID, self._first_density),
                f"step {check.step}": (_SPECTRUM_GRID, density),
            }
            self.logger.log_figure("spectrum", plots.plot_spectrum(spectra, threshold=-self.threshold), check.step)
        steps = [h["step"] for h in history]
        curves = {
            name: (steps, [h.get(name, math.nan) for h in history])
            for name in dict.fromkeys(
                ("sharp_fraction_mean", "memorized_fraction", self.onset_key, "nn_memorized_fraction")
            )
            if name in check.values
        }
        figure = plots.plot_metric_curves(curves, onsets={self.onset_key: onset_step}, ylabel="value")
        self.logger.log_figure("curves", figure, check.step)
        if check.conditions:
            names = list(check.conditions)
            figure = plots.plot_condition_metrics(
                {m: [check.conditions[c][m] for c in names] for m in CONDITION_METRICS},
                names,
                flagged=names.index(check.most_memorized_condition) if check.most_memorized_condition else None,
                title=f"memwatch: per-condition metrics at step {check.step}",
            )
            self.logger.log_figure("conditions", figure, check.step)

    def _tables(self, check: CheckResult) -> None:
        columns = ["probe", "t", "sharp_fraction", "lid", "lambda_min", "trace", "score", "nn_ratio"]
        rows = [
            [
                i,
                t,
                *(
                    float(v)
                    for v in (r.sharp_fraction[i], r.lid[i], r.eigenvalues[i, 0], r.trace[i], r.memorization_score[i])
                ),
                None if check.nn_ratio is None else float(check.nn_ratio[i]),
            ]
            for t, r in check.results.items()
            for i in range(len(r.memorization_score))
        ]
        self.logger.log_table("probes", columns, rows, check.step)
        copied = [c for c in check.copied if c.copies]
        if copied:  # indices, ids and counts: no pixels
            columns = ["rank", "index", "id", "copies", "flagged_copies", "probes"]
            rows = [
                [r, c.index, _plain_id(c.id), c.copies, c.flagged_copies, len(c.probes)] for r, c in enumerate(copied)
            ]
            self.logger.log_table("copied_items", columns, rows, check.step)
        if check.conditions:
            rows = [
                [c, *(check.conditions[c][m] for m in CONDITION_METRICS), c == check.most_memorized_condition]
                for c in check.conditions
            ]
            self.logger.log_table("conditions", ["condition", *CONDITION_METRICS, "most_memorized"], rows, check.step)

    def _gallery(self, check: CheckResult, reference: Tensor | None, reference_images: Tensor | None) -> None:
        """The most memorized probes beside their nearest training samples (``log_media``), titled
        and labelled with what the training row shows."""
        from memwatch import plots

        score = check.primary.memorization_score
        order = torch.nan_to_num(score, nan=-1.0).argsort(descending=True)[:_GALLERY_SIZE]
        probes = self._images(check.samples[order])
        neighbours, source = None, _gallery_source(check, reference, reference_images, self.decode_fn is not None)
        if source == "original":
            neighbours = _original_images(reference_images, reference, check.nearest[order])
        elif source in ("reference", "decoded"):
            neighbours = self._images(reference[check.nearest[order]])
        if probes is None or (source in ("reference", "decoded") and neighbours is None):
            return
        captions = [
            f"score {float(score[i]):.2f}"
            + ("" if check.nn_ratio is None else f"\nd1/d2 {float(check.nn_ratio[i]):.2f}")
            for i in order
        ]
        title, label = GALLERY_TEXT[source]
        figure = plots.plot_gallery(
            probes, neighbours=neighbours, captions=captions, title=title, neighbours_label=label
        )
        self.logger.log_figure("most_memorized", figure, check.step, private=True)

    def _images(self, x: Tensor) -> Tensor | None:
        """``x`` as ``[n, 1 or 3, H, W]`` images (decoded with ``decode_fn``), or ``None`` with one
        warning when they cannot be shown."""
        if self.decode_fn is not None:
            with torch.no_grad():
                x = self.decode_fn(x).detach().cpu()
        if x.ndim == 4 and x.shape[1] in (1, 3):
            return x
        if not self._gallery_warned:
            self._gallery_warned = True
            hint = "" if self.decode_fn is not None else " (a latent model: pass `decode_fn=`, e.g. the VAE's decode)"
            rank_zero_warn(
                f"memwatch: probes of shape {tuple(x.shape[1:])} cannot be shown as images (need [C, H, W] with "
                f"C = 1 or 3){hint}; the gallery is skipped"
            )
        return None

    def _announce(self, check: CheckResult, clean_checkpoint: str | None) -> None:
        """The onset alert (W&B) and warning, else the result line; the conditional line."""
        values, decision = check.values, check.decision
        if decision.onset:
            clean_step = _int_or_none(values.get("clean_step"))
            msg = (
                f"memorization onset at step {check.step} by {onset_rule(check, self.onset_key)}: {decision.reason}"
                f"{copies_verdict(values, self.onset_key)}. "
                + (
                    f"Last clean checkpoint: {clean_checkpoint} (step {clean_step})"
                    if clean_step
                    else (
                        f"Last clean checkpoint: {clean_checkpoint} (step 0, the weights training started from)"
                        if clean_step == 0
                        else "No check before it was clean, so there is no clean checkpoint"
                    )
                    + f": the model was memorizing by its first check{_first_step(decision.reason)}. Check sooner "
                    "(a smaller `cadence.first_check` and `cadence.steps_per_sample`, or a fixed "
                    "`every_n_train_steps`) to catch the onset"
                )
            )
            rank_zero_warn(f"memwatch: {msg}")
            self.logger.alert("memwatch: memorization onset", msg)
        elif self.verbose:
            bad = int(values.get("nonfinite_count", 0))
            rank_zero_info(
                f"memwatch step {check.step}: sharp fraction {values['sharp_fraction_mean']:.3f}"
                f"{console_lid(values, self.lid_statistic)}, "
                f"flagged {values[self.onset_key]:.2f} by {onset_rule(check, self.onset_key)}"
                + copies_verdict(values, self.onset_key)
                + (f", {bad} probe(s) not finite" if bad else "")
                + f" ({values['check_seconds']:.1f}s{self._sampler_part()})"
                + (f"; {self.cadence_text}" if self.cadence_text else "")
            )
        if check.conditions and self.verbose:
            scores = torch.tensor([c["hessian_score_diff"] for c in check.conditions.values()], dtype=torch.float64)
            finite = scores[torch.isfinite(scores)]
            top, median = (float(finite.max()), float(finite.median())) if finite.numel() else (math.nan, math.nan)
            rank_zero_info(
                f"memwatch step {check.step}: most memorized condition {check.most_memorized_condition} "
                f"(Hessian-weighted score difference {top:.3g}, median over conditions {median:.3g})"
            )


#: the rule each onset share stands for, in words (``"alarm_fraction"``: the check's own :attr:`CheckResult.rule`)
RULES = {
    "memorized_fraction": "sharp probes (onset.on='sharpness')",
    "lid_memorized_fraction": "the LID statistic (onset.on='lid')",
    "nn_memorized_fraction": "copies, d₁/d₂ < 1/3 (onset.on='copies')",
    "flagged_fraction": "sharp probes or copies (onset.on='either')",
}


def onset_rule(check: CheckResult, onset_key: str) -> str:
    """The rule behind the onset share ``onset_key``, in words, for the result line and the alert."""
    if onset_key == "alarm_fraction":
        return check.rule or "the default rule"
    return RULES[onset_key]


#: the result line's one "LID": for each ``sharpness.lid.statistic``, the logged median it reads and its name
CONSOLE_LID = {
    "relative": ("lid/flipd", "FLIPD"),
    "profile": ("lid/flipd", "FLIPD"),
    "drawdown": ("lid/flipd", "FLIPD"),
    "denoising": ("lid/denoising_lid", "denoising"),
    "count": ("lid/count", "flat directions"),
}


def console_lid(values: dict[str, float], statistic: str = "relative") -> str:
    """The result line's LID: the probes' median LID at the primary level as ``statistic`` reads
    it, named, beside the data's; ``""`` when it was not measured.

    Example:
        >>> console_lid({"lid/flipd": 2.04, "lid/data_lid": 4.13})
        ', LID 2.0 (FLIPD; data 4.1)'
    """
    key, name = CONSOLE_LID[statistic]
    value = values.get(key, math.nan)
    if not math.isfinite(value):
        return ""
    return f", LID {value:.1f} ({name}; data {values.get('lid/data_lid', math.nan):.1f})"


def copies_verdict(values: dict[str, float], onset_key: str = "memorized_fraction") -> str:
    """What the copies say beside the onset rule's signal (``values[onset_key]``), for the result
    line and the onset alert: ``""`` without training samples to compare with; else the share of
    copies and, where the two disagree, which way (flagged probes with no copy among the training
    samples compared, or copies the rule did not flag).

    Example:
        >>> copies_verdict({"memorized_fraction": 0.6, "nn_memorized_fraction": 0.0})
        ', copies 0.00: flagged but no copies among the training samples compared'
    """
    copies, sharp = values.get("nn_memorized_fraction"), values.get(onset_key, math.nan)
    if copies is None:
        return ""
    if not math.isfinite(copies):
        return ", copies not measured"
    text = f", copies {copies:.2f}"
    if sharp > 0 and copies == 0:
        return text + ": flagged but no copies among the training samples compared"
    if copies > 0 and sharp == 0:
        return text + ": copies that the onset rule does not flag"
    return text


#: the gallery's ``(title, training-row label)`` by what its training row shows (:func:`_gallery_source`)
GALLERY_TEXT = {
    "reference": ("Most memorized probes and their nearest training samples", "nearest\ntraining sample"),
    "decoded": (
        "Most memorized probes and their nearest training samples, decoded from the latent reference_data "
        "(not the original images)",
        "decoded nearest\ntraining sample",
    ),
    "original": (
        "Most memorized probes and their nearest training samples (the original reference_data images)",
        "original nearest\ntraining sample",
    ),
    "batches": (
        "Most memorized probes. No training samples shown: reference_data='batches' keeps them in memory "
        "only and never logs them (d1/d2 under each probe)",
        None,
    ),
    "none": ("Most memorized probes (no reference_data: nearest training samples unknown)", None),
}


def _gallery_source(
    check: CheckResult, reference: Tensor | None, reference_images: Tensor | None, decoded: bool
) -> str:
    """What the gallery's training row shows, a key of ``GALLERY_TEXT``: ``"original"`` (the user's
    images), ``"decoded"`` (``decode_fn`` of the reference), ``"reference"`` (as given), or no row:
    ``"batches"`` (ratios to samples seen in the batches, which are never drawn) or ``"none"``."""
    if reference is None or check.nearest is None:
        return "batches" if check.nn_ratio is not None else "none"
    if reference_images is not None:
        return "original"
    return "decoded" if decoded else "reference"


def _original_images(reference_images: Tensor, reference: Tensor, nearest: Tensor) -> Tensor:
    """Rows ``nearest`` of the user's images ``[N, C, H, W]`` (one per row of ``reference`` ``[N, ...]``).

    Raises:
        MemwatchError: ``reference_images`` is not ``[N, 1 or 3, H, W]`` with ``N = len(reference)``.
    """
    shape = tuple(reference_images.shape)
    if reference_images.ndim != 4 or shape[1] not in (1, 3) or shape[0] != reference.shape[0]:
        raise MemwatchError(
            f"`reference_images` must be [N={reference.shape[0]}, C, H, W] with C = 1 or 3 (one image per "
            f"reference_data row), got shape {shape}"
        )
    return reference_images[nearest].detach().cpu()


def _plain_id(value: object) -> object:
    """An item id as a table cell: numbers and strings as they are, anything else as text."""
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


def _first_step(reason: str) -> str:
    """`` (step N)`` of the streak's first check, read from the onset reason (``"since step N"``)."""
    found = re.search(r"since step (\d+)", reason)
    return f" (step {found.group(1)})" if found else ""


def _int_or_none(value: float | None) -> int | None:
    return None if value is None or not math.isfinite(value) else int(value)
