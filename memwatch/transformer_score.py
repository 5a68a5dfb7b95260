"""The score of a diffusers image transformer, called the way its own pipeline calls it.

memwatch measures every network on probes ``x`` ``[n, C, H, W]`` (latents, as the training
batches hold them) and a condition ``cond`` ``[n, *cond_shape]``; each transformer family takes
them differently (the time input is the schedule's timestep ``t``):

* ``DiTTransformer2DModel``: one condition is a class label ``()``, passed as ``class_labels``;
  the null condition is the dropped label; ``timestep=t``.
* ``PixArtTransformer2DModel``: a prompt embedding ``[L, caption_channels]`` as
  ``encoder_hidden_states``, with ``added_cond_kwargs`` (the image size in pixels, the latent
  size × 8, when its config uses size conditions); the null condition is the empty prompt's.
* ``SD3Transformer2DModel``: a :func:`joint_condition` ``[L·E + P]``, split into
  ``encoder_hidden_states`` ``[L, E]`` and ``pooled_projections`` ``[P]``; null: the empty prompt's.
* ``FluxTransformer2DModel``: the same joint condition; the probes packed into 2×2 patches
  ``[n, (H/2)(W/2), 4C]`` with ``img_ids`` / ``txt_ids`` (and ``guidance`` when the config has
  ``guidance_embeds``), the output unpacked again; ``timestep=t / 1000``.

``E`` is ``config.joint_attention_dim`` and ``P`` ``config.pooled_projection_dim``. A network
that also predicts its variance (DiT, PixArt: ``out_channels = 2 · in_channels``) is measured on
its first ``in_channels`` output channels, the noise prediction, as its pipeline reads it.

The dropped label of DiT is the extra row of its ``LabelEmbedding`` (``num_classes``, e.g. 1000
for ImageNet), which training with label dropout learns as "no class". The empty-prompt embedding
of a text model exists only where its text encoder runs: the user's module holds it (see
:func:`memwatch.discovery.find_score` and ``memwatch_null_cond``).

The schedule is not this module's business: the same call conventions serve a DDPM, DDIM or a
flow-matching schedule; the time input is the schedule's timestep (diffusers' units), divided by
1000 for Flux as ``FluxPipeline`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

__all__ = [
    "FLUX_GUIDANCE",
    "TRANSFORMERS",
    "TransformerScore",
    "config_value",
    "dropped_label",
    "family_of",
    "joint_condition",
]

#: the ``guidance`` value given to a guidance-distilled Flux (``config.guidance_embeds``): the
#: default ``guidance_scale`` of ``FluxPipeline`` and of diffusers' Flux training scripts
FLUX_GUIDANCE = 3.5
_FLUX_TIME_UNIT = 1000.0  # FluxPipeline passes `timestep / 1000`; the network multiplies by 1000 again
_PIXART_VAE_FACTOR = 8  # PixArt's size conditions are in pixels: the latent size × the VAE's 8


def joint_condition(prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
    """One SD3 / Flux condition as one tensor: the prompt embedding and its pooled projection.

    ``[..., L, E]`` and ``[..., P]`` → ``[..., L·E + P]`` (the prompt's tokens row by row, then the
    pooled vector); :class:`TransformerScore` splits it again with the network's ``E`` and ``P``.

    Raises:
        MemwatchError: not tensors, or leading axes that differ.

    Example:
        >>> joint_condition(torch.zeros(77, 16), torch.zeros(8)).shape
        torch.Size([1240])
        >>> joint_condition(torch.zeros(2, 77, 16), torch.zeros(2, 8)).shape
        torch.Size([2, 1240])
    """
    if not isinstance(prompt_embeds, Tensor) or not isinstance(pooled, Tensor) or prompt_embeds.ndim < 2:
        raise MemwatchError(
            "`joint_condition` takes the prompt embedding [..., L, E] and its pooled projection [..., P] as tensors, "
            f"got {_describe(prompt_embeds)} and {_describe(pooled)}"
        )
    if prompt_embeds.shape[:-2] != pooled.shape[:-1]:
        raise MemwatchError(
            f"`joint_condition`: the prompt embedding {tuple(prompt_embeds.shape)} and the pooled projection "
            f"{tuple(pooled.shape)} must have the same leading axes"
        )
    return torch.cat([prompt_embeds.flatten(-2), pooled.to(prompt_embeds.dtype)], dim=-1)


def dropped_label(network: nn.Module) -> int | None:
    """The class label that means "no class" to a label-embedding network (DiT), or ``None``.

    It is ``num_classes`` of the network's diffusers ``LabelEmbedding`` when that embedding was
    built with label dropout (``dropout_prob > 0`` adds the row the dropped labels train);
    ``DiTPipeline`` passes the same label (1000) for classifier-free guidance.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> dropped_label(DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=1,
        ...     num_layers=1, sample_size=4, num_embeds_ada_norm=10))
        10
    """
    for module in network.modules():
        if type(module).__name__ == "LabelEmbedding" and getattr(module, "dropout_prob", 0) > 0:
            return int(module.num_classes)
    return None


class TransformerScore(DiffusionScore):
    """A :class:`DiffusionScore` around a diffusers image transformer (see the module docstring).

    Args:
        model: the network, one of :data:`TRANSFORMERS` (or a subclass).
        schedule: the noise schedule it was trained with.
        prediction: what it predicts (``memwatch.score.PREDICTION_TYPES``).
        null_cond: the one condition that means "unconditional": the dropped class label of a
            DiT (:func:`dropped_label`), the empty prompt's embedding ``[L, caption_channels]``
            of a PixArt, the empty prompt's :func:`joint_condition` ``[L·E + P]`` of SD3 / Flux.
        guidance_scale: classifier-free guidance ``w`` of conditional calls (``None``: none).
        guidance: the ``guidance`` input of a guidance-distilled Flux (``config.guidance_embeds``).
        time_fn: overrides the time input (default: the schedule's timestep, / 1000 for Flux).

    Raises:
        MemwatchError: ``model`` is not one of :data:`TRANSFORMERS`; the arguments of
            :class:`DiffusionScore`. A call without a condition and without ``null_cond`` raises
            one naming the null condition to set; a condition or probe that does not fit the
            network raises one naming both shapes.

    Example:
        >>> from diffusers import DiTTransformer2DModel
        >>> net = DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=2,
        ...     out_channels=4, num_layers=1, sample_size=4, num_embeds_ada_norm=10)
        >>> score = TransformerScore(net, NoiseSchedule.linear(100), null_cond=dropped_label(net))
        >>> score(torch.randn(3, 2, 4, 4), 50).shape   # the noise half of a learned-variance output
        torch.Size([3, 2, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        *,
        null_cond: Tensor | int | None = None,
        guidance_scale: float | None = None,
        guidance: float = FLUX_GUIDANCE,
        time_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        family = family_of(model)
        if family is None:
            raise MemwatchError(
                f"`model` must be one of the diffusers transformers {TRANSFORMERS}, got {type(model).__name__}"
            )
        super().__init__(
            model,
            schedule,
            prediction,
            null_cond=null_cond,
            guidance_scale=guidance_scale,
            cond_kwarg=_CONDITION_KWARG[family],
            time_fn=time_fn,
        )
        self.family = family
        self.guidance = float(guidance)
        # read once: what the calls need of the network (`model` may be swapped for a wrapper of its call)
        self.settings = {k: config_value(model, k) for k in _SETTINGS}
        self.settings["use_additional_conditions"] = bool(getattr(model, "use_additional_conditions", False))

    def _call_model(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise MemwatchError(_no_condition_message(self.family))
        if x.ndim != 4:
            raise MemwatchError(
                f"{self.family} takes probes [n, C, H, W]; got probes of shape {tuple(x.shape[1:])} "
                "(`data.sample_shape`): pass the latent shape (C, H, W)"
            )
        out = _CALLS[self.family](self, x, self._time_input(t, x), cond)
        if out.ndim == 4 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]  # a learned variance: the first channels are the noise prediction
        return out


# ---------------------------------------------------------------------- the families
def _dit(score: TransformerScore, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    if cond.is_floating_point() or cond.ndim != 1:
        raise MemwatchError(
            f"DiTTransformer2DModel takes one integer class label per probe; got a {cond.dtype} condition of "
            f"per-probe shape {tuple(cond.shape[1:])}"
        )
    return score.model(x, t, class_labels=cond, return_dict=False)[0]


def _pixart(score: TransformerScore, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    settings = score.settings
    _check_embedding(cond, settings["caption_channels"] or settings["cross_attention_dim"], score)
    sizes: dict[str, Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if settings["use_additional_conditions"]:  # as PixArtAlphaPipeline: pixels, height / width
        h, w = (_PIXART_VAE_FACTOR * s for s in x.shape[2:])
        sizes = {
            "resolution": torch.tensor([h, w], dtype=x.dtype, device=x.device).expand(x.shape[0], 2),
            "aspect_ratio": torch.full((x.shape[0], 1), h / w, dtype=x.dtype, device=x.device),
        }
    cond = cond.to(x.dtype)
    return score.model(x, encoder_hidden_states=cond, timestep=t, added_cond_kwargs=sizes, return_dict=False)[0]


def _sd3(score: TransformerScore, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    prompt, pooled = _split_joint(score, cond, x.dtype)
    return score.model(x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t, return_dict=False)[0]


def _flux(score: TransformerScore, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    n, c, h, w = x.shape
    packed_channels = score.settings["in_channels"]
    if h % 2 or w % 2 or 4 * c != packed_channels:
        raise MemwatchError(
            f"FluxTransformer2DModel packs 2×2 patches of latents [C, H, W] into {packed_channels} "
            f"channels: its probes need C = in_channels / 4 = {packed_channels // 4} and an even "
            f"H and W; got probes of shape {(c, h, w)} (`data.sample_shape`: the unpacked latent shape)"
        )
    prompt, pooled = _split_joint(score, cond, x.dtype)
    packed = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, 4 * c)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(x.device, x.dtype)
    txt_ids = torch.zeros(prompt.shape[1], 3, device=x.device, dtype=x.dtype)
    guidance = None
    if score.settings["guidance_embeds"]:
        guidance = torch.full((n,), score.guidance, device=x.device, dtype=x.dtype)
    out = score.model(
        packed,
        encoder_hidden_states=prompt,
        pooled_projections=pooled,
        timestep=t.to(x.dtype) / _FLUX_TIME_UNIT,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]
    return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


_Call = Callable[[TransformerScore, Tensor, Tensor, Tensor], Tensor]
_CALLS: dict[str, _Call] = {
    "DiTTransformer2DModel": _dit,
    "PixArtTransformer2DModel": _pixart,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
}
#: the diffusers image transformers memwatch calls as their pipelines do (subclasses too)
TRANSFORMERS = tuple(_CALLS)
_CONDITION_KWARG = {
    "DiTTransformer2DModel": "class_labels",
    "PixArtTransformer2DModel": "encoder_hidden_states",
    "SD3Transformer2DModel": "encoder_hidden_states",
    "FluxTransformer2DModel": "encoder_hidden_states",
}
#: the config values the calls read
_SETTINGS = (
    "in_channels",
    "caption_channels",
    "cross_attention_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
    "guidance_embeds",
)
_NULL_CONDITION = {
    "DiTTransformer2DModel": "the dropped class label (an int)",
    "PixArtTransformer2DModel": "the empty prompt's embedding [L, caption_channels]",
    "SD3Transformer2DModel": "memwatch.joint_condition(empty_prompt_embeds [L, E], empty_pooled [P])",
    "FluxTransformer2DModel": "memwatch.joint_condition(empty_prompt_embeds [L, E], empty_pooled [P])",
}


def family_of(model: Any) -> str | None:
    """The name of the first class of :data:`TRANSFORMERS` in ``model``'s class hierarchy, or ``None``."""
    return next((c.__name__ for c in type(model).__mro__ if c.__name__ in _CALLS), None)


# ---------------------------------------------------------------------- helpers
def _no_condition_message(family: str) -> str:
    return (
        f"{family} takes a condition in every call (`{_CONDITION_KWARG[family]}`), and memwatch has no null "
        f"condition for its unconditional probes: set `memwatch_null_cond` on the LightningModule to "
        f"{_NULL_CONDITION[family]}, e.g. `self.memwatch_null_cond = ...` in its __init__ (or pass `null_cond=` to "
        "the memwatch.TransformerScore that `score_fn` / `memwatch_score()` returns)"
    )


def _split_joint(score: TransformerScore, cond: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``[n, L·E + P]`` → the prompt embedding ``[n, L, E]`` and the pooled projection ``[n, P]``."""
    width, pooled = score.settings["joint_attention_dim"], score.settings["pooled_projection_dim"]
    size = cond.shape[-1] if cond.ndim == 2 else 0
    if not cond.is_floating_point() or cond.ndim != 2 or size <= pooled or (size - pooled) % width:
        raise MemwatchError(
            f"{score.family} takes one joint condition [L·E + P] per probe (memwatch.joint_condition of the prompt "
            f"embedding [L, E={width}] and the pooled projection [P={pooled}]); got a {cond.dtype} condition of "
            f"per-probe shape {tuple(cond.shape[1:])}"
        )
    prompt = cond[:, : size - pooled].reshape(cond.shape[0], -1, width)
    return prompt.to(dtype), cond[:, size - pooled :].to(dtype)


def _check_embedding(cond: Tensor, width: int | None, score: TransformerScore) -> None:
    if not cond.is_floating_point() or cond.ndim != 3 or (width is not None and cond.shape[-1] != width):
        raise MemwatchError(
            f"{score.family} takes one prompt embedding [L, {width}] per probe (`encoder_hidden_states`); got a "
            f"{cond.dtype} condition of per-probe shape {tuple(cond.shape[1:])}"
        )


def config_value(obj: Any, key: str) -> Any:
    """``obj.config[key]`` of a diffusers object (its config a mapping or attributes), or ``None``.

    Example:
        >>> config_value(nn.Linear(1, 1), "in_channels") is None
        True
    """
    config = getattr(obj, "config", None)
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _describe(value: Any) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
