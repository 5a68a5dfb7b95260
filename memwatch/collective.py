"""How the ranks of a run agree: the three collectives a monitor needs, behind one small protocol.

A check runs on every rank; its decisions (the noise levels, whether every rank measured, the
stop) must be the same everywhere. :class:`Collective` is all the monitor asks of a distributed
run: rank zero's object everywhere, and a logical AND / OR of one flag per rank. A single process
gets :class:`SingleProcess`; a run under ``torch.distributed`` (e.g. ``accelerate launch``)
:class:`TorchDistributed`; a Lightning Trainer its strategy through :class:`StrategyCollective`.

Example:
    >>> one = default_collective()   # no process group: the trivial one
    >>> one.world_size, one.rank, one.broadcast([1, 2]), one.all_true(True), one.any_true(False)
    (1, 0, [1, 2], True, False)
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["Collective", "SingleProcess", "StrategyCollective", "TorchDistributed", "default_collective"]


class Collective(Protocol):
    """The collectives of a monitor. Every rank calls each method, in the same order.

    Attributes:
        world_size: the number of ranks (1 for a single process).
        rank: this process's global rank (0 for a single process).
    """

    world_size: int
    rank: int

    def broadcast(self, obj: Any) -> Any:
        """Rank zero's ``obj`` (picklable) on every rank."""

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""

    def any_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some rank."""


class SingleProcess:
    """The collectives of one process: each is the identity."""

    world_size = 1
    rank = 0

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_true(self, flag: bool) -> bool:
        return bool(flag)

    def any_true(self, flag: bool) -> bool:
        return bool(flag)


class TorchDistributed:
    """The collectives of an initialised ``torch.distributed`` default group (``accelerate``,
    ``torchrun``): one ``broadcast_object_list`` or one ``all_reduce`` of a one-element tensor,
    on the current CUDA device under NCCL, else on the CPU."""

    def __init__(self) -> None:
        dist = torch.distributed
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        nccl = dist.get_backend() == "nccl"
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        return self._reduce(flag, torch.distributed.ReduceOp.MIN)

    def any_true(self, flag: bool) -> bool:
        return self._reduce(flag, torch.distributed.ReduceOp.MAX)

    def _reduce(self, flag: bool, op: Any) -> bool:
        value = torch.tensor([int(bool(flag))], device=self._device)
        torch.distributed.all_reduce(value, op=op)
        return bool(value.item())


class StrategyCollective:
    """A Lightning strategy's collectives (``strategy.broadcast``, ``reduce_boolean_decision``).

    Args:
        strategy: ``trainer.strategy``.
        world_size, rank: ``trainer.world_size``, ``trainer.global_rank``.
    """

    def __init__(self, strategy: Any, world_size: int, rank: int) -> None:
        self.strategy, self.world_size, self.rank = strategy, world_size, rank

    def broadcast(self, obj: Any) -> Any:
        return self.strategy.broadcast(obj, src=0)

    def all_true(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(flag, all=True))

    def any_true(self, flag: bool) -> bool:
        return bool(self.strategy.reduce_boolean_decision(flag, all=False))


def default_collective() -> Collective:
    """:class:`TorchDistributed` when a default process group is initialised, else :class:`SingleProcess`."""
    dist = torch.distributed
    return TorchDistributed() if dist.is_available() and dist.is_initialized() else SingleProcess()
