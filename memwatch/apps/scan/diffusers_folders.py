"""Loading diffusers folders as ``save_pretrained`` and diffusers' training scripts write them:
the network (its class from ``config.json``) and its scheduler, as one module the monitor finds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from memwatch.apps.scan.results import _one_line, _Unreadable
from memwatch.errors import MemwatchError


def _is_diffusers_folder(path: Path) -> bool:
    """A ``save_pretrained`` model folder, or a folder holding one as ``unet/``."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "unet" / "config.json").is_file())


class _DiffusersModel(pl.LightningModule):
    """A loaded diffusers network and its scheduler as attributes: what the monitor's discovery finds."""

    def __init__(self, unet: torch.nn.Module, scheduler: Any) -> None:
        super().__init__()
        self.unet, self.scheduler = unet, scheduler


def _load_diffusers(path: Path, scheduler: str | Path | None, device: Any, root: Path) -> pl.LightningModule:
    """The network of a diffusers folder (``path`` or ``path/unet``) and its scheduler, as a module.

    Raises:
        _Unreadable: an unreadable ``config.json``, a network other than a ``UNet2DModel``, no
            scheduler (``scheduler``, or a ``scheduler/`` folder from ``path`` up to ``root``), or
            weights that do not load.
    """
    import diffusers

    model_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as err:
        raise _Unreadable(f"its config.json cannot be read ({_one_line(err)})") from err
    if name != "UNet2DModel":
        raise _Unreadable(
            f"{str(model_dir)!r} holds a {name!r}; scan loads UNet2DModel folders (a conditional network needs its "
            "null condition: scan a Lightning checkpoint of a module with `memwatch_score()`)"
        )
    found = Path(scheduler) if scheduler is not None else _find_scheduler(path, root)
    if found is None:
        raise _Unreadable(
            f"no scheduler/ folder in it or above it up to {str(root)!r}: pass `scheduler`, a folder with the "
            "scheduler_config.json the model was trained with"
        )
    try:
        unet = diffusers.UNet2DModel.from_pretrained(model_dir)
        noise_scheduler = _scheduler_class(found).from_pretrained(found)
    except Exception as err:  # missing or damaged weights, a damaged scheduler config
        raise _Unreadable(f"it does not load ({_one_line(err)})") from err
    return _DiffusersModel(unet, noise_scheduler).to(device)


def _find_scheduler(path: Path, root: Path) -> Path | None:
    """``scheduler/`` in the checkpoint folder ``path`` (beside its ``unet/``), else in each folder
    above it up to ``root`` (``output_dir/scheduler/`` above ``output_dir/checkpoint-500/``)."""
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
