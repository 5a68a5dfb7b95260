"""The score Jacobian as a batched, matrix-free linear operator.

For ``n`` samples at once and a per-sample function ``f: [n, D] -> [n, D]`` (the score at a fixed
``t``; row ``b`` of the output depends on row ``b`` of the input only) the operator applies the
block-diagonal Jacobian ``J = diag(J_1, …, J_n)``, ``J_b = ∂f_b/∂x_b`` ``[D, D]``:

    jvp(v)    = J v                       [n, D]
    vjp(u)    = Jᵀ u                      [n, D]
    matvec(v) = ½ (J + Jᵀ) v              [n, D]   (symmetric: the Hessian of log p_t)

A learned score is not exactly a gradient field, so J is not exactly symmetric; its symmetric
part is what the spectral routines see. One forward pass with a graph is kept (``vjp``), so each
product costs backward passes only.

Two ways to get ``J v``:

* ``"forward"``: forward-mode AD (``torch.func.jvp``), one forward pass with tangents.
* ``"reverse"``: the double-vjp trick — ``u ↦ Jᵀ u`` is linear, and its vjp with cotangent ``v`` is
  ``J v``. Needs only reverse-mode formulas, which every op has (attention and group norm in
  real UNets lack forward-mode formulas).

Scaled-dot-product attention runs on its "math" backend inside the operator: the fused CPU/GPU
kernels have neither forward-mode nor double-backward formulas.

``mode="auto"`` tries forward mode once and falls back to reverse mode with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
from einops import rearrange
from torch import Tensor

from memwatch.errors import MemwatchError

__all__ = ["ScoreJacobian", "reference_jacobian", "map_chunks", "is_out_of_memory", "JVP_MODES"]

JVP_MODES = ("auto", "forward", "reverse")


class ScoreJacobian:
    """Block-diagonal Jacobian of a per-sample function at ``x``, as a linear operator.

    Args:
        fn: per-sample function ``[n, *shape] -> [n, *shape]``.
        x: ``[n, *shape]`` point at which to linearize.
        mode: how to compute ``J v``, one of ``JVP_MODES``.

    Attributes:
        output: ``[n, D]`` ``fn(x)`` flattened (detached).
        mode: the mode in use after any fallback (``"forward"`` or ``"reverse"``).

    Example:
        >>> A = torch.randn(3, 3)
        >>> op = ScoreJacobian(lambda x: x @ A.T, torch.randn(2, 3))
        >>> torch.allclose(op.jvp(torch.eye(3)[:2]), A[:, :2].T)
        True
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, mode: str = "auto") -> None:
        if mode not in JVP_MODES:
            raise MemwatchError(f"`mode` must be one of {JVP_MODES}, got {mode!r}")
        self.n = x.shape[0]
        self.sample_shape = tuple(x.shape[1:])
        self.dim = x[0].numel()
        self._x = x.detach().reshape(self.n, self.dim)
        self._fn = fn
        with _autodiff_context():
            out, self._vjp_fn = torch.func.vjp(self._flat_fn, self._x)
        self.output = out.detach()
        self._jvp_reverse: Callable[[Tensor], tuple[Tensor]] | None = None
        self.mode = "reverse" if mode == "reverse" else self._try_forward(strict=mode == "forward")

    # ------------------------------------------------------------------ products
    def vjp(self, u: Tensor) -> Tensor:
        """``Jᵀ u`` for ``u`` ``[n, D]``."""
        with _autodiff_context():
            return self._vjp_fn(u)[0].detach()

    def jvp(self, v: Tensor) -> Tensor:
        """``J v`` for ``v`` ``[n, D]``."""
        with _autodiff_context():
            if self.mode == "forward":
                return torch.func.jvp(self._flat_fn, (self._x,), (v,))[1].detach()
            if self._jvp_reverse is None:
                _, self._jvp_reverse = torch.func.vjp(lambda u: self._vjp_fn(u)[0], torch.zeros_like(self.output))
            return self._jvp_reverse(v)[0].detach()

    def matvec(self, v: Tensor) -> Tensor:
        """``½ (J + Jᵀ) v`` for ``v`` ``[n, D]``."""
        return 0.5 * (self.jvp(v) + self.vjp(v))

    def dense(self, symmetric: bool = True, chunk_size: int | None = None) -> Tensor:
        """The Jacobian ``[n, D, D]`` (``J_b[i, j] = ∂f_bi/∂x_bj``), symmetrized if asked.

        Costs ``D`` vjp products, vectorized with ``vmap`` in chunks of ``chunk_size`` basis vectors
        (``None``: all ``D`` at once; memory grows with ``n · chunk_size``).
        """
        basis = torch.eye(self.dim, dtype=self._x.dtype, device=self._x.device)
        basis = basis[:, None, :].expand(self.dim, self.n, self.dim)
        with _autodiff_context():
            try:
                rows = torch.func.vmap(lambda e: self._vjp_fn(e)[0].detach(), chunk_size=chunk_size)(basis)
            except RuntimeError as err:  # an op without a batching rule: one product at a time
                if is_out_of_memory(err):
                    raise
                rows = torch.stack([self.vjp(e) for e in basis])
        jac = rearrange(rows, "i b j -> b i j")
        return 0.5 * (jac + jac.transpose(1, 2)) if symmetric else jac

    # ------------------------------------------------------------------ private
    def _flat_fn(self, x_flat: Tensor) -> Tensor:
        out = self._fn(x_flat.reshape(self.n, *self.sample_shape))
        return out.reshape(self.n, self.dim)

    def _try_forward(self, strict: bool) -> str:
        """Check forward mode works on this function; return the mode to use."""
        try:
            with _autodiff_context():
                torch.func.jvp(self._flat_fn, (self._x,), (torch.zeros_like(self._x),))
        except (RuntimeError, NotImplementedError) as err:
            if strict:
                raise
            warnings.warn(
                f"forward-mode AD is not supported by this model ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); memwatch falls back to reverse mode (double vjp)",
                RuntimeWarning,
                stacklevel=3,
            )
            return "reverse"
        return "forward"


@contextlib.contextmanager
def _autodiff_context() -> Iterator[None]:
    """Gradients on, attention on the differentiable-twice "math" SDPA backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def reference_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Dense per-sample Jacobians ``[n, D, D]`` with ``torch.func.jacfwd``, one sample at a time.

    A slow, independent reference for tests: ``fn`` is called on single-sample batches ``[1, *shape]``.
    """
    shape = x.shape[1:]

    def single(xi: Tensor) -> Tensor:
        return fn(xi.reshape(1, *shape)).reshape(-1)

    return torch.stack([torch.func.jacfwd(single)(xi.reshape(-1)) for xi in x])


def map_chunks(fn: Callable[[slice], tuple[Tensor, ...]], n: int, max_batch: int | None) -> tuple[Tensor, ...]:
    """Concatenate ``fn(rows)`` over consecutive row slices of at most ``max_batch`` rows.

    Memory then grows with ``max_batch``, not with ``n``. On out-of-memory (accelerator or CPU
    allocator) the chunk is halved (with a warning) and retried; a single row that does not fit raises.
    """
    parts, start, step = [], 0, min(max_batch or n, n)
    while start < n:
        rows = slice(start, min(start + step, n))
        try:
            parts.append(fn(rows))
        except RuntimeError as err:
            if step == 1 or not is_out_of_memory(err):
                raise
            step = max(1, step // 2)
            warnings.warn(f"memwatch: out of memory, retrying with max_batch={step}", RuntimeWarning, stacklevel=2)
            continue
        start = rows.stop
    return tuple(torch.cat(p) for p in zip(*parts))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure: ``torch.OutOfMemoryError`` on an accelerator, a
    ``RuntimeError`` from the CPU allocator."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)
