"""Training speed of ``memwatch fit --config CONFIG`` against the same module in a plain script.

For each shipped config, two fresh processes train the config's ``model:`` on its ``data:`` for
``--steps`` optimizer steps, in turn (plain, CLI, plain, CLI, …, ``--repeats`` pairs):

* **plain**: a script builds the model and data module from the config's ``class_path`` /
  ``init_args`` and calls ``Trainer(max_steps=..., logger=False, enable_progress_bar=False,
  enable_checkpointing=False).fit`` — what a user's own script would do;
* **cli**: ``python -m memwatch fit --config CONFIG --trainer.max_steps N`` exactly as shipped
  (its progress bar, logger, logging cadence and monitor), in a temporary working directory.

Both runs carry :class:`StepClock`, which times optimizer steps 20 … ``--steps`` (the
start-up — imports, W&B's offline run, the first steps — is not training speed). The default
``--steps`` stays below each config's check cadence (``monitor.every_n_train_steps``), so no
check runs: what a check costs is ``benchmarks/bench_overhead.py``'s subject. Printed: each run's
steps per second, the whole process's wall time, and per config the median of ``plain / cli``
steps-per-second ratios (the CLI's slowdown: 1.0 = as fast as the script).

    python benchmarks/bench_cli_fit.py                       # both configs, 180 steps, 2 pairs
    python benchmarks/bench_cli_fit.py --config configs/digits.yaml --steps 400 --repeats 3
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import os
import pty
import re
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "digits.yaml", ROOT / "configs" / "toy2d.yaml"]
_RESULT = "bench_cli_fit result: "


class StepClock(pl.Callback):
    """Prints, at the end of fit, the steps per second from optimizer step ``warmup`` to the last,
    per second of wall time and per second of the process's CPU time (steadier on a busy machine).

    Args:
        warmup: optimizer steps not timed (the first steps pay for lazy initialisation).
    """

    def __init__(self, warmup: int = 20) -> None:
        self.warmup = warmup
        self.started: tuple[float, float] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.started = (time.perf_counter(), time.process_time())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        timed = trainer.global_step - self.warmup
        if self.started is not None and timed > 0:
            wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
            rates = {"steps_per_second": round(timed / wall, 2), "cpu_steps_per_second": round(timed / cpu, 2)}
            print(_RESULT + json.dumps(rates), flush=True)


def _instantiate(section: dict[str, Any]) -> Any:
    module, _, name = section["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**section.get("init_args", {}))


def plain_fit(config: Path, steps: int) -> None:
    """The config's model and data module, trained by a plain ``Trainer`` (no logger, no bar)."""
    import yaml

    settings = yaml.safe_load(config.read_text())
    pl.seed_everything(settings.get("seed_everything", 0), verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepClock()],
        default_root_dir=tempfile.mkdtemp(prefix="bench_cli_fit_plain_"),
    )
    trainer.fit(_instantiate(settings["model"]), datamodule=_instantiate(settings["data"]))


def _run(command: list[str], cwd: str, threads: int) -> tuple[float, float, float]:
    """``(steps per second, CPU steps per second, whole-process wall seconds)`` of one run.

    The command writes to a pseudo-terminal, as in a user's terminal (a progress bar draws there,
    not into a pipe); its output is read as it comes and kept for the result line.
    """
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS=str(threads), COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), env.get("PYTHONPATH", "")])
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # 200 columns: no wrapped result
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        try:
            chunk = os.read(master, 65536) if ready else b""
        except OSError:  # the terminal closed: the process has ended
            break
        if ready and not chunk:
            break
        chunks.append(chunk)
    returncode = proc.wait()
    wall = time.perf_counter() - started
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    found = re.findall(re.escape(_RESULT) + r"(\{.*?\})", text)  # a progress bar may share its line
    if returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(command)} failed ({returncode}):\n{text[-4000:]}")
    result = json.loads(found[-1])
    return result["steps_per_second"], result["cpu_steps_per_second"], wall


def _clocked(config: Path, directory: str) -> str:
    """A second config for ``memwatch fit``: the config's own callbacks plus :class:`StepClock`.

    (A list in a later config replaces the earlier one, so the shipped callbacks are repeated.)
    """
    import yaml

    callbacks = yaml.safe_load(config.read_text()).get("trainer", {}).get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    callbacks = [*callbacks, {"class_path": "bench_cli_fit.StepClock"}]
    path = Path(directory, "clocked.yaml")
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return str(path)


def compare(config: Path, steps: int, repeats: int, threads: int) -> tuple[float, float]:
    """Run ``repeats`` plain / CLI pairs of ``config``; print each run; return the median slowdowns
    ``(wall, CPU)``: plain steps per second over the CLI's."""
    plain = [sys.executable, __file__, "--plain", str(config), "--steps", str(steps)]
    wall, cpu = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cwd:
            cli = [sys.executable, "-m", "memwatch", "fit", "--config", str(config), "--config", _clocked(config, cwd)]
            cli += ["--trainer.max_steps", str(steps)]
            (p_rate, p_cpu, p_wall), (c_rate, c_cpu, c_wall) = _run(plain, cwd, threads), _run(cli, cwd, threads)
        wall.append(p_rate / c_rate)
        cpu.append(p_cpu / c_cpu)
        print(
            f"{config.name}: plain {p_rate:6.1f} steps/s ({p_cpu:6.1f} per CPU s, {p_wall:5.1f} s process) | "
            f"memwatch fit {c_rate:6.1f} steps/s ({c_cpu:6.1f} per CPU s, {c_wall:5.1f} s process) | "
            f"slowdown {wall[-1]:.2f}x wall, {cpu[-1]:.2f}x CPU",
            flush=True,
        )
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, action="append", help="a config (repeatable; default: both shipped)")
    parser.add_argument("--steps", type=int, default=180, help="optimizer steps per run (default 180)")
    parser.add_argument("--repeats", type=int, default=2, help="plain / CLI pairs per config (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    parser.add_argument("--plain", type=Path, help=argparse.SUPPRESS)  # the plain run's own process
    args = parser.parse_args()
    if args.plain is not None:
        plain_fit(args.plain, args.steps)
        return
    for config in args.config or CONFIGS:
        wall, cpu = compare(config.resolve(), args.steps, args.repeats, args.threads)
        pairs = f"{args.repeats} pair(s)"
        print(f"{config.name}: median slowdown of memwatch fit, {pairs}: {wall:.2f}x wall, {cpu:.2f}x CPU")


if __name__ == "__main__":
    main()
