"""What to measure on a LightningModule, found and checked once before training starts.

* :func:`find_score` — the module's :class:`memwatch.DiffusionScore`: a user ``score_fn``, a
  ``memwatch_score()`` method, or a diffusers UNet or image transformer (DiT, PixArt, SD3, Flux)
  and its scheduler among the module's attributes (``torch.compile``'d networks included);
  :func:`diffusers_score` — the same reading of a network and scheduler a loop holds apart.
* :func:`measured_score` — the same score on an EMA of the weights (an ``nn.Module`` copy such as
  ``torch.optim.swa_utils.AveragedModel``, or diffusers' ``EMAModel``), the training weights untouched.
* :func:`sample_shape_of`, :func:`batch_sample_shape` — the shape of one probe, from a diffusers
  config or from a training batch.
* :func:`check_score`, :func:`check_reference_data` — one model call on two probes and a check
  of the reference data's space, so a wrong shape fails once, at setup, with a message that
  names the argument to change, rather than at every check as a raw shape error.

Compiled networks are measured through their eager module ``_orig_mod``: it holds the very
parameters the compiled forward trains (shared storage), so the numbers are those of the
training weights. Measuring through the compiled wrapper instead would recompile for new probe
batch sizes, grad modes and train/eval flags (minutes per compilation of a tiny UNet on a busy
CPU), and with torch 2.13 a first call under ``torch.func.vjp`` produced no graph and left the
wrapper's later training calls uncompiled too.

Over 600 lines, as one module: finding the score is one precedence (``score_fn``, then
``memwatch_score()``, then a diffusers pair, EMAs and compiled wrappers set apart) whose refusals
name every candidate seen; split by model family, each part would restate that order.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from memwatch.errors import MemwatchError
from memwatch.operators import is_out_of_memory
from memwatch.schedules import NoiseSchedule, is_flow_matching
from memwatch.score import PREDICTION_TYPES, DiffusionScore
from memwatch.transformer_score import TransformerScore, config_value, dropped_label, family_of
from memwatch.validation import check_shape

__all__ = [
    "DIFFUSERS_NETWORKS",
    "NULL_COND_ATTR",
    "ScoreFn",
    "diffusers_score",
    "check_score",
    "find_score",
    "measured_score",
    "network_of",
    "sample_shape_of",
]

ScoreFn = Callable[[nn.Module], DiffusionScore]

#: diffusers network classes recognised on a module (subclasses too), with the keyword that
#: carries their condition (``UNet2DModel``: ``class_labels`` only when its config has class
#: embeddings; SD3 / Flux: with ``pooled_projections``). The transformers are called as their
#: pipelines call them (:mod:`memwatch.transformer_score`).
DIFFUSERS_NETWORKS = {
    "UNet2DModel": "class_labels",
    "UNet2DConditionModel": "encoder_hidden_states",
    "DiTTransformer2DModel": "class_labels",
    "PixArtTransformer2DModel": "encoder_hidden_states",
    "SD3Transformer2DModel": "encoder_hidden_states",
    "FluxTransformer2DModel": "encoder_hidden_states",
}
#: the LightningModule attribute that holds the null condition of a conditional network memwatch
#: finds (the empty prompt's embedding, which only the module's text encoder can make)
NULL_COND_ATTR = "memwatch_null_cond"

_PROBES = 2  # probes of the dry call in check_score


# ---------------------------------------------------------------------- finding the score
def find_score(pl_module: nn.Module, score_fn: ScoreFn | None = None, *, ema_attr: str | None = None) -> DiffusionScore:
    """The module's :class:`DiffusionScore`, found in this order of precedence:

    1. ``score_fn(pl_module)``;
    2. ``pl_module.memwatch_score()``;
    3. a diffusers network of :data:`DIFFUSERS_NETWORKS` among the module's attributes (child
       modules at any depth, plain attributes, pipelines' ``.unet`` / ``.transformer``) with its
       scheduler (any attribute with ``alphas_cumprod`` and ``config``, e.g. ``DDPMScheduler``, or a
       flow-matching ``FlowMatch*`` scheduler): the schedule is :meth:`NoiseSchedule.from_diffusers`,
       the prediction ``scheduler.config.prediction_type`` (``"flow_prediction"`` for flow
       matching). A UNet is called with the condition keyword
       ``"encoder_hidden_states"`` (``UNet2DConditionModel``) or ``"class_labels"`` (a
       ``UNet2DModel`` whose config has ``num_class_embeds`` or ``class_embed_type``); an image
       transformer (DiT, PixArt, SD3, Flux) as its pipeline calls it, through a
       :class:`memwatch.TransformerScore`. The null condition of a conditional network is the
       module's ``memwatch_null_cond`` attribute (:data:`NULL_COND_ATTR`: the empty prompt's
       embedding ``[L, E]``, or :func:`memwatch.joint_condition` of it and its pooled projection
       for SD3 / Flux) when it has one, else a DiT's dropped class label
       (:func:`memwatch.transformer_score.dropped_label`), else none (the dry call at fit start
       then names the attribute to set).

    A ``torch.compile``'d network (found, or in the returned score) is replaced by its eager
    ``_orig_mod`` — the same parameters (see the module docstring). EMA copies are never
    auto-detected (measure them with :func:`measured_score`): the subtree of ``ema_attr`` and
    every ``AveragedModel`` are skipped, and of several networks the one with trainable parameters
    wins. Call it while the parameters' ``requires_grad`` flags are the training ones (not inside
    a frozen, eval-mode check) and keep the result: the score holds the network, whose weights
    change in place.

    Args:
        pl_module: the LightningModule (any ``nn.Module``).
        score_fn: ``pl_module -> DiffusionScore``, overrides everything else.
        ema_attr: attribute of an EMA copy of the network, excluded from auto-detection.

    Returns:
        The score; its ``model`` is an eager network when it was found or compiled.

    Raises:
        MemwatchError: ``score_fn`` / ``memwatch_score()`` returned something else than a
            ``DiffusionScore``; nothing was found (the message lists what was found and the ways to
            provide a score); several networks or disagreeing schedulers were found; the
            scheduler's ``prediction_type`` is not one of ``memwatch.score.PREDICTION_TYPES``.

    Example:
        >>> class Module(nn.Module):
        ...     def memwatch_score(self):
        ...         return DiffusionScore(lambda x, t: 0 * x, NoiseSchedule.linear(10))
        >>> find_score(Module()).prediction
        'epsilon'
    """
    if score_fn is not None:
        score, source = score_fn(pl_module), "`score_fn`"
    elif callable(getattr(pl_module, "memwatch_score", None)):
        score, source = pl_module.memwatch_score(), "`memwatch_score()`"
    else:
        return _diffusers_score(pl_module, ema_attr)
    if not isinstance(score, DiffusionScore):
        raise MemwatchError(f"{source} must return a memwatch.DiffusionScore, got {type(score).__name__}")
    eager = _eager(score.model)
    return score if eager is score.model else score.with_model(eager)


def _diffusers_score(pl_module: nn.Module, ema_attr: str | None) -> DiffusionScore:
    """A score around the one diffusers network and scheduler among the module's attributes."""
    ema = None if ema_attr is None else getattr(pl_module, ema_attr, None)
    skip = set() if ema is None else {id(ema)}
    networks: dict[int, tuple[str, nn.Module]] = {}
    schedulers: dict[int, tuple[str, Any]] = {}
    for name, value in _attributes(pl_module, "", skip):
        if isinstance(value, nn.Module) and _network_kind(value) is not None:
            networks.setdefault(id(value), (name, value))
        elif _has_attributes(value, "alphas_cumprod", "config") or is_flow_matching(value):
            schedulers.setdefault(id(value), (name, value))
    if not networks or not schedulers:
        raise MemwatchError(_not_found_message(pl_module, list(networks.values()), list(schedulers.values())))
    _, network = _one_network(list(networks.values()))
    sched_name, scheduler = _one_scheduler(list(schedulers.values()))
    null_cond, where = getattr(pl_module, NULL_COND_ATTR, None), f"{type(pl_module).__name__}.{NULL_COND_ATTR}"
    return diffusers_score(network, scheduler, null_cond=null_cond, names=(sched_name, where))


def diffusers_score(
    network: nn.Module,
    scheduler: Any,
    *,
    null_cond: Tensor | None = None,
    names: tuple[str, str] = ("scheduler", "null_cond"),
) -> DiffusionScore:
    """The score of a diffusers network under its scheduler, as :func:`find_score` reads a pair
    it finds on a module: for a loop that holds the two apart (``score_fn=lambda net:
    diffusers_score(net, noise_scheduler)``).

    The schedule is :meth:`NoiseSchedule.from_diffusers`, the prediction
    ``scheduler.config.prediction_type`` (``"flow_prediction"`` for flow matching); a UNet of
    :data:`DIFFUSERS_NETWORKS` is called with its condition keyword when it takes one, an image
    transformer through a :class:`memwatch.TransformerScore`.

    Args:
        network: a diffusers UNet or image transformer.
        scheduler: its diffusers scheduler (with ``alphas_cumprod`` and ``config``, or ``FlowMatch*``).
        null_cond: the null condition of a conditional network (a DiT's default: its dropped label).
        names: the scheduler's and the null condition's names in messages.

    Raises:
        MemwatchError: the network is no diffusers UNet or image transformer; the prediction
            type is not one of ``memwatch.score.PREDICTION_TYPES``; ``null_cond`` does not fit.
    """
    flow = is_flow_matching(scheduler)
    prediction = config_value(scheduler, "prediction_type") or ("flow_prediction" if flow else "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise MemwatchError(
            f"the scheduler `{names[0]}` has config.prediction_type={prediction!r}; memwatch supports "
            f"{PREDICTION_TYPES}: pass a `score_fn` that converts the network's output"
        )
    schedule, kind = NoiseSchedule.from_diffusers(scheduler), _network_kind(network)
    if kind is None and family_of(network) is None:
        raise MemwatchError(
            f"`network` must be a diffusers UNet ({', '.join(DIFFUSERS_NETWORKS)}) or image transformer, got "
            f"{type(network).__name__}: pass a `score_fn` that builds a memwatch.DiffusionScore"
        )
    try:
        if family_of(network) is not None:
            null_cond = dropped_label(network) if null_cond is None else null_cond
            return TransformerScore(network, schedule, prediction, null_cond=null_cond)
        conditional = _takes_a_condition(network, kind)
        return DiffusionScore(
            network,
            schedule,
            prediction=prediction,
            null_cond=null_cond if conditional else None,
            cond_kwarg=DIFFUSERS_NETWORKS[kind] if conditional else None,
        )
    except MemwatchError as err:  # the only argument not checked above is the null condition
        raise MemwatchError(f"`{names[1]}`: {err}") from err


def _attributes(module: nn.Module, prefix: str, skip: set[int]) -> Iterator[tuple[str, Any]]:
    """``(dotted name, value)`` of the plain attributes and child modules of ``module``'s tree.

    Does not descend into diffusers networks, ``AveragedModel`` copies (EMAs) or ``skip``; a
    plain attribute with ``.scheduler`` and ``.unet`` or ``.transformer`` (a pipeline) yields those.
    """
    for name, value in vars(module).items():
        if name in ("_modules", "_parameters", "_buffers") or id(value) in skip:
            continue
        yield prefix + name, value
        for network in ("unet", "transformer"):
            if _has_attributes(value, network, "scheduler"):  # a pipeline
                yield f"{prefix}{name}.{network}", getattr(value, network)
                yield f"{prefix}{name}.scheduler", value.scheduler
    for name, child in module.named_children():
        if id(child) in skip:
            continue
        yield prefix + name, child
        if _network_kind(child) is None and not _is_averaged_model(child):
            yield from _attributes(child, f"{prefix}{name}.", skip)


def _has_attributes(value: Any, *names: str) -> bool:
    """Whether ``value`` (not a module) has all of ``names``; an attribute lookup that raises means no."""
    if isinstance(value, nn.Module):
        return False
    try:
        return all(hasattr(value, name) for name in names)
    except Exception:  # noqa: BLE001 - arbitrary user objects: a proxy's __getattr__ may raise anything
        return False


def _network_kind(module: Any) -> str | None:
    """The name of the class of :data:`DIFFUSERS_NETWORKS` that ``module`` is (or subclasses), or ``None``."""
    return next((c.__name__ for c in type(module).__mro__ if c.__name__ in DIFFUSERS_NETWORKS), None)


def _one_network(found: list[tuple[str, nn.Module]]) -> tuple[str, nn.Module]:
    """The one network of ``found``, or the one trainable one; else an error naming them."""
    if len(found) > 1:
        trainable = [(n, m) for n, m in found if any(p.requires_grad for p in m.parameters())]
        if len(trainable) != 1:
            names = ", ".join(f"`{_display(n)}` ({type(m).__name__})" for n, m in found)
            raise MemwatchError(
                f"memwatch found several diffusion networks on the module: {names}, and "
                f"{len(trainable)} of them have trainable parameters; pass `score_fn=` to say which one to "
                "measure (or `ema_attr=` to exclude an EMA copy)"
            )
        found = trainable
    name, network = found[0]
    return _display(name), _eager(network)


def _one_scheduler(found: list[tuple[str, Any]]) -> tuple[str, Any]:
    """The first scheduler, when all of ``found`` agree on ``alphas_cumprod`` (flow matching: the
    config) and prediction type."""
    name, first = found[0]
    for other_name, other in found[1:]:
        if is_flow_matching(first) or is_flow_matching(other):
            same = is_flow_matching(first) and is_flow_matching(other) and dict(first.config) == dict(other.config)
        else:
            same = (
                config_value(other, "prediction_type") == config_value(first, "prediction_type")
                and torch.as_tensor(other.alphas_cumprod).shape == torch.as_tensor(first.alphas_cumprod).shape
                and torch.allclose(
                    torch.as_tensor(other.alphas_cumprod, dtype=torch.float64).cpu(),
                    torch.as_tensor(first.alphas_cumprod, dtype=torch.float64).cpu(),
                )
            )
        if not same:
            raise MemwatchError(
                f"memwatch found schedulers `{_display(name)}` and `{_display(other_name)}` with different noise "
                "schedules or prediction types; pass `score_fn=` to say which one the network was trained with"
            )
    return _display(name), first


def _not_found_message(
    pl_module: nn.Module, networks: list[tuple[str, nn.Module]], schedulers: list[tuple[str, Any]]
) -> str:
    found = []
    if networks:
        found.append("the network " + ", ".join(f"`{_display(n)}` ({type(m).__name__})" for n, m in networks))
    if schedulers:
        found.append("the scheduler " + ", ".join(f"`{n}` ({type(s).__name__})" for n, s in schedulers))
    shadows = [name for name, value in vars(pl_module).items() if _is_ema_model(value)]
    if shadows:
        found.append(f"the diffusers EMAModel `{shadows[0]}` (shadow weights, not a network)")
    if not found:
        summary = "found no diffusers network and no scheduler. "
    else:
        missing = (
            "scheduler with `alphas_cumprod` or flow-matching (FlowMatch*) scheduler"
            if networks
            else " / ".join(DIFFUSERS_NETWORKS)
        )
        summary = f"found {' and '.join(found)}, but no {missing}. "
    return (
        f"memwatch cannot find the score of {type(pl_module).__name__}: {summary}"
        "Provide one of: (1) `MemorizationMonitor(score_fn=lambda module: memwatch.DiffusionScore(module.net, "
        "schedule, prediction=...))`; (2) a `memwatch_score()` method on the module returning a "
        f"memwatch.DiffusionScore; (3) a diffusers network ({', '.join(DIFFUSERS_NETWORKS)}) and its scheduler "
        "(e.g. DDPMScheduler, FlowMatchEulerDiscreteScheduler) as attributes of the module. A torch.compile'd "
        "network is found through its "
        "`_orig_mod`. An EMA (torch.optim.swa_utils.AveragedModel, diffusers' EMAModel) is not the network: "
        "keep the network itself on the module and name the EMA with `ema_attr=` to measure its weights."
    )


# ---------------------------------------------------------------------- EMA weights
@contextlib.contextmanager
def measured_score(
    score: DiffusionScore, pl_module: nn.Module, ema_attr: str | None = None
) -> Iterator[DiffusionScore]:
    """The score on the weights a check measures: the training ones, or the EMA at ``ema_attr``.

    EMA is never chosen automatically: whether to watch the EMA or the raw weights is the
    user's call. ``getattr(pl_module, ema_attr)`` may be

    * an ``nn.Module`` copy of the network: a deepcopy updated by hand, or a wrapper holding it as
      ``.module`` (``torch.optim.swa_utils.AveragedModel``, timm's ``ModelEmaV2``) or
      ``.ema_model`` (``ema_pytorch.EMA``), compiled or not; an EMA of the whole LightningModule
      is measured at the network's attribute path in it. Measured in place.
    * a diffusers ``EMAModel`` (``diffusers.training_utils.EMAModel``, shadow weights only):
      measured on a deepcopy of the network into which ``ema.copy_to`` writes the shadow weights
      at every entry (eval mode, frozen); the training network is untouched. The copy is not
      kept between checks: it would cost a second resident copy of the network for the whole run
      to save one weight copy per check.

    Args:
        score: the training score (from :func:`find_score`).
        pl_module: the module that holds the EMA.
        ema_attr: the attribute name, or ``None`` for the training weights.

    Yields:
        ``score`` itself (``ema_attr=None``) or ``score.with_model(ema network)``; valid inside the
        ``with`` block (the copy is released with the yielded score).

    Raises:
        MemwatchError: ``ema_attr`` names nothing usable (the message says what it names and which
            EMA-like attributes the module has), a network of another type or parameter shapes, or
            an ``EMAModel`` whose shadow weights do not match the network's parameters.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> holder = nn.Module()
        >>> holder.ema = torch.optim.swa_utils.AveragedModel(net)
        >>> with measured_score(DiffusionScore(net, NoiseSchedule.linear(10)), holder, "ema") as s:
        ...     s.model is holder.ema.module
        True
    """
    if ema_attr is None:
        yield score
        return
    ema = getattr(pl_module, ema_attr, None)
    if _is_ema_model(ema):
        network = _shadowed_network(score, ema, ema_attr)
        shadow_copy = copy.deepcopy(network).eval().requires_grad_(False)
        ema.copy_to(shadow_copy.parameters())
        try:
            yield score.with_model(shadow_copy)
        finally:
            del shadow_copy
    elif isinstance(ema, nn.Module):
        yield score.with_model(_ema_network(ema, score, pl_module, ema_attr))
    else:
        what = "no attribute" if ema is None else f"a {type(ema).__name__}"
        raise MemwatchError(
            f"`ema_attr`={ema_attr!r} names {what} on {type(pl_module).__name__}; it must name an EMA of the "
            "network: an nn.Module copy (torch.optim.swa_utils.AveragedModel, a deepcopy updated by hand) or a "
            f"diffusers EMAModel. EMA-like attributes of the module: {_ema_like(pl_module) or 'none'}"
        )


def _is_ema_model(value: Any) -> bool:
    """A diffusers ``EMAModel`` (duck-typed: ``shadow_params`` and ``copy_to``, not a module)."""
    return (
        not isinstance(value, nn.Module)
        and hasattr(value, "shadow_params")
        and callable(getattr(value, "copy_to", None))
    )


def _is_averaged_model(module: Any) -> bool:
    return any(c.__name__ == "AveragedModel" for c in type(module).__mro__)


def _shadowed_network(score: DiffusionScore, ema: Any, ema_attr: str) -> nn.Module:
    """The score's network, checked to match the ``EMAModel``'s shadow weights one for one."""
    network = score.model
    if not isinstance(network, nn.Module):
        raise MemwatchError(
            f"`ema_attr`={ema_attr!r} is a diffusers EMAModel (shadow weights of a network), but the score's model "
            f"is a {type(network).__name__}, not the nn.Module whose parameters it shadows; let `score_fn` / "
            "`memwatch_score()` return a DiffusionScore around the network itself"
        )
    shapes = [tuple(p.shape) for p in network.parameters()]
    shadows = [tuple(p.shape) for p in ema.shadow_params]
    if shapes != shadows:
        raise MemwatchError(
            f"`ema_attr`={ema_attr!r} is a diffusers EMAModel of {len(shadows)} parameters that do not match the "
            f"{len(shapes)} parameters of the measured {type(network).__name__}; build it from that network "
            "(`EMAModel(unet.parameters())`)"
        )
    return network


def _ema_network(ema: nn.Module, score: DiffusionScore, pl_module: nn.Module, ema_attr: str) -> nn.Module:
    """The network inside an ``nn.Module`` EMA, checked against the score's network."""
    network, candidate = score.model, _eager(ema)
    if type(candidate) is not type(network):
        for attr in ("module", "ema_model"):  # AveragedModel / timm ModelEmaV2; ema_pytorch.EMA
            inner = getattr(candidate, attr, None)
            if isinstance(inner, nn.Module):
                candidate = _eager(inner)
                break
    if not isinstance(network, nn.Module):
        return candidate  # nothing to compare with: the dry call (check_score) is the check
    if type(candidate) is not type(network):  # an EMA of the whole module: the network's path in it
        path = next((n for n, m in pl_module.named_modules() if m is network), None)
        inner = _submodule(candidate, path)
        if type(inner) is not type(network):
            raise MemwatchError(
                f"`ema_attr`={ema_attr!r} is a {type(ema).__name__} holding a {type(candidate).__name__}, but the "
                f"measured network is a {type(network).__name__}; name an EMA of that network"
            )
        candidate = inner
    if [p.shape for p in candidate.parameters()] != [p.shape for p in network.parameters()]:
        raise MemwatchError(
            f"`ema_attr`={ema_attr!r}: the parameter shapes of its {type(candidate).__name__} differ from those of "
            "the measured network; name an EMA of that network"
        )
    return candidate


def _submodule(module: nn.Module, path: str | None) -> nn.Module | None:
    """``module``'s submodule at ``path`` (compile wrappers skipped), or ``None``."""
    if not path:
        return None
    try:
        return _eager(module.get_submodule(_display(path)))
    except AttributeError:
        return None


def _ema_like(pl_module: nn.Module) -> list[str]:
    """Names of the module's attributes that look like an EMA, with their types."""
    items = {**vars(pl_module), **dict(pl_module.named_children())}
    return [
        f"{name} ({type(value).__name__})"
        for name, value in items.items()
        if not name.startswith("_") and (_is_ema_model(value) or _is_averaged_model(value) or "ema" in name.lower())
    ]


# ---------------------------------------------------------------------- probe shape
def sample_shape_of(score: DiffusionScore) -> tuple[int, ...] | None:
    """``(in_channels, H, W)`` of one sample from the network's diffusers config, or ``None``.

    ``config.sample_size`` is an int (square) or a pair ``(H, W)``.

    Example:
        >>> sample_shape_of(DiffusionScore(lambda x, t: x, NoiseSchedule.linear(10))) is None
        True
    """
    model = _eager(score.model)
    channels, size = config_value(model, "in_channels"), config_value(model, "sample_size")
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(channels, int) or not isinstance(size, Sequence) or len(size) != 2:
        return None
    shape = (channels, *size)
    return shape if all(isinstance(s, int) and s > 0 for s in shape) else None


# ---------------------------------------------------------------------- dry call at setup
def check_score(
    score: DiffusionScore,
    sample_shape: Sequence[int],
    *,
    device: torch.device | str,
    cond: Tensor | int | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """One call of the score on 2 probes ``[2, *sample_shape]`` at the schedule's middle timestep.

    Runs without gradients and with the network in eval mode (its modes restored afterwards), on
    seeded standard normal probes (a private generator: the global RNG is untouched).

    Args:
        score: the score to check (e.g. the one :func:`measured_score` yields).
        sample_shape: the shape of one probe.
        device: where the probes go (the training device).
        cond: a condition for the call (``None``: an unconditional call, with ``null_cond`` if set).
        dtype: dtype of the probes.

    Raises:
        MemwatchError: ``sample_shape`` is not a shape of positive ints; the network fails on the
            probes (the message names ``sample_shape``, its value, the network and its error, or the
            missing ``null_cond`` of a conditional network); its output is not shaped like its input
            (the message names the network). A score that is not finite is a ``RuntimeWarning``
            (a state of the weights, not of the configuration: the checks then report NaN).

    Example:
        >>> score = DiffusionScore(lambda x, t: 0 * x, NoiseSchedule.linear(10))
        >>> check_score(score, (2,), device="cpu")
    """
    shape = check_shape("sample_shape", sample_shape) or ()
    x = torch.randn((_PROBES, *shape), generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    t = score.schedule.sampling_timesteps(3)[1]
    calls: list[bool] = []  # True: the network returned; False: it raised

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(False)
        out = score.model(*args, **kwargs)
        calls[-1] = True
        return out

    probe = copy.copy(score)  # the same score (subclass and settings), the network call recorded
    probe.model = recorded
    with torch.no_grad(), _eval_mode(score.model):
        try:
            value = probe(x, t, cond)
        except Exception as err:  # noqa: BLE001 - the network's own error, re-raised with context
            if is_out_of_memory(err) or (not calls and isinstance(err, MemwatchError)):
                raise  # out of memory, or memwatch's own check of `cond` / `t` (its message is the context)
            # a second call is the unconditional one of a guided score
            unconditional = cond is None or len(calls) > 1
            returned = bool(calls) and calls[-1]
            raise MemwatchError(_call_failure(score, shape, unconditional, err, returned=returned)) from err
    if not torch.isfinite(value).all():  # a state of the weights, not of the configuration: checks report NaN
        warnings.warn(
            f"memwatch: the score of {_model_name(score)} is not finite at t={float(t):g} on probes of "
            f"`data.sample_shape`={shape}; checks will report NaN until it is (check the network's weights and the "
            "noise schedule)",
            RuntimeWarning,
            stacklevel=2,
        )


def _call_failure(
    score: DiffusionScore, shape: tuple[int, ...], unconditional: bool, err: Exception, returned: bool
) -> str:
    """The message of a failed dry call: the network's output, a missing condition, or the shape."""
    name, reason = _model_name(score), f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if returned:
        channels = (config_value(score.model, "in_channels"), config_value(score.model, "out_channels"))
        hint = ""
        if None not in channels and channels[0] != channels[1]:
            hint = (
                f" Its config has in_channels={channels[0]}, out_channels={channels[1]}: a network that also "
                f"predicts a variance needs a `score_fn` whose model keeps the first {channels[0]} output channels."
            )
        return (
            f"{name} does not return a tensor shaped like its input on probes of `data.sample_shape`={shape}: "
            f"{reason}.{hint}"
        )
    if unconditional and score.null_cond is None and score.cond_kwarg is not None:
        return (
            f"{name} is conditional (`{score.cond_kwarg}`) and fails without a condition ({reason}); unconditional "
            f"probes need its null condition (the null class label, or the empty-prompt embedding [L, E]): set "
            f"`{NULL_COND_ATTR}` on the LightningModule when memwatch finds the network, or pass `null_cond=` to the "
            "DiffusionScore that `score_fn` / `memwatch_score()` returns"
        )
    kind = _network_kind(score.model)
    if score.cond_kwarg is None and kind is not None and _takes_a_condition(score.model, kind):
        return (
            f"{name} takes `{DIFFUSERS_NETWORKS[kind]}` in every call, but this DiffusionScore passes no condition "
            f"(its `cond_kwarg` is None; {reason}). Let memwatch find the network and its scheduler on the module "
            "(no `score_fn` / `memwatch_score()`: it calls the network as its pipeline does and finds the null "
            f"condition), or pass `cond_kwarg={DIFFUSERS_NETWORKS[kind]!r}` and `null_cond=`"
        )
    params = next(iter(score.model.parameters()), None) if isinstance(score.model, nn.Module) else None
    where = "" if params is None else f"; its parameters are {params.dtype} on {params.device}"
    if shape == sample_shape_of(score):
        return (
            f"{name} fails on probes of `data.sample_shape`={shape}, the shape its config declares{where}: {reason}. "
            "The shape is not the cause: check how the score calls the network (`cond_kwarg`, `time_fn`, the "
            "output) against how `training_step` calls it"
        )
    return (
        f"{name} fails on probes of `data.sample_shape`={shape}{where}: {reason}. Pass the shape of one sample as the "
        "network takes it (`data.sample_shape`; the latent shape for a latent model)"
    )


def _takes_a_condition(network: Any, kind: str) -> bool:
    """Whether a diffusers network of class ``kind`` fails without its condition keyword."""
    if kind == "UNet2DModel":
        return any(config_value(network, key) is not None for key in ("num_class_embeds", "class_embed_type"))
    return True


def _model_name(score: DiffusionScore) -> str:
    return f"the model ({type(score.model).__name__})"


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model`` in eval mode (if it is a module), every submodule's mode restored afterwards."""
    modes = {m: m.training for m in model.modules()} if isinstance(model, nn.Module) else {}
    try:
        for m in modes:
            m.eval()
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def network_of(module: nn.Module) -> nn.Module:
    """The network inside data-parallel wrappers — ``DistributedDataParallel`` (what
    ``accelerate``'s ``prepare`` and torchrun scripts train) and ``DataParallel`` —, else ``module``.

    A check measures and keeps the network itself: the same parameters, its own ``state_dict`` keys
    (a wrapper's are ``module.…``, which a fresh network does not load), and its forward without the
    wrapper's collectives (a check's calls differ between ranks).
    """
    while isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module


# ---------------------------------------------------------------------- small helpers
def _eager(model: Any) -> Any:
    """The eager module inside ``torch.compile`` wrappers (``_orig_mod``), else ``model``."""
    while isinstance(model, nn.Module) and isinstance(model._modules.get("_orig_mod"), nn.Module):
        model = model._modules["_orig_mod"]
    return model


def _display(name: str) -> str:
    """An attribute path without compile wrappers, e.g. ``unet._orig_mod`` → ``unet``."""
    return name.replace("._orig_mod", "")
