"""The monitor's check without a Trainer: the scan's monitor, built once from its settings and the
training data, one measurement of a loaded checkpoint, and the onset detector replayed over the checks."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from memwatch.apps.scan.cache import _item_dict
from memwatch.apps.scan.results import CheckpointScan, _one_line
from memwatch.attribution import copied_items
from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.intake import batch_range
from memwatch.monitor import Monitor
from memwatch.options import LEGACY_NAMES, regroup
from memwatch.probes import isolated


class _OfflineCheck:
    """A monitor's check without a Trainer: one measurement of a loaded module, its values.

    It runs the monitor's own code path: :meth:`Monitor.prepare` finds the score,
    the evaluation timesteps and indexes the reference data (as fit start does), and
    :meth:`~Monitor.offline_check` draws and measures all probes and turns every
    signal's results into the logged scalars.
    """

    def __init__(
        self,
        monitor: Monitor,
        *,
        ids: Sequence[Any] | Dataset | None,
        num_items: int | None,
        data_shape: Sequence[int] | None = None,
    ) -> None:
        self.monitor, self.ids, self.num_items = monitor, ids, num_items
        self.data_shape = None if data_shape is None else tuple(data_shape)  # the probe shape, when `data` set it

    def measure(self, module: pl.LightningModule, step: int, path: Path) -> dict[str, Any]:
        """The cache entry of one checkpoint: its step, values and copied items (JSON-able).

        Raises:
            MemwatchError: the monitor refuses the module with these settings (the message names
                the checkpoint, and the data's shape when the network does not take it).
        """
        monitor = self.monitor
        started = time.perf_counter()
        with isolated(module):
            try:
                monitor.prepare(module)
            except MemwatchError as err:
                raise MemwatchError(self._refusal(err, path)) from err
            if monitor.pending:  # once, as a live run at its first check: the levels, the data LID
                if monitor.reference is not None:
                    monitor.fit_data(monitor.reference)
                elif monitor.calibrated_sigmas is None and monitor.calibrating:
                    raise MemwatchError(
                        'sigmas="auto" (the default) sets the noise levels from the training data, and a scan sees '
                        "no batches: pass the training data as `data`, or noise levels as `sigmas`"
                    )
            draft = monitor.offline_check(module)  # the copies from the monitor's copy index of `data`
        values, measurement = draft.values, draft.measurement
        values["check_seconds"] = time.perf_counter() - started
        copied = []
        if measurement.nearest is not None and measurement.nn_ratio is not None:
            flagged = measurement.primary.memorization_score > monitor.sharpness.score_threshold
            copied = copied_items(
                measurement.nearest, measurement.nn_ratio, flagged, num_items=self.num_items, ids=self.ids
            )
        return {"step": step, "values": values, "copied": [_item_dict(c) for c in copied]}

    def _refusal(self, err: MemwatchError, path: Path) -> str:
        """The monitor's refusal of a checkpoint; a network that fails on probes shaped like the
        ``data`` items (the probe shape came from them) is said in those terms."""
        cause = err.__cause__
        if self.data_shape is not None and cause is not None and "sample_shape" in str(err):
            return (
                f"the network of {str(path)!r} fails on samples shaped like the `data` items, {self.data_shape} "
                f"({_one_line(cause)}): pass the data this model was trained on as `data` (a latent model's "
                "latents), or the shape the network takes as `sample_shape`"
            )
        return f"{str(path)!r}: {err}"


def _replay(monitor: Monitor, checks: list[CheckpointScan]) -> tuple[list[CheckpointScan], int | None, Path | None]:
    """Feed the monitor's detector every check in step order: ``onset`` / ``clean_step`` values,
    the onset step and the last clean checkpoint, as the live monitor would have logged them."""
    detector, clean, out = monitor.detector, None, []
    for check in checks:
        values = {k: v for k, v in check.values.items() if k not in ("onset", "clean_step")}
        decision = detector.update(check.step, values[detector.monitor])  # the share `onset_on` names
        if decision.clean:
            clean = check.path
        values["onset"] = float(decision.memorizing)
        if detector.last_clean_step is not None:
            values["clean_step"] = float(detector.last_clean_step)
        out.append(CheckpointScan(check.path, check.step, values, check.copied, check.cached))
    return out, detector.onset_step, clean


def _reference(
    data: Tensor | Dataset | None, ids: Sequence[Any] | None
) -> tuple[Tensor | None, Sequence[Any] | Dataset | None]:
    """The training data as a checked tensor ``[N, *shape]``, and where the items' ids come from."""
    if data is None:
        return None, ids
    if isinstance(data, Tensor):
        if ids is not None and len(ids) != len(data):
            raise MemwatchError(f"`ids` must hold one id per item of `data` ({len(data)}), got {len(ids)}")
        return _checked_data(data.detach().cpu()), ids
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=256, shuffle=False)
        return _checked_data(torch.cat([first_tensor(b) for b in loader]).detach().cpu()), data
    raise MemwatchError(f"`data` must be a tensor [N, *shape], a Dataset or None, got {type(data).__name__}")


def _checked_data(data: Tensor) -> Tensor:
    """``data`` as the probes and the ground truth need it: ``[N ≥ 2, *shape]``, floating, finite."""
    if data.ndim < 2 or len(data) < 2:
        raise MemwatchError(
            f"`data` must hold at least 2 training items as [N, *shape] (the nearest-neighbour ratio needs two), "
            f"got shape {tuple(data.shape)}"
        )
    if not data.is_floating_point():
        raise MemwatchError(
            "`data` must be floating point, in the values the model trains on (e.g. images / 127.5 - 1), "
            f"got {data.dtype}"
        )
    bad = int((~torch.isfinite(data.flatten(1))).any(dim=1).sum())
    if bad:
        raise MemwatchError(f"`data` must be finite: {bad} of its {len(data)} items hold NaN or Inf")
    return data


def _build_monitor(monitor_kwargs: dict[str, Any] | None, reference: Tensor | None) -> tuple[Monitor, dict[str, Any]]:
    """The scan's monitor — the one place it is built — and the arguments it was built with (the
    cache's settings): ``monitor_kwargs``, no clean checkpoint, and the training data's reference,
    probe shape and range unless given."""
    kwargs = dict(monitor_kwargs or {})
    if isinstance(kwargs.get("reference_data"), str):
        raise MemwatchError(
            f"`monitor_kwargs`: reference_data={kwargs['reference_data']!r} compares the probes with training batches, "
            "and a scan sees none: pass the training data as `data`"
        )
    kwargs["save_clean_checkpoint"] = False
    if reference is not None:
        kwargs.setdefault("reference_data", reference)
        kwargs.setdefault("sample_shape", tuple(reference.shape[1:]))
        kwargs.setdefault("data_range", batch_range(reference))
    # the scan's settings are flat (its flags); the monitor takes them in its option groups
    groups = {n: p.default for n, p in inspect.signature(Monitor).parameters.items() if is_dataclass(p.default)}
    flat = {k: v for k, v in kwargs.items() if k in LEGACY_NAMES}
    top = {k: v for k, v in kwargs.items() if k not in LEGACY_NAMES}
    return Monitor(**top, **regroup(groups, flat, warn=False)), kwargs
