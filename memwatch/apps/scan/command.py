"""``memwatch scan`` on the command line: its flags, ``--data``, one error line and an exit code per
failure, the summary it prints."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor

from memwatch.apps.scan import scanning
from memwatch.apps.scan.results import ScanResult, _one_line
from memwatch.apps.scan.scanning import _WANDB_SCAN_MODES, scan
from memwatch.errors import MemwatchError
from memwatch.options import LEGACY_NAMES

_MONITOR_FLAGS: dict[str, dict[str, Any]] = {
    "num_probes": {"type": int},
    "sampler_steps": {"type": int},
    "sigmas": {"type": float, "nargs": "+"},
    "timesteps": {"type": float, "nargs": "+"},
    "k": {"type": int},
    "threshold": {"type": float},
    "score_threshold": {"type": float},
    "method": {},
    "num_iters": {"type": int},
    "num_vectors": {"type": int},
    "max_batch": {"type": int},
    "onset_threshold": {"type": float},
    "patience": {"type": int},
    "min_steps": {"type": int},
    "seed": {"type": int},
    "sample_shape": {"type": int, "nargs": "+"},
    "ema_attr": {},
}


# the scan's and the monitor's argument names → the command's flags, for messages (see `_in_scan_terms`)
_SCAN_TERMS: dict[str, str] = {
    **{name: "`--" + name.replace("_", "-") + "`" for name in _MONITOR_FLAGS},
    "checkpoints": "CHECKPOINTS",
    "module_class": "`--module`",
    "data": "`--data`",
    "ids": "the ids of `--data`",
    "reference_data": "`--data`",
    "data_range": "the value range of `--data`",
    "scheduler": "`--scheduler`",
    "out": "`--out`",
    "wandb_mode": "`--wandb-mode`",
    "device": "`--device`",
}
_SCAN_TERMS.update(  # the monitor's own names for the same settings (`data.sample_shape` ...)
    {f"{group}.{field}": _SCAN_TERMS[flat] for flat, (group, field) in LEGACY_NAMES.items() if flat in _SCAN_TERMS}
)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage block), with exit code 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``PROG: error: MESSAGE`` on stderr and exit with 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``memwatch scan`` flags; monitor flags left out keep the monitor's defaults."""
    parser = parser or _Parser(prog="memwatch scan", description=scanning.__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoints", nargs="+", type=Path, help="checkpoint files, diffusers folders, or folders holding them"
    )
    parser.add_argument(
        "--scheduler",
        type=Path,
        help="scheduler folder for diffusers checkpoints (default: a scheduler/ folder in the checkpoint "
        "folder or above it, up to the folder scanned)",
    )
    parser.add_argument("--module", help="LightningModule class path (default: the checkpoint's `_class_path`)")
    parser.add_argument(
        "--data",
        help="training data: N (the digits subset DigitsDataModule(n_train=N, seed=--data-seed) trains on) "
        "or a file saved with torch.save holding a tensor [N, ...] or {'data': tensor, 'ids': list}",
    )
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the digits subset (default 0)")
    parser.add_argument(
        "--out", type=Path, default=Path("memwatch_scan"), help="output folder (default ./memwatch_scan)"
    )
    parser.add_argument(
        "--wandb-mode", choices=_WANDB_SCAN_MODES, default="disabled", help="offline: a W&B run in --out"
    )
    parser.add_argument("--device", default="cpu", help="where to measure (default cpu)")
    parser.add_argument("--no-resume", dest="resume", action="store_false", help="measure every checkpoint again")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    for name, spec in _MONITOR_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=f"MemorizationMonitor({name}=…)", **spec)
    return parser


def load_data(spec: str | None, seed: int = 0) -> tuple[Tensor | None, list[Any] | None]:
    """``--data``: ``N`` (the digits subset of :class:`memwatch.apps.toymodels.DigitsDataModule`) or a
    ``torch.save`` file with a tensor or ``{"data": tensor, "ids": [...]}``; returns ``(data, ids)``.

    Raises:
        MemwatchError: neither an integer nor a readable file of that form.
    """
    if spec is None:
        return None, None
    if spec.isdigit():
        from memwatch.data import digits

        return digits(int(spec), seed=seed), None
    path = Path(spec)
    if not path.is_file():
        raise MemwatchError(f"`--data` must be a number of digits or a torch.save file, got {spec!r}")
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, or pickled objects other than tensors: not a data file
        raise MemwatchError(f"`--data` file {spec!r} cannot be read as tensors ({_one_line(err)})") from err
    if isinstance(stored, Tensor):
        return stored, None
    if isinstance(stored, dict) and isinstance(stored.get("data"), Tensor):
        return stored["data"], stored.get("ids")
    raise MemwatchError(f"`--data` file {spec!r} must hold a tensor or {{'data': tensor, 'ids': list}}")


def main(argv: Sequence[str] | None = None) -> int:
    """``memwatch scan CHECKPOINTS... [--module CLASS] [--data N|FILE] [--out DIR] [--debug] ...``.

    Every error is one line on stderr (``memwatch scan: error: …``, in the command's flags; the
    traceback too with ``--debug``), every warning too (``memwatch scan: warning: …``).

    Returns:
        The exit code: 0 when at least one checkpoint was measured, 1 when every checkpoint was
        skipped or the scan failed unexpectedly, 2 for a usage error (a bad flag, a missing path,
        ``--out`` naming a file, bad ``--data``, settings the model does not take).
    """
    args = build_parser().parse_args(argv)
    with _one_line_warnings():
        try:
            result = _run(args)
        except Exception as err:  # the command's boundary: every failure becomes one line and an exit code
            return _fail(err, debug=args.debug)
    print(_summary(result), flush=True)
    if not result.checks:
        _error(f"no checkpoint could be read: all {len(result.skipped)} were skipped (see the warnings above)")
        return 1
    return 0


def _run(args: argparse.Namespace) -> ScanResult:
    """The scan the parsed flags ask for."""
    monitor_kwargs = {name: getattr(args, name) for name in _MONITOR_FLAGS if hasattr(args, name)}
    for name in ("sigmas", "timesteps", "sample_shape"):
        if name in monitor_kwargs:
            monitor_kwargs[name] = tuple(monitor_kwargs[name])
    monitor_kwargs.setdefault("verbose", False)
    data, ids = load_data(args.data, args.data_seed)
    return scan(
        args.checkpoints,
        args.module,
        data=data,
        ids=ids,
        monitor_kwargs=monitor_kwargs,
        out=args.out,
        resume=args.resume,
        progress=args.progress,
        wandb_mode=args.wandb_mode,
        device=args.device,
        scheduler=args.scheduler,
    )


def _fail(err: Exception, *, debug: bool) -> int:
    """Report a failed scan in one line (the traceback first with ``--debug``); its exit code."""
    if debug:
        traceback.print_exc()
    if isinstance(err, MemwatchError):  # what the user passed does not fit
        _error(_in_scan_terms(str(err)))
        return 2
    _error(_one_line(err) + ("" if debug else " (run with --debug for the traceback)"))
    return 1


def _error(text: str) -> None:
    print(f"memwatch scan: error: {' '.join(text.split())}", file=sys.stderr, flush=True)


def _in_scan_terms(message: str) -> str:
    """A message of the scan or the monitor with the argument names it quotes in backticks as the
    command's flags (``sample_shape=`` → ``--sample-shape``, ``reference_data`` → ``--data``)."""
    return re.sub(r"`([\w.]+)=?`", lambda m: _SCAN_TERMS.get(m[1], m[0]), message)


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Warnings (the scan's skipped files, the monitor's) as ``memwatch scan: warning: …`` lines."""

    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        text = re.sub(r"^memwatch( scan)?: ", "", str(message))
        print(f"memwatch scan: warning: {' '.join(_in_scan_terms(text).split())}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _summary(result: ScanResult) -> str:
    head = f"memwatch scan: {len(result.checks)} checkpoint(s), {result.measured} measured now"
    if result.skipped:
        head += f", {len(result.skipped)} skipped: " + ", ".join(s.path.name for s in result.skipped)
    lines = [head]
    for c in result.checks:
        v = c.values
        nn = f", copies {v['nn_memorized_fraction']:.0%}" if "nn_memorized_fraction" in v else ""
        lines.append(
            f"  step {c.step}: sharp fraction {v['sharp_fraction_mean']:.3f}, flagged {v[result.onset_key]:.0%}"
            f"{nn}{'  <- onset' if c.step == result.onset_step else ''}"
        )
    lines.extend(f"  skipped {s.path}: {s.reason}" for s in result.skipped)
    if result.checks and result.onset_step is None:
        lines.append("no memorization onset")
    elif result.checks:
        lines.append(f"onset at step {result.onset_step}; last clean checkpoint: {result.clean_checkpoint}")
    top = [f"{c.id} ({c.copies} copies)" for c in result.most_copied if c.copies][:5]
    if top:
        lines.append("most copied training items (last checkpoint): " + ", ".join(map(str, top)))
    lines.extend(f"{name}: {path}" for name, path in result.files.items())
    if result.wandb_dir is not None:
        lines.append(f"W&B offline run: {result.wandb_dir}; upload with: wandb sync {result.wandb_dir}")
    return "\n".join(lines)
