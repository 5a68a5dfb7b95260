"""Loading diffusers folders as ``save_pretrained`` and diffusers' training scripts write them:
the network (its class from ``config.json``) and its scheduler, as one module the monitor finds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from memwatch.apps.scan.results import _one_line, _Unreadable
from memwatch.discovery import DIFFUSERS_NETWORKS
from memwatch.errors import MemwatchError

#: the sub-folders of a checkpoint folder that hold its network, as diffusers' training scripts save
#: them: ``checkpoint-500/unet/`` (UNet scripts), ``checkpoint-500/transformer/`` (DiT, PixArt, SD3, Flux)
NETWORK_FOLDERS = ("unet", "transformer")
#: the networks scan loads from a folder (``config.json``'s ``_class_name``) → the attribute their
#: pipeline keeps them under; the other networks memwatch knows take a prompt embedding in every call
_LOADED = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}


def _holds_network(path: Path) -> bool:
    """A folder holding a model folder as ``unet/`` or ``transformer/`` (a checkpoint folder)."""
    return any((path / part / "config.json").is_file() for part in NETWORK_FOLDERS)


def _is_diffusers_folder(path: Path) -> bool:
    """A ``save_pretrained`` model folder, or a folder holding one as ``unet/`` or ``transformer/``."""
    return path.is_dir() and ((path / "config.json").is_file() or _holds_network(path))


def _network_folder(path: Path) -> Path:
    """The model folder of a diffusers folder: its ``unet/`` or ``transformer/``, else itself."""
    return next((path / part for part in NETWORK_FOLDERS if (path / part / "config.json").is_file()), path)


class _DiffusersModel(pl.LightningModule):
    """A loaded diffusers network and its scheduler as attributes: what the monitor's discovery finds.

    Args:
        network: the network, kept as ``attribute`` (``unet`` / ``transformer``, as its pipeline does).
        scheduler: the diffusers scheduler it was trained with.
        attribute: the network's attribute name.
    """

    def __init__(self, network: torch.nn.Module, scheduler: Any, attribute: str) -> None:
        super().__init__()
        self.add_module(attribute, network)
        self.scheduler = scheduler


def _load_diffusers(path: Path, scheduler: str | Path | None, device: Any, root: Path) -> pl.LightningModule:
    """The network of a diffusers folder (``path``, ``path/unet`` or ``path/transformer``) and its
    scheduler, as a module.

    Raises:
        _Unreadable: an unreadable ``config.json``, a network other than a ``UNet2DModel`` or a
            ``DiTTransformer2DModel`` (a text-conditional one needs the empty prompt's embedding,
            which a folder does not hold), no scheduler (``scheduler``, or a ``scheduler/`` folder
            from ``path`` up to ``root``), or weights that do not load.
    """
    import diffusers

    model_dir = _network_folder(path)
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise _Unreadable(f"its config.json cannot be read ({_one_line(err)})") from err
    if name not in _LOADED:
        raise _Unreadable(f"{str(model_dir)!r} holds a {name!r}; {_not_loaded(name)}")
    found = Path(scheduler) if scheduler is not None else _find_scheduler(path, root)
    if found is None:
        raise _Unreadable(
            f"no scheduler/ folder in it or above it up to {str(root)!r}: pass `scheduler`, a folder with the "
            "scheduler_config.json the model was trained with"
        )
    try:
        network = getattr(diffusers, name).from_pretrained(model_dir)
        noise_scheduler = _scheduler_class(found).from_pretrained(found)
    except Exception as err:  # missing or damaged weights, a damaged scheduler config
        raise _Unreadable(f"it does not load ({_one_line(err)})") from err
    return _DiffusersModel(network, noise_scheduler, _LOADED[name]).to(device)


def _not_loaded(name: Any) -> str:
    """Why scan does not load a network of class ``name`` from a folder, and what to scan instead."""
    loaded = " and ".join(_LOADED)
    if DIFFUSERS_NETWORKS.get(name) == "encoder_hidden_states":
        return (
            f"scan loads {loaded} folders: a text-conditional network's unconditional probes need the empty "
            "prompt's embedding, which only its text encoder makes and a model folder does not hold (scan a "
            "Lightning checkpoint of a module that keeps it as `memwatch_null_cond`, or has `memwatch_score()`)"
        )
    return f"scan loads {loaded} folders, diffusion networks memwatch calls without a text condition"


def _find_scheduler(path: Path, root: Path) -> Path | None:
    """``scheduler/`` in the checkpoint folder ``path`` (beside its ``unet/`` or ``transformer/``), else
    in each folder above it up to ``root`` (``output_dir/scheduler/`` above ``output_dir/checkpoint-500/``)."""
    folder = path
    while True:
        if (folder / "scheduler" / "scheduler_config.json").is_file():
            return folder / "scheduler"
        if folder == root or root not in folder.parents:
            return None
        folder = folder.parent


def _scheduler_class(folder: Path) -> type:
    """The diffusers scheduler class a scheduler folder's config names."""
    import diffusers

    config = folder / "scheduler_config.json"
    if not config.is_file():
        raise MemwatchError(f"`scheduler` must be a folder with a scheduler_config.json, got {str(folder)!r}")
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except ValueError as err:
        raise MemwatchError(f"`scheduler`: {str(config)!r} is not JSON ({_one_line(err)})") from err
    cls = getattr(diffusers, str(name), None)
    if cls is None:
        raise MemwatchError(f"`scheduler`: {str(folder)!r} names an unknown diffusers scheduler class {name!r}")
    return cls
