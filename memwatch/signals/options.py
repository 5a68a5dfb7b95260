"""The signals' option groups: ``sharpness`` (with its ``lid``), ``copies`` and ``loss_gap``.

They sit below the signals and their :class:`memwatch.signals.context.SignalContext`, which carries
them to each signal's factory; each signal module re-exports its own. The monitor's other groups
are :mod:`memwatch.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from memwatch import defaults
from memwatch.errors import MemwatchError
from memwatch.index import IndexOptions
from memwatch.sharpness import SharpnessOptions
from memwatch.validation import check_fraction, check_int, check_levels, check_positive

__all__ = ["DESCRIPTIONS", "STATISTICS", "CopyOptions", "LidOptions", "LossGapOptions", "SharpnessCheckOptions"]

#: the per-probe statistics, in words: four ratios (1: as the reference; → 0: a copy) and the LID itself
DESCRIPTIONS = {
    "relative": "FLIPD / data LID",
    "profile": "mean over levels of FLIPD / data LID",
    "drawdown": "FLIPD / its first checks' median",
    "denoising": "denoising LID / data LID",
    "count": "LID",
}
STATISTICS = tuple(DESCRIPTIONS)


@dataclass(frozen=True)
class LidOptions:
    """How the LID signal measures and decides (see :mod:`memwatch.signals.lid`).

    Attributes:
        statistic: the per-probe statistic a probe is judged on, one of :data:`STATISTICS`
            (``"count"``: the probe's LID at the primary level itself, in dimensions — the
            sharpness measurement's count of flat directions, FLIPD on the trace tier).
        ratio_threshold: a probe is memorized when its ratio is below this (``(0, 1]``).
        count_threshold: with ``statistic="count"``: a probe is memorized when its LID is below
            this many dimensions (``> 0``).
        neighbours: the fewest points per local-PCA neighbourhood of the data LID (``>= 2``;
            more when the noise reaches further, :func:`memwatch.lid.data_lid`).
        anchors: neighbourhoods the data LID's median is taken over (``>= 1``).
        draws: noise draws per probe and level of the denoising LID (``0``: not measured; the
            ``denoising`` statistic needs ``>= 1``).
        baseline_checks: the first checks forming each probe's own baseline (``drawdown``).
    """

    statistic: str = defaults.LID_STATISTIC
    ratio_threshold: float = defaults.LID_RATIO_THRESHOLD
    count_threshold: float = defaults.LID_COUNT_THRESHOLD
    neighbours: int = 32
    anchors: int = 256
    draws: int = 8
    baseline_checks: int = 2

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise MemwatchError(f"`sharpness.lid.statistic` must be one of {list(STATISTICS)}, got {self.statistic!r}")
        check_fraction("sharpness.lid.ratio_threshold", self.ratio_threshold, low_open=True, high_closed=True)
        check_positive("sharpness.lid.count_threshold", self.count_threshold)
        check_int("sharpness.lid.neighbours", self.neighbours, 2)
        check_int("sharpness.lid.anchors", self.anchors, 1)
        check_int("sharpness.lid.draws", self.draws, 0)
        check_int("sharpness.lid.baseline_checks", self.baseline_checks, 1)
        if self.statistic == "denoising" and self.draws == 0:
            raise MemwatchError('`sharpness.lid.statistic`="denoising" needs `sharpness.lid.draws` >= 1, got 0')


@dataclass(frozen=True)
class SharpnessCheckOptions(SharpnessOptions):
    """How sharp a probe must be, and how its spectrum is measured at a check.

    The fields of :class:`memwatch.SharpnessOptions` (``k``, ``threshold``, ``method``,
    ``num_iters``, ``num_vectors``, ``max_batch``, …) plus:

    Attributes:
        score_threshold: a probe counts as memorized when its sharp fraction exceeds this (``[0, 1)``).
        lid: the LID signal's options (:class:`LidOptions`): the probes' LID
            against the data's, and the rule of ``onset.on="lid"``.
        spectrum_every_n_checks: with ``method="auto"`` at image scale (``d > 384``) the cheap
            trace tier (LID / FLIPD from ``num_vectors`` reverse-mode products per probe) runs at
            every check and the Lanczos spectrum every n-th check (``lambda_min`` and the
            spectrum panel update then; NaN in between).
        spectrum_probes: that spectrum is measured on this many probes per process (the first of
            its shard; ``None``: all of them): the panel draws their mean density, and
            ``lambda_min`` / ``normalized_eig_mean`` summarize them. The spectrum costs what the
            trace tier of eight checks does per probe; on a few it is no longer the first
            check's bulk (the README's Performance section).
    """

    score_threshold: float = defaults.SCORE_THRESHOLD
    spectrum_every_n_checks: int = defaults.SPECTRUM_EVERY_N_CHECKS
    spectrum_probes: int | None = defaults.SPECTRUM_PROBES
    lid: LidOptions = LidOptions()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("sharpness.score_threshold", self.score_threshold)
        check_int("sharpness.spectrum_every_n_checks", self.spectrum_every_n_checks, 1)
        if self.spectrum_probes is not None:
            check_int("sharpness.spectrum_probes", self.spectrum_probes, 1, allow="or None")

    def measure_options(self) -> SharpnessOptions:
        """The spectrum settings alone, as :func:`memwatch.measure_sharpness` takes them."""
        names = SharpnessOptions.__dataclass_fields__
        return SharpnessOptions(**{n: getattr(self, n) for n in names})


@dataclass(frozen=True, eq=False)
class CopyOptions:
    """What the probes' copies are found in, and named by.

    Attributes:
        ids: ids of the ``reference_data`` items (a list, or a Dataset returning ``(data, id)`` /
            ``{"id": …}``), shown in the attribution table (indices and counts only, never pixels).
        index: the copy index's settings (memory budget, vectors, exact/compressed tiers, mirrored
            probes): :class:`memwatch.index.IndexOptions`.
        embed_fn: a feature map ``[m, *shape] -> [m, e]`` (e.g. a frozen SSCD / DINO network)
            applied to the probes and the training samples alike: copies by L2 on its features.
    """

    ids: Sequence[Any] | None = None
    index: IndexOptions = IndexOptions()
    embed_fn: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.index, IndexOptions):
            raise MemwatchError(f"`copies.index` must be an IndexOptions, got {type(self.index).__name__}")


@dataclass(frozen=True, eq=False)
class LossGapOptions:
    """The held-out side of the loss gap.

    Attributes:
        heldout_data: samples ``[M, *shape]`` (or an iterable of batches; through
            ``data.encode_fn`` like ``reference_data``) the model never trains on; ``None``: no
            loss gap. Needs ``reference_data`` for the training side.
        sigmas: its noise levels σ_t (the validation study's timesteps).
    """

    heldout_data: Tensor | Any | None = None
    sigmas: Sequence[float] = defaults.LOSS_GAP_SIGMAS

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigmas", check_levels("loss_gap.sigmas", self.sigmas))
