"""The scan's outputs: ``scan.csv``, ``curves.png``, ``attribution.csv``, ``skipped.csv`` and an
offline W&B run with the live monitor's keys."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

from memwatch.apps.scan.results import CheckpointScan, ScanResult
from memwatch.loggers import MonitorLogger, finish_wandb, wandb_logger

SKIPPED_NAME = "skipped.csv"
_CURVES = ("alarm_fraction", "sharp_fraction_mean", "memorized_fraction", "nn_memorized_fraction")
_FIRST_COLUMNS = (
    "alarm_fraction",
    "sharp_fraction_mean",
    "memorized_fraction",
    "nn_memorized_fraction",
    "auroc",
    "onset",
)


def _write(result: ScanResult, out: Path, cache_path: Path | None, wandb_mode: str) -> ScanResult:
    files: dict[str, Path] = {}
    if result.checks:
        files["table"] = _write_table(result, out / "scan.csv")
        files["curves"] = _write_curves(result, out / "curves.png")
    if any(c.copied for c in result.checks):
        files["attribution"] = _write_attribution(result, out / "attribution.csv")
    if result.skipped:
        files["skipped"] = _write_skipped(result, out / SKIPPED_NAME)
    else:  # no list of an earlier scan's skipped files
        (out / SKIPPED_NAME).unlink(missing_ok=True)
    if cache_path is not None and cache_path.exists():
        files["cache"] = cache_path
    wandb_dir = _log_wandb(result, out) if wandb_mode == "offline" and result.checks else None
    return dataclasses.replace(result, files=files, wandb_dir=wandb_dir)


def _write_skipped(result: ScanResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "reason"])
        writer.writerows([str(s.path), s.reason] for s in result.skipped)
    return path


def _metric_columns(result: ScanResult) -> list[str]:
    names = {k for c in result.checks for k in c.values}
    return [n for n in _FIRST_COLUMNS if n in names] + sorted(names - set(_FIRST_COLUMNS))


def _write_table(result: ScanResult, path: Path) -> Path:
    columns = _metric_columns(result)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", *columns])
        for c in result.checks:
            writer.writerow([str(c.path), c.step, *(c.values.get(n, math.nan) for n in columns)])
    return path


def _write_curves(result: ScanResult, path: Path) -> Path:
    from memwatch import plots

    steps = [c.step for c in result.checks]
    curves = {
        n: (steps, [c.values.get(n, math.nan) for c in result.checks])
        for n in _CURVES
        if any(n in c.values for c in result.checks)
    }
    figure = plots.plot_metric_curves(
        curves, onsets={result.onset_key: result.onset_step}, ylabel="value", title="memwatch scan"
    )
    return plots.save_figure(figure, path)


_ATTRIBUTION_COLUMNS = ["rank", "index", "id", "copies", "flagged_copies", "probes"]


def _attribution_rows(check: CheckpointScan) -> list[list[Any]]:
    return [
        [r, c.index, c.id, c.copies, c.flagged_copies, " ".join(map(str, c.probes))]
        for r, c in enumerate(check.copied, start=1)
    ]


def _write_attribution(result: ScanResult, path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "step", *_ATTRIBUTION_COLUMNS])
        for c in result.checks:
            writer.writerows([str(c.path), c.step, *row] for row in _attribution_rows(c))
    return path


def _log_wandb(result: ScanResult, out: Path) -> Path | None:
    logger = wandb_logger("offline", out, project="memwatch", name="scan")
    assert logger is not None
    monitor_logger = MonitorLogger([logger])
    monitor_logger.define_metrics()
    for check in result.checks:
        monitor_logger.log_scalars(check.values, check.step)
        if check.copied:
            monitor_logger.log_table("copied_items", _ATTRIBUTION_COLUMNS, _attribution_rows(check), check.step)
    return finish_wandb(logger)
