"""The loss-gap signal: the baseline a careful user watches, side by side with the sharpness.

With ``loss_gap.heldout_data`` (samples of the training distribution the model never trains on)
each check logs the denoising loss at ``loss_gap.sigmas`` with fixed noises on
``LOSS_GAP_SIZE`` of them (``loss_heldout``), the same on training samples (``loss_train``: the
reference tensor, or the samples held at the first check with ``"batches"``) and their relative
gap ``loss_gap`` (:mod:`memwatch.lossgap`). The onset never reads it. A fault here makes only
these three values NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from memwatch import defaults
from memwatch.intake import in_probe_space
from memwatch.lossgap import LossGap, relative_gap
from memwatch.options import DataOptions
from memwatch.probes import ProbeMeasurement, evaluation_timesteps
from memwatch.score import DiffusionScore
from memwatch.signals.base import Draft, Run, Signal, gathered
from memwatch.signals.context import SignalContext
from memwatch.signals.options import LossGapOptions

__all__ = ["LossGapOptions", "LossGapSignal"]


class LossGapSignal(Signal):
    """The relative loss gap at every check (see the module docstring).

    Args:
        options: the loss-gap group.
        data: the data group (selector, encoder, units) the held-out data is read with.
        training_samples: the training side, known by the first check.
        seed: seed of the fixed noises.
        max_batch: ``() -> rows per model call`` (the sharpness signal's resolved bound).
    """

    name = "loss_gap"
    reads_reservoir = True  # its training side, with reference_data="batches"
    value_names = ("loss_train", "loss_heldout", "loss_gap")

    def __init__(
        self,
        options: LossGapOptions,
        *,
        data: DataOptions,
        training_samples: Callable[[], Tensor],
        seed: int,
        max_batch: Callable[[], int | None],
    ) -> None:
        self.options, self.data = options, data
        self.training_samples = training_samples
        self.seed = seed
        self.max_batch = max_batch
        self.heldout: Tensor | None = None  # in the probes' space, from prepare
        self._times: list[float] = []
        self._gap: LossGap | None = None  # built at the first check

    def prepare(self, run: Run) -> None:
        """The held-out data in the probes' space; a bad one, or a σ outside the schedule, fails here."""
        self._times = evaluation_timesteps(run.score.schedule, self.options.sigmas, name="loss_gap.sigmas")
        name = "loss_gap.heldout_data"
        self.heldout = in_probe_space(self.options.heldout_data, name, self.data, run.sample_shape, run.device)

    def measure(self, run: Run, score: DiffusionScore, measurement: ProbeMeasurement) -> tuple[Tensor, Tensor]:
        """``(L_train [K], L_held [K])`` of this rank's loss-gap samples."""
        assert self.heldout is not None
        if self._gap is None:
            self._gap = LossGap(
                self.training_samples(),
                self.heldout,
                timesteps=self._times,
                size=defaults.LOSS_GAP_SIZE,
                seed=self.seed,
            )
        return self._gap.losses(score, device=run.device, max_batch=self.max_batch())

    def contribute(self, run: Run, draft: Draft, measured: tuple[Tensor, Tensor]) -> None:
        """Means over the timesteps and every rank (NaN when any is) and their relative gap."""
        train, held = (float(gathered(v.double().mean().reshape(1).to(run.device)).mean()) for v in measured)
        draft.values.update(
            loss_train=train, loss_heldout=held, loss_gap=relative_gap(torch.tensor(train), torch.tensor(held))
        )


def build(context: SignalContext) -> LossGapSignal | None:
    """The loss-gap signal (with ``loss_gap.heldout_data``)."""
    if context.loss_gap.heldout_data is None:
        return None
    return LossGapSignal(
        context.loss_gap,
        data=context.data,
        training_samples=context.training_samples,
        seed=context.seed,
        max_batch=context.max_batch,
    )
