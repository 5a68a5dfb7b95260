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
        num_probes, sampler_steps, k: the monitor's size (the callback's defaults unless a
            smaller demo asks for less); everything it decides with — noise levels, the onset rule
            and its thresholds — is the library's default (:mod:`memwatch.defaults`).
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
    k: int = defaults.SHARPNESS.k


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
        lid: ``[n]``; flagged: ``[n]`` bool, the probes the monitor's onset rule counts as
        memorized; nn_ratio: ``[n]`` d₁/d₂ to the training set; nearest: ``[n]`` index of the
        nearest training image; density: ``[G]`` mean spectral density on ``grid`` ``[G]``.
    """

    samples: Tensor
    score: Tensor
    lid: Tensor
    flagged: Tensor
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
        sigma: the primary σ_t it measured at (calibrated from the training data); onset_key,
        onset_threshold, onset_patience: the value its onset rule watches (``alarm_fraction``, …),
        the share above which it fires and at how many checks in a row; rule: the rule in words.
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
    sigma: float
    onset_key: str
    onset_threshold: float
    onset_patience: int
    rule: str
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
