"""What the study runs: data sets, sizes, seeds, noise levels, threshold grids, the signals it
scores, and the library defaults it compares against.

Everything here is a frozen value; nothing trains or reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from memwatch import MemorizationMonitor, SharpnessResult
from memwatch.sharpness import SharpnessOptions

NN_ONSET = 0.10  # ground-truth onset: first check with more than 10 % NN-memorized probes
FPRS = (0.01, 0.05)  # false-positive rates at which the TPR is reported
GMM_COMPONENTS, GMM_STD, GMM_SEED = 8, 0.3, 1234
MANIFOLD_DIM = 16


# ----------------------------------------------------------------------------- signals
@dataclass(frozen=True)
class Signal:
    """One per-probe signal of a :class:`memwatch.SharpnessResult`.

    Attributes:
        label: name shown in tables and legends.
        value: ``SharpnessResult -> [n]`` raw per-probe value.
        sign: ``+1``: larger = more memorized; ``-1``: smaller = more memorized. ``sign · value``
            is the *oriented* signal (higher = more memorized) that every analysis uses.
    """

    label: str
    value: Callable[[SharpnessResult], torch.Tensor]
    sign: float


def _lambda_max(result: SharpnessResult) -> torch.Tensor:
    """``[n]`` the least negative normalized eigenvalue σ²λ_max of the dense spectrum."""
    return torch.nan_to_num(result.spectrum_nodes, nan=-math.inf).max(1).values


SIGNALS: dict[str, Signal] = {
    "sharp_fraction": Signal("sharp fraction", lambda r: r.sharp_fraction, 1.0),
    "lid": Signal("LID", lambda r: r.lid, -1.0),
    "lambda_min": Signal("σ²λ_min", lambda r: r.normalized[:, 0], -1.0),
    "normalized_eig_mean": Signal("mean σ²λ_1..k", lambda r: r.normalized.mean(1), -1.0),
    "flipd": Signal("FLIPD (trace)", lambda r: r.flipd, -1.0),
    "lambda_max": Signal("σ²λ_max", _lambda_max, -1.0),
}
PRIMARY_SIGNAL = "sharp_fraction"  # the callback's score
ALTERNATIVE_SIGNAL = "lambda_max"  # the strongest signal at low FPR; not the callback's score today

SCORE_THRESHOLDS: dict[str, tuple[float, ...]] = {  # per-probe thresholds tried on the oriented signal
    "sharp_fraction": (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
    # -σ²λ_max > c  <=>  every direction is sharp at τ = c  <=>  sharp fraction (at τ = c) = 1
    "lambda_max": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
}
ONSET_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ----------------------------------------------------------------------------- the study grid
@dataclass(frozen=True)
class DataSpec:
    """One data set of the study: its sizes and its training recipe.

    Attributes:
        name: ``"gmm"``, ``"swiss_roll"``, ``"s_curve"`` or ``"digits"`` (see :func:`runs.make_data`).
        ns: training-set sizes N.
        max_steps: optimizer steps per run.
        every: check cadence (optimizer steps).
        hidden: width of the MLP ε-network.
        lr: Adam learning rate.
    """

    name: str
    ns: tuple[int, ...]
    max_steps: int
    every: int
    hidden: int
    lr: float


@dataclass(frozen=True)
class StudyConfig:
    """The whole grid: data sets × sizes × seeds, the noise levels measured, the selection grid.

    Attributes:
        data: the data sets.
        seeds: training seeds (data subset / embedding, init, batch order, probe noise).
        select_seeds: the seeds every choice is made on; the others only report.
        abs_sigmas: absolute noise levels σ_t.
        rel_sigmas: relative levels c, measured at σ_t = c · (median NN distance of the training set).
        num_probes, sampler_steps: probes per check and their DDIM steps.
        depth, batch_size: MLP depth and training batch size.
        score_thresholds: signal -> per-probe thresholds tried (on the oriented signal).
        onset_thresholds: ``onset_threshold`` values tried.
    """

    data: tuple[DataSpec, ...]
    seeds: tuple[int, ...]
    select_seeds: tuple[int, ...]
    abs_sigmas: tuple[float, ...]
    rel_sigmas: tuple[float, ...]
    num_probes: int = 32
    sampler_steps: int = 50
    depth: int = 3
    batch_size: int = 64
    score_thresholds: Mapping[str, tuple[float, ...]] = field(default_factory=lambda: dict(SCORE_THRESHOLDS))
    onset_thresholds: tuple[float, ...] = ONSET_THRESHOLDS

    @property
    def report_seeds(self) -> tuple[int, ...]:
        """The seeds that play no part in any choice."""
        return tuple(s for s in self.seeds if s not in self.select_seeds)

    def specs(self) -> list[str]:
        """Names of every noise level measured: ``"abs 0.3"``, ``"rel 0.1"``, …"""
        return [f"abs {s:g}" for s in self.abs_sigmas] + [f"rel {c:g}" for c in self.rel_sigmas]

    def abs_specs(self) -> list[str]:
        """The absolute noise levels of :meth:`specs`."""
        return [f"abs {s:g}" for s in self.abs_sigmas]


DEFAULT = StudyConfig(
    data=(
        DataSpec("gmm", (8, 16, 32, 64, 1024), 8000, 250, 128, 2e-3),
        DataSpec("swiss_roll", (8, 16, 32, 256, 1024), 8000, 250, 128, 2e-3),
        DataSpec("s_curve", (8, 16, 32, 256, 1024), 8000, 250, 128, 2e-3),
        DataSpec("digits", (8, 16, 32, 1024), 6000, 250, 256, 2e-3),
    ),
    seeds=(0, 1, 2),
    select_seeds=(0,),
    abs_sigmas=(0.05, 0.1, 0.2, 0.3, 0.5, 0.8),
    rel_sigmas=(0.05, 0.1, 0.2, 0.3, 0.5),
)

FAST = StudyConfig(
    data=(DataSpec("gmm", (4, 512), 600, 100, 128, 3e-3),),
    seeds=(0, 1),
    select_seeds=(0,),
    abs_sigmas=(0.1, 0.3),
    rel_sigmas=(0.1,),
    num_probes=16,
    sampler_steps=20,
    depth=2,
)


# ----------------------------------------------------------------------------- library defaults
@dataclass(frozen=True)
class Defaults:
    """The callback settings the study replays and reports against ("shipped").

    Attributes:
        sigmas: evaluation noise levels; the first is the primary one onset is decided on.
        threshold: τ, a direction is sharp when σ_t²λ < -τ.
        score_threshold: a probe is memorized when its sharp fraction exceeds this.
        onset_threshold, onset_min_delta, patience, min_steps, baseline_checks: the
            :class:`memwatch.onset.OnsetDetector` rule on ``memorized_fraction``.
    """

    sigmas: tuple[float, ...]
    threshold: float
    score_threshold: float
    onset_threshold: float | None
    onset_min_delta: float | None
    patience: int
    min_steps: int
    baseline_checks: int

    @property
    def primary_spec(self) -> str:
        """The study's name of the primary noise level, e.g. ``"abs 0.3"``."""
        return f"abs {float(self.sigmas[0]):g}"

    def to_dict(self) -> dict[str, Any]:
        """Plain form stored in the cache (``sigmas`` as a list)."""
        return {
            "sigmas": list(self.sigmas),
            "threshold": self.threshold,
            "score_threshold": self.score_threshold,
            "onset_threshold": self.onset_threshold,
            "onset_min_delta": self.onset_min_delta,
            "patience": self.patience,
            "min_steps": self.min_steps,
            "baseline_checks": self.baseline_checks,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Defaults:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "sigmas": tuple(d["sigmas"])})


def library_defaults() -> Defaults:
    """The library's current defaults, read by name: τ from :class:`memwatch.sharpness.SharpnessOptions`,
    the noise levels, the score threshold and the onset rule (its
    :class:`memwatch.onset.OnsetDetector`) from a default :class:`memwatch.MemorizationMonitor`.
    The study follows any edit of them."""
    monitor = MemorizationMonitor()
    detector = monitor.detector
    return Defaults(
        sigmas=tuple(monitor.sigmas),
        threshold=SharpnessOptions().threshold,
        score_threshold=monitor.score_threshold,
        onset_threshold=detector.threshold,
        onset_min_delta=detector.min_delta,
        patience=detector.patience,
        min_steps=detector.min_steps,
        baseline_checks=detector.baseline_checks,
    )
