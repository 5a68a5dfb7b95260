"""What a demo run is made of: its settings and what it produced (used by the demo and its figures)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from memwatch import defaults

__all__ = ["DEFAULT", "FAST", "DemoSettings", "ProbeReport", "RunResult"]


@dataclass(frozen=True)
class DemoSettings:
    """Everything that sets the size of a demo run (model, optimizer, monitor cadence and cost).

    Attributes:
        n_small, n_large: training-set sizes of the memorizing and the generalizing run.
        steps: optimizer steps per run; check_every: the monitor's ``every_n_train_steps``.
        hidden, depth, lr, batch_size: the MLP denoiser and its Adam optimizer.
        num_probes, sampler_steps, sigmas, k, threshold, score_threshold, onset_threshold: the monitor
            (see :mod:`memwatch.apps.demo`): the callback's defaults (:mod:`memwatch.defaults`) unless
            a smaller demo asks for less; the noise level and the onset threshold are the absolute
            rule the library shipped before ``sigmas="auto"`` (``defaults.ABSOLUTE_SIGMAS``,
            ``defaults.ABSOLUTE_ONSET_THRESHOLD``), whose story the demo tells.
    """

    n_small: int = 16
    n_large: int = 1024
    steps: int = 8000
    check_every: int = 500
    hidden: int = 256
    depth: int = 3
    lr: float = 2e-3
    batch_size: int = 64
    num_probes: int = defaults.NUM_PROBES
    sampler_steps: int = defaults.SAMPLER_STEPS
    sigmas: tuple[float, ...] = defaults.ABSOLUTE_SIGMAS
    k: int = defaults.SHARPNESS.k
    threshold: float = defaults.SHARPNESS.threshold
    score_threshold: float = defaults.SCORE_THRESHOLD
    onset_threshold: float = defaults.ABSOLUTE_ONSET_THRESHOLD


DEFAULT = DemoSettings()
#: ``--fast``: the same story in well under a minute (for tests and a first look).
FAST = DemoSettings(
    n_small=8,
    n_large=256,
    steps=1000,
    check_every=250,
    hidden=128,
    depth=2,
    num_probes=16,
    sampler_steps=20,
    k=4,
)


@dataclass
class ProbeReport:
    """Per-probe results of one of the monitor's checks, at its primary noise level.

    Attributes:
        samples: ``[n, *shape]`` generated probes; score: ``[n]`` sharp fraction at the primary σ;
        lid: ``[n]``; nn_ratio: ``[n]`` d₁/d₂ to the training set; nearest: ``[n]`` index of the
        nearest training image; density: ``[G]`` mean spectral density on ``grid`` ``[G]``.
    """

    samples: Tensor
    score: Tensor
    lid: Tensor
    nn_ratio: Tensor
    nearest: Tensor
    grid: Tensor
    density: Tensor


@dataclass
class RunResult:
    """What one demo run produced.

    Attributes:
        name: run name, e.g. ``"digits-N16"``; label: legend label; n_train: training images.
        steps: optimizer steps done; seconds: wall time of ``trainer.fit``.
        onset_step, clean_step: from the monitor (``None``: no onset / no clean check).
        history: the monitor's per-check values; final: its last check.
        early, late: probe reports at the first check and at the end.
        train_data: ``[N, 1, 8, 8]`` training images; wandb_dir: the W&B run folder (or None).
        clean_checkpoint: the monitor's last clean checkpoint (or None).
    """

    name: str
    label: str
    n_train: int
    steps: int
    seconds: float
    onset_step: int | None
    clean_step: int | None
    history: list[dict[str, float]]
    early: ProbeReport | None
    late: ProbeReport
    train_data: Tensor
    wandb_dir: Path | None = None
    clean_checkpoint: Path | None = None
    figures: dict[str, Path] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}
