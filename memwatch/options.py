"""The monitor's options, grouped by what they configure: frozen, validated dataclasses.

:class:`memwatch.MemorizationMonitor` takes the handful of settings nearly every user sets as
arguments of its own and the rest as one group each — what the probes are (:class:`ProbeOptions`),
how training batches are read (:class:`DataOptions`), how sharp a probe must be
(:class:`memwatch.signals.options.SharpnessCheckOptions`), when onset is declared
(:class:`OnsetOptions`), what the copies and loss-gap signals compare with
(:class:`memwatch.signals.options.CopyOptions`, :class:`memwatch.signals.options.LossGapOptions`),
what is kept (:class:`CheckpointOptions`) and what is reported (:class:`ReportOptions`). Each group
checks its own fields when it is built, and the message names ``group.field``, the allowed range
and the value. LightningCLI / jsonargparse reads the groups as nested options
(``--trainer.callbacks.init_args.onset.threshold 0.05``) and YAML writes them as sections::

    - class_path: memwatch.MemorizationMonitor
      init_args:
        every_n_train_steps: 200
        onset: {threshold: 0.05, patience: 1}

The flat names of memwatch 0.1 (``onset_threshold=``, ``sampler_steps=``, …) still work for this
release, with a deprecation warning naming the new place (:func:`regroup`).

Example:
    >>> OnsetOptions(threshold=0.05, patience=1).patience
    1
    >>> OnsetOptions(patience=0)
    Traceback (most recent call last):
    ...
    memwatch.errors.MemwatchError: `onset.patience` must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from memwatch import defaults
from memwatch.checkpoint import check_save_mode
from memwatch.conditional import check_first_steps, parse_conditions
from memwatch.errors import MemwatchError
from memwatch.onset import OnsetDetector
from memwatch.sampling import ProbeSampler
from memwatch.validation import check_fraction, check_int, check_levels, check_range, check_shape

__all__ = [
    "CheckpointOptions",
    "DataOptions",
    "MemwatchDeprecationWarning",
    "ONSET_VALUES",
    "OnsetOptions",
    "RULE_DEFAULTS",
    "ProbeOptions",
    "ReportOptions",
    "regroup",
]

#: the share of the probes each ``onset.on`` watches (a key of the check's values)
ONSET_VALUES = {
    "auto": "alarm_fraction",
    "sharpness": "memorized_fraction",
    "lid": "lid_memorized_fraction",
    "copies": "nn_memorized_fraction",
    "either": "flagged_fraction",
}

#: each rule's own ``(threshold, patience)`` (``OnsetOptions(threshold="auto", patience="auto")``): the alarm's
#: chosen on study v4's selection seeds (docs/validation.md), the others' those of studies v2.2 / v3
RULE_DEFAULTS = {
    "auto": (defaults.ALARM_THRESHOLD, defaults.ALARM_PATIENCE),
    "auto without samples": (defaults.ALARM_THRESHOLD, defaults.ALARM_FALLBACK_PATIENCE),
    "sharpness": (defaults.ONSET_THRESHOLD, defaults.PATIENCE),
    "lid": (defaults.ONSET_THRESHOLD, defaults.PATIENCE),
    "copies": (defaults.ONSET_THRESHOLD, defaults.PATIENCE),
    "either": (defaults.ONSET_THRESHOLD, defaults.PATIENCE),
}

#: a batch selector: a dict key, a tuple / list index, or ``batch -> Tensor``
Selector = str | int | Callable[[Any], Tensor] | None


class MemwatchDeprecationWarning(DeprecationWarning):
    """A setting of an earlier memwatch release that still works, for one more release."""


def _set(obj: object, name: str, value: object) -> None:
    """Normalize a field of a frozen dataclass in ``__post_init__``."""
    object.__setattr__(obj, name, value)


def _check_selector(name: str, value: Any) -> None:
    """A batch selector: ``None``, a dict key, a tuple index ``>= 0`` or a function."""
    if not (value is None or isinstance(value, (str, int)) or callable(value)):
        raise MemwatchError(
            f"`{name}` must be a dict key, a tuple index, a function batch -> Tensor or None, got {value!r}"
        )
    if isinstance(value, bool) or (isinstance(value, int) and value < 0):
        raise MemwatchError(f"`{name}` as a tuple index must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, eq=False)
class DataOptions:
    """How the monitor reads training data: the batches, ``reference_data`` and held-out data.

    Attributes:
        select: where a batch holds its samples: a dict key (``"image"``), a tuple / list index
            (``1`` for ``(label, image)`` batches) or a function ``batch -> Tensor [b, ...]``;
            default: the batch itself, or its first tensor.
        ids: where a batch holds the id of the training item each sample was made from — for
            augmented batches (random flips, crops, colour jitter), whose views of one item must
            count as that item in the copy rule (:mod:`memwatch.index`): a dict key, a tuple index
            or a function ``batch -> Tensor [b]`` (integers; or a list of ints / strings). Ids name
            the same item on every rank (e.g. the dataset index). ``None`` (default): each distinct
            sample is its own item.
        sample_shape: the probes' shape (one sample); default: the network's config, else the
            first training batch.
        encode_fn: images → latents (e.g. a VAE's encode), applied to pixel ``reference_data``,
            held-out data and training batches not already in the probes' shape (only the rows
            kept are encoded), so all live where the probes do.
        decode_fn: latents ``[n, *shape]`` → images ``[n, C, H, W]`` for galleries.
        data_range: ``(low, high)`` of the data; probes far beyond it are counted
            (``out_of_range_count``). Default: the scheduler's clipping range, else measured on
            the training samples held (see :mod:`memwatch.signals.sharpness`).
        integer_range: integer (e.g. ``uint8``, 0…255) samples are mapped linearly onto this
            ``(low, high)``, e.g. ``(-1, 1)`` for a ``training_step`` that trains on
            ``x / 127.5 - 1``. ``None`` (default): integer batches are not read (one warning) and
            integer ``reference_data`` is refused — in raw units every distance would be wrong.
        capacity: most distinct training samples held in memory per rank (``sigmas="auto"``
            until the first check, ``reference_data="batches"`` for the whole run without a copy
            index): ``capacity × d × 4`` bytes on the CPU; never logged or saved.
    """

    select: Selector = None
    ids: Selector = None
    sample_shape: Sequence[int] | None = None
    encode_fn: Callable[[Tensor], Tensor] | None = None
    decode_fn: Callable[[Tensor], Tensor] | None = None
    data_range: tuple[float, float] | None = None
    integer_range: tuple[float, float] | None = None
    capacity: int = defaults.CALIBRATION_CAPACITY

    def __post_init__(self) -> None:
        for name in ("select", "ids"):
            _check_selector(f"data.{name}", getattr(self, name))
        _set(self, "sample_shape", check_shape("data.sample_shape", self.sample_shape))
        _set(self, "data_range", check_range("data.data_range", self.data_range))
        _set(self, "integer_range", check_range("data.integer_range", self.integer_range))
        check_int("data.capacity", self.capacity, 2)


@dataclass(frozen=True, eq=False)
class ProbeOptions:
    """What the probes are: how they are drawn and at which noise levels they are measured.

    Attributes:
        sampler_steps: sampler steps per probe (``>= 2``).
        timesteps: evaluation timesteps in schedule units; they win over ``sigmas``.
        sigma_factors: with ``sigmas="auto"``: the levels are these × the median
            nearest-neighbour distance of the training samples seen before the first check
            (:mod:`memwatch.calibration`).
        seed: seed of the probes' start noise and of the Lanczos / trace vectors.
        sampler: a :class:`memwatch.sampling.ProbeSampler`; default
            :func:`memwatch.sample_trajectory`, which steps the model's own diffusers scheduler.
        ema_attr: name of an EMA of the network on the module to measure instead (an
            ``nn.Module`` copy, ``AveragedModel``, or a diffusers ``EMAModel``).
        conditions: for a conditional (classifier-free-guidance) model, the conditions to watch
            (a tensor ``[C, ...]``, or a sequence of int labels / tensors): each check also draws
            ``num_probes`` probes per condition and logs ``memwatch/cond/{c}/…``
            (:mod:`memwatch.signals.conditional`).
        condition_first_steps: the conditional metrics average over this many leading
            (noisiest) sampler steps; default :func:`memwatch.conditional.default_first_steps`.
    """

    sampler_steps: int = defaults.SAMPLER_STEPS
    timesteps: Sequence[float] | None = None
    sigma_factors: Sequence[float] = defaults.SIGMA_FACTORS
    seed: int = 0
    sampler: ProbeSampler | None = None
    ema_attr: str | None = None
    conditions: Tensor | Sequence[Any] | Mapping[str, Any] | None = None
    condition_first_steps: int | None = None

    def __post_init__(self) -> None:
        check_int("probes.sampler_steps", self.sampler_steps, 2)
        if self.timesteps is not None:
            _set(self, "timesteps", check_levels("probes.timesteps", self.timesteps, positive=False))
        _set(self, "sigma_factors", check_levels("probes.sigma_factors", self.sigma_factors))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise MemwatchError(f"`probes.seed` must be an integer, got {self.seed!r}")
        check_first_steps(
            self.condition_first_steps,
            self.sampler_steps,
            name="probes.condition_first_steps",
            steps_name="probes.sampler_steps",
        )
        parse_conditions(self.conditions)  # a malformed condition fails here, not at fit start


@dataclass(frozen=True)
class OnsetOptions:
    """When onset is declared: the :class:`memwatch.onset.OnsetDetector` rule on the share of
    probes that ``on`` watches.

    Attributes:
        threshold: onset when more than this share of the probes is memorized (``[0, 1)``;
            ``None``: only ``min_delta``; ``"auto"``: the rule's own, :data:`RULE_DEFAULTS`) ...
        patience: ... at this many checks in a row (``"auto"``: the rule's own).
        on: ``"auto"`` (default: ``alarm_fraction``, :mod:`memwatch.signals.alarm` — copies of the
            training samples, or isolated peaks within ``confirm_ratio`` of one; without training
            samples, isolated peaks), ``"sharpness"`` (``memorized_fraction``), ``"lid"``
            (``lid_memorized_fraction``: probes whose LID statistic fell below ``sharpness.lid``'s
            threshold, :mod:`memwatch.signals.lid`),
            ``"copies"`` (``nn_memorized_fraction``: probes with ``d₁/d₂ < 1/3`` to the training
            samples; needs ``reference_data``) or
            ``"either"`` (``flagged_fraction``: sharp or a copy).
        confirm_ratio: with ``on="auto"`` and training samples: an isolated peak (LID below
            ``sharpness.lid.count_threshold``) counts when its ``d₁/d₂`` is below this (``(1/3, 1]``).
        min_delta: also/instead: onset when the share exceeds the baseline of the first
            ``baseline_checks`` checks by this much.
        min_steps: no onset before this global step.
        baseline_checks: checks that form the baseline of ``min_delta``.
        min_valid_fraction: a check whose share of probes with finite values is below this
            (``(0, 1]``) is a failed check: NaN metrics, neither clean nor counted.
    """

    threshold: float | str | None = "auto"
    patience: int | str = "auto"
    on: str = defaults.ONSET_ON
    confirm_ratio: float = defaults.CONFIRM_RATIO
    min_delta: float | None = None
    min_steps: int = 0
    baseline_checks: int = 3
    min_valid_fraction: float = defaults.MIN_VALID_FRACTION

    def __post_init__(self) -> None:
        if self.threshold not in (None, "auto"):
            check_fraction("onset.threshold", self.threshold)
        if self.patience != "auto":
            check_int("onset.patience", self.patience, 1)
        if self.on not in ONSET_VALUES:
            raise MemwatchError(f"`onset.on` must be one of {sorted(ONSET_VALUES)}, got {self.on!r}")
        check_fraction("onset.min_valid_fraction", self.min_valid_fraction, low_open=True, high_closed=True)
        ratio = self.confirm_ratio
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 1 / 3 < ratio <= 1):
            raise MemwatchError(f"`onset.confirm_ratio` must be a number in (1/3, 1], got {self.confirm_ratio!r}")
        self.detector()  # the detector checks the rest (min_delta, min_steps, baseline_checks)

    def resolved(self, compared: bool = True) -> tuple[float | None, int]:
        """``(threshold, patience)`` in force: the rule's own where ``"auto"`` (:data:`RULE_DEFAULTS`;
        ``on="auto"`` without training samples to compare with, ``compared=False``: its fallback's)."""
        rule = self.on if self.on != "auto" or compared else "auto without samples"
        threshold, patience = RULE_DEFAULTS[rule]
        return (
            threshold if self.threshold == "auto" else self.threshold,  # type: ignore[return-value]
            patience if self.patience == "auto" else int(self.patience),
        )

    def detector(self, compared: bool = True) -> OnsetDetector:
        """A fresh detector with this rule (``compared``: whether training samples are compared with the probes)."""
        threshold, patience = self.resolved(compared)
        return OnsetDetector(
            threshold=threshold,
            min_delta=self.min_delta,
            baseline_checks=self.baseline_checks,
            patience=patience,
            min_steps=self.min_steps,
            monitor=ONSET_VALUES[self.on],
        )


@dataclass(frozen=True)
class CheckpointOptions:
    """What is kept: the last clean checkpoint (``memwatch-clean.ckpt``).

    Attributes:
        save: save it at every clean check (overwritten atomically: a crash or kill mid-save
            keeps the previous one), so the last one before onset survives. A failed save is a
            warning.
        dirpath: where it goes; default: the run's own log folder (see
            :func:`memwatch.checkpoint.default_dirpath`), never shared between runs.
        mode: ``"weights"`` (the module's weights, EMA copies included; load it with
            ``YourModule.load_from_checkpoint``), ``"full"`` (resumable) or ``"adapter"`` (only
            the peft adapter weights, e.g. LoRA, of the module's adapted networks; load them onto
            the base model with :func:`memwatch.checkpoint.load_adapter_checkpoint`; a module
            with no peft adapter fails at fit start).
    """

    save: bool = True
    dirpath: str | Path | None = None
    mode: str = "weights"

    def __post_init__(self) -> None:
        if not isinstance(self.save, bool):
            raise MemwatchError(f"`checkpoint.save` must be True or False, got {self.save!r}")
        check_save_mode(self.mode, name="checkpoint.mode")


@dataclass(frozen=True)
class ReportOptions:
    """What a check reports, and how its faults surface.

    Attributes:
        figures: draw and log the spectrum / curve / condition plots and the probe table (a few
            tens of ms per check); scalars and histograms are logged regardless.
        media: also log probe images and nearest-neighbour galleries (privacy: a memorized
            probe *is* a copy of training data; off by default).
        verbose: print a line when a check starts and one with its result (rank zero).
        raise_errors: re-raise faults of a check or of a batch's intake instead of warning
            (default: training never crashes because of memwatch).
    """

    figures: bool = True
    media: bool = False
    verbose: bool = True
    raise_errors: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not isinstance(getattr(self, field.name), bool):
                raise MemwatchError(f"`report.{field.name}` must be True or False, got {getattr(self, field.name)!r}")


#: the flat names of memwatch 0.1 → (group, field) of today's options
LEGACY_NAMES: dict[str, tuple[str, str]] = {
    **{n: ("probes", n) for n in ("sampler_steps", "timesteps", "sigma_factors", "seed", "sampler", "ema_attr")},
    **{n: ("probes", n) for n in ("conditions", "condition_first_steps")},
    **{n: ("sharpness", n) for n in ("k", "threshold", "method", "num_iters", "num_vectors", "max_batch")},
    **{n: ("sharpness", n) for n in ("spectrum_every_n_checks", "score_threshold")},
    "onset_threshold": ("onset", "threshold"),
    "onset_on": ("onset", "on"),
    "onset_min_delta": ("onset", "min_delta"),
    **{n: ("onset", n) for n in ("patience", "min_steps", "baseline_checks", "min_valid_fraction")},
    "save_clean_checkpoint": ("checkpoint", "save"),
    "dirpath": ("checkpoint", "dirpath"),
    "clean_checkpoint_mode": ("checkpoint", "mode"),
    "reference_ids": ("copies", "ids"),
    "heldout_data": ("loss_gap", "heldout_data"),
    "loss_gap_sigmas": ("loss_gap", "sigmas"),
    "batch_key": ("data", "select"),
    **{n: ("data", n) for n in ("sample_shape", "encode_fn", "decode_fn", "data_range")},
    "calibration_capacity": ("data", "capacity"),
    "log_figures": ("report", "figures"),
    "log_media": ("report", "media"),
    **{n: ("report", n) for n in ("verbose", "raise_errors")},
}


def regroup(
    groups: Mapping[str, Any], legacy: Mapping[str, Any], *, warn: bool = True, stacklevel: int = 3
) -> dict[str, Any]:
    """``groups`` (name → options object) with the flat ``legacy`` settings moved into them, one
    :class:`MemwatchDeprecationWarning` naming each new place (``warn=False``: none, for a
    command whose own flags are flat, as ``memwatch scan``'s are).

    Raises:
        TypeError: a name that is neither today's nor a flat name of an earlier release.
        MemwatchError: a value out of range (from the group's own checks).

    Example:
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     regroup({"onset": OnsetOptions()}, {"onset_threshold": 0.1})["onset"].threshold
        0.1
        >>> str(seen[0].message)
        '`onset_threshold=` is deprecated and will be removed in memwatch 0.3: pass onset=OnsetOptions(threshold=...)'
    """
    unknown = sorted(set(legacy) - set(LEGACY_NAMES))
    if unknown:
        raise TypeError(f"MemorizationMonitor() got unexpected keyword arguments {unknown}")
    changes: dict[str, dict[str, Any]] = {}
    for name, value in legacy.items():
        group, field = LEGACY_NAMES[name]
        if warn:
            warnings.warn(
                f"`{name}=` is deprecated and will be removed in memwatch 0.3: pass "
                f"{group}={type(groups[group]).__name__}({field}=...)",
                MemwatchDeprecationWarning,
                stacklevel=stacklevel,
            )
        changes.setdefault(group, {})[field] = value
    return {name: dataclasses.replace(g, **changes[name]) if name in changes else g for name, g in groups.items()}
