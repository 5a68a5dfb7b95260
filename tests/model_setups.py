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

    def condition(self, label: int) -> Tensor:
        """The condition of class ``label`` as memwatch takes it: the label."""
        return torch.tensor(label)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        t = torch.randint(0, 100, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        out = self.transformer(self.scheduler.add_noise(x0, eps, t), t, class_labels=labels).sample
        return nn.functional.mse_loss(out[:, : x0.shape[1]], eps)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class PromptDiffusion(pl.LightningModule):
    """A text-conditional diffusers transformer (``family``: ``"pixart"``, ``"sd3"``, ``"flux"``) and
    its ``DDPMScheduler`` kept as attributes, called in ``training_step`` as its pipeline calls it.

    Trained on one fixed "prompt" per class (an embedding ``[tokens, width]`` and a pooled projection
    ``[pooled]``), captions dropped (10 %) to the empty prompt's, which the module keeps as the buffer
    ``memwatch_null_cond`` (PixArt: the embedding; SD3 / Flux: their ``memwatch.joint_condition``).
    With ``flow=True`` it trains as the SD3 / Flux scripts do: a ``FlowMatchEulerDiscreteScheduler``
    (shift 3), a training timestep drawn uniformly from its own (``timesteps[i]``, ``sigmas[i]``),
    ``x_t = (1 - σ) x_0 + σ ε`` and the velocity target ``ε - x_0``; else a ``DDPMScheduler`` and the
    noise target (legitimate if unusual for these families: it tests their call conventions).
    """

    def __init__(self, family: str, channels: int = 1, size: int = 8, classes: int = 10, flow: bool = False) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        torch.manual_seed(0)
        self.family, self.transformer = family, _text_transformer(family, channels, size, width=12, pooled=6)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else DDPMScheduler(num_train_timesteps=100)
        self.flow = flow
        self.register_buffer("prompts", torch.randn(classes, 3, 12))
        self.register_buffer("pooled", torch.randn(classes, 6))
        self.register_buffer("empty", torch.randn(3, 12))  # the text encoders' ""
        self.register_buffer("empty_pooled", torch.randn(6))
        self.register_buffer("memwatch_null_cond", self._as_condition(self.empty, self.empty_pooled))

    def condition(self, label: int) -> Tensor:
        """The prompt of class ``label`` as memwatch takes it, in the form of ``memwatch_null_cond``."""
        return self._as_condition(self.prompts[label], self.pooled[label])

    def _as_condition(self, prompt: Tensor, pooled: Tensor) -> Tensor:
        """One prompt as memwatch takes it: PixArt its embedding; SD3 / Flux the joint condition."""
        from memwatch import joint_condition

        return prompt if self.family == "pixart" else joint_condition(prompt, pooled)

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        eps = torch.randn_like(x0)
        dropped = torch.rand(x0.shape[0], device=x0.device) < 0.1
        prompt = torch.where(dropped[:, None, None], self.empty, self.prompts[labels])
        pooled = torch.where(dropped[:, None], self.empty_pooled, self.pooled[labels])
        if self.flow:
            i = torch.randint(0, len(self.scheduler.timesteps), (x0.shape[0],))
            t, sigma = self.scheduler.timesteps[i].to(x0.device), self.scheduler.sigmas[i].to(x0).view(-1, 1, 1, 1)
            xt, target = (1 - sigma) * x0 + sigma * eps, eps - x0
        else:
            t = torch.randint(0, 100, (x0.shape[0],), device=x0.device)
            xt, target = self.scheduler.add_noise(x0, eps, t), eps
        return nn.functional.mse_loss(self._predict(xt, t, prompt, pooled), target)

    def _predict(self, x: Tensor, t: Tensor, prompt: Tensor, pooled: Tensor) -> Tensor:
        """The noise prediction ``[n, C, H, W]``, as the family's pipeline calls the network."""
        net = self.transformer
        if self.family == "pixart":
            sizes = {"resolution": None, "aspect_ratio": None}
            return net(x, encoder_hidden_states=prompt, timestep=t, added_cond_kwargs=sizes).sample[:, : x.shape[1]]
        if self.family == "sd3":
            return net(x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t).sample
        from diffusers import FluxPipeline

        n, c, h, w = x.shape
        out = net(
            FluxPipeline._pack_latents(x, n, c, h, w), encoder_hidden_states=prompt, pooled_projections=pooled,
            timestep=t / 1000, img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype),
            txt_ids=torch.zeros(prompt.shape[1], 3, device=x.device), guidance=torch.full((n,), 3.5, device=x.device),
        ).sample  # fmt: skip
        return FluxPipeline._unpack_latents(out, 8 * h, 8 * w, 8)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _text_transformer(family: str, channels: int, size: int, width: int, pooled: int) -> nn.Module:
    """A tiny config-built PixArt / SD3 / Flux transformer (Flux: ``4 · channels`` packed channels)."""
    import diffusers

    heads = dict(num_attention_heads=2, attention_head_dim=8)
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(
            **heads, in_channels=channels, out_channels=2 * channels, num_layers=1, sample_size=size,
            cross_attention_dim=16, caption_channels=width,
        )  # fmt: skip
    if family == "sd3":
        return diffusers.SD3Transformer2DModel(
            **heads, sample_size=size, patch_size=2, in_channels=channels, out_channels=channels, num_layers=1,
            joint_attention_dim=width, caption_projection_dim=16, pooled_projection_dim=pooled, pos_embed_max_size=size,
        )  # fmt: skip
    return diffusers.FluxTransformer2DModel(
        **heads, in_channels=4 * channels, num_layers=1, num_single_layers=1, joint_attention_dim=width,
        pooled_projection_dim=pooled, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
