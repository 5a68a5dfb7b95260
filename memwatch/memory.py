"""How many rows a model call can take: the memory free on a device, and the row bound a check
uses when ``max_batch`` is not given (every batched model call of a check, :func:`memwatch.operators.map_chunks`
halving a chunk that still runs out of memory)."""

from __future__ import annotations

import math
import os

import torch

from memwatch.validation import check_int

__all__ = ["MEMORY_FRACTION", "ROW_BYTES_PER_ELEMENT", "available_memory", "default_max_batch"]

#: share of the available memory that :func:`default_max_batch` plans for
MEMORY_FRACTION = 0.25
#: bytes one row through the model costs, per element of a sample per byte of its dtype (see
#: :func:`default_max_batch`; measured by ``benchmarks/bench_conditional_memory.py``)
ROW_BYTES_PER_ELEMENT = 32768


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes of memory free for new tensors on ``device``.

    CUDA: ``torch.cuda.mem_get_info`` (free on the device) plus what torch's caching allocator
    holds but does not use (``memory_reserved − memory_allocated``). Any other device (the CPU,
    and unified-memory accelerators such as MPS): the host's available memory from ``psutil``
    if installed, else ``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf`` (available
    physical pages × page size).

    Example:
        >>> available_memory("cpu") > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_max_batch(
    sample_dim: int,
    *,
    device: torch.device | str = "cpu",
    bytes_budget: int | None = None,
    bytes_per_row: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Rows per model call that fit in memory: a ``max_batch`` for ``max_batch=None`` callers.

        rows = clamp(floor(bytes_budget / bytes_per_row), 1, 4096)
        bytes_budget  = MEMORY_FRACTION · available_memory(device)       (default; MEMORY_FRACTION = 0.25)
        bytes_per_row = ROW_BYTES_PER_ELEMENT · sample_dim · itemsize    (default; ROW_BYTES_PER_ELEMENT = 2¹⁵)

    ``bytes_per_row`` is what one row costs in the heaviest call: the graph of one vjp of the
    score difference (two network passes) with a Jacobian product on it. The network's
    activations dominate it, self-attention most (memwatch differentiates attention on its
    "math" backend, whose attention maps grow like ``(H·W)²``). ``ROW_BYTES_PER_ELEMENT``
    (``2¹⁵``) is about 1.5–2× what ``benchmarks/bench_conditional_memory.py`` measures for a
    small ``UNet2DConditionModel`` at 3×16×16 (≈ 17–21 k bytes per element, about 50 MB per
    row); a wider network or larger images cost more per element: measure yours (the peak memory
    of one :func:`memwatch.conditional.conditional_metrics` call over its ``max_batch``) and pass ``bytes_per_row``.
    A chunk that still runs out of memory is halved (:func:`memwatch.operators.map_chunks`).

    Args:
        sample_dim: ``d``, elements of one sample (e.g. ``C · H · W``), ``>= 1``.
        device: where the model runs (the memory that is measured).
        bytes_budget: bytes to plan for instead of ``MEMORY_FRACTION`` of the available memory.
        bytes_per_row: bytes one row costs instead of the formula above.
        dtype: the sampling dtype (its itemsize enters the formula).

    Returns:
        ``max_batch``, an int in ``[1, 4096]``.

    Raises:
        MemwatchError: ``sample_dim``, ``bytes_budget`` or ``bytes_per_row`` not a positive integer.

    Example:
        >>> default_max_batch(768, bytes_budget=2**32)  # 4 GiB for 3×16×16 float32 samples
        42
    """
    for name, value in (("sample_dim", sample_dim), ("bytes_budget", bytes_budget), ("bytes_per_row", bytes_per_row)):
        if value is not None:
            check_int(name, value, 1)
    budget = bytes_budget if bytes_budget is not None else MEMORY_FRACTION * available_memory(device)
    per_row = bytes_per_row if bytes_per_row is not None else ROW_BYTES_PER_ELEMENT * sample_dim * dtype.itemsize
    return int(min(4096, max(1, math.floor(budget / per_row))))
