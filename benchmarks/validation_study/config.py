"""What the study runs: data sets, sizes, seeds, noise levels, threshold grids, the signals it
scores, and the library defaults it compares against.

Everything here is a frozen value; nothing trains or reads a file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from memwatch import MemorizationMonitor, SharpnessResult
from memwatch.sharpness import SharpnessOptions

NN_ONSET = 0.10  # ground-truth onset: first check with more than 10 % NN-memorized probes
FPRS = (0.01, 0.05)  # false-positive rates at which the TPR is reported
GMM_COMPONENTS, GMM_STD, GMM_SEED = 8, 0.3, 1234
MANIFOLD_DIM = 16
NEVER, BORDERLINE = 0.05, 0.10  # a run never memorizes: no check above 5 % copies; 5-10 %: borderline
SCALED: dict[str, tuple[str, tuple[float, float]]] = {  # name -> (base data set, (a, b)): x -> a x + b
    "digits_01": ("digits", (0.5, 0.5)),  # the [-1, 1] digits mapped to [0, 1]
    "digits_x3": ("digits", (3.0, 0.0)),  # the [-1, 1] digits × 3
}
# the v3 defaults, fixed: sharp fraction > 0.9 at the calibrated level 0.1, onset > 0.3, patience 2
V3_RULE = (0.9, 0.3, 2)
IMAGE_SIZES = {"digits16": 16, "digits16_mlp": 16}  # the digits upsampled to this side (d = 256): UNet, MLP
DUPLICATED = {"gmm_dup": ("gmm", 4, 2000)}  # name -> (base set, items repeated, times each): N distinct + the repeats
AUGMENTED = {"digits_aug": "digits"}  # name -> base set: trained on random views (augment.py), item ids in the batches
UNET_METHOD = "trace"  # the UNet runs' monitor: the tier `method="auto"` uses at image scale


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

SCORE_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)  # per-probe thresholds tried (sharp fraction)
LID_THRESHOLDS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)  # per-probe LID thresholds tried (dimensions)
ONSET_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the LID count's onset grid (v3's)
COPY_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3)  # θ: onset grid of the rules that read copies
RHOS = (0.4, 0.5, 0.6)  # ρ: the looser ratio of a confirmed probe
PATIENCES = (1, 2)  # checks in a row


# ----------------------------------------------------------------------------- the study grid
@dataclass(frozen=True)
class DataSpec:
    """One data set of the study: its sizes and its training recipe.

    Attributes:
        name: ``"gmm"``, ``"swiss_roll"``, ``"s_curve"``, ``"digits"`` or a rescaled set of
            :data:`SCALED` (see :func:`runs.make_data`).
        ns: training-set sizes N.
        max_steps: optimizer steps per run.
        every: check cadence (optimizer steps).
        hidden: width of the MLP ε-network; with ``model="unet"`` the UNet's first block width
            (the second is twice it).
        lr: Adam learning rate.
        model: ``"mlp"`` (``memwatch.apps.toymodels.DDPMModule``, the study's linear schedule) or
            ``"unet"`` (a diffusers ``UNet2DModel`` with a default ``DDPMScheduler``, found by the
            monitors without glue; its absolute and auto monitors measure with :data:`UNET_METHOD`).
        batch_size: training batch size (``None``: the study's).

    A data set of :data:`DUPLICATED` trains on its ``N`` distinct samples plus a few of them
    repeated many times (data-driven memorization); its truth is measured against the ``N``
    distinct ones.
    """

    name: str
    ns: tuple[int, ...]
    max_steps: int
    every: int
    hidden: int
    lr: float
    model: str = "mlp"
    batch_size: int | None = None

    @property
    def cost(self) -> float:
        """Rough CPU cost of one run, to start the longest first (measured: a UNet step of batch
        32 ≈ 25× an MLP-256 step of batch 64, which is ≈ 4× an MLP-128 step)."""
        per_step = 100.0 if self.model == "unet" else 4.0 if self.hidden > 128 else 1.0
        return self.max_steps * per_step


@dataclass(frozen=True)
class StudyConfig:
    """The whole grid: data sets × sizes × seeds, the noise levels measured, the selection grid.

    Attributes:
        data: the data sets.
        seeds: training seeds (data subset / embedding, init, batch order, probe noise).
        select_seeds: the seeds every choice is made on; the others only report.
        sigma_factors: the ``sigma_factors`` of the ``sigmas="auto"`` monitor (one level each).
        loss_timesteps: the fixed timesteps of the loss-gap baseline.
        held_out: size of the held-out split (and of the training subset) of the loss gap.
        num_probes, sampler_steps: probes per check and their DDIM steps.
        depth, batch_size: MLP depth and training batch size.
        gap_timestep, gap_threshold: the loss-gap baseline (one of ``loss_timesteps``; fixed, v3's).
        score_thresholds, lid_thresholds, onset_thresholds, copy_thresholds, rhos, patiences: the
            grids tried on the selection seeds (:mod:`.analysis`).
    """

    data: tuple[DataSpec, ...]
    seeds: tuple[int, ...]
    select_seeds: tuple[int, ...]
    sigma_factors: tuple[float, ...]
    loss_timesteps: tuple[int, ...] = (20, 50, 100, 200, 400)
    held_out: int = 256
    num_probes: int = 32
    sampler_steps: int = 50
    depth: int = 3
    batch_size: int = 64
    gap_timestep: int = 400
    gap_threshold: float = 0.5
    score_thresholds: tuple[float, ...] = SCORE_THRESHOLDS
    lid_thresholds: tuple[float, ...] = LID_THRESHOLDS
    onset_thresholds: tuple[float, ...] = ONSET_THRESHOLDS
    copy_thresholds: tuple[float, ...] = COPY_THRESHOLDS
    rhos: tuple[float, ...] = RHOS
    patiences: tuple[int, ...] = PATIENCES

    @property
    def report_seeds(self) -> tuple[int, ...]:
        """The seeds that play no part in any choice."""
        return tuple(s for s in self.seeds if s not in self.select_seeds)

    def auto_specs(self) -> list[str]:
        """Names of the calibrated noise levels measured: ``"auto 0.2"``, …"""
        return [f"auto {c:g}" for c in self.sigma_factors]


def _digits_specs(
    ns: tuple[int, ...], steps: int, every: int, hidden: int, lr: float, names: tuple[str, ...] = ("digits", *SCALED)
) -> tuple[DataSpec, ...]:
    """The digits at the scales ``names`` (default: every scale of the study), same recipe."""
    return tuple(DataSpec(name, ns, steps, every, hidden, lr) for name in names)


DEFAULT = StudyConfig(
    data=(
        DataSpec("gmm", (8, 16, 1024), 4000, 250, 128, 2e-3),
        DataSpec("gmm_dup", (5000,), 4000, 250, 128, 2e-3),
        DataSpec("swiss_roll", (8, 16, 256), 4000, 250, 128, 2e-3),
        DataSpec("s_curve", (8, 16, 256), 4000, 250, 128, 2e-3),
        DataSpec("digits", (8, 16, 1024), 4000, 250, 256, 2e-3),
        *_digits_specs((16, 1024), 4000, 250, 256, 2e-3, names=tuple(SCALED)),
        DataSpec("digits16_mlp", (16, 1024), 3000, 250, 256, 2e-3),
        DataSpec("digits16", (16, 64, 1024), 3000, 250, 16, 1e-3, model="unet", batch_size=32),
        DataSpec("digits_aug", (4, 1024), 8000, 250, 256, 2e-3),  # N = 8, 16 do not memorize in 8000 steps (pilots)
    ),
    seeds=(0, 1, 2, 3, 4),
    select_seeds=(0, 1, 2),
    sigma_factors=(0.1,),  # the library's default level only (study v4)
    num_probes=20,
)
FRESH = replace(DEFAULT, seeds=(5,))  # trained after every choice is fixed, evaluated only (``--fresh``)

FAST = StudyConfig(
    data=(
        DataSpec("gmm", (4, 512), 600, 100, 128, 3e-3),
        DataSpec("gmm_dup", (300,), 600, 100, 128, 3e-3),
        DataSpec("digits_aug", (4,), 600, 100, 64, 3e-3),
    ),
    seeds=(0, 1),
    select_seeds=(0,),
    sigma_factors=(0.1,),
    loss_timesteps=(50, 400),
    held_out=64,
    num_probes=16,
    sampler_steps=20,
    depth=2,
)


# ----------------------------------------------------------------------------- library defaults
@dataclass(frozen=True)
class Defaults:
    """The callback settings the study replays and reports against ("shipped").

    Attributes:
        sigmas: evaluation noise levels; the first is the primary one onset is decided on
            (``("auto",)``: calibrated, ``sigma_factors`` × the median NN distance).
        threshold: τ, a direction is sharp when σ_t²λ < -τ.
        score_threshold: a probe is memorized when its sharp fraction exceeds this.
        onset_threshold, onset_min_delta, patience, min_steps, baseline_checks: the
            :class:`memwatch.onset.OnsetDetector` rule on the share ``onset_on`` names.
        onset_on: ``"auto"`` (the alarm: a copy, or an LID below ``lid_count_threshold`` with
            ``d₁/d₂ < confirm_ratio``), ``"copies"``, ``"either"`` (sharp or a copy), ``"sharpness"``
            (the sharp fraction above ``score_threshold``) or ``"lid"`` (the LID signal's
            ``lid_statistic`` below ``lid_ratio_threshold``, or the LID below ``lid_count_threshold``).
        lid_statistic, lid_ratio_threshold, lid_count_threshold: the LID signal's rule.
        confirm_ratio: the alarm's looser ratio for an isolated peak.
    """

    sigmas: tuple[float, ...]
    threshold: float
    score_threshold: float
    onset_threshold: float | None
    onset_min_delta: float | None
    patience: int
    min_steps: int
    baseline_checks: int
    sigma_factors: tuple[float, ...] = (0.2,)
    onset_on: str = "sharpness"
    lid_statistic: str = "relative"
    lid_ratio_threshold: float = 0.5
    lid_count_threshold: float = 3.0
    confirm_ratio: float = 0.5

    @property
    def primary_spec(self) -> str:
        """The study's name of the primary noise level, e.g. ``"abs 0.3"`` (``"auto F"`` with
        ``sigmas="auto"``: ``F`` the first factor)."""
        if self.sigmas == ("auto",):
            return f"auto {float(self.sigma_factors[0]):g}"
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
            "sigma_factors": list(self.sigma_factors),
            "onset_on": self.onset_on,
            "lid_statistic": self.lid_statistic,
            "lid_ratio_threshold": self.lid_ratio_threshold,
            "lid_count_threshold": self.lid_count_threshold,
            "confirm_ratio": self.confirm_ratio,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Defaults:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "sigmas": tuple(d["sigmas"]), "sigma_factors": tuple(d["sigma_factors"])})


def library_defaults() -> Defaults:
    """The library's current defaults, read by name: τ from :class:`memwatch.sharpness.SharpnessOptions`,
    the noise levels, the score threshold, the LID rule and the onset rule (its
    :class:`memwatch.onset.OnsetDetector`) from a default :class:`memwatch.MemorizationMonitor`.
    The study follows any edit of them."""
    monitor = MemorizationMonitor()
    detector = monitor.detector
    return Defaults(
        sigmas=("auto",) if monitor.calibrating else tuple(monitor.sigmas),
        sigma_factors=tuple(monitor.probes.sigma_factors),
        threshold=SharpnessOptions().threshold,
        score_threshold=monitor.sharpness.score_threshold,
        onset_threshold=detector.threshold,
        onset_min_delta=detector.min_delta,
        patience=detector.patience,
        min_steps=detector.min_steps,
        baseline_checks=detector.baseline_checks,
        onset_on=monitor.onset.on,
        lid_statistic=monitor.sharpness.lid.statistic,
        lid_ratio_threshold=monitor.sharpness.lid.ratio_threshold,
        lid_count_threshold=monitor.sharpness.lid.count_threshold,
        confirm_ratio=monitor.onset.confirm_ratio,
    )
