"""Tiny training setups shared by the callback tests (and the DDP script)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from memwatch import DiffusionScore
from memwatch.apps.toymodels import DDPMModule, TensorDataModule
from memwatch.data import manifold

CORNERS = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def memorizing_data() -> torch.Tensor:
    """Four isolated training points: a 2-D model memorizes them within a few hundred steps."""
    return CORNERS


def generalizing_data() -> torch.Tensor:
    """2000 points on the moons (a 1-D manifold): probes keep one flat direction."""
    return manifold("moons", 2000, dim=2, seed=0)


def module_2d(**kwargs) -> DDPMModule:
    return DDPMModule(shape=(2,), hidden=kwargs.pop("hidden", 128), depth=kwargs.pop("depth", 2), lr=2e-3, **kwargs)


def datamodule(x: torch.Tensor, batch_size: int = 128) -> TensorDataModule:
    return TensorDataModule(x, batch_size=batch_size, steps_per_epoch=100, seed=0)


def trainer(tmp_path, callbacks=(), max_steps: int = 200, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints or bars; deterministic unless ``kwargs`` say)."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("deterministic", True)
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        callbacks=list(callbacks),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(
    tmp_path,
    data,
    monitor: pl.Callback | None = None,
    max_steps: int = 200,
    seed: int | None = 0,
    module: pl.LightningModule | None = None,
    *,
    hidden: int = 128,
    depth: int = 2,
    **kwargs,
) -> tuple[pl.Trainer, pl.LightningModule]:
    """One short ``Trainer.fit`` of ``module`` with ``monitor`` (the memwatch callback, or any
    callback; ``None``: none), the tiny real run each callback feature is tested by.

    Args:
        tmp_path: the Trainer's root folder.
        data: a tensor ``[N, *shape]`` (through :func:`datamodule`), or a DataModule / DataLoader.
        monitor: the one callback.
        max_steps: training steps.
        seed: ``pl.seed_everything(seed)`` first, before the default module is built (``None``:
            no seeding, the caller seeded).
        module: the LightningModule; default the 2-D MLP DDPM :func:`module_2d` of ``hidden`` units
            and ``depth`` layers.
        kwargs: more arguments of :func:`trainer` (``logger``, ``deterministic``, ...).

    Returns:
        ``(trainer, module)`` after the fit.
    """
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    module = module_2d(hidden=hidden, depth=depth) if module is None else module
    t = trainer(tmp_path, [] if monitor is None else [monitor], max_steps=max_steps, **kwargs)
    t.fit(module, datamodule(data) if isinstance(data, torch.Tensor) else data)
    return t, module


class Overconfident(DDPMModule):
    """A model whose ε-prediction is 30× its network's (a blown-up output layer, as a run that
    diverges has): its score contracts faster than the noise (FLIPD ``d + σ_t² tr H`` < 0), and
    memwatch's DDIM carries its probes far out of the data at every check."""

    factor = 30.0

    def memwatch_score(self) -> DiffusionScore:
        return DiffusionScore(lambda x, t: self.factor * self.net(x, t), self.schedule, prediction="epsilon")


class SlightlyOverconfident(Overconfident):
    """ε 12× its network's (not 30×): a FLIPD a little below 0, within what a learned
    score may read there (:func:`memwatch.lid.possible`), so it is clamped, not unmeasured."""

    factor = 12.0
