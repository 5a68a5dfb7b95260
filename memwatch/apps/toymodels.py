"""Small diffusion models for the demo, the examples and the tests.

:class:`DDPMModule` is also a template for your own LightningModule: the only thing memwatch needs
from it is :meth:`DDPMModule.memwatch_score`, which returns the model's :class:`DiffusionScore`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

__all__ = [
    "DDPMModule",
    "DigitsDataModule",
    "MLPDenoiser",
    "UNetDDPMModule",
    "tiny_unet",
    "ManifoldDataModule",
    "TensorDataModule",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[n, dim]`` of timesteps ``t`` ``[n]`` (Vaswani et al.; DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPDenoiser(nn.Module):
    """ε-network for small data: ``[n, *shape] -> [n, *shape]``, flattened inside.

    Args:
        shape: sample shape, e.g. ``(1, 8, 8)`` or ``(2,)``.
        hidden: width; depth: number of hidden layers; time_dim: timestep embedding size.
        num_classes: if set, a class-conditional model; label ``num_classes`` is the null
            (unconditional) label used for classifier-free guidance.
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        dim = math.prod(self.shape)
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.label_emb = None if num_classes is None else nn.Embedding(num_classes + 1, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        h = self.inp(rearrange(x, "n ... -> n (...)"))
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(h.dtype))
        if self.label_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.label_emb.num_embeddings - 1, device=x.device)
            emb = emb + self.label_emb(cond.long())
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h).reshape(x.shape)


class DDPMModule(pl.LightningModule):
    """A DDPM trained with the ε-objective on small data, ready for :class:`MemorizationMonitor`.

    Args:
        shape: sample shape; hidden, depth: MLP size; num_timesteps: T of the linear schedule;
        lr: Adam learning rate; num_classes: class-conditional if set (labels come as the
        batch's second tensor); p_uncond: label dropout for classifier-free guidance.

    Example:
        >>> module = DDPMModule(shape=(2,), hidden=32, depth=1)
        >>> module.memwatch_score().prediction
        'epsilon'
    """

    def __init__(
        self,
        shape: Sequence[int] = (1, 8, 8),
        hidden: int = 256,
        depth: int = 3,
        num_timesteps: int = 1000,
        lr: float = 1e-3,
        num_classes: int | None = None,
        p_uncond: float = 0.2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MLPDenoiser(shape, hidden=hidden, depth=depth, num_classes=num_classes)
        self.schedule = NoiseSchedule.linear(num_timesteps)
        self.register_buffer("alphas_cumprod", self.schedule.alphas_cumprod.float(), persistent=False)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.net(x, t, cond)

    def memwatch_score(self) -> DiffusionScore:
        """The score memwatch measures (with the null label for conditional models)."""
        null = None if self.hparams.num_classes is None else torch.tensor(self.hparams.num_classes)
        return DiffusionScore(self.net, self.schedule, prediction="epsilon", null_cond=null)

    def training_step(self, batch: Sequence[Tensor] | Tensor, batch_idx: int) -> Tensor:
        x = batch if isinstance(batch, Tensor) else batch[0]
        cond = None
        if self.hparams.num_classes is not None:
            cond = batch[1].clone()
            drop = torch.rand(cond.shape, device=cond.device) < self.hparams.p_uncond
            cond[drop] = self.hparams.num_classes
        t = torch.randint(0, self.schedule.num_timesteps, (x.shape[0],), device=x.device)
        noise = torch.randn_like(x)
        ab = self.alphas_cumprod[t].reshape(-1, *([1] * (x.ndim - 1)))
        loss = nn.functional.mse_loss(self.net(ab.sqrt() * x + (1 - ab).sqrt() * noise, t, cond), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TensorDataModule(pl.LightningDataModule):
    """Serves in-memory tensors in random batches drawn with replacement (a fixed seed).

    Each epoch is ``steps_per_epoch`` batches however small the data set, so tiny training sets
    (the ones that memorize) train as fast per step as large ones. The draws are made up front
    into an index list read in order, so under DDP Lightning's ``DistributedSampler`` splits
    that list between ranks (a resampling sampler would be replaced by one over the raw data).
    """

    def __init__(self, *tensors: Tensor, batch_size: int = 64, steps_per_epoch: int = 100, seed: int = 0) -> None:
        super().__init__()
        if not tensors:
            raise MemwatchError("TensorDataModule needs at least one tensor")
        self.tensors, self.batch_size, self.steps_per_epoch, self.seed = tensors, batch_size, steps_per_epoch, seed

    def train_dataloader(self) -> DataLoader:
        draws = torch.randint(
            len(self.tensors[0]),
            (self.batch_size * self.steps_per_epoch,),
            generator=torch.Generator().manual_seed(self.seed),
        )
        dataset = TensorDataset(*(t[draws] for t in self.tensors))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)


class DigitsDataModule(TensorDataModule):
    """sklearn's 8×8 handwritten digits (embedded in scikit-learn, no download) in [-1, 1].

    A seeded random subset of ``n_train`` of the 1797 images, served like
    :class:`TensorDataModule`; small subsets are what a diffusion model memorizes.

    Args:
        n_train: number of training images (``None``: all 1797).
        batch_size, steps_per_epoch, seed: as for :class:`TensorDataModule`; ``seed`` also picks
            the subset.
        image_size: side of the served images; 8 is the original, larger sizes are bilinear
            upsamplings (e.g. 16 for a UNet that halves the resolution twice).

    Attributes:
        train_data: the training images ``[n_train, 1, image_size, image_size]`` float32, which
            ``memwatch fit`` also hands to a ``MemorizationMonitor`` as ``reference_data``.

    Example:
        >>> DigitsDataModule(n_train=16, image_size=16).train_data.shape
        torch.Size([16, 1, 16, 16])
    """

    def __init__(
        self,
        n_train: int | None = 1024,
        batch_size: int = 64,
        steps_per_epoch: int = 100,
        seed: int = 0,
        image_size: int = 8,
    ) -> None:
        from memwatch.data import digits

        images = digits(n_train, seed=seed, image_size=image_size)
        super().__init__(images, batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed)
        self.train_data = images


class ManifoldDataModule(TensorDataModule):
    """Points on a low-dimensional manifold (:func:`memwatch.data.manifold`): two moons in the
    plane by default, the 2-D toy for density plots.

    Args:
        name: one of :data:`memwatch.data.MANIFOLDS` (``"moons"``: intrinsic dimension 1; swiss
            roll / S-curve: 2, need ``dim >= 3``).
        n_train: number of training points; a handful are memorized, thousands are not.
        dim: ambient dimension.
        noise: standard deviation of sklearn's noise on the manifold (before standardizing).
        batch_size, steps_per_epoch, seed: as for :class:`TensorDataModule`.

    Attributes:
        train_data: the training points ``[n_train, dim]`` float32 (standardized per axis
            before the random rotation).

    Example:
        >>> ManifoldDataModule(n_train=8).train_data.shape
        torch.Size([8, 2])
    """

    def __init__(
        self,
        name: str = "moons",
        n_train: int = 2000,
        dim: int = 2,
        noise: float = 0.0,
        batch_size: int = 128,
        steps_per_epoch: int = 100,
        seed: int = 0,
    ) -> None:
        from memwatch.data import manifold

        points = manifold(name, n_train, dim=dim, seed=seed, noise=noise)
        super().__init__(points, batch_size=batch_size, steps_per_epoch=steps_per_epoch, seed=seed)
        self.train_data = points


def tiny_unet(
    channels: int = 1,
    size: int | tuple[int, int] = 8,
    *,
    widths: Sequence[int] = (8, 16),
    conditional: bool = False,
    **config: Any,
):
    """A config-built diffusers UNet with random weights (``UNet2DConditionModel`` with
    cross-attention to 16-dimensional embeddings if ``conditional``), small enough for a CPU;
    ``config`` overrides or adds config entries (e.g. ``out_channels``, ``num_class_embeds``)."""
    import diffusers

    common = dict(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1)
    common.update(block_out_channels=tuple(widths), norm_num_groups=4, **config)
    if conditional:
        return diffusers.UNet2DConditionModel(
            **common,
            cross_attention_dim=16,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return diffusers.UNet2DModel(
        **common, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D")
    )


class UNetDDPMModule(pl.LightningModule):
    """A diffusers ``UNet2DModel`` and its scheduler kept as attributes, trained with the
    scheduler's own ``add_noise`` / ``get_velocity``: what memwatch finds without any glue.

    Args:
        unet: the network (e.g. :func:`tiny_unet`); scheduler: a diffusers DDPM-style scheduler
        (its ``prediction_type`` picks the target); lr: Adam learning rate.
    """

    def __init__(self, unet: nn.Module, scheduler: Any, lr: float = 1e-3) -> None:
        super().__init__()
        self.unet, self.scheduler, self.lr = unet, scheduler, lr

    def training_step(self, batch: Sequence[Tensor] | Tensor, batch_idx: int) -> Tensor:
        x0 = batch if isinstance(batch, Tensor) else batch[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        noisy = self.scheduler.add_noise(x0, eps, t)
        v = self.scheduler.config.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(x0, eps, t) if v else eps
        loss = nn.functional.mse_loss(self.unet(noisy, t).sample, target)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
