"""The row bound of a check's model calls (mirrors :mod:`memwatch.memory`): the memory free on a
device and the default ``max_batch`` formula."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from memwatch.memory import ROW_BYTES_PER_ELEMENT, available_memory, default_max_batch


def test_default_max_batch_follows_its_formula(monkeypatch):
    import memwatch.memory as memory

    d = 3 * 16 * 16
    assert default_max_batch(d, bytes_budget=2**30) == 2**30 // (ROW_BYTES_PER_ELEMENT * d * 4)
    assert default_max_batch(d, bytes_budget=2**32, dtype=torch.float64) == 2**32 // (ROW_BYTES_PER_ELEMENT * d * 8)
    assert default_max_batch(d, bytes_budget=10_000, bytes_per_row=1_000) == 10
    assert default_max_batch(d, bytes_budget=1) == 1  # never 0
    assert default_max_batch(1, bytes_budget=2**50) == 4096  # capped
    free = available_memory("cpu")
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**34)  # 16 GiB free
    assert default_max_batch(d) == int(0.25 * 2**34) // (ROW_BYTES_PER_ELEMENT * d * 4)
    for kwargs, match in (
        (dict(sample_dim=0), "`sample_dim`"),
        (dict(sample_dim=8, bytes_budget=-1), "`bytes_budget`"),
    ):
        with pytest.raises(ValueError, match=match):
            default_max_batch(**kwargs)


def test_available_memory_reads_proc_meminfo_without_psutil(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    if not Path("/proc/meminfo").exists():
        pytest.skip("no /proc/meminfo")
    kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable:"))
    assert abs(available_memory("cpu") - kib * 1024) < 2**30  # the figure moves while we read it
