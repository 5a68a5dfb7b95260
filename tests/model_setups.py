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
    }[kind]()


def sample_t(schedule: NoiseSchedule, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Training timesteps: uniform steps (discrete), uniform t (VP), log-normal σ (EDM)."""
    if schedule.is_discrete:
        return torch.randint(0, schedule.num_timesteps, (n,), generator=generator)
    if schedule.kind == "vp":
        return schedule.t_min + (1 - schedule.t_min) * torch.rand(n, generator=generator, dtype=torch.float64)
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


def digits_images(n: int, size: int = 8) -> Tensor:
    """``n`` sklearn digits as ``[n, 1, size, size]`` images in [-1, 1]."""
    from memwatch.data import digits

    x = digits(n)
    if size != 8:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1)


class DiTDiffusion(pl.LightningModule):
    """A class-conditional ``DiTTransformer2DModel`` and its ``DDPMScheduler`` kept as attributes,
    trained as DiT trains: ε on the first ``channels`` outputs (the others are its variance head),
    the labels dropped to the null class by its ``LabelEmbedding`` (10 % in training mode)."""

    def __init__(self, channels: int = 1, size: int = 8, classes: int = 10) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, DiTTransformer2DModel

        torch.manual_seed(0)
        self.transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=2 * channels,
            num_layers=1, sample_size=size, num_embeds_ada_norm=classes,
        )  # fmt: skip
        self.scheduler = DDPMScheduler(num_train_timesteps=100)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        t = torch.randint(0, 100, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        out = self.transformer(self.scheduler.add_noise(x0, eps, t), t, class_labels=labels).sample
        return nn.functional.mse_loss(out[:, : x0.shape[1]], eps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PixArtDiffusion(pl.LightningModule):
    """A ``PixArtTransformer2DModel`` and its ``DDPMScheduler`` kept as attributes, trained on one
    fixed "prompt" embedding ``[tokens, width]`` per class, captions dropped (10 %) to the empty
    prompt's embedding, which the module keeps as the buffer ``memwatch_null_cond``."""

    def __init__(self, channels: int = 1, size: int = 8, classes: int = 10, tokens: int = 3, width: int = 12) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, PixArtTransformer2DModel

        torch.manual_seed(0)
        self.transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=channels, out_channels=2 * channels,
            num_layers=1, sample_size=size, cross_attention_dim=16, caption_channels=width,
        )  # fmt: skip
        self.scheduler = DDPMScheduler(num_train_timesteps=100)
        self.register_buffer("prompts", torch.randn(classes, tokens, width))
        self.register_buffer("memwatch_null_cond", torch.randn(tokens, width))  # the text encoder's ""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        t = torch.randint(0, 100, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        dropped = (torch.rand(x0.shape[0], device=x0.device) < 0.1)[:, None, None]
        captions = torch.where(dropped, self.memwatch_null_cond, self.prompts[labels])
        sizes = {"resolution": None, "aspect_ratio": None}
        noisy = self.scheduler.add_noise(x0, eps, t)
        out = self.transformer(noisy, encoder_hidden_states=captions, timestep=t, added_cond_kwargs=sizes).sample
        return nn.functional.mse_loss(out[:, : x0.shape[1]], eps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)
