"""LightningModules for the end-to-end matrix: any schedule, any prediction type, MLP or diffusers.

Each trains the objective of its prediction type on its own schedule, so the monitor measures
the score the model really learned.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from memwatch import DiffusionScore, NoiseSchedule
from memwatch.apps.toymodels import MLPDenoiser


def schedule_of(kind: str) -> NoiseSchedule:
    """The schedules users train with (small T keeps CPU fits short)."""
    if kind == "diffusers":
        from diffusers import DDPMScheduler

        return NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=200))  # clip_sample on
    return {
        "linear": lambda: NoiseSchedule.linear(200),
        "scaled_linear": lambda: NoiseSchedule.scaled_linear(200),
        "cosine": lambda: NoiseSchedule.cosine(200),
        "vp": NoiseSchedule.vp,
        "edm": NoiseSchedule.edm,
        "flow": NoiseSchedule.flow,
    }[kind]()


def sample_t(schedule: NoiseSchedule, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Training timesteps: uniform steps (discrete), uniform t (VP, flow), log-normal σ (EDM)."""
    if schedule.is_discrete:
        return torch.randint(0, schedule.num_timesteps, (n,), generator=generator)
    if schedule.kind in ("vp", "flow"):
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return schedule.t_min + (schedule.t_max - schedule.t_min) * u
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=generator, dtype=torch.float64))
    return sigma.clamp(schedule.t_min, schedule.t_max)


def target_of(prediction: str, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network with this prediction type is trained to output."""
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction == "sample":
        return x0
    if prediction == "flow_prediction":
        return eps - x0
    return -eps / sigma  # "score"


def time_input(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The network's time input: the step for discrete schedules, a scaled float otherwise."""
    if schedule.is_discrete:
        return t
    return 250 * (t.log() / 4 if schedule.kind == "ve" else t)


class AnyDiffusion(pl.LightningModule):
    """An MLP diffusion model on ``shape`` trained with ``prediction`` on schedule ``kind``."""

    def __init__(self, kind: str, prediction: str, shape: tuple[int, ...] = (2,), hidden: int = 64) -> None:
        super().__init__()
        self.schedule, self.prediction = schedule_of(kind), prediction
        self.net = MLPDenoiser(shape, hidden=hidden, depth=2)

    def memwatch_score(self) -> DiffusionScore:
        time_fn = None if self.schedule.is_discrete else (lambda t: time_input(self.schedule, t).float())
        return DiffusionScore(self.net, self.schedule, prediction=self.prediction, time_fn=time_fn)

    def training_step(self, batch: Tensor | list[Tensor], batch_idx: int) -> Tensor:
        x0 = batch if isinstance(batch, Tensor) else batch[0]
        t = sample_t(self.schedule, x0.shape[0]).to(x0.device)
        view = (-1,) + (1,) * (x0.ndim - 1)
        alpha = self.schedule.alpha(t).to(x0).reshape(view)
        sigma = self.schedule.sigma(t).to(x0).reshape(view)
        eps = torch.randn_like(x0)
        out = self.net(alpha * x0 + sigma * eps, time_input(self.schedule, t).float())
        weight = sigma**2 if self.prediction == "score" else 1.0  # keep the score loss bounded
        return (weight * (out - target_of(self.prediction, x0, eps, alpha, sigma)) ** 2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


class UNetFlowModule(pl.LightningModule):
    """A diffusers ``UNet2DModel`` and a ``FlowMatchEulerDiscreteScheduler`` kept as attributes,
    trained as the diffusers SD3 / Flux scripts train: a training timestep of the scheduler,
    ``scale_noise`` for x_t, the target ``noise - x_0``."""

    def __init__(self, unet: nn.Module, scheduler: object, lr: float = 1e-3) -> None:
        super().__init__()
        self.unet, self.scheduler, self.lr = unet, scheduler, lr

    def training_step(self, batch: Tensor | list[Tensor], batch_idx: int) -> Tensor:
        x0 = batch if isinstance(batch, Tensor) else batch[0]
        timesteps = self.scheduler.timesteps
        t = timesteps[torch.randint(0, len(timesteps), (x0.shape[0],))].to(x0.device)
        eps = torch.randn_like(x0)
        noisy = self.scheduler.scale_noise(x0, t, eps)
        return nn.functional.mse_loss(self.unet(noisy, t).sample, eps - x0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_images(n: int, size: int = 8) -> Tensor:
    """``n`` sklearn digits as ``[n, 1, size, size]`` images in [-1, 1]."""
    from memwatch.data import digits

    x = digits(n)
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)
