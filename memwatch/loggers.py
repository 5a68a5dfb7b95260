"""Send memwatch scalars and media to whatever Lightning loggers the Trainer has.

The loggers compute nothing: every method takes finished numbers, tensors or figures and only
converts them to what each backend accepts.

================  ========  ==============  =============  ===================  ==========  =====
logger            scalars   histogram       figure         images (log_media)   table       alert
================  ========  ==============  =============  ===================  ==========  =====
W&B               yes       wandb.Histogram wandb.Image    wandb.Image list     wandb.Table yes
TensorBoard       yes       add_histogram   add_figure     add_images           CSV file    —
has a directory   yes       —               PNG file       PNG files            CSV file    —
anything else     yes       —               —              —                    —           —
================  ========  ==============  =============  ===================  ==========  =====

Files go to ``<log_dir or save_dir>/<prefix>/<name>_step<step>.{png,csv}`` (a CSVLogger's
``log_dir`` is ``<save_dir>/<name>/version_<n>``). Scalars go through every logger's own
``log_metrics`` on every rank (Lightning's loggers guard rank zero themselves); media, tables and
alerts are sent from global rank zero only. W&B media go through ``WandbLogger.log_metrics``,
like Lightning's own ``log_image``/``log_table``, so every memwatch row carries
``trainer/global_step`` and all memwatch charts share the trainer step as x-axis.

Privacy: :meth:`MonitorLogger.log_images` shows probes or training samples, so it does nothing
unless ``log_media=True``. Figures (spectra, curves) and tables hold no training data.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> ml = MonitorLogger.from_trainer(trainer)
    >>> ml.log_scalars({"lid_mean": 3.0}, step=0)   # no logger: a no-op
    >>> ml.loggers
    []
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from memwatch.errors import MemwatchError

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import numpy as np
    from matplotlib.figure import Figure

__all__ = ["MonitorLogger", "WANDB_MODES", "wandb_logger", "finish_wandb"]

WANDB_MODES = ("offline", "online", "disabled")

_STEP_KEY = "trainer/global_step"  # the x-axis WandbLogger.log_metrics adds to every row
_ALERT_LEVELS = ("INFO", "WARN", "ERROR")
_UNSAFE = re.compile(r"[^\w.-]+")  # file names: "/" and other odd characters become "_"


class MonitorLogger:
    """Fans memwatch scalars and media out to a list of Lightning loggers.

    Args:
        loggers: the loggers to write to (usually ``trainer.loggers``); empty makes every method
            a no-op.
        log_media: allow :meth:`log_images` (pictures of probes / training samples).
        prefix: namespace of every key, ``f"{prefix}/{name}"``.
        is_global_zero: whether this process is global rank zero; media, tables and alerts are
            only sent from there.

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> import tempfile
        >>> ml = MonitorLogger([CSVLogger(tempfile.mkdtemp())])
        >>> ml.log_scalars({"lid_mean": 3.0, "onset": 0}, step=10)   # memwatch/lid_mean, …
    """

    def __init__(
        self,
        loggers: Sequence[Logger],
        *,
        log_media: bool = False,
        prefix: str = "memwatch",
        is_global_zero: bool = True,
    ) -> None:
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise MemwatchError(f"`prefix` must be a non-empty string without a trailing '/', got {prefix!r}")
        self.loggers = list(loggers)
        self.log_media = bool(log_media)
        self.prefix = prefix
        self.is_global_zero = bool(is_global_zero)
        self._metrics_defined = False

    @classmethod
    def from_trainer(cls, trainer: pl.Trainer, *, log_media: bool = False, prefix: str = "memwatch") -> MonitorLogger:
        """A ``MonitorLogger`` over ``trainer.loggers``; build it in ``Callback.setup`` or later,
        when ``trainer.is_global_zero`` is known."""
        return cls(trainer.loggers, log_media=log_media, prefix=prefix, is_global_zero=trainer.is_global_zero)

    @classmethod
    def of(
        cls, target: Any = None, *, log_media: bool = False, prefix: str = "memwatch", is_global_zero: bool = True
    ) -> MonitorLogger:
        """A ``MonitorLogger`` for a loop without a Trainer: ``target`` is ``None`` (log nothing), a
        W&B run (``wandb.init(...)``, wrapped in a ``WandbLogger``), a Lightning logger or a list of them.

        Raises:
            MemwatchError: ``target`` is none of these (the message names its type).
        """
        if target is None:
            loggers: list[Logger] = []
        elif isinstance(target, Logger):
            loggers = [target]
        elif isinstance(target, Sequence) and all(isinstance(t, Logger) for t in target):
            loggers = list(target)
        elif callable(getattr(target, "log", None)) and hasattr(target, "define_metric"):  # a wandb Run
            loggers = [WandbLogger(experiment=target)]
        else:
            raise MemwatchError(
                f"`logger` must be None, a wandb run, a Lightning logger or a list of them, got {type(target).__name__}"
            )
        return cls(loggers, log_media=log_media, prefix=prefix, is_global_zero=is_global_zero)

    # ---------------------------------------------------------------------------------------
    def define_metrics(self) -> None:
        """W&B: plot every ``<prefix>/*`` key against ``trainer/global_step``. Idempotent."""
        if self._metrics_defined or not self.is_global_zero:
            return
        self._metrics_defined = True
        for logger in self._wandb():
            define = getattr(logger.experiment, "define_metric", None)  # absent on a disabled run
            if define is not None:
                define(f"{_logger_prefix(logger)}{self.prefix}/*", step_metric=_STEP_KEY)

    def log_scalars(self, metrics: Mapping[str, float | Tensor], step: int) -> None:
        """Log ``{f"{prefix}/{k}": float(v)}`` through every logger's ``log_metrics``.

        Args:
            metrics: name → Python number or one-element Tensor (any device / dtype).
            step: the trainer's global step.

        Raises:
            ValueError: a value is not a single number.
        """
        if not self.loggers or not metrics:
            return
        values = {self._key(k): _scalar(k, v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=step)

    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        """Histogram of ``values`` (any shape, flattened; NaN / inf dropped) on W&B / TensorBoard."""
        targets = [lg for lg in self._media_loggers() if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        if not targets:
            return
        flat = values.detach().reshape(-1).to("cpu", torch.float64)
        flat = flat[torch.isfinite(flat)].numpy()
        if flat.size == 0:
            return
        for logger in targets:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_metrics({self._key(name): wandb.Histogram(flat)}, step=step)
            else:
                logger.experiment.add_histogram(_logger_prefix(logger) + self._key(name), flat, global_step=step)

    def log_figure(self, name: str, figure: Figure, step: int, *, private: bool = False) -> None:
        """Log a matplotlib figure (W&B image, TensorBoard figure, else a PNG file), then close it.

        Spectra and curves hold no training data and are always allowed; a figure that shows
        probes or training samples (a gallery) is ``private`` and, like :meth:`log_images`, only
        logged with ``log_media=True``.
        """
        try:
            png: bytes | None = None
            for logger in self._media_loggers() if self.log_media or not private else []:
                if isinstance(logger, TensorBoardLogger):
                    tag = _logger_prefix(logger) + self._key(name)
                    logger.experiment.add_figure(tag, figure, global_step=step, close=False)
                    continue
                png = png or _render_png(figure)
                if isinstance(logger, WandbLogger):
                    import wandb
                    from PIL import Image

                    logger.log_metrics({self._key(name): wandb.Image(Image.open(io.BytesIO(png)))}, step=step)
                elif (path := self._file(logger, name, step, ".png")) is not None:
                    path.write_bytes(png)
        finally:
            if getattr(figure.canvas, "manager", None) is not None:  # made by pyplot: free it there
                import matplotlib.pyplot as plt

                plt.close(figure)

    def log_images(self, name: str, images: Tensor, step: int, captions: Sequence[str] | None = None) -> None:
        """Log a batch of images; a no-op unless ``log_media=True`` (they show probes / data).

        Args:
            images: ``[n, C, H, W]`` float, C in {1, 3, 4}, values in ``[-1, 1]`` (when any is
                negative) or ``[0, 1]``; clamped after mapping to ``[0, 1]``.
            captions: ``n`` captions (W&B only).

        Raises:
            ValueError: wrong shape, or ``len(captions) != n``.
        """
        if not self.log_media:
            return
        targets = list(self._media_loggers())
        if not targets:
            return
        if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise MemwatchError(f"`images` must be [n, C, H, W] with C in (1, 3, 4), got shape {tuple(images.shape)}")
        if captions is not None and len(captions) != images.shape[0]:
            raise MemwatchError(f"`captions` must have {images.shape[0]} entries (one per image), got {len(captions)}")
        x = images.detach().to("cpu", torch.float32)
        if x.numel() and x.min() < 0:
            x = (x + 1) / 2
        x = x.clamp(0, 1)  # [n, C, H, W] in [0, 1]
        hwc = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [n, H, W, C]
        if hwc.shape[-1] == 1:
            hwc = hwc[..., 0]  # [n, H, W] grayscale
        for logger in targets:
            if isinstance(logger, WandbLogger):
                import wandb

                caps = list(captions) if captions is not None else [None] * len(hwc)
                pics = [wandb.Image(img, caption=c) for img, c in zip(hwc, caps)]
                logger.log_metrics({self._key(name): pics}, step=step)
            elif isinstance(logger, TensorBoardLogger):
                tag = _logger_prefix(logger) + self._key(name)
                logger.experiment.add_images(tag, x, global_step=step, dataformats="NCHW")
            else:
                for i, img in enumerate(hwc):
                    if (path := self._file(logger, f"{name}_{i}", step, ".png")) is not None:
                        _save_png(img, path)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a table of scalars: a ``wandb.Table`` on W&B, else a CSV file where the logger has
        a directory. One-element Tensors become Python numbers.

        Raises:
            ValueError: a row's length differs from ``len(columns)``.
        """
        targets = list(self._media_loggers())
        if not targets:
            return
        data = [[_plain(v) for v in row] for row in rows]
        for i, row in enumerate(data):
            if len(row) != len(columns):
                raise MemwatchError(f"`rows[{i}]` has {len(row)} cells, expected {len(columns)} (one per column)")
        for logger in targets:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.log_metrics({self._key(name): wandb.Table(columns=list(columns), data=data)}, step=step)
            elif (path := self._file(logger, name, step, ".csv")) is not None:
                with path.open("w", newline="") as fh:
                    writer = csv.writer(fh)
                    writer.writerow(columns)
                    writer.writerows(data)

    def log_config(self, name: str, params: Mapping[str, Any]) -> None:
        """Add ``{f"{prefix}/{name}": params}`` to the run's config through every logger's
        ``log_hyperparams`` (W&B config, ``hparams.yaml``, TensorBoard hparams), once per run.

        Args:
            name: the config entry, e.g. ``"probe_sampler"``.
            params: plain values (numbers, strings, booleans).
        """
        for logger in self.loggers:
            logger.log_hyperparams({self._key(name): dict(params)})

    def alert(self, title: str, text: str, *, level: str = "WARN") -> None:
        """W&B alert (``run.alert``); other loggers: nothing. A failing W&B call only warns.

        Args:
            level: ``"INFO"``, ``"WARN"`` or ``"ERROR"``.
        """
        if level not in _ALERT_LEVELS:
            raise MemwatchError(f"`level` must be one of {_ALERT_LEVELS}, got {level!r}")
        for logger in self._wandb():
            try:
                logger.experiment.alert(title=title, text=text, level=level)
            except Exception as err:  # noqa: BLE001 - an alert must never stop training
                rank_zero_warn(f"memwatch: W&B alert {title!r} failed: {type(err).__name__}: {err}")

    # ---------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _media_loggers(self) -> list[Logger]:
        return self.loggers if self.is_global_zero else []

    def _wandb(self) -> list[WandbLogger]:
        return [lg for lg in self._media_loggers() if isinstance(lg, WandbLogger)]

    def _file(self, logger: Logger, name: str, step: int, suffix: str) -> Path | None:
        """``<log_dir>/<prefix>/<name>_step<step><suffix>`` with its folder made, or None when
        the logger has no local directory."""
        root = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if not isinstance(root, (str, Path)) or "://" in str(root):
            return None
        path = Path(root) / self.prefix / f"{_UNSAFE.sub('_', name)}_step{step}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def wandb_logger(mode: str, save_dir: str | Path, **kwargs: Any) -> WandbLogger | None:
    """A quiet ``WandbLogger`` writing under ``save_dir`` (created; made absolute, because wandb's
    service process may outlive the caller and have another working directory), or ``None`` for
    ``mode="disabled"``.

    Args:
        mode: one of ``WANDB_MODES``; ``"offline"`` needs no account (``wandb sync`` uploads later).
        save_dir: the folder that receives ``wandb/<run>``.
        kwargs: passed to ``WandbLogger`` (``project``, ``name``, ``group``, ...).
    """
    if mode not in WANDB_MODES:
        raise MemwatchError(f"`mode` must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "disabled":
        return None
    import wandb

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("settings", wandb.Settings(silent=True, console="off"))
    logger = WandbLogger(save_dir=str(save_dir.resolve()), offline=mode == "offline", **kwargs)
    # Lightning passes `anonymous=None` to wandb.init, and wandb warns that the setting has no effect
    # whatever its value: leave it out, as a user who never set it expects
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def finish_wandb(logger: WandbLogger) -> Path:
    """Close the logger's W&B run; returns its folder (``…/wandb/offline-run-<date>-<id>`` offline)."""
    import wandb

    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    return run_dir


def _logger_prefix(logger: Logger) -> str:
    """The logger's own key prefix as its ``log_metrics`` adds it (``"p-"``), or ``""``."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""


def _scalar(key: str, value: float | Tensor) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise MemwatchError(f"metric {key!r} must be a single number, got a Tensor of shape {tuple(value.shape)}")
        return float(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        raise MemwatchError(f"metric {key!r} must be a number, got {type(value).__name__}") from None


def _plain(value: Any) -> Any:
    """One-element Tensors / numpy scalars → Python numbers; anything else unchanged."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else value


def _render_png(figure: Figure) -> bytes:
    buf = io.BytesIO()
    figure.savefig(buf, format="png")
    return buf.getvalue()


def _save_png(image: np.ndarray, path: Path) -> None:
    """Write ``[H, W]`` / ``[H, W, C]`` uint8 as PNG."""
    from PIL import Image

    Image.fromarray(image).save(path)
