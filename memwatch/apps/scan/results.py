"""What a scan returns: a checkpoint's check, a skipped checkpoint and why, the whole result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from memwatch.attribution import CopiedItem
from memwatch.errors import MemwatchError


@dataclass(frozen=True)
class CheckpointScan:
    """One checkpoint's check.

    Attributes:
        path: the checkpoint file.
        step: its global step.
        values: the check's scalars under the live monitor's names (``onset`` and ``clean_step``
            from the detector replayed over the scan; ``check_seconds`` of the measurement).
        copied: training items the probes copy, most copied first (empty without data).
        cached: the values came from the cache (not measured in this call).
    """

    path: Path
    step: int
    values: dict[str, float]
    copied: list[CopiedItem] = field(default_factory=list)
    cached: bool = False


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint that could not be read (empty, truncated, not a checkpoint, a diffusers folder
    that does not load): reported, left out of the checks, listed in ``skipped.csv``.

    Attributes:
        path: the checkpoint file or folder.
        reason: why, in one line.
    """

    path: Path
    reason: str


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan` found.

    Attributes:
        checks: one :class:`CheckpointScan` per checkpoint, by ascending global step.
        onset_step: the global step at which the detector declares onset (``None``: none).
        clean_checkpoint: the last clean checkpoint before onset (``None``: no clean check).
        measured: checkpoints measured in this call (the others came from the cache).
        files: ``"table"``, ``"curves"``, ``"attribution"``, ``"cache"``, ``"skipped"`` → written paths.
        wandb_dir: the offline W&B run's folder, or ``None``.
        skipped: the checkpoints that could not be read, with the reason (not measured, not in
            ``checks``).
        onset_key: the share the onset rule watches (``alarm_fraction`` by default).
    """

    checks: list[CheckpointScan]
    onset_step: int | None
    clean_checkpoint: Path | None
    measured: int
    files: dict[str, Path] = field(default_factory=dict)
    wandb_dir: Path | None = None
    skipped: list[SkippedCheckpoint] = field(default_factory=list)
    onset_key: str = "alarm_fraction"

    @property
    def history(self) -> list[dict[str, float]]:
        """Every check's values with its ``step``, as :attr:`MemorizationMonitor.history` holds them."""
        return [dict(c.values, step=float(c.step)) for c in self.checks]

    @property
    def most_copied(self) -> list[CopiedItem]:
        """The last checkpoint's copied items, most copied first (empty without data)."""
        return self.checks[-1].copied if self.checks else []


class _Unreadable(Exception):
    """A checkpoint that cannot be read; the scan skips it (its message: the reason, one line)."""


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (a MemwatchError: its message alone); of a long line,
    its first sentence."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 160 and ". " in text:
        text = text.split(". ")[0] + "."
    if isinstance(err, MemwatchError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
