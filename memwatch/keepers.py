"""Who keeps the clean weights: one small protocol, a file for any loop, the Trainer's checkpoint for Lightning.

At every clean check the monitor asks its :class:`Keeper` to save the module; the keeper writes
atomically (:func:`memwatch.checkpoint.write_atomic`: the previous file survives a failed or
killed save) and returns a :class:`memwatch.checkpoint.SaveOutcome`, the same on every rank.

* :class:`FileKeeper` — any training loop: the module's ``state_dict`` (``mode="weights"``) or
  its peft adapters (``mode="adapter"``, loaded back with
  :func:`memwatch.checkpoint.load_adapter_checkpoint`), written by rank zero.
* :class:`TrainerKeeper` — a Lightning Trainer: :func:`memwatch.checkpoint.save_clean_checkpoint`
  (``"weights"``, ``"full"`` or ``"adapter"``, through ``Trainer.save_checkpoint``).

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from memwatch.collective import SingleProcess
    >>> keeper = FileKeeper(tempfile.mkdtemp())
    >>> keeper.save(nn.Linear(2, 2), step=10, collective=SingleProcess()).ok
    True
    >>> sorted(torch.load(keeper.path, weights_only=True))
    ['global_step', 'state_dict']
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
from torch import nn

from memwatch.checkpoint import (
    CLEAN_CHECKPOINT_NAME,
    SaveOutcome,
    adapter_state,
    check_adapters,
    check_save_mode,
    save_clean_checkpoint,
    write_atomic,
)
from memwatch.collective import Collective
from memwatch.errors import MemwatchError

__all__ = ["FileKeeper", "Keeper", "TrainerKeeper"]


class Keeper(Protocol):
    """Saves the clean weights. Every rank calls :meth:`save`, in the same order.

    Attributes:
        path: the file a successful save leaves in place.
    """

    path: Path

    def check(self, module: nn.Module) -> None:
        """At the run's start: raise :class:`MemwatchError` when ``module`` cannot be saved so."""

    def save(self, module: nn.Module, step: int, collective: Collective) -> SaveOutcome:
        """Write ``module``'s weights of ``step`` atomically; the outcome is the same on every rank."""


class FileKeeper:
    """The clean weights of any loop, in one file: ``<dirpath>/memwatch-clean.ckpt``.

    ``mode="weights"`` writes ``{"state_dict": module.state_dict() (CPU), "global_step": step}``
    (load with ``module.load_state_dict(torch.load(path)["state_dict"])``); ``mode="adapter"``
    writes the peft adapters of the module's adapted networks
    (:func:`memwatch.checkpoint.load_adapter_checkpoint`). Rank zero writes; its outcome is broadcast.

    Args:
        dirpath: the folder (created by the first save).
        mode: ``"weights"`` or ``"adapter"`` (``"full"``, the optimizer's state too, needs a Trainer).
        raise_errors: re-raise a failed save instead of returning it.

    Raises:
        MemwatchError: ``mode`` is not ``"weights"`` or ``"adapter"``.
    """

    def __init__(self, dirpath: str | os.PathLike, mode: str = "weights", *, raise_errors: bool = False) -> None:
        if check_save_mode(mode, name="checkpoint.mode") == "full":
            raise MemwatchError(
                '`checkpoint.mode`="full" saves the optimizer and loop states, which only a Lightning Trainer '
                'holds; outside Lightning use "weights" or "adapter"'
            )
        self.path, self.mode, self.raise_errors = Path(dirpath) / CLEAN_CHECKPOINT_NAME, mode, raise_errors

    def check(self, module: nn.Module) -> None:
        if self.mode == "adapter":
            check_adapters(module)

    def save(self, module: nn.Module, step: int, collective: Collective) -> SaveOutcome:
        start, error, nbytes = time.perf_counter(), None, 0
        if collective.rank == 0:
            try:
                state: dict[str, Any] = (
                    adapter_state(module)
                    if self.mode == "adapter"
                    else {"state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()}}
                )
                nbytes = write_atomic(dict(state, global_step=step), self.path)
            except Exception as err:  # noqa: BLE001 - reported through the outcome (and re-raised below if asked)
                error = err
        described = None if error is None else f"{type(error).__name__}: {error}"
        local = SaveOutcome(error is None, self.path if error is None else None, self.path.parent, self.mode, step,
                            described, time.perf_counter() - start, nbytes)  # fmt: skip
        outcome = collective.broadcast(local)
        if self.raise_errors and not outcome.ok:
            if error is not None:
                raise error
            raise RuntimeError(f"memwatch: rank 0 could not write the clean checkpoint ({outcome.error})")
        return outcome


class TrainerKeeper:
    """The clean checkpoint of a Lightning run (:func:`memwatch.checkpoint.save_clean_checkpoint`).

    Args:
        trainer: the running Trainer.
        dirpath: the folder (:func:`memwatch.checkpoint.prepare_dirpath`).
        mode: ``"weights"``, ``"full"`` or ``"adapter"``.
        raise_errors: re-raise a failed save instead of returning it.
    """

    def __init__(self, trainer: pl.Trainer, dirpath: Path, mode: str, *, raise_errors: bool = False) -> None:
        self.trainer, self.dirpath, self.mode, self.raise_errors = trainer, dirpath, mode, raise_errors
        self.path = dirpath / CLEAN_CHECKPOINT_NAME

    def check(self, module: nn.Module) -> None:
        if self.mode == "adapter":
            check_adapters(module)  # a clean checkpoint of no adapter fails at fit start, not at the first clean check

    def save(self, module: nn.Module, step: int, collective: Collective) -> SaveOutcome:
        # the Trainer gathers the module and the step itself; every rank takes part through its strategy
        return save_clean_checkpoint(self.trainer, self.dirpath, mode=self.mode, raise_errors=self.raise_errors)
