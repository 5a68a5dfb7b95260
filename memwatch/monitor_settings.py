"""The monitor's settings that are read together: the cadence argument and the combinations
of options that only make sense together (each refusal names the settings and the value)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from memwatch.cadence import CadenceOptions
from memwatch.errors import MemwatchError
from memwatch.options import DataOptions, OnsetOptions
from memwatch.signals import CopyOptions, LossGapOptions
from memwatch.validation import check_cadence

__all__ = ["cadence_of", "check_together"]


def cadence_of(every_n_train_steps: Any) -> tuple[int | str | None, CadenceOptions | None]:
    """``(every_n_train_steps, cadence options)`` of the argument: ``"auto"`` or a
    :class:`memwatch.cadence.CadenceOptions` is the budgeted cadence (``"auto"``, its options), an
    integer a fixed one (it, ``None``), ``None`` none by steps.

    Raises:
        MemwatchError: any other value (the message names the argument and what it takes).
    """
    if isinstance(every_n_train_steps, CadenceOptions):
        return "auto", every_n_train_steps
    if isinstance(every_n_train_steps, str):
        if every_n_train_steps != "auto":
            raise MemwatchError(
                '`every_n_train_steps` must be "auto", a CadenceOptions, a positive integer or None, '
                f"got {every_n_train_steps!r}"
            )
        return "auto", CadenceOptions()
    return check_cadence("every_n_train_steps", every_n_train_steps), None


def _describe(value: Any) -> str:
    """A setting's value in a message: tensors by their shape, not their contents."""
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)


def check_together(
    reference_data: Any, data: DataOptions, onset: OnsetOptions, copies: CopyOptions, loss_gap: LossGapOptions
) -> None:
    """Settings that only make sense together."""
    if isinstance(reference_data, str) and reference_data != "batches":
        raise MemwatchError(
            '`reference_data` must be training samples, an iterable of batches, "batches" or None, '
            f"got {reference_data!r}"
        )
    if onset.on in ("copies", "either") and reference_data is None:
        raise MemwatchError(
            f"`onset.on`={onset.on!r} needs training samples to compare the probes with: pass `reference_data` "
            '(a tensor, or "batches" for those the monitor sees)'
        )
    if data.ids is not None and not isinstance(reference_data, str):
        raise MemwatchError(
            "`data.ids` name the items of the training batches' views, which the copy index reads with "
            f'reference_data="batches" (the default); got reference_data={_describe(reference_data)}: a reference '
            "tensor's rows are its items"
        )
    if isinstance(reference_data, str) and copies.ids is not None:
        raise MemwatchError(
            '`copies.ids` name the items of a `reference_data` tensor; with reference_data="batches" the monitor holds '
            "a changing sample of the batches and has no ids: pass `reference_data` as a tensor"
        )
    if loss_gap.heldout_data is not None and reference_data is None:
        raise MemwatchError(
            "`loss_gap.heldout_data` is one side of the loss gap; the other is training samples: pass `reference_data` "
            '(a tensor, or "batches" for those the monitor sees)'
        )
