"""The copies signal: which probes copy a training sample (``d₁/d₂ < 1/3``), and which items.

The training samples live in a :class:`memwatch.index.CopyIndex` (``copies.index``): filled once
at fit start from a ``reference_data`` tensor (or iterable; each DDP rank indexes its shard), or
with ``"batches"`` from the distinct training samples this rank sees (in memory only, never
logged or saved; bounded by ``copies.index.memory_mb``, not by a sample count). At a check every
rank searches every rank's probes in its own index and the ranks' two nearest candidates are
merged by content key (:func:`memwatch.index.merge_hits`): the union's ratio is exact, whichever
rank holds which sample. With a reference tensor the candidates are re-ranked on it, so the
distances are those of the samples themselves.

It contributes ``nn_ratio`` (and with a reference, the nearest item) to the measurement — the
sharpness summary reads it: ``nn_memorized_fraction``, ``auroc``, ``flagged_fraction`` — and with
a reference the items the probes copy (``CheckResult.copied``,
:attr:`MemorizationMonitor.most_copied`). Where no ratio can be told (fewer than two distinct
training samples held), those three values are NaN with one warning; the sharpness values stay.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch.attribution import CopiedItem, copied_items
from memwatch.index import CopyIndex, Hits, fill_from, merge_hits, nearest, ratio
from memwatch.intake import TrainingSamples, in_probe_space
from memwatch.options import DataOptions
from memwatch.probes import ProbeMeasurement, shard
from memwatch.signals.base import Draft, Run, Signal, gathered, nan_values
from memwatch.signals.context import SignalContext
from memwatch.signals.options import CopyOptions

__all__ = ["CopyOptions", "CopySignal"]

#: the values that need a ratio per probe
COPY_VALUES = ("nn_memorized_fraction", "auroc", "flagged_fraction")


class CopySignal(Signal):
    """Copies of the training samples among the probes (see the module docstring).

    Args:
        options: the copies group.
        reference_data: the monitor's ``reference_data`` (a tensor or an iterable), or ``"batches"``.
        data: the data group (selector, encoder, units) the reference is read with.
        held: with ``"batches"``: the monitor's training samples, which feed the index.
        num_probes: probes per check, over every rank.
        score_threshold: a probe is flagged by sharpness above this (for the attribution table).
    """

    name = "copies"
    phase_names = {"contribute": "copy_search"}
    value_names = COPY_VALUES

    def __init__(
        self,
        options: CopyOptions,
        *,
        reference_data: Any,
        data: DataOptions,
        held: TrainingSamples | None,
        num_probes: int,
        score_threshold: float,
    ) -> None:
        self.options = options
        self.reference_data, self.data, self.held = reference_data, data, held
        self.reference: Tensor | None = None
        self.index: CopyIndex | None = None
        self.num_probes = num_probes
        self.score_threshold = score_threshold
        self._warned_few = False

    def prepare(self, run: Run) -> None:
        """The index, filled from a reference (checked and moved into the probes' space; a bad
        one fails here), or wired to the batches."""
        if self.index is not None:
            return
        self.index = CopyIndex(self.options.index, run.sample_shape, self.options.embed_fn)
        if self.held is not None:
            self.held.index = self.index
            return
        self.reference = in_probe_space(self.reference_data, "reference_data", self.data, run.sample_shape, run.device)
        fill_from(self.index, self.reference, progress=run.is_global_zero, shard=(run.rank, run.world_size))

    @property
    def original_images(self) -> Tensor | None:
        """A pixel reference tensor as the user gave it, before ``data.encode_fn`` (for galleries
        of latent models: the originals, not decoded latents); ``None`` otherwise."""
        plain = isinstance(self.reference_data, Tensor) and self.data.encode_fn is not None
        return self.reference_data.detach().cpu() if plain else None

    def contribute(self, run: Run, draft: Draft, measured: object) -> list[CopiedItem] | None:
        """The probes' ratios into the measurement; the reading: the reference items copied (with a
        reference tensor), most copied first."""
        if self.held is not None and self.held.refused:  # said once where the batches were refused
            draft.values.update(nan_values(COPY_VALUES))
            return None
        ratio_all, row_all = self._search(run, draft.measurement)
        if bool(run.all_true(bool(torch.isnan(ratio_all).all()))):
            self._few_samples(run)
            draft.values.update(nan_values(COPY_VALUES))
            return None
        mine = shard(self.num_probes, run.world_size, run.rank)
        nearest_item = None if self.reference is None else row_all[mine]
        draft.with_measurement(nn_ratio=ratio_all[mine].float(), nearest=nearest_item)
        if self.reference is None:
            return None
        flagged = gathered(draft.measurement.primary.memorization_score.to(run.device)) > self.score_threshold
        return self._copied(row_all, ratio_all, flagged)

    def _copied(self, row: Tensor, ratio_all: Tensor, flagged: Tensor) -> list[CopiedItem]:
        """The reference items every rank's probes copy, most copied first; a probe without a
        nearest item (not finite) is left out, the others keep their numbers."""
        assert self.reference is not None
        valid = torch.nonzero(row >= 0).flatten()
        items = copied_items(
            row[valid], ratio_all[valid], flagged[valid], num_items=len(self.reference), ids=self.options.ids
        )
        return [dataclasses.replace(c, probes=tuple(int(valid[p]) for p in c.probes)) for c in items]

    def _search(self, run: Run, measurement: ProbeMeasurement) -> tuple[Tensor, Tensor]:
        """``(d₁/d₂ [n], nearest row [n])`` of every rank's probes over every rank's index
        (collectives on every rank). A rank that cannot search makes every ratio NaN, with a
        warning, never a partial answer."""
        probes = gathered(measurement.samples.to(run.device))  # every rank's, in rank order
        n = probes.shape[0]
        try:
            assert self.index is not None  # the monitor drained the staged batches into it
            hits = self.index.search(probes, reference=self.reference)
            parts = _hit_tensors(hits)
        except Exception as err:  # noqa: BLE001 - a monitor must not crash training
            if run.raise_errors and run.world_size == 1:
                raise
            warnings.warn(  # from the rank that failed, which need not be rank zero
                f"memwatch: the probes could not be compared with the training samples: {err!r}; their copy values "
                "are NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            parts = _failed_hits(n, self.options.index.flip)
        every = [gathered(p.to(run.device).unsqueeze(0)) for p in parts]  # each [world, n, 2]
        merged = merge_hits([_hits_of([p[w] for p in every]) for w in range(every[0].shape[0])])
        row, _ = nearest(merged)
        return ratio(merged), row

    def _few_samples(self, run: Run) -> None:
        if not self._warned_few:
            self._warned_few = True
            rank_zero_warn(
                f"memwatch: at step {run.step} no probe's d₁/d₂ could be told (fewer than two distinct training "
                "samples to compare with, or the comparison failed: see above): nn_memorized_fraction, auroc and "
                "flagged_fraction are NaN; the sharpness values are measured as usual. Warned once"
            )


def _hit_tensors(hits: Hits) -> list[Tensor]:
    """``hits`` as a flat list of ``[n, 2]`` tensors (distance, key, row; then the mirror's)."""
    own = [hits.distance, hits.key.double(), hits.row.double()]
    return own if hits.mirror is None else own + _hit_tensors(hits.mirror)


def _hits_of(parts: list[Tensor]) -> Hits:
    """Inverse of :func:`_hit_tensors`."""
    mirror = _hits_of(parts[3:]) if len(parts) > 3 else None
    return Hits(parts[0], parts[1].long(), parts[2].long(), mirror)


def _failed_hits(n: int, flip: bool) -> list[Tensor]:
    """The hit tensors of a rank that could not search: NaN distances (every ratio NaN), no keys."""
    nan, none = torch.full((n, 2), torch.nan, dtype=torch.float64), torch.full((n, 2), -1.0, dtype=torch.float64)
    return [nan, none, none] * (2 if flip else 1)


def build(context: SignalContext) -> CopySignal | None:
    """The copies signal (with ``reference_data``)."""
    if context.reference_data is None:
        return None
    return CopySignal(
        context.copies,
        reference_data=context.reference_data,
        data=context.data,
        held=context.held() if context.copies_from_batches else None,
        num_probes=context.num_probes,
        score_threshold=context.sharpness.score_threshold,
    )
