"""Finding a LightningModule's diffusion score and the probe shape (no Trainer hooks, no math).

The monitor asks, in order: a ``score_fn(pl_module)``, the module's ``memwatch_score()``, or a
diffusers ``UNet2DModel`` and scheduler kept as attributes of the module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

__all__ = ["ScoreFn", "batch_range", "batch_sample_shape", "find_score", "materialize", "sample_shape_of", "with_ema"]

ScoreFn = Callable[[pl.LightningModule], DiffusionScore]


def find_score(pl_module: pl.LightningModule, score_fn: ScoreFn | None = None) -> DiffusionScore:
    """The module's :class:`DiffusionScore`: ``score_fn(pl_module)``, else ``pl_module.memwatch_score()``,
    else a diffusers ``UNet2DModel`` and a scheduler found among the module's attributes.

    Raises:
        MemwatchError: none of these applies (the message says what to add).
    """
    if score_fn is not None:
        score = score_fn(pl_module)
    elif callable(getattr(pl_module, "memwatch_score", None)):
        score = pl_module.memwatch_score()
    else:
        score = _diffusers_score(pl_module)
    if not isinstance(score, DiffusionScore):
        raise MemwatchError(f"the score must be a memwatch.DiffusionScore, got {type(score).__name__}")
    return score


def with_ema(score: DiffusionScore, pl_module: pl.LightningModule, ema_attr: str | None) -> DiffusionScore:
    """``score`` around the EMA copy ``getattr(pl_module, ema_attr)`` (its ``.module`` if wrapped)."""
    if ema_attr is None:
        return score
    ema = getattr(pl_module, ema_attr, None)
    if not isinstance(ema, nn.Module):
        raise MemwatchError(f"`ema_attr`={ema_attr!r} does not name an nn.Module on {type(pl_module).__name__}")
    return score.with_model(getattr(ema, "module", ema))


def sample_shape_of(model: Any) -> tuple[int, ...] | None:
    """``(C, H, W)`` from a diffusers model's config (``in_channels``, ``sample_size``), else ``None``."""
    config = getattr(model, "config", None)
    size = getattr(config, "sample_size", None)
    channels = getattr(config, "in_channels", None)
    if size is None or channels is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return (int(channels), int(h), int(w))


def batch_sample_shape(batch: Any, key: str | None) -> tuple[int, ...]:
    """The shape of one sample of a training batch: ``batch[key]``, the batch itself, or its
    first tensor.

    Raises:
        MemwatchError: ``key`` is not a key of the batch, or no tensor is found.
    """
    if key is not None:
        if not isinstance(batch, Mapping) or key not in batch:
            raise MemwatchError(f"`batch_key`={key!r} is not a key of the training batch")
        return tuple(batch[key].shape[1:])
    if isinstance(batch, Tensor):
        return tuple(batch.shape[1:])
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        if isinstance(item, Tensor):
            return tuple(item.shape[1:])
    raise MemwatchError("memwatch cannot infer the probe shape from the batch; pass `sample_shape=` or `batch_key=`")


def batch_range(batch: Any, key: str | None, seen: tuple[float, float] | None = None) -> tuple[float, float] | None:
    """``(min, max)`` of a training batch's data (``batch[key]`` or its first tensor), widened by
    ``seen``; ``seen`` unchanged when the batch holds no floating tensor."""
    data = batch[key] if key is not None and isinstance(batch, Mapping) else batch
    try:
        x = first_tensor(data)
    except MemwatchError:
        return seen
    if not x.is_floating_point() or x.numel() == 0:
        return seen
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    return (lo, hi) if seen is None else (min(lo, seen[0]), max(hi, seen[1]))


def materialize(data: Any) -> Tensor:
    """Reference data (a tensor or an iterable of batches) as one CPU tensor ``[N, *shape]``."""
    if isinstance(data, Tensor):
        return data.detach().cpu()
    return torch.cat([first_tensor(b).detach().cpu() for b in data])


def _diffusers_score(pl_module: pl.LightningModule) -> DiffusionScore:
    unet = next((m for m in vars(pl_module)["_modules"].values() if type(m).__name__ == "UNet2DModel"), None)
    scheduler = next(
        (v for v in vars(pl_module).values() if hasattr(v, "alphas_cumprod") and hasattr(v, "config")), None
    )
    if unet is None or scheduler is None:
        raise MemwatchError(
            f"memwatch cannot find the score of {type(pl_module).__name__}: pass "
            "`MemorizationMonitor(score_fn=lambda module: memwatch.DiffusionScore(...))`, or add a "
            "`memwatch_score()` method returning a memwatch.DiffusionScore, or keep a diffusers "
            "UNet2DModel and its scheduler as attributes of the module"
        )
    prediction = getattr(scheduler.config, "prediction_type", "epsilon")
    return DiffusionScore(unet, NoiseSchedule.from_diffusers(scheduler), prediction=prediction)
