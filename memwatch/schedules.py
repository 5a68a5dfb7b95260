"""Noise schedules: how much signal and noise a diffusion state ``x_t`` holds.

Every schedule describes the forward process

    x_t = α_t · x_0 + σ_t · ε,        ε ~ N(0, I),

with signal scale ``α_t`` and noise standard deviation ``σ_t``. ``alpha_bar(t) = α_t²``.

* discrete (DDPM-style): ``t`` is an integer step in ``[0, T-1]``, ``α_t² = ᾱ_t`` and
  ``σ_t² = 1 - ᾱ_t`` (linear, scaled-linear, cosine, or any diffusers scheduler).
* ``"vp"`` (continuous variance preserving): ``t ∈ [t_min, 1]``,
  ``ᾱ(t) = exp(-½ t² (β_max - β_min) - t β_min)``.
* ``"ve"`` (EDM / variance exploding): ``t`` *is* the noise level σ, ``α_t = 1``, ``σ_t = t``.
* ``"flow"`` (rectified flow, flow matching): ``σ_t = t / time_scale``, ``α_t = 1 - σ_t``, so
  ``x_t = (1 - σ_t) x_0 + σ_t ε``; ``time_scale`` is 1 for continuous ``t ∈ [t_min, t_max] ⊂ (0, 1]``
  and ``num_train_timesteps`` for diffusers' convention (``timestep = σ · 1000`` is what
  ``FlowMatchEulerDiscreteScheduler`` and its pipelines pass to the network). The network's
  velocity is ``v = dx_t/dσ = ε - x_0`` (``prediction="flow_prediction"``).

Noise levels. :meth:`NoiseSchedule.noise_level` is the level a timestep stands for in the units the
monitor's ``sigmas`` and :meth:`NoiseSchedule.timestep_for_sigma` speak: the noise in data units
``σ_t / α_t`` for flow (``x_t / α_t = x_0 + (σ_t / α_t) ε``) and VE; ``σ_t`` for the DDPM / VP
schedules, as since memwatch 0.1 (there ``σ_t / α_t`` is within 5 % of ``σ_t`` below σ ≈ 0.3).

Timesteps are always in the schedule's own units. A schedule built by :meth:`NoiseSchedule.from_diffusers`
from a diffusers scheduler with a ``config`` keeps that config: its DDIM sampling grid (timestep spacing,
steps offset) and its sampler settings (clipping, thresholding) are then diffusers' own, through
:meth:`NoiseSchedule.ddim_scheduler`; for a flow-matching scheduler the grid (``shift``, dynamic shifting,
``shift_terminal``, Karras / exponential / beta sigmas) is that of ``FlowMatchEulerDiscreteScheduler``,
through :meth:`NoiseSchedule.flow_scheduler`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.validation import check_int

__all__ = ["NoiseSchedule", "image_seq_len", "is_flow_matching"]

Kind = Literal["discrete", "vp", "ve", "flow"]


@dataclass(frozen=True)
class NoiseSchedule:
    """A diffusion noise schedule ``x_t = α_t x_0 + σ_t ε``.

    Build one with a constructor rather than directly:
    :meth:`linear`, :meth:`scaled_linear`, :meth:`cosine`, :meth:`from_diffusers` (discrete),
    :meth:`vp` and :meth:`edm` (continuous), :meth:`flow` (rectified flow; also
    :meth:`from_diffusers` of a ``FlowMatch*`` scheduler).

    ``scheduler_class`` and ``scheduler_config`` hold the diffusers scheduler a schedule was built
    from (class name and its config as sorted ``(key, value)`` pairs, lists as tuples, so the
    schedule stays hashable); ``None`` otherwise. Read the config with :meth:`diffusers_config`.

    Example:
        >>> sched = NoiseSchedule.linear(1000)
        >>> sched.sigma(torch.tensor([0, 999])).shape
        torch.Size([2])
        >>> round(float(sched.sigma(999)), 4)
        1.0
    """

    kind: Kind
    alphas_cumprod: Tensor | None = None  # [T] float64, discrete schedules only
    t_min: float = 0.0
    t_max: float = 1.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    scheduler_class: str | None = None
    scheduler_config: tuple[tuple[str, Any], ...] | None = field(default=None, repr=False)
    time_scale: float = 1.0  # flow only: σ_t = t / time_scale

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> NoiseSchedule:
        """Discrete schedule from ``ᾱ_t`` for ``t = 0 … T-1`` (``[T]``, decreasing in (0, 1])."""
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
        if ac.numel() < 2 or not bool(((ac > 0) & (ac <= 1)).all()):
            raise MemwatchError(f"`alphas_cumprod` must hold T >= 2 values in (0, 1], got {ac.numel()} values")
        return cls(kind="discrete", alphas_cumprod=ac, t_min=0.0, t_max=float(ac.numel() - 1))

    @classmethod
    def from_betas(cls, betas: Tensor) -> NoiseSchedule:
        """Discrete schedule from per-step variances ``β_t`` (``[T]``): ``ᾱ_t = Π_{s≤t} (1 - β_s)``."""
        return cls.from_alphas_cumprod(torch.cumprod(1.0 - torch.as_tensor(betas, dtype=torch.float64), 0))

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """DDPM's linear β schedule (Ho et al. 2020)."""
        check_int("num_timesteps", num_timesteps, 2)
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64))

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Latent-diffusion's schedule: linear in ``√β``."""
        check_int("num_timesteps", num_timesteps, 2)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(betas)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal's cosine schedule, ``ᾱ(u) ∝ cos²((u + s)/(1 + s) · π/2)``."""
        check_int("num_timesteps", num_timesteps, 2)
        u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls.from_betas(betas)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> NoiseSchedule:
        """The schedule of a diffusers scheduler: DDPM-style (anything with ``alphas_cumprod``) or
        flow matching (a ``FlowMatch*`` scheduler, see :func:`is_flow_matching`).

        When the scheduler has a diffusers ``config`` (every ``ConfigMixin`` scheduler does), the
        schedule keeps it and its class name, and memwatch's probe sampler then steps with
        ``diffusers.DDIMScheduler.from_config(config)``, as ``DDIMPipeline`` does: clipping,
        thresholding, timestep spacing, steps offset and ``set_alpha_to_one`` all apply.

        A flow-matching scheduler gives :meth:`flow` with its ``num_train_timesteps`` (timesteps
        ``t = σ · T``, diffusers' convention) over the σ range of its training sigmas (``shift``
        applied, as the scheduler holds them; down to half the smallest, see the code); the probe sampler then steps
        ``FlowMatchEulerDiscreteScheduler.from_config(config)`` (:meth:`flow_scheduler`).

        Raises:
            MemwatchError: ``scheduler`` has no ``alphas_cumprod`` and is not a flow-matching
                scheduler; a flow-matching scheduler with ``invert_sigmas=True`` (σ = 1 at the
                data, the other convention, which memwatch does not read).

        Example:
            >>> from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
            >>> sched = NoiseSchedule.from_diffusers(DDPMScheduler(clip_sample=False))
            >>> sched.scheduler_class, sched.diffusers_config()["clip_sample"]
            ('DDPMScheduler', False)
            >>> flow = NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0))
            >>> flow.kind, flow.time_scale, round(flow.t_min, 3), flow.t_max
            ('flow', 1000.0, 1.497, 1000.0)
        """
        if is_flow_matching(scheduler):
            base = cls._from_flow_matching(scheduler)
        else:
            ac = getattr(scheduler, "alphas_cumprod", None)
            if ac is None:
                raise MemwatchError(
                    f"`scheduler` must have an `alphas_cumprod` attribute (a diffusers DDPM/DDIM-style "
                    f"scheduler) or be a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, ...), "
                    f"got {type(scheduler).__name__}"
                )
            base = cls.from_alphas_cumprod(ac)
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping):
            return base
        frozen = tuple(sorted((str(k), _freeze(v)) for k, v in config.items()))
        return dataclasses.replace(base, scheduler_class=type(scheduler).__name__, scheduler_config=frozen)

    @classmethod
    def _from_flow_matching(cls, scheduler: Any) -> NoiseSchedule:
        """:meth:`flow` over a ``FlowMatch*`` scheduler's training sigmas."""
        config = scheduler.config
        if config.get("invert_sigmas", False):
            raise MemwatchError(
                f"`scheduler` {type(scheduler).__name__} has config.invert_sigmas=True (σ = 1 at the data); "
                "memwatch reads flow matching with σ = 0 at the data only: pass a score_fn with "
                "NoiseSchedule.flow() and the network's time input mapped by `time_fn`"
            )
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the training sigmas from the config (``scheduler.sigmas`` is the inference grid once
        # ``set_timesteps`` ran)
        sigmas = FlowMatchEulerDiscreteScheduler.from_config(_euler_config(config)).sigmas.to(torch.float64)
        # down to half the smallest training σ: the sampler's last grid σ can fall below it by a
        # float32 rounding (``σ · T`` in float32) or by the grid's second shift when shift < 1
        return cls.flow(int(config["num_train_timesteps"]), float(sigmas.min()) / 2, float(sigmas.max()))

    @classmethod
    def flow(
        cls, num_train_timesteps: int | None = None, sigma_min: float = 1e-3, sigma_max: float = 1.0
    ) -> NoiseSchedule:
        """Rectified flow / flow matching: ``x_t = (1 - σ_t) x_0 + σ_t ε``, velocity ``v = ε - x_0``.

        Args:
            num_train_timesteps: ``None`` for continuous time ``t = σ_t`` (the network takes
                ``t ∈ [sigma_min, sigma_max]``); an integer ``T`` for diffusers' convention
                ``t = σ_t · T`` (``FlowMatchEulerDiscreteScheduler`` and the SD3 / Flux pipelines
                pass ``timestep = σ · 1000`` to the network). Timesteps are floats either way.
            sigma_min: smallest σ_t measured or sampled, in ``(0, sigma_max)`` (σ = 0 is the data
                itself, where the score is not defined).
            sigma_max: largest σ_t, in ``(sigma_min, 1]`` (1: pure noise, where sampling starts).

        Raises:
            MemwatchError: ``num_train_timesteps`` is not an integer ``>= 2``, or the σ range is not
                ``0 < sigma_min < sigma_max <= 1``.

        Example:
            >>> sched = NoiseSchedule.flow(1000)
            >>> [round(float(v), 2) for v in (sched.alpha(250.0), sched.sigma(250.0), sched.noise_level(250.0))]
            [0.75, 0.25, 0.33]
        """
        if num_train_timesteps is not None:
            check_int("num_train_timesteps", num_train_timesteps, 2)
        if not 0 < sigma_min < sigma_max <= 1:
            raise MemwatchError(f"need 0 < `sigma_min` < `sigma_max` <= 1, got {sigma_min}, {sigma_max}")
        scale = 1.0 if num_train_timesteps is None else float(num_train_timesteps)
        return cls(kind="flow", t_min=sigma_min * scale, t_max=sigma_max * scale, time_scale=scale)

    @classmethod
    def vp(cls, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> NoiseSchedule:
        """Continuous variance-preserving SDE (Song et al. 2021), ``t ∈ [t_min, 1]``."""
        if not 0 < t_min < 1:
            raise MemwatchError(f"`t_min` must be in (0, 1), got {t_min}")
        return cls(kind="vp", t_min=t_min, t_max=1.0, beta_min=beta_min, beta_max=beta_max)

    @classmethod
    def edm(cls, sigma_min: float = 0.002, sigma_max: float = 80.0) -> NoiseSchedule:
        """EDM / variance-exploding noise levels (Karras et al. 2022): ``t = σ``, ``α = 1``."""
        if not 0 < sigma_min < sigma_max:
            raise MemwatchError(f"need 0 < `sigma_min` < `sigma_max`, got {sigma_min}, {sigma_max}")
        return cls(kind="ve", t_min=sigma_min, t_max=sigma_max)

    # ------------------------------------------------------------------- queries
    @property
    def is_discrete(self) -> bool:
        return self.kind == "discrete"

    @property
    def num_timesteps(self) -> int | None:
        """``T`` for discrete schedules, ``None`` for continuous ones."""
        return None if self.alphas_cumprod is None else self.alphas_cumprod.numel()

    def diffusers_config(self) -> dict[str, Any] | None:
        """The diffusers scheduler config this schedule was built from (tuples back to lists), or ``None``."""
        if self.scheduler_config is None:
            return None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.scheduler_config}

    def check_t(self, t: Tensor | float | int, name: str = "t") -> Tensor:
        """Return ``t`` as a tensor after checking it lies in the schedule's range.

        Python floats become float64 tensors (never float32), so a continuous timestep keeps
        its exact value; tensors keep their dtype.

        Raises:
            ValueError: ``t`` is non-finite, out of ``[t_min, t_max]``, or not an integer step
                for a discrete schedule.
        """
        tt = torch.as_tensor(t, dtype=torch.float64) if isinstance(t, float) else torch.as_tensor(t)
        if tt.is_floating_point() and not bool(torch.isfinite(tt).all()):
            raise MemwatchError(f"`{name}` must be finite, got {tt}")
        if self.is_discrete and tt.is_floating_point() and not bool((tt == tt.round()).all()):
            raise MemwatchError(f"`{name}` must be integer steps for a discrete schedule, got {tt}")
        lo, hi = float(tt.min()), float(tt.max())
        if lo < self.t_min or hi > self.t_max:
            raise MemwatchError(
                f"`{name}` must lie in [{self.t_min:g}, {self.t_max:g}] for this {self.kind} schedule, "
                f"got values in [{lo:g}, {hi:g}]"
            )
        return tt

    def alpha_bar(self, t: Tensor | float | int) -> Tensor:
        """``ᾱ_t = α_t²`` (float64, shape of ``t``)."""
        tt = torch.as_tensor(t)
        if self.kind == "discrete":
            assert self.alphas_cumprod is not None
            return self.alphas_cumprod[tt.long().cpu()].reshape(tt.shape)
        tt = tt.to(torch.float64).cpu()
        if self.kind == "vp":
            return torch.exp(-0.5 * tt**2 * (self.beta_max - self.beta_min) - tt * self.beta_min)
        if self.kind == "flow":
            return self.alpha(tt) ** 2
        return torch.ones_like(tt)

    def alpha(self, t: Tensor | float | int) -> Tensor:
        """Signal scale ``α_t`` (float64)."""
        if self.kind == "flow":
            return 1.0 - self.sigma(t)
        return self.alpha_bar(t).sqrt()

    def sigma(self, t: Tensor | float | int) -> Tensor:
        """Noise standard deviation ``σ_t`` of ``x_t`` — the scale of the score (float64)."""
        if self.kind in ("ve", "flow"):
            return torch.as_tensor(t).to(torch.float64).cpu() / self.time_scale
        return (1.0 - self.alpha_bar(t)).clamp_min(0).sqrt()

    def noise_level(self, t: Tensor | float | int) -> Tensor:
        """The noise level ``t`` stands for, in the units of ``sigmas`` and :meth:`timestep_for_sigma` (float64).

        Flow and VE: the noise in data units ``σ_t / α_t`` (infinite at a flow's σ_t = 1); DDPM / VP:
        ``σ_t`` (see the module docstring).
        """
        if self.kind == "flow":
            return self.sigma(t) / self.alpha(t)
        return self.sigma(t)

    def sampling_timesteps(self, steps: int, sample_shape: Sequence[int] | None = None) -> Tensor:
        """Decreasing timestep grid ``[steps]`` for a ``steps``-step sampler, first = noisiest.

        With a diffusers config: the grid of ``DDIMScheduler.from_config(config).set_timesteps(steps)``
        (its ``timestep_spacing`` and ``steps_offset``), or for flow matching that of
        :meth:`flow_scheduler` (``sample_shape`` fixes μ of dynamic shifting). Otherwise, discrete:
        ``steps`` evenly spaced integers from ``T-1`` down to 0; VP and flow: uniform in
        ``[t_min, t_max]``; VE: Karras et al.'s ρ=7 spacing of σ from ``t_max`` to ``t_min``.
        """
        check_int("steps", steps, 2)
        if self.scheduler_config is not None and self.kind == "flow":
            return self.flow_scheduler(steps, sample_shape).timesteps.cpu().to(torch.float64)
        if self.scheduler_config is not None:
            return self.ddim_scheduler(steps).timesteps.cpu()
        if self.kind == "discrete":
            return torch.linspace(self.t_max, 0, steps, dtype=torch.float64).round().long()
        if self.kind in ("vp", "flow"):
            return torch.linspace(self.t_max, self.t_min, steps, dtype=torch.float64)
        rho = 7.0
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = self.t_min ** (1 / rho), self.t_max ** (1 / rho)
        return (hi + ramp * (lo - hi)) ** rho

    def ddim_scheduler(self, steps: int, **overrides: Any) -> Any:
        """diffusers' ``DDIMScheduler.from_config(config, **overrides)`` with ``set_timesteps(steps)`` done.

        This is the scheduler ``DDIMPipeline`` would build from the model's scheduler. Should its
        ``alphas_cumprod`` differ from this schedule's (a ``beta_schedule`` DDIM lacks, such as
        ``"sigmoid"``, or ``alphas_cumprod`` edited after construction), it is rebuilt with
        ``trained_betas`` taken from this schedule, so sampler and score agree on ``ᾱ_t``.

        Args:
            steps: number of inference steps, in ``[2, T]``.
            overrides: config values to replace (e.g. ``prediction_type="epsilon"``).

        Raises:
            MemwatchError: the schedule has no diffusers config, or ``steps`` is out of range.
        """
        config = self.diffusers_config()
        if config is None or self.kind == "flow":
            raise MemwatchError(
                "this schedule has no diffusers DDPM-style scheduler config; build it with "
                "`NoiseSchedule.from_diffusers(scheduler)` to sample with diffusers' DDIMScheduler"
                + (" (a flow-matching schedule samples with `flow_scheduler`)" if self.kind == "flow" else "")
            )
        assert self.alphas_cumprod is not None
        check_int("steps", steps, 2, self.alphas_cumprod.numel())
        from diffusers import DDIMScheduler

        try:
            ddim = DDIMScheduler.from_config(config, **overrides)
            same = torch.allclose(ddim.alphas_cumprod.double(), self.alphas_cumprod, rtol=1e-6, atol=0)
        except NotImplementedError:
            same = False
        if not same:
            ac = self.alphas_cumprod
            betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
            fixed = {**overrides, "trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}
            ddim = DDIMScheduler.from_config(config, **fixed)
        ddim.set_timesteps(steps)
        return ddim

    def flow_scheduler(self, steps: int, sample_shape: Sequence[int] | None = None, **overrides: Any) -> Any:
        """diffusers' ``FlowMatchEulerDiscreteScheduler.from_config(config, **overrides)`` with
        ``set_timesteps(steps, mu=μ)`` done: the scheduler the SD3 / Flux pipelines step with.

        ``stochastic_sampling`` is off (probes are deterministic). With ``use_dynamic_shifting``,
        μ is the pipelines' ``calculate_shift`` of the image sequence length of ``sample_shape``
        (:func:`image_seq_len`); without a shape, the config's ``base_image_seq_len`` (μ = ``base_shift``).

        Args:
            steps: number of inference steps, ``>= 2``.
            sample_shape: one probe's shape (no batch axis), e.g. latents ``[16, 64, 64]``.
            overrides: config values to replace.

        Raises:
            MemwatchError: the schedule did not come from a diffusers flow-matching scheduler.
        """
        config = self.diffusers_config()
        if config is None or self.kind != "flow":
            raise MemwatchError(
                "this schedule has no diffusers flow-matching scheduler config; build it with "
                "`NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(...))`"
            )
        check_int("steps", steps, 2)
        from diffusers import FlowMatchEulerDiscreteScheduler

        euler = FlowMatchEulerDiscreteScheduler.from_config(
            _euler_config(config), **{"stochastic_sampling": False, **overrides}
        )
        mu = None
        if euler.config.use_dynamic_shifting:
            c = euler.config
            seq = c.base_image_seq_len if sample_shape is None else image_seq_len(sample_shape)
            slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
            mu = c.base_shift + slope * (seq - c.base_image_seq_len)
        euler.set_timesteps(steps, mu=mu)
        return euler

    def timestep_for_sigma(self, sigma: float) -> Tensor:
        """The timestep whose :meth:`noise_level` is closest to ``sigma`` (integer step when discrete):
        ``σ_t`` for DDPM / VP, the noise in data units ``σ_t / α_t`` for flow and VE.

        Example:
            >>> float(NoiseSchedule.flow(1000).timestep_for_sigma(1.0))  # σ_t = ½: x_t / α_t = x_0 + 1·ε
            500.0
        """
        if sigma <= 0:
            raise MemwatchError(f"`sigma` must be positive, got {sigma}")
        if self.kind == "discrete":
            return (self.sigma(torch.arange(self.num_timesteps)) - sigma).abs().argmin()
        if self.kind == "ve":
            return torch.tensor(min(max(sigma, self.t_min), self.t_max), dtype=torch.float64)
        if self.kind == "flow":  # σ_t / (1 - σ_t) = sigma
            t = sigma / (1.0 + sigma) * self.time_scale
            return torch.tensor(min(max(t, self.t_min), self.t_max), dtype=torch.float64)
        # VP: solve -log(1 - σ²) = ½ t² Δβ + t β_min for t.
        c = -math.log1p(-(min(sigma, 1 - 1e-12) ** 2))
        db = self.beta_max - self.beta_min
        t = (-self.beta_min + math.sqrt(self.beta_min**2 + 2 * db * c)) / db if db > 0 else c / self.beta_min
        return torch.tensor(min(max(t, self.t_min), self.t_max), dtype=torch.float64)


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` is a diffusers flow-matching scheduler: a ``FlowMatch*`` class
    (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``, …), or a multistep
    solver on flow sigmas (``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` … with
    ``use_flow_sigmas=True``, as SANA and Wan ship), with a config naming ``num_train_timesteps``.

    A solver on flow sigmas still has a DDPM ``alphas_cumprod`` from its unused betas: reading that
    would be a wrong schedule, which is why this test comes first."""
    if type(scheduler).__module__.split(".")[0] != "diffusers" and not type(scheduler).__name__.startswith("FlowMatch"):
        return False  # before any attribute lookup, which may raise on arbitrary objects
    config = getattr(scheduler, "config", None)
    if not (isinstance(config, Mapping) and "num_train_timesteps" in config):
        return False
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas", False))


def _euler_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``FlowMatchEulerDiscreteScheduler`` config equivalent to a flow-matching scheduler's ``config``.

    A ``FlowMatch*`` config passes through. A solver on flow sigmas (``use_flow_sigmas=True``)
    names its shift ``flow_shift``: it becomes Euler's ``shift`` over the same
    ``num_train_timesteps``; its other keys (betas, solver order, …) do not describe the schedule.

    Raises:
        MemwatchError: a solver on flow sigmas with ``use_dynamic_shifting=True`` (its μ comes from
            the pipeline's call, which memwatch cannot know).
    """
    if not config.get("use_flow_sigmas", False):
        return dict(config)
    if config.get("use_dynamic_shifting", False):
        raise MemwatchError(
            "the scheduler has config.use_flow_sigmas=True with use_dynamic_shifting=True: its shift comes "
            "from the μ the pipeline passes at each call, which memwatch cannot know; pass "
            "NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=...)) with the shift you sample with"
        )
    return {"num_train_timesteps": config["num_train_timesteps"], "shift": float(config.get("flow_shift", 1.0))}


def image_seq_len(sample_shape: Sequence[int]) -> int:
    """The image sequence length the SD3 / Flux pipelines compute μ of dynamic shifting from.

    ``[C, H, W]`` latents: ``(H // 2) · (W // 2)`` (SD3's patch size 2, Flux's 2×2 packing);
    ``[L, D]`` packed tokens (Flux's ``latents.shape[1]``): ``L``; any other shape: its number of
    elements (one token each).

    Example:
        >>> image_seq_len((16, 128, 128)), image_seq_len((4096, 64))
        (4096, 4096)
    """
    shape = tuple(int(v) for v in sample_shape)
    if len(shape) == 3:
        return (shape[1] // 2) * (shape[2] // 2)
    if len(shape) == 2:
        return shape[0]
    return math.prod(shape)


def _freeze(value: Any) -> Any:
    """A config value in hashable form: lists, tuples and arrays become tuples."""
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value
