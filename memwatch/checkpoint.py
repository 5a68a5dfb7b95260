"""Writing the clean checkpoint safely: atomically, cheaply, per run, and never crashing training.

The clean checkpoint is the last checkpoint taken before memorization onset. It is overwritten at
every clean check, so a save must never destroy the previous one, and a failed save (a full disk,
a bad directory) must cost a warning, not the run.

* **Atomic.** The checkpoint is streamed with ``torch.save`` into a hidden temporary file *in the
  target's own directory* (``.memwatch-clean.ckpt.<random>.tmp``), flushed, ``fsync``-ed and moved
  onto the target with ``os.replace``; then the directory is ``fsync``-ed. A kill at any moment
  leaves either the previous or the new checkpoint, never a truncated one. A writer holds an
  advisory lock (``flock``) on its temporary file, so the temporary files a killed process left
  behind (no lock) are told apart from a live writer's and removed at the next save.
* **Cheap by default.** ``mode="weights"`` is Lightning's ``weights_only=True`` checkpoint: the
  LightningModule's ``state_dict`` (EMA copies held as submodules or buffers included), the
  loops, the hyper-parameters; it loads with ``LightningModule.load_from_checkpoint``.
  ``mode="full"`` adds the optimizer, LR-scheduler, precision and callback states (resumable with
  ``Trainer.fit(ckpt_path=...)``): for Adam about three times the bytes. ``mode="adapter"`` keeps
  only what a parameter-efficient fine-tune trains: the peft adapter weights (LoRA) of every
  adapted network of the module (:func:`adapter_networks`), loaded back onto the base model with
  :func:`load_adapter_checkpoint`.
* **Collective.** :func:`save_clean_checkpoint` goes through ``Trainer.save_checkpoint`` (every
  rank gathers its state, rank 0 writes, then all meet at Lightning's barrier) with the strategy's
  ``checkpoint_io`` replaced for the call by a writer that never raises, so a failed write on rank
  0 still reaches the barrier; rank 0's outcome is then broadcast, one decision for all ranks.
* **Per run, created late.** :func:`default_dirpath` is a ``memwatch-clean`` folder inside the
  ``checkpoints`` folder that Lightning's ``ModelCheckpoint`` uses (the run's versioned log
  directory, or a stamped folder without a logger), so two runs never share a clean checkpoint.
  The directory is validated at ``setup`` but created only by the first save.

Example:
    >>> import memwatch.checkpoint as mc
    >>> outcome = mc.save_clean_checkpoint(trainer, dirpath)           # doctest: +SKIP
    >>> if not outcome.ok:                                              # doctest: +SKIP
    ...     warnings.warn(outcome.failure_message(previous_step=clean_step))
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from torch import nn

from memwatch.errors import MemwatchError

try:  # advisory locks tell a live writer's temporary file from a killed one's (POSIX only)
    import fcntl
except ImportError:  # pragma: no cover - Windows: every matching temporary file counts as stale
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CLEAN_CHECKPOINT_NAME",
    "SAVE_MODES",
    "SaveOutcome",
    "adapter_networks",
    "adapter_state",
    "check_adapters",
    "check_dirpath",
    "check_save_mode",
    "default_dirpath",
    "load_adapter_checkpoint",
    "prepare_dirpath",
    "remove_stale_temp_files",
    "save_clean_checkpoint",
    "write_atomic",
]

CLEAN_CHECKPOINT_NAME = "memwatch-clean.ckpt"
SAVE_MODES = ("weights", "full", "adapter")
_PathLike = str | os.PathLike
_DEFAULT_SUBDIR = "memwatch-clean"  # the default folder's last part below Lightning's ``checkpoints``


@dataclass(frozen=True)
class SaveOutcome:
    """What one clean-checkpoint save did (the same object on every rank).

    Attributes:
        ok: the checkpoint was written and moved into place.
        path: the checkpoint file when ``ok``, else ``None`` (the previous one, if any, is untouched).
        dirpath: the directory it was written to (or should have been).
        mode: one of :data:`SAVE_MODES`.
        step: ``trainer.global_step`` at the save.
        error: ``"<ExceptionType>: <message>"`` of the failure, ``None`` when ``ok``.
        seconds: wall-clock time of the save on rank 0 (gathering the state included), in seconds.
        nbytes: size of the written file in bytes (0 when not ``ok``).
    """

    ok: bool
    path: Path | None
    dirpath: Path
    mode: str
    step: int
    error: str | None
    seconds: float
    nbytes: int

    def failure_message(self, previous_step: int | None) -> str:
        """The warning for a failed save: names ``dirpath``, the cause and what is kept.

        Args:
            previous_step: global step of the last clean checkpoint that was written, ``None`` if none.

        Example:
            >>> error = "OSError: [Errno 28] No space left on device"
            >>> outcome = SaveOutcome(False, None, Path("/x"), "weights", 8, error, 0.1, 0)
            >>> print(outcome.failure_message(previous_step=4))  # doctest: +NORMALIZE_WHITESPACE
            memwatch: could not write the clean checkpoint to dirpath='/x' (OSError: [Errno 28] No space
            left on device); training continues, the previous clean checkpoint (step 4) is kept
        """
        kept = (
            "there is no earlier clean checkpoint"
            if previous_step is None
            else f"the previous clean checkpoint (step {previous_step}) is kept"
        )
        return (
            f"memwatch: could not write the clean checkpoint to dirpath={str(self.dirpath)!r} ({self.error}); "
            f"training continues, {kept}"
        )


# ------------------------------------------------------------------------ configuration
def check_save_mode(mode: str, name: str = "mode") -> str:
    """Return ``mode`` if it is one of :data:`SAVE_MODES`.

    Args:
        mode: the value to check.
        name: the argument's name in the message (e.g. a callback's ``clean_checkpoint_mode``).

    Raises:
        MemwatchError: any other value (the message names the argument, the allowed values and the value).
    """
    if mode not in SAVE_MODES:
        raise MemwatchError(f"`{name}` must be one of {SAVE_MODES}, got {mode!r}")
    return mode


def check_dirpath(dirpath: _PathLike) -> Path:
    """Validate a clean-checkpoint directory without creating anything: a save there can succeed.

    An existing directory is proven writable by creating and deleting a small hidden file in it
    (permission bits alone say nothing for root or on network filesystems). A directory that does
    not exist yet is left uncreated (:func:`save_clean_checkpoint` creates it at the first save):
    its nearest existing ancestor must be a directory that the process may write into and enter
    (``os.access(W_OK | X_OK)``, which also sees a read-only filesystem).

    Args:
        dirpath: a local directory (remote URLs such as ``s3://`` are not supported: the atomic
            rename needs a local filesystem).

    Returns:
        The absolute path of the directory (which may not exist yet).

    Raises:
        MemwatchError: ``dirpath`` is not a path, is a URL, is a file, lies below a file, or is not
            writable (the message names ``dirpath``, its value and the cause).

    Example:
        >>> check_dirpath(tmp_path / "new" / "dir").exists()              # doctest: +SKIP
        False
    """
    if not isinstance(dirpath, str | os.PathLike):
        raise MemwatchError(f"`dirpath` must be a local directory path (str or os.PathLike), got {dirpath!r}")
    text = os.fspath(dirpath)
    if "://" in text:
        raise MemwatchError(f"`dirpath` must be a local directory (the atomic rename needs one), got {text!r}")
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.exists() and not path.is_dir():
        raise MemwatchError(f"`dirpath`={text!r} must be a directory, but it is a file")
    if path.is_dir():
        try:
            probe = path / f".memwatch-write-test.{secrets.token_hex(8)}"
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            probe.unlink()
        except OSError as err:
            raise MemwatchError(f"`dirpath`={text!r} is not a writable directory ({_describe(err)})") from err
        return path
    ancestor = next(parent for parent in path.parents if parent.exists())
    if not ancestor.is_dir():
        raise MemwatchError(f"`dirpath`={text!r} is not a writable directory (its parent {str(ancestor)!r} is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise MemwatchError(
            f"`dirpath`={text!r} is not a writable directory (it does not exist and its nearest existing "
            f"parent {str(ancestor)!r} is not writable)"
        )
    return path


def default_dirpath(trainer: pl.Trainer) -> Path:
    """The clean checkpoint's directory for this run: beside Lightning's checkpoints, never shared.

    Mirrors how Lightning's ``ModelCheckpoint`` resolves its ``checkpoints`` folder, plus a
    ``memwatch-clean`` sub-folder (so ``memwatch scan`` over the ``checkpoints`` folder, which reads
    its ``*.ckpt`` files, does not take the clean checkpoint for one more training checkpoint):

    * with a versioned first logger, ``<save_dir>/<name>/<version>/checkpoints/memwatch-clean``
      (TensorBoard / CSV: ``.../version_N/checkpoints/memwatch-clean``; W&B:
      ``<save_dir>/<project>/<run id>/checkpoints/memwatch-clean``), ``save_dir`` falling back to
      ``trainer.default_root_dir``;
    * without a logger, or when the first logger has no version,
      ``<default_root_dir>/checkpoints/memwatch-clean/<run stamp>``, with a stamp of the UTC time
      and 32 random bits (Lightning's ``checkpoints`` folder is shared by such runs; the stamp is not).

    No folder is named like the package (a ``./memwatch`` folder in the working directory would
    shadow an editable install). Collective: every rank must call it (rank 0's answer is
    broadcast). Call it once per run (at ``setup``): the run stamp differs from call to call.

    Returns:
        The directory (not created; see :func:`check_dirpath`).
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    version = None if logger is None else logger.version
    if logger is None or version is None or version == "":
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(4)}"
        path = Path(trainer.default_root_dir, "checkpoints", _DEFAULT_SUBDIR, stamp)
    else:
        name = logger.name
        version = version if isinstance(version, str) else f"version_{version}"
        parts = [str(name)] if name else []
        path = Path(logger.save_dir or trainer.default_root_dir, *parts, version, "checkpoints", _DEFAULT_SUBDIR)
    return Path(trainer.strategy.broadcast(str(path), src=0))


def prepare_dirpath(trainer: pl.Trainer, dirpath: _PathLike | None) -> Path:
    """Resolve, validate and tidy the clean-checkpoint directory at ``setup``, on all ranks at once.

    ``dirpath`` (or :func:`default_dirpath` when ``None``) is checked by :func:`check_dirpath` on
    rank 0, which alone writes; nothing is created (the first save creates the folder), and when
    the folder exists, stale temporary files of killed saves are removed from it. The result
    or the error is broadcast, so every rank returns the same path or raises the same error.
    Collective: every rank must call it.

    Raises:
        MemwatchError: ``dirpath`` is unusable (see :func:`check_dirpath`), on every rank.
    """
    target = default_dirpath(trainer) if dirpath is None else dirpath
    answer: tuple[str | None, str | None] = (None, None)
    if trainer.is_global_zero:
        try:
            path = check_dirpath(target)
            remove_stale_temp_files(path)
            answer = (str(path), None)
        except MemwatchError as err:
            answer = (None, str(err))
    path_text, error = trainer.strategy.broadcast(answer, src=0)
    if error is not None:
        raise MemwatchError(error)
    return Path(path_text)


# ------------------------------------------------------------------------ adapters (peft)
def adapter_networks(module: nn.Module) -> dict[str, nn.Module]:
    """The peft-adapted networks in ``module``'s tree, by their dotted path in it (``""``: itself).

    A network is adapted when it carries peft's ``peft_config`` (a ``{adapter name: config}``
    dict): a ``peft.PeftModel`` (``get_peft_model``), a diffusers model after ``add_adapter`` or
    ``load_lora_adapter``, a model after ``peft.inject_adapter_in_model``. Only the outermost such
    module of a subtree counts (a ``PeftModel``'s inner ``LoraModel`` is part of it).

    Example:
        >>> adapter_networks(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    found: dict[str, nn.Module] = {}
    for path, sub in module.named_modules():
        inside = any(not p or path.startswith(p + ".") for p in found)
        if not inside and isinstance(getattr(sub, "peft_config", None), dict):
            found[path] = sub
    return found


def check_adapters(module: nn.Module, name: str = "checkpoint.mode") -> dict[str, nn.Module]:
    """The module's adapted networks (:func:`adapter_networks`), at least one.

    Raises:
        MemwatchError: none (the message names ``name``, its value ``"adapter"`` and the other modes).
    """
    found = adapter_networks(module)
    if not found:
        raise MemwatchError(
            f'`{name}`="adapter" saves the peft adapter weights (LoRA) of the module, but {type(module).__name__} '
            "has no peft-adapted network (none carries `peft_config`: adapt it with peft's `get_peft_model`, "
            'diffusers\' `add_adapter` or `inject_adapter_in_model`); use "weights" or "full" to save the whole module'
        )
    return found


def adapter_state(module: nn.Module) -> dict[str, Any]:
    """What ``mode="adapter"`` writes of ``module``: per adapted network and adapter name, peft's
    state dict of the adapter (``get_peft_model_state_dict``, on the CPU) and its config as JSON.

    Raises:
        MemwatchError: the module has no peft-adapted network (:func:`check_adapters`).
    """
    from peft import get_peft_model_state_dict

    weights: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    configs: dict[str, dict[str, str]] = {}
    for path, network in check_adapters(module).items():
        weights[path] = {
            adapter: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(network, adapter_name=adapter).items()}
            for adapter in network.peft_config
        }
        configs[path] = {a: json.dumps(c.to_dict(), default=_jsonable) for a, c in network.peft_config.items()}
    return {"memwatch_adapters": weights, "peft_configs": configs}


def _jsonable(value: Any) -> Any:
    """A peft config value JSON cannot write: sets as sorted lists, the rest (enums) as text."""
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def load_adapter_checkpoint(module: nn.Module, path: _PathLike) -> list[str]:
    """Load a ``mode="adapter"`` clean checkpoint onto ``module``, adapted as it was in training.

    Build the base model and apply the same adapter config first (e.g. ``get_peft_model(unet,
    lora_config)`` in the module's ``__init__``); the file then sets the adapter weights through
    ``peft.set_peft_model_state_dict``, the base weights staying as they are.

    Args:
        module: the module (e.g. a freshly built LightningModule) holding the adapted networks at
            the paths they had in training.
        path: the checkpoint file.

    Returns:
        ``"<network path>:<adapter name>"`` of each adapter loaded.

    Raises:
        MemwatchError: the file is not an adapter checkpoint; a network path is not adapted in
            ``module`` or lacks the adapter name; the saved weights do not fit its adapter (the
            message names the keys).
    """
    from peft import set_peft_model_state_dict

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "memwatch_adapters" not in checkpoint:
        raise MemwatchError(f'{os.fspath(path)!r} is not a checkpoint of `checkpoint.mode`="adapter"')
    networks, loaded = adapter_networks(module), []
    for where, adapters in checkpoint["memwatch_adapters"].items():
        network = networks.get(where)
        for adapter, state in adapters.items():
            if network is None or adapter not in network.peft_config:
                raise MemwatchError(
                    f"the adapter checkpoint holds adapter {adapter!r} of the network at {where or '<the module>'!r}, "
                    f"but {type(module).__name__} has no such adapted network (adapted: "
                    f"{ {p or '<the module>': list(n.peft_config) for p, n in networks.items()} }); apply the same "
                    "adapter config to the base model first"
                )
            result = set_peft_model_state_dict(network, state, adapter_name=adapter)
            unexpected = list(getattr(result, "unexpected_keys", []))
            if unexpected:
                raise MemwatchError(
                    f"adapter {adapter!r} of {where or '<the module>'!r}: {len(unexpected)} saved weights fit no "
                    f"layer of the adapted network, e.g. {unexpected[:3]}; apply the adapter config used in training"
                )
            loaded.append(f"{where}:{adapter}")
    return loaded


# ------------------------------------------------------------------------ the atomic file write
def remove_stale_temp_files(dirpath: _PathLike, filename: str = CLEAN_CHECKPOINT_NAME) -> list[Path]:
    """Delete the temporary files that killed saves of ``filename`` left in ``dirpath``.

    A temporary file is ``.<filename>.<random>.tmp``. One that a live writer holds (its ``flock``)
    is left alone, so two processes writing into one directory do not break each other's save. On
    a filesystem without advisory locks every matching file counts as stale.

    Returns:
        The removed files (empty when ``dirpath`` does not exist).
    """
    directory = Path(dirpath)
    if not directory.is_dir():
        return []
    removed = []
    for candidate in sorted(directory.glob(f".{glob.escape(filename)}.*.tmp")):
        try:
            fd = os.open(candidate, os.O_RDWR)
        except OSError:  # vanished meanwhile, or not ours to delete
            continue
        try:
            if _try_lock(fd):
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _try_lock(fd: int, blocking: bool = False) -> bool:
    """Take an exclusive ``flock`` on ``fd``; ``False`` only when another open file holds one."""
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # the filesystem has no locks (ENOLCK, EOPNOTSUPP): proceed unlocked
        return True
    return True


def write_atomic(checkpoint: dict[str, Any], target: Path) -> int:
    """Stream ``checkpoint`` with ``torch.save`` into a locked temporary sibling of ``target``,
    fsync, rename onto ``target`` (a kill leaves the old file or the new one, never a torn one).

    Returns:
        The file's size in bytes.

    Raises:
        OSError: the directory cannot be created or written (the temporary file is removed).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent, target.name)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        _try_lock(fd, blocking=True)  # held until close: marks the file as in progress
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint, handle)
            handle.flush()
            os.fsync(handle.fileno())
            nbytes = os.fstat(handle.fileno()).st_size
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(target.parent)
    return nbytes


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable. Best effort: some filesystems (and Windows) cannot open or fsync a
    # directory; the rename itself has happened by now, so the new checkpoint is in place either way.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _AtomicWriter(CheckpointIO):
    """A ``CheckpointIO`` for one save: writes atomically and records, instead of raising, a failure.

    Not raising matters under DDP: ``Trainer.save_checkpoint`` writes on rank 0 and then enters a
    barrier; an exception on rank 0 would skip the barrier and leave the other ranks waiting.
    """

    def __init__(self) -> None:
        self.called = False
        self.nbytes = 0
        self.error: Exception | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PathLike, storage_options: Any | None = None) -> None:
        self.called = True
        try:
            if storage_options is not None:
                raise TypeError(f"memwatch's clean checkpoint takes no storage_options, got {storage_options!r}")
            self.nbytes = write_atomic(checkpoint, Path(path))
        except Exception as err:  # reported through SaveOutcome, after the barrier
            self.error = err

    def load_checkpoint(
        self, path: _PathLike, map_location: Any | None = None, weights_only: bool | None = None
    ) -> Any:
        raise NotImplementedError("memwatch's clean-checkpoint writer only writes")

    def remove_checkpoint(self, path: _PathLike) -> None:
        raise NotImplementedError("memwatch's clean-checkpoint writer only writes")


# ------------------------------------------------------------------------ the save
def save_clean_checkpoint(
    trainer: pl.Trainer,
    dirpath: _PathLike,
    *,
    mode: str = "weights",
    filename: str = CLEAN_CHECKPOINT_NAME,
    raise_errors: bool = False,
) -> SaveOutcome:
    """Write ``<dirpath>/<filename>`` atomically through ``Trainer.save_checkpoint``; never crash by default.

    Collective: every rank must call it, in the same order relative to other collectives. Rank 0
    writes; its :class:`SaveOutcome` is broadcast and returned on every rank. The file is written
    with ``torch.save`` whatever ``checkpoint_io`` the strategy has (an asynchronous or remote one
    would defeat the atomic rename). Strategies that write checkpoints themselves rather than
    through ``checkpoint_io`` (DeepSpeed, sharded FSDP) are reported as a failed save.

    Args:
        trainer: the running Trainer (a model must be attached).
        dirpath: the directory, normally from :func:`prepare_dirpath` (created if missing).
        mode: ``"weights"`` (default: model ``state_dict``, loops and hyper-parameters, loadable
            with ``LightningModule.load_from_checkpoint``), ``"full"`` (also optimizer,
            LR-scheduler, precision and callback states: resumable) or ``"adapter"`` (the peft
            adapter weights only, written by rank 0 from its module: DDP replicas are equal;
            loadable with :func:`load_adapter_checkpoint`).
        filename: the checkpoint's file name.
        raise_errors: re-raise a failure instead of returning it (rank 0 re-raises the original
            exception, the other ranks a ``RuntimeError`` carrying its text).

    Returns:
        The outcome; on failure ``ok`` is ``False`` and the previous file at the target is untouched.

    Raises:
        MemwatchError: ``mode`` is not one of :data:`SAVE_MODES` (always, whatever ``raise_errors``).
    """
    check_save_mode(mode)
    start = time.perf_counter()
    target = Path(dirpath) / filename
    writer = _AtomicWriter()
    strategy = trainer.strategy
    previous_io = strategy.checkpoint_io
    failure: Exception | None = None
    try:
        strategy.checkpoint_io = writer
        if mode != "adapter":
            trainer.save_checkpoint(target, weights_only=mode == "weights")
        elif trainer.is_global_zero:
            state = adapter_state(trainer.lightning_module)
            writer.save_checkpoint(dict(state, global_step=trainer.global_step, epoch=trainer.current_epoch), target)
    except Exception as err:  # e.g. a hook failing while the state is gathered
        failure = err
    finally:
        strategy.checkpoint_io = previous_io
    if failure is not None and not trainer.is_global_zero:  # rank 0's outcome decides; say so here
        warnings.warn(
            f"memwatch: rank {trainer.global_rank} failed while saving the clean checkpoint ({_describe(failure)})",
            RuntimeWarning,
            stacklevel=2,
        )
    if trainer.is_global_zero:
        failure = failure or writer.error
        if failure is None and not writer.called:
            failure = RuntimeError(
                f"{type(strategy).__name__} wrote the checkpoint itself, not through `checkpoint_io`, so "
                "memwatch cannot write it atomically"
            )
    local = SaveOutcome(
        ok=failure is None,
        path=target if failure is None else None,
        dirpath=target.parent,
        mode=mode,
        step=trainer.global_step,
        error=None if failure is None else _describe(failure),
        seconds=time.perf_counter() - start,
        nbytes=writer.nbytes if failure is None else 0,
    )
    outcome = strategy.broadcast(local, src=0)
    if raise_errors and not outcome.ok:
        if trainer.is_global_zero and failure is not None:
            raise failure
        raise RuntimeError(
            f"memwatch: rank 0 could not write the clean checkpoint to dirpath={str(outcome.dirpath)!r} "
            f"({outcome.error})"
        )
    return outcome


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
