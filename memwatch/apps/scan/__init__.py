"""``memwatch scan``: the monitor's check on saved checkpoints, after training (see
:mod:`memwatch.apps.scan.scanning` for what it measures, writes and reads).

One module a job:

* :mod:`.scanning` — :func:`scan`: the checkpoints in global-step order, measured or cached,
  the skipped ones, the outputs;
* :mod:`.checkpoints` — finding checkpoints, their global steps, loading Lightning checkpoints;
* :mod:`.diffusers_folders` — loading diffusers ``unet/`` and ``transformer/`` folders with their
  scheduler;
* :mod:`.check` — the scan's monitor, one offline check, the onset detector replayed;
* :mod:`.cache` — results per checkpoint and settings, so a scan resumes;
* :mod:`.writers` — ``scan.csv``, ``curves.png``, ``attribution.csv``, ``skipped.csv``, W&B;
* :mod:`.results` — :class:`ScanResult`, :class:`CheckpointScan`, :class:`SkippedCheckpoint`;
* :mod:`.command` — the command line (:func:`main`, :func:`build_parser`, :func:`load_data`).
"""

from memwatch.apps.scan.cache import CACHE_NAME
from memwatch.apps.scan.command import build_parser, load_data, main
from memwatch.apps.scan.results import CheckpointScan, ScanResult, SkippedCheckpoint
from memwatch.apps.scan.scanning import scan
from memwatch.apps.scan.writers import SKIPPED_NAME

__all__ = [
    "CACHE_NAME",
    "SKIPPED_NAME",
    "CheckpointScan",
    "ScanResult",
    "SkippedCheckpoint",
    "build_parser",
    "load_data",
    "main",
    "scan",
]
