"""When the next check runs: a share of training time (the budget), within what onset needs.

A check costs about the same whatever the cadence (drawing and measuring the probes), so the
cadence alone sets the monitor's share of training time. :class:`BudgetCadence` keeps an account:
every second of training earns ``budget`` seconds of monitoring, every check spends its own wall
time, and a check is due once the account holds what the last steady check cost. The first
check's one-time costs (calibration, the data LID, the first spectrum) and the periodic spectrum
are paid off by the checks that follow waiting longer; a cost that changes (a bigger model under
the same monitor, a slower step) changes the cadence at the next check.

Two bounds keep the account from missing onset or checking for nothing:

* the **ceiling**: at most ``steps_per_sample`` steps per effective training sample between two
  checks. Memorization comes later the larger the training set (Bonnaire et al. 2505.17638:
  its time grows linearly with the number of samples), and a sample repeated ``r`` times in the
  batches is memorized as if the set were ``r`` times smaller, so the effective size is the
  number of samples seen divided by the largest repeat (:attr:`DataSize.effective`). Until the
  monitor knows the size (before its first check), the ceiling is ``first_check``. When the
  ceiling binds, the monitor may cost more than the budget: the result line says so.
* the **floor**: never two checks fewer than ``min_steps`` apart.

``every_n_train_steps`` (an integer) replaces all of this with a fixed cadence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memwatch import defaults
from memwatch.validation import check_fraction, check_int, check_positive

__all__ = ["ONE_TIME_PHASES", "BudgetCadence", "CadenceOptions", "DataSize", "SizeCounter"]

#: the phases of a check (``memwatch/time/<phase>``) that not every check pays: the first
#: check's calibration, data LID and consistency check, and the periodic spectrum
ONE_TIME_PHASES = ("calibration", "data_lid", "consistency", "spectrum")


@dataclass(frozen=True)
class CadenceOptions:
    """How often checks run when ``every_n_train_steps="auto"``.

    Attributes:
        budget: the monitor's share of training wall time, in ``(0, 1)`` (default 0.03: about what
            logging to W&B costs; see the README's Performance section).
        steps_per_sample: the ceiling: at most this many optimizer steps per effective training
            sample between checks (> 0).
        first_check: the step of the first check, before the data's size and the check's cost are
            known (>= 1).
        min_steps: the floor: at least this many steps between checks (>= 1).
    """

    budget: float = defaults.BUDGET
    steps_per_sample: float = defaults.STEPS_PER_SAMPLE
    first_check: int = defaults.FIRST_CHECK
    min_steps: int = defaults.MIN_CHECK_STEPS

    def __post_init__(self) -> None:
        check_fraction("cadence.budget", self.budget, low_open=True)
        check_positive("cadence.steps_per_sample", self.steps_per_sample)
        check_int("cadence.first_check", self.first_check, 1)
        check_int("cadence.min_steps", self.min_steps, 1)


@dataclass(frozen=True)
class DataSize:
    """What the monitor knows of the training set's size.

    Attributes:
        samples: distinct training samples (or items) seen so far.
        largest_repeat: how often the most repeated one was seen, relative to the average (1: none
            repeated more than the others).
    """

    samples: int
    largest_repeat: float = 1.0

    @property
    def effective(self) -> float:
        """The size the set memorizes like: ``samples / largest_repeat`` (at least 1)."""
        return max(1.0, self.samples / max(self.largest_repeat, 1.0))


class BudgetCadence:
    """The account of :mod:`memwatch.cadence` (see the module docstring); framework-free.

    Call :meth:`train_seconds` with the wall time of training steps (checks excluded) and
    :meth:`checked` after each check: it fixes the step of the next one (:attr:`next_step`), so
    that every DDP rank, given rank zero's, agrees on it without a collective at each step.

    Example:
        >>> cadence = BudgetCadence(CadenceOptions(budget=0.05, first_check=100))
        >>> cadence.due(99), cadence.due(100)
        (False, True)
        >>> cadence.train_seconds(10.0, steps=100)  # 0.1 s a step
        >>> cadence.checked(100, seconds=2.0, steady_seconds=1.0, size=DataSize(10_000))
        >>> cadence.next_step, cadence.bound  # (2 s spent + 1 s next) / (0.05 · 0.1 s) = 600 steps, minus 100 earned
        (600, 'budget')
    """

    def __init__(self, options: CadenceOptions) -> None:
        self.options = options
        self._train = 0.0  # training wall seconds so far (checks excluded)
        self._spent = 0.0  # check wall seconds so far
        self._steps_trained = 0  # the steps behind ``_train``
        self._steady: float | None = None  # the last check's cost without its one-time phases
        self._size: DataSize | None = None
        self._tick: float | None = None  # perf_counter at the last tick
        self._tick_step: int | None = None  # the step it ticked
        self._inside = 0.0  # the monitor's seconds since the last tick
        self.last_step: int | None = None
        self.next_step: int = options.first_check
        self.bound = "first"  # what set next_step: "first", "budget", "ceiling" or "floor"

    def train_seconds(self, seconds: float, steps: int = 1) -> None:
        """``steps`` optimizer steps took ``seconds`` of wall time (no check among them)."""
        if math.isfinite(seconds) and seconds >= 0:
            self._train += seconds
            self._steps_trained += steps

    def tick(self, step: int) -> None:
        """Training reached optimizer step ``step``: the wall time since the last step ticked, less
        the monitor's own time in between (:meth:`spend`, :meth:`checked`), is training time. A
        tick at a step already ticked (the micro-batches of gradient accumulation) is not one."""
        if self._tick_step is not None and step <= self._tick_step:
            return
        now = time.perf_counter()
        if self._tick is not None and self._tick_step is not None:
            self.train_seconds(now - self._tick - self._inside, steps=step - self._tick_step)
        self._tick, self._tick_step, self._inside = now, step, 0.0

    def spend(self, seconds: float) -> None:
        """The monitor spent ``seconds`` outside a check (taking a batch, publishing): on the
        account, and not training time."""
        if math.isfinite(seconds) and seconds > 0:
            self._spent += seconds
            self._inside += seconds

    def checked(self, step: int, *, seconds: float, steady_seconds: float, size: DataSize | None) -> None:
        """A check ran at ``step`` and took ``seconds`` of wall time, ``steady_seconds`` of them what
        every check pays (its one-time phases excluded); ``size``: the training set as known now.
        Fixes :attr:`next_step`: when the account will hold a steady check's cost, within the
        floor and the ceiling."""
        self.last_step = step
        self.spend(seconds)
        if math.isfinite(steady_seconds) and steady_seconds > 0:
            self._steady = steady_seconds
        if size is not None:
            self._size = size
        wanted = self.budget_steps
        o = self.options
        if wanted is None or wanted >= self.ceiling:
            self.bound, interval = "ceiling", self.ceiling
        elif wanted < o.min_steps:
            self.bound, interval = "floor", o.min_steps
        else:
            self.bound, interval = "budget", wanted
        self.next_step = step + interval

    def account(self, step: int, values: dict[str, float], seconds: float, size: DataSize | None) -> None:
        """:meth:`checked` from a check's logged ``values``: its steady cost is ``seconds`` less the
        phases of :data:`ONE_TIME_PHASES` it paid (``memwatch/time/<phase>``)."""
        extra = sum(values.get(f"time/{phase}", 0.0) for phase in ONE_TIME_PHASES)
        steady = seconds - extra if values else math.nan  # an unmeasured check: the last steady cost stays
        self.checked(step, seconds=seconds, steady_seconds=steady, size=size)

    def use_next_step(self, next_step: int) -> None:
        """Take another process's :attr:`next_step` (rank zero's, so that all ranks agree)."""
        self.next_step = int(next_step)

    def due(self, step: int) -> bool:
        """Whether a check is due at ``step``."""
        return step >= self.next_step

    @property
    def step_seconds(self) -> float | None:
        """The mean wall time of a training step so far (``None`` before any)."""
        return self._train / self._steps_trained if self._steps_trained else None

    @property
    def ceiling(self) -> int:
        """The most steps between two checks: ``steps_per_sample`` × the effective size
        (``first_check`` before the size is known), at least ``min_steps``."""
        o = self.options
        if self._size is None:
            return max(o.first_check, o.min_steps)
        return max(o.min_steps, math.ceil(o.steps_per_sample * self._size.effective))

    @property
    def budget_steps(self) -> int | None:
        """Steps from the last check until the account holds a steady check's cost: what was spent
        beyond the budget so far, plus the next check, at the budget's share of a step's time
        (``None`` until a check and a step were timed)."""
        step = self.step_seconds
        if self._steady is None or not step:
            return None
        owed = self._spent + self._steady - self.options.budget * self._train
        return max(1, math.ceil(owed / (self.options.budget * step)))

    @property
    def interval(self) -> int:
        """The steps between the last check and the next (``first_check`` before the first)."""
        return self.next_step - (self.last_step or 0)

    @property
    def ratio(self) -> float:
        """The monitor's wall time so far (checks, intake, publishing) over the training's, what the
        budget bounds: above 1 where the ceiling makes checks cost more than the training between
        them (NaN before any training)."""
        return self._spent / self._train if self._train > 0 else math.nan

    def describe(self) -> str:
        """The cadence in force and why, for the result line, e.g. ``"next check in 640 steps (budget
        3%: a check 3.2 s, a step 0.16 s; the monitor so far 2.9% of training time)"``."""
        o, step = self.options, self.step_seconds
        if self.last_step is None:
            return f"first check at step {self.next_step}"
        costs = (
            f"a check {self._steady:.3g} s, a step {step:.3g} s"
            if self._steady is not None and step
            else "costs not timed yet"
        )
        size = "" if self._size is None else f" for {self._size.effective:.0f} effective training samples"
        why = {
            "budget": f"budget {o.budget:.0%}",
            "ceiling": f"ceiling: {o.steps_per_sample:g} steps a sample{size}",
            "floor": f"floor: {o.min_steps} steps",
        }[self.bound]
        share = f"the monitor so far {self.ratio:.1%} of training time"
        return f"next check in {self.interval} steps ({why}: {costs}; {share})"

    def state_dict(self) -> dict[str, Any]:
        size = None if self._size is None else (self._size.samples, self._size.largest_repeat)
        return {
            "train": self._train, "spent": self._spent, "steps_trained": self._steps_trained, "steady": self._steady,
            "size": size, "last_step": self.last_step, "next_step": self.next_step, "bound": self.bound,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._train, self._spent = float(state["train"]), float(state["spent"])
        self._steps_trained, self._steady = int(state["steps_trained"]), state["steady"]
        self._size = None if state["size"] is None else DataSize(*state["size"])
        self.last_step, self.next_step, self.bound = state["last_step"], int(state["next_step"]), state["bound"]


class SizeCounter:
    """The distinct training samples (or items) the batches held and how often each came: exact,
    from their keys (content hashes, or item ids), 16 bytes a distinct sample, merged when asked.

    Example:
        >>> counter = SizeCounter()
        >>> counter.add(torch.tensor([1, 2, 3, 3, 3, 3]))
        >>> counter.size()
        DataSize(samples=3, largest_repeat=2.0)
    """

    def __init__(self) -> None:
        self._keys = torch.empty(0, dtype=torch.int64)  # sorted, distinct
        self._counts = torch.empty(0, dtype=torch.int64)
        self._pending: list[Tensor] = []

    def add(self, keys: Tensor) -> None:
        """Count ``[m]`` int64 keys of rows a batch held (merged at the next :meth:`size`)."""
        self._pending.append(keys.detach().to("cpu", torch.int64).flatten())

    def size(self) -> DataSize | None:
        """What the keys so far say (``None`` before any)."""
        if self._pending:
            keys = torch.cat([self._keys, *self._pending])
            counts = torch.cat([self._counts, torch.ones(keys.numel() - self._keys.numel(), dtype=torch.int64)])
            self._keys, inverse = torch.unique(keys, sorted=True, return_inverse=True)
            self._counts = torch.zeros_like(self._keys).scatter_add_(0, inverse, counts)
            self._pending = []
        if not self._keys.numel():
            return None
        mean = float(self._counts.double().mean())
        return DataSize(int(self._keys.numel()), float(self._counts.max()) / mean)
