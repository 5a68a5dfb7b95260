"""A tiny training setup for the clean-checkpoint tests (and their kill script)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from callback_setup import trainer
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from memwatch.apps.toymodels import UNetDDPMModule
from memwatch.checkpoint import SaveOutcome, save_clean_checkpoint


class TinyModule(pl.LightningModule):
    """A 2-layer MLP autoencoder on random data, with an EMA copy held as a submodule."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 4))
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.9)).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return ((self.net(x) - x) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=8)


class SaveAt(pl.Callback):
    """Calls :func:`save_clean_checkpoint` after the given optimizer steps, as the monitor would.

    ``before(step)`` runs just before each save (to inject a fault). A failed save is warned about
    with the outcome's message; ``outcomes``, ``states`` (the module's state at the save) and
    ``digests`` (sha256 of the written file) are recorded per step.
    """

    def __init__(
        self,
        dirpath: str | Path,
        steps: Sequence[int],
        mode: str = "weights",
        raise_errors: bool = False,
        before: Callable[[int], None] | None = None,
    ) -> None:
        self.dirpath = dirpath
        self.steps = set(steps)
        self.mode = mode
        self.raise_errors = raise_errors
        self.before = before
        self.outcomes: dict[int, SaveOutcome] = {}
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.digests: dict[int, str] = {}
        self.clean_step: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step not in self.steps:
            return
        if self.before is not None:
            self.before(step)
        outcome = save_clean_checkpoint(trainer, self.dirpath, mode=self.mode, raise_errors=self.raise_errors)
        self.outcomes[step] = outcome
        if outcome.ok:
            self.clean_step = step
            self.states[step] = {k: v.clone() for k, v in pl_module.state_dict().items()}
            self.digests[step] = sha256(outcome.path)
        else:
            pl.utilities.rank_zero_warn(outcome.failure_message(previous_step=self.clean_step))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit(root: str | Path, callbacks: Sequence[pl.Callback], max_steps: int = 6, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    fitted = trainer(root, callbacks, max_steps=max_steps, **kwargs)
    fitted.fit(TinyModule())
    return fitted


def lora_unet() -> nn.Module:
    """The same tiny base ``UNet2DModel`` (seeded) with a rank-4 LoRA on its attention projections
    (peft's ``get_peft_model``): the base frozen, the adapter trainable."""
    from peft import LoraConfig, get_peft_model

    from memwatch.apps.toymodels import tiny_unet

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    return get_peft_model(tiny_unet(), config)


class LoraUNetModule(UNetDDPMModule):
    """A LoRA fine-tune of a tiny UNet2DModel with its DDPMScheduler, the README's UNet recipe."""

    def __init__(self) -> None:
        from diffusers import DDPMScheduler

        super().__init__(lora_unet(), DDPMScheduler(num_train_timesteps=100), lr=1e-2)
