"""The batch intake: what the monitor takes from each training batch, and what it refuses.

Signals that read training samples (the calibration of ``sigmas="auto"``, the copies of
``reference_data="batches"``) get them through :class:`BatchIntake`, which makes every batch
either a clean ``[b, *shape]`` float tensor or nothing, never a crash or a skewed number:

* **Where the samples are.** ``data.select``: a dict key, a tuple index or a function; default
  the batch itself or its first tensor. A batch where the selector finds nothing is skipped.
* **Units.** Integer samples (``uint8`` images) are mapped onto ``data.integer_range``; without
  it they are refused (in raw 0…255 units every distance and noise level would be wrong).
* **Shapes.** The first batch fixes the sample shape; a batch of another shape (aspect-ratio
  bucketing) turns the intake off for the rest of the run: the samples held so far are used.
* **Values.** Rows with a NaN / Inf are dropped and counted.
* **Items.** With ``data.ids`` every row carries the id of the training item it is a view of
  (augmented batches), so the copy index counts the views of one item as that item.
* **Cost.** :meth:`BatchIntake.stage` only keeps a detached copy where the batch is (no
  device synchronization per step); the rows are checked and handed on at :meth:`BatchIntake.drain`,
  at the next check or when the staged rows exceed ``STAGE_BYTES``.

Each kind of fault is warned about once per run (naming the step and the setting to change) and
counted in :attr:`BatchIntake.skipped` / :attr:`BatchIntake.dropped_rows`; with
``report.raise_errors`` it is raised instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from memwatch.cadence import SizeCounter
from memwatch.calibration import Reservoir
from memwatch.errors import MemwatchError
from memwatch.groundtruth import first_tensor
from memwatch.index import CopyIndex, content_keys
from memwatch.operators import is_out_of_memory
from memwatch.options import DataOptions
from memwatch.validation import check_int, check_shape

__all__ = [
    "STAGE_BYTES",
    "BatchIntake",
    "TrainingSamples",
    "as_float",
    "batch_range",
    "batch_sample_shape",
    "check_reference_data",
    "in_probe_space",
    "item_ids",
    "select_data",
]

STAGE_BYTES = 64 * 2**20  #: staged rows beyond this are drained before the next check


def as_float(data: Tensor, integer_range: tuple[float, float] | None, what: str) -> Tensor:
    """``data`` in the units the model trains on: floats as they are, ``uint8`` (0…255) mapped
    linearly onto ``integer_range``.

    Raises:
        MemwatchError: other dtypes (labels, masks), or ``uint8`` without ``integer_range``.

    Example:
        >>> as_float(torch.tensor([[0, 255]], dtype=torch.uint8), (-1.0, 1.0), "x")
        tensor([[-1.,  1.]])
    """
    if data.is_floating_point():
        return data
    if data.dtype != torch.uint8:
        raise MemwatchError(f"{what} holds {data.dtype} samples, not images or real numbers; set `data.select`")
    if integer_range is None:
        raise MemwatchError(
            f"{what} holds uint8 samples (0…255), and memwatch compares samples in the units the model trains on: "
            "set `data.integer_range`, e.g. (-1, 1) for a training_step that trains on x / 127.5 - 1"
        )
    low, high = integer_range
    return low + (high - low) * data.to(torch.float32) / 255


def item_ids(batch: Any, select: Any, size: int) -> Tensor:
    """The ids ``[size]`` int64 of the training items a batch's samples are views of, chosen by
    ``data.ids`` (a dict key, a tuple index or a function): an integer tensor where it is (no copy
    to the CPU, no sync), or a list of ints / strings (strings by a 63-bit BLAKE2b hash, the same
    on every process).

    Raises:
        MemwatchError: nothing at the selector, or not ``size`` integer ids.

    Example:
        >>> item_ids({"image": torch.zeros(2, 3), "idx": torch.tensor([7, 9])}, "idx", 2)
        tensor([7, 9])
    """
    if callable(select):
        found = select(batch)
    elif isinstance(select, str):
        found = batch.get(select) if isinstance(batch, Mapping) else None
    else:
        found = batch[select] if isinstance(batch, Sequence) and select < len(batch) else None
    if isinstance(found, Tensor) and not found.is_floating_point() and not found.is_complex():
        if found.shape == (size,):
            return found.detach().to(torch.int64)
    elif isinstance(found, Sequence) and len(found) == size and all(isinstance(i, (int, str)) for i in found):
        return torch.tensor([i if isinstance(i, int) else _string_id(i) for i in found], dtype=torch.int64)
    what = (
        type(found).__name__
        if not isinstance(found, Tensor)
        else f"a {found.dtype} tensor of shape {tuple(found.shape)}"
    )
    raise MemwatchError(
        f"`data.ids`={select!r} must give {size} integer (or string) ids of the batch's items, got {what}"
    )


def _string_id(name: str) -> int:
    """A 63-bit id of a string item id, the same on every process."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFFFFFFFFFF


class BatchIntake:
    """Training samples from the batches, checked (see the module docstring).

    Args:
        options: the data group of the monitor.
        raise_errors: raise faults instead of warning once.
    """

    def __init__(self, options: DataOptions, *, raise_errors: bool = False) -> None:
        self.options = options
        self.raise_errors = raise_errors
        self.shape: tuple[int, ...] | None = None  # of a batch row, fixed by the first batch
        self.off = False
        self.skipped = 0  # batches not taken (faults, refused units, after the intake turned off)
        self.dropped_rows = 0  # rows with a non-finite value
        self._warned: set[str] = set()
        self._staged: list[tuple[int, Tensor, Tensor | None]] = []
        self._staged_bytes = 0

    def stage(self, batch: Any, step: int) -> None:
        """Keep this batch's samples for :meth:`drain` (a detached copy where they are; no sync).

        Raises:
            MemwatchError: with ``raise_errors``, any fault of the batch.
        """
        if self.off:
            self.skipped += 1
            return
        try:
            rows = self._checked(select_data(batch, self.options.select), step)
        except Exception as err:  # noqa: BLE001 - a user's selector too: its fault skips the batch, not the run
            self.fault("select", step, f"{_describe(err, 'data.select')}; the batch is skipped")
            return
        if rows is None:
            return
        ids = None
        if self.options.ids is not None:
            try:
                ids = item_ids(batch, self.options.ids, rows.shape[0]).clone()
            except Exception as err:  # noqa: BLE001 - as above
                self.fault("ids", step, f"{_describe(err, 'data.ids')}; the batch is skipped")
                return
        self._staged.append((step, rows.detach().clone(), ids))
        self._staged_bytes += rows.numel() * rows.element_size()

    @property
    def full(self) -> bool:
        """Whether the staged rows should be drained now (beyond ``STAGE_BYTES``)."""
        return self._staged_bytes > STAGE_BYTES

    def drain(self) -> list[tuple[int, Tensor, Tensor | None]]:
        """The staged ``(step, rows [b, *shape], item ids [b] or None)`` with the non-finite rows
        dropped, oldest first."""
        out = []
        for step, rows, ids in self._staged:
            finite = torch.isfinite(rows.flatten(1)).all(1)
            bad = int((~finite).sum())
            if bad:
                self.dropped_rows += bad
                self.fault(
                    "nonfinite",
                    step,
                    f"{bad} of {rows.shape[0]} samples of the training batch at step {step} hold NaN/Inf; they are "
                    "not taken (counted in memwatch/intake_dropped_rows)",
                )
                rows = rows[finite.to(rows.device)]
                ids = None if ids is None else ids[finite.to(ids.device)]
            if rows.shape[0]:
                out.append((step, rows, ids))
        self._staged, self._staged_bytes = [], 0
        return out

    def fault(self, kind: str, step: int, message: str) -> None:
        """One warning per kind of fault and run (or raise with ``raise_errors``)."""
        if kind != "nonfinite":
            self.skipped += 1
        if self.raise_errors:
            raise MemwatchError(f"memwatch: training batch at step {step}: {message}")
        if kind not in self._warned:
            self._warned.add(kind)
            rank_zero_warn(f"memwatch: training batch at step {step}: {message}. Warned once per run.")

    def _checked(self, data: Tensor, step: int) -> Tensor | None:
        """``data`` as float samples of the first batch's shape, or ``None`` (refused, with a warning)."""
        if data.ndim < 2:
            raise MemwatchError(
                f"the selected tensor has shape {tuple(data.shape)}, not [batch, *sample_shape]; set `data.select`"
            )
        if not data.is_floating_point():
            try:
                data = as_float(data, self.options.integer_range, "the training batch")
            except MemwatchError as err:
                self.fault("dtype", step, f"{err}; the batch is not taken")
                return None
        shape = tuple(data.shape[1:])
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            self.off = True
            self.fault(
                "shape",
                step,
                f"its samples have shape {shape}, the first batch's {self.shape} (bucketed sizes?): the monitor stops "
                "reading batches and keeps the samples it holds (set `data.select` to a fixed-size view, or pass "
                "`sigmas` and a `reference_data` tensor to need no batches)",
            )
            return None
        return data


class TrainingSamples:
    """The distinct training samples the monitor holds from the batches, in the probes' space:
    the intake's rows, staged, then offered (through ``data.encode_fn`` where they are not already
    latents) to a :class:`memwatch.calibration.Reservoir` (``data.capacity`` of them: the noise
    levels' calibration, the loss gap's training side) and, with ``reference_data="batches"``, to
    the copies signal's :class:`memwatch.index.CopyIndex`. In memory only; never logged or saved.

    Args:
        intake: the monitor's batch intake.
        seed: seed of the reservoir.
        uses: the settings that read the batches, for messages (e.g. ``'sigmas="auto"'``).
        optional: whether the monitor can do without them (no ``sigmas="auto"`` to calibrate):
            batches that are not in the probes' space are then refused with one warning
            (:attr:`refused`) instead of failing the run.
    """

    def __init__(self, intake: BatchIntake, *, seed: int, uses: str, optional: bool = False) -> None:
        self.intake = intake
        self.reservoir: Reservoir | None = Reservoir(intake.options.capacity, seed=seed, distinct=True)
        self.index: CopyIndex | None = None  # the copies signal's, with reference_data="batches"
        self.uses = uses
        self.optional = optional
        self.refused: str | None = None  # why no training sample is held (batches outside the probes' space)
        # with the copy index: how many distinct samples (items) the batches held, and their repeats
        self.sizes = SizeCounter()
        self._warned_latents = False

    def __len__(self) -> int:
        """Samples in the reservoir (0 once it is dropped)."""
        return 0 if self.reservoir is None else len(self.reservoir)

    @property
    def samples(self) -> Tensor:
        """``[m, *shape]`` float32 on the CPU (a copy); see :attr:`memwatch.calibration.Reservoir.samples`.

        Raises:
            MemwatchError: the reservoir was dropped (:meth:`drop_reservoir`).
        """
        if self.reservoir is None:
            raise MemwatchError("the training samples' reservoir was dropped once no signal read it")
        return self.reservoir.samples

    def drop_reservoir(self) -> None:
        """Free the reservoir (the levels and the data LID are fixed and no loss gap reads it); the
        copy index, if any, goes on taking the batches."""
        self.reservoir = None

    def rows(self, index: Tensor) -> Tensor:
        """``[r, *shape]`` the samples at positions ``index`` of :attr:`samples`, copying only those
        (:meth:`memwatch.calibration.Reservoir.rows`)."""
        if self.reservoir is None:
            raise MemwatchError("the training samples' reservoir was dropped once no signal read it")
        return self.reservoir.rows(index)

    def offer(self, batch: Any, step: int, sample_shape: Sequence[int]) -> None:
        """Stage a training batch (no device synchronization); drained when the stage is full.

        Raises:
            MemwatchError: the first batch's samples are not in the probes' space and no
                ``data.encode_fn`` maps them there (a configuration error).
        """
        first = self.intake.shape is None
        self.intake.stage(batch, step)
        shape, encode = self.intake.shape, self.intake.options.encode_fn
        if first and shape is not None and encode is None and shape != tuple(sample_shape):
            if not self.optional:
                raise MemwatchError(space_message(shape, sample_shape, self.uses))
            self._refuse(space_message(shape, sample_shape, self.uses))
        if self.intake.full:
            self.drain(sample_shape)

    def _refuse(self, reason: str) -> None:
        """Hold no training sample for the rest of the run, and say so once."""
        self.refused = reason
        self.intake.off = True
        self.intake.drain()  # the refused batch
        rank_zero_warn(
            f"memwatch: {reason}. The monitor holds and compares no training samples for the rest of the run: no "
            "copies are counted, the LID signal has no data LID, and the onset rule decides on isolated peaks alone"
        )

    def drain(self, sample_shape: Sequence[int]) -> None:
        """Offer the staged rows to the reservoir; a batch that cannot be encoded is skipped (one warning)."""
        for step, rows, ids in self.intake.drain():
            try:
                self._hold(rows, ids, tuple(sample_shape))
            except Exception as err:  # noqa: BLE001 - the user's encoder: its fault skips the batch, not the run
                self.intake.fault("encode", step, f"{_describe(err, 'data.encode_fn')}; the batch is not taken")

    def _hold(self, rows: Tensor, ids: Tensor | None, sample_shape: tuple[int, ...]) -> None:
        """Offer ``rows`` (views of the items ``ids``) to the reservoir and the copy index, in the probes' space."""
        encode = self.intake.options.encode_fn
        in_space = tuple(rows.shape[1:]) == sample_shape
        if in_space and encode is not None and not self._warned_latents:
            self._warned_latents = True
            rank_zero_warn(
                f"memwatch: the training batches already hold samples of the probes' shape {sample_shape}, so "
                "they are taken as latents and `data.encode_fn` is not applied to them (it still encodes "
                "`reference_data` and `loss_gap.heldout_data`)"
            )
        if not in_space and encode is None:
            raise MemwatchError(space_message(tuple(rows.shape[1:]), sample_shape, self.uses))
        if self.index is None:  # only the reservoir: of a full one few rows are kept, and only those are encoded
            if self.reservoir is not None:
                self.reservoir.update(rows, transform=None if in_space else lambda x: self._encode(x, sample_shape))
            return
        keys = content_keys(rows)  # of the rows as they came (pixels, for a latent model)
        items = None if ids is None else ids.cpu()
        self.sizes.add(keys if items is None else items)
        if in_space:
            if self.reservoir is not None:
                self.reservoir.update(rows)
            self.index.add(rows, items=items, keys=keys)
            return
        fresh = self.index.fresh(keys)  # only the rows the index does not hold yet are encoded
        if fresh.any():
            encoded = self._encode(rows[fresh.to(rows.device)], sample_shape)
            if self.reservoir is not None:
                self.reservoir.update(encoded)
            self.index.add(encoded, items=None if items is None else items[fresh], keys=keys[fresh])

    def _encode(self, x: Tensor, sample_shape: tuple[int, ...]) -> Tensor:
        """Training samples ``[b, *data shape]`` in the probes' space ``[b, *sample_shape]`` through
        ``data.encode_fn`` (checked before anything is kept)."""
        with torch.no_grad(), isolate_rng():  # an encoder that samples must not move the training RNG
            out = self.intake.options.encode_fn(x)
        if not isinstance(out, Tensor):
            raise MemwatchError(
                f"`data.encode_fn` returned a {type(out).__name__}, not a tensor (for a diffusers VAE: "
                "lambda x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor)"
            )
        if tuple(out.shape[1:]) != sample_shape or out.shape[0] != x.shape[0]:
            raise MemwatchError(space_message(tuple(out.shape[1:]), sample_shape, self.uses))
        return out.detach()


def in_probe_space(
    data: Any, name: str, options: DataOptions, sample_shape: Sequence[int], device: torch.device | str | None = None
) -> Tensor:
    """User data (``reference_data``, held-out data) ``[N, *shape]`` checked — real units, finite —
    and encoded into the probes' space (``data.encode_fn`` runs on ``device``), on the CPU.

    Raises:
        MemwatchError: the data is not shaped like the probes (after ``data.encode_fn``), holds
            fewer than two samples, NaN / Inf values, or integers without ``data.integer_range``.
    """
    if isinstance(data, Tensor):
        data = as_float(data, options.integer_range, f"`{name}`")
    out = check_reference_data(
        data, sample_shape, options.encode_fn, batch_key=options.select, device=device, name=name
    )
    bad = int((~torch.isfinite(out.flatten(1)).all(1)).sum())
    if bad:
        raise MemwatchError(f"`{name}` holds {bad} of {len(out)} samples with NaN/Inf values; drop them first")
    return out


def _describe(err: BaseException, setting: str) -> str:
    """A fault in one line: memwatch's own message, or the exception the user's ``setting`` raised."""
    return str(err) if isinstance(err, MemwatchError) else f"`{setting}` raised {err!r}"


def space_message(shape: tuple[int, ...] | None, probes: Sequence[int], uses: str) -> str:
    """Why training samples of ``shape`` cannot be compared with probes of shape ``probes``."""
    return (
        f"{uses} compare training samples with the probes, but the training batches hold samples of shape {shape} "
        f"and the probes have shape {tuple(probes)} (`data.sample_shape`, or the model's config): pass "
        "`data.sample_shape` to match the data, `data.select` to point at the samples, or a `data.encode_fn` "
        "that maps the batches there"
    )


# ---------------------------------------------------------------------- what a batch holds
def batch_sample_shape(batch: Any, batch_key: Any = None) -> tuple[int, ...]:
    """The shape of one sample of a training batch: ``batch[batch_key]`` for dict batches, else
    the batch itself or its first tensor (tuple / list / dict), without the batch dimension.

    Raises:
        MemwatchError: ``batch_key`` is not a key of a dict batch (the message lists the keys) or
            the batch is not a dict; no tensor in the batch; the tensor has no sample dimensions.

    Example:
        >>> batch_sample_shape({"label": torch.zeros(8), "image": torch.zeros(8, 3, 4, 4)}, "image")
        (3, 4, 4)
    """
    data = select_data(batch, batch_key)
    if data.ndim < 2:
        raise MemwatchError(
            f"the data tensor of the training batch has shape {tuple(data.shape)}, not [batch, *sample_shape]; "
            "pass `data.sample_shape` (and `data.select` to point at the samples)"
        )
    return tuple(data.shape[1:])


def select_data(batch: Any, select: Any, what: str = "the training batch") -> Tensor:
    """The data tensor of ``batch`` chosen by ``select`` (see :class:`memwatch.options.DataOptions`).

    Raises:
        MemwatchError: the selector finds no tensor (the message names ``data.select`` and what the batch holds).

    Example:
        >>> select_data((torch.zeros(4), torch.ones(4, 2)), 1).shape
        torch.Size([4, 2])
    """
    if callable(select):
        out = select(batch)
        if not isinstance(out, Tensor):
            raise MemwatchError(f"`data.select` returned a {type(out).__name__} for {what}, not a tensor")
        return out
    if isinstance(select, str):
        if not isinstance(batch, Mapping) or not isinstance(batch.get(select), Tensor):
            keys = list(batch) if isinstance(batch, Mapping) else f"none (a {type(batch).__name__})"
            raise MemwatchError(f"`data.select`={select!r} is not a key of a tensor in {what}; its keys: {keys}")
        return batch[select]
    if isinstance(select, int):
        ok = isinstance(batch, Sequence) and select < len(batch) and isinstance(batch[select], Tensor)
        if not ok:
            raise MemwatchError(
                f"`data.select`={select} is not the index of a tensor in {what} (a {type(batch).__name__})"
            )
        return batch[select]
    try:
        return first_tensor(dict(batch) if isinstance(batch, Mapping) else batch)
    except MemwatchError as err:
        raise MemwatchError(
            f"memwatch cannot find a tensor in {what} (a {type(batch).__name__}); set `data.select` "
            "(a dict key, a tuple index or a function) or `data.sample_shape`"
        ) from err


# ---------------------------------------------------------------------- reference data
def check_reference_data(
    reference_data: Tensor | Iterable[Any],
    sample_shape: Sequence[int],
    encode_fn: Callable[[Tensor], Tensor] | None = None,
    *,
    batch_key: str | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    name: str = "reference_data",
) -> Tensor:
    """Training samples ``[N, *sample_shape]`` on the CPU, in the space of the probes.

    Args:
        reference_data: ``[N, ...]`` tensor, or an iterable of batches (tensors, or tuples / lists
            / dicts whose first tensor — ``batch[batch_key]`` for dicts — is the data).
        sample_shape: the probes' shape; the data must have it after ``encode_fn``.
        encode_fn: maps a chunk of data ``[b, ...]`` to the probes' space ``[b, *sample_shape]``
            (e.g. images → VAE latents,
            ``lambda x: vae.encode(x).latent_dist.mean * vae.config.scaling_factor``); called
            without gradients on chunks of ``batch_size`` samples moved to ``device``.
        batch_key: key of the data in dict batches.
        device: where ``encode_fn`` runs (default: where the data is).
        batch_size: samples per ``encode_fn`` call.
        name: the argument the errors name (``"heldout_data"`` for held-out samples).

    Returns:
        ``[N, *sample_shape]`` detached CPU tensor.

    Raises:
        MemwatchError: the data (after ``encode_fn``) is not shaped like the probes — the message
            names ``name`` / ``encode_fn`` and both shapes; fewer than 2 samples; no
            tensor in a batch; ``encode_fn`` fails or does not return a tensor.

    Example:
        >>> check_reference_data(torch.zeros(4, 3, 2, 2), (3, 2, 2)).shape
        torch.Size([4, 3, 2, 2])
    """
    shape = check_shape("sample_shape", sample_shape) or ()
    check_int("batch_size", batch_size, 1)
    if not isinstance(reference_data, (Tensor, Iterable)):
        raise MemwatchError(
            f"`{name}` must be a tensor [N, ...] or an iterable of batches, got {type(reference_data).__name__}"
        )
    batches = [reference_data] if isinstance(reference_data, Tensor) else reference_data
    parts = []
    for batch in batches:
        data = select_data(batch, batch_key, f"a `{name}` batch").detach()
        encoded = data if encode_fn is None else _encode(encode_fn, data, device, batch_size, name)
        if tuple(encoded.shape[1:]) != shape:
            raise MemwatchError(_space_message(tuple(data.shape[1:]), tuple(encoded.shape[1:]), shape, encode_fn, name))
        parts.append(encoded.cpu())
    total = sum(p.shape[0] for p in parts)
    if total < 2:
        raise MemwatchError(f"`{name}` must hold at least 2 samples, got {total}")
    return torch.cat(parts)


def _encode(encode_fn: Callable[[Tensor], Tensor], data: Tensor, device: Any, batch_size: int, name: str) -> Tensor:
    """``encode_fn`` over ``batch_size`` chunks of ``data`` (no gradients), concatenated on the CPU."""
    out = []
    with torch.no_grad():
        for chunk in data.split(batch_size):
            try:
                encoded = encode_fn(chunk if device is None else chunk.to(device))
            except Exception as err:  # noqa: BLE001 - the user function's error, re-raised with context
                if is_out_of_memory(err):
                    raise
                raise MemwatchError(
                    f"`encode_fn` fails on a `{name}` chunk of shape {tuple(chunk.shape)}: {type(err).__name__}: {err}"
                ) from err
            if not isinstance(encoded, Tensor):
                raise MemwatchError(f"`encode_fn` must return a tensor, got {type(encoded).__name__}")
            out.append(encoded.detach().cpu())
    return torch.cat(out)


def _space_message(
    given: tuple[int, ...],
    got: tuple[int, ...],
    shape: tuple[int, ...],
    encode_fn: Callable[..., Any] | None,
    name: str,
) -> str:
    if encode_fn is None:
        return (
            f"`{name}` samples have shape {given}, but the probes have shape {shape} (`data.sample_shape`); "
            "pass training samples in the space the model generates, or a `data.encode_fn` that maps them there "
            "(e.g. images → VAE latents for a latent model)"
        )
    return (
        f"`data.encode_fn` maps `{name}` samples of shape {given} to shape {got}, but the probes have shape "
        f"{shape} (`data.sample_shape`)"
    )


def batch_range(
    batch: Any, batch_key: Any = None, seen: tuple[float, float] | None = None
) -> tuple[float, float] | None:
    """``(min, max)`` of the finite values of a training batch's float data (chosen by
    ``batch_key``, see :func:`select_data`), widened by ``seen``; ``seen`` unchanged when the batch
    holds no finite float value."""
    try:
        x = select_data(batch, batch_key).detach()
    except MemwatchError:
        return seen
    x = x[torch.isfinite(x)] if x.is_floating_point() else x[:0]
    if x.numel() == 0:
        return seen
    lo, hi = (float(v) for v in torch.aminmax(x))
    return (lo, hi) if seen is None else (min(lo, seen[0]), max(hi, seen[1]))
