"""Finding the checkpoints a scan is given and loading them: Lightning ``*.ckpt`` files (their
global step, their LightningModule class) and, through :mod:`.diffusers_folders`, diffusers folders."""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from memwatch.apps.scan.diffusers_folders import _holds_network, _is_diffusers_folder, _load_diffusers
from memwatch.apps.scan.results import _one_line, _Unreadable
from memwatch.errors import MemwatchError


def _load(
    path: Path, *, roots: dict[Path, Path], module_class: type[pl.LightningModule] | None, scheduler: Any, device: Any
) -> pl.LightningModule:
    """The module of a checkpoint file or diffusers folder (``roots``: where each was found)."""
    if path.is_dir():
        return _load_diffusers(path, scheduler, device, roots[path])
    return _load_module(path, module_class, device)


def _checkpoint_files(checkpoints: Sequence[str | Path]) -> dict[Path, Path]:
    """Every checkpoint named, or found in a named folder, → the folder it was found in (a named
    checkpoint: the folder holding it); a scheduler is looked for up to that folder."""
    if isinstance(checkpoints, (str, Path)):
        checkpoints = [checkpoints]
    found: dict[Path, Path] = {}
    for item in checkpoints:
        path = Path(item).resolve()
        if not path.exists():
            raise MemwatchError(f"`checkpoints`: {str(item)!r} is neither a checkpoint file nor a folder")
        inside = _inside(path) if path.is_dir() else []
        for file in inside:
            found.setdefault(file, path)
        if not inside and (path.is_file() or _is_diffusers_folder(path)):
            found.setdefault(path, path.parent)
    if not found:
        raise MemwatchError(f"`checkpoints` must name at least one checkpoint, got {list(map(str, checkpoints))}")
    return found


def _inside(folder: Path) -> list[Path]:
    """The checkpoints in a folder: its ``*.ckpt`` files and diffusers checkpoint folders. In a
    diffusers output folder (``unet/``, ``scheduler/``, ``checkpoint-N/``) or checkpoint folder, the
    model folders (``unet/``, ``unet_ema/``, ``transformer/``, ``vae/``) are its parts: only folders
    holding a ``unet/`` or a ``transformer/`` count."""
    parts = _is_diffusers_folder(folder)
    folders = [
        p for p in sorted(folder.iterdir()) if _holds_network(p) or (not parts and (p / "config.json").is_file())
    ]
    return sorted(folder.glob("*.ckpt")) + folders


def _global_step(path: Path) -> int:
    """A checkpoint's global step (a diffusers folder: the last number in its name).

    Raises:
        _Unreadable: the file is empty, not a torch file, truncated, or not a Lightning checkpoint;
            the folder names no step.
    """
    if path.is_dir():  # a diffusers folder: checkpoint-500, step_500, ...
        numbers = re.findall(r"\d+", path.name)
        if not numbers:
            raise _Unreadable("the folder's name holds no step: name it after its global step (e.g. checkpoint-500)")
        return int(numbers[-1])
    step = _read_checkpoint(path).get("global_step")
    if not isinstance(step, int):
        raise _Unreadable("it holds no `global_step`: not a Lightning checkpoint")
    return step


def _read_checkpoint(path: Path) -> dict[str, Any]:
    if path.stat().st_size == 0:
        raise _Unreadable("the file is empty")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling a damaged or foreign file can raise anything: the file is unreadable
        raise _Unreadable(f"not a readable checkpoint (truncated or another format? {_one_line(err)})") from err
    if not isinstance(checkpoint, dict):
        raise _Unreadable(f"it holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    return checkpoint


def _load_module(path: Path, module_class: type[pl.LightningModule] | None, device: Any) -> pl.LightningModule:
    """The LightningModule of a checkpoint, as ``module_class`` (default: the class it names)."""
    cls = module_class
    if cls is None:
        cls = (_read_checkpoint(path).get("hyper_parameters") or {}).get("_class_path")
        if cls is None:
            raise MemwatchError(
                f"checkpoint {str(path)!r} does not name its LightningModule class (no "
                "hyper_parameters['_class_path'], which LightningCLI / `memwatch fit` store): pass `module_class`, "
                "its import path 'package.module.Class'"
            )
        cls = _resolve_class(cls)
    try:
        return cls.load_from_checkpoint(path, map_location=device).to(device)
    except Exception as err:  # arguments or weights of another class: the message says which class was tried
        raise MemwatchError(
            f"checkpoint {str(path)!r} does not load as {_qualified(cls)} ({_one_line(err)}): pass the "
            "LightningModule class it was saved from as `module_class`"
        ) from err


def _resolve_class(module_class: type | str | None) -> type[pl.LightningModule] | None:
    """``module_class`` as a LightningModule subclass (an import path imported)."""
    cls = _import_class(module_class) if isinstance(module_class, str) else module_class
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise MemwatchError(f"`module_class` must be a LightningModule subclass or its import path, got {cls!r}")
    return cls


def _import_class(class_path: str) -> type:
    module_name, _, name = class_path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise MemwatchError(
            f"`module_class`: cannot import {class_path!r} (expected 'package.module.Class'): {err}"
        ) from err


def _class_name(module_class: type | str | None) -> str | None:
    return module_class if module_class is None or isinstance(module_class, str) else _qualified(module_class)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
