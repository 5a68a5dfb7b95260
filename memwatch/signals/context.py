"""What a signal's factory sees of its monitor: a typed context instead of the monitor itself.

Each signal module has a ``build(context: SignalContext) -> Signal | None`` factory
(:mod:`memwatch.signals.registry`). The context carries the monitor's settings and the few
services a signal may call later — the training samples held now, the evaluation timesteps, the
row bound of a model call, the training side of the comparisons, and the hook that moves the
measurement to calibrated levels — so no signal holds the monitor or looks another signal up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from memwatch.intake import TrainingSamples
    from memwatch.options import DataOptions, OnsetOptions, ProbeOptions
    from memwatch.signals.options import CopyOptions, LossGapOptions, SharpnessCheckOptions

__all__ = ["SignalContext"]


@dataclass(frozen=True)
class SignalContext:
    """The monitor's settings and services, as its signals' factories read them.

    Attributes:
        num_probes: probes per check, all ranks together.
        reference_data: the monitor's ``reference_data`` (a tensor ``[N, *shape]``, an iterable of
            batches, ``"batches"`` or ``None``).
        data, probes, sharpness, onset, copies, loss_gap: the monitor's option groups.
        calibrating: whether the noise levels come from the training samples (``sigmas="auto"``
            and no ``probes.timesteps``).
        held: ``() ->`` the training samples the monitor holds now (``None`` once it freed them).
        timesteps: ``() ->`` the evaluation timesteps, primary first (fixed at the run's start or
            by the calibration at the first check).
        max_batch: ``() ->`` rows per model call (the measurement's resolved bound, or ``None``).
        training_samples: ``() ->`` the training side of a comparison ``[m, *shape]`` in the
            probes' space: the reference tensor, or the samples held (known by the first check).
        use_levels: measure at these noise levels σ_t from now on (the calibration's result).
    """

    num_probes: int
    reference_data: Tensor | Any | str | None
    data: DataOptions
    probes: ProbeOptions
    sharpness: SharpnessCheckOptions
    onset: OnsetOptions
    copies: CopyOptions
    loss_gap: LossGapOptions
    calibrating: bool
    held: Callable[[], TrainingSamples | None]
    timesteps: Callable[[], list[float]]
    max_batch: Callable[[], int | None]
    training_samples: Callable[[], Tensor]
    use_levels: Callable[[Sequence[float]], None]

    @property
    def seed(self) -> int:
        """The probes' seed, which every seeded draw of a signal derives from."""
        return self.probes.seed

    @property
    def copies_from_batches(self) -> bool:
        """Whether the probes are compared with the training samples seen (``reference_data="batches"``)."""
        return isinstance(self.reference_data, str)
