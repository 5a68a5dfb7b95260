"""The score Jacobian as a batched, matrix-free linear operator, its J·v path verified.

For ``n`` samples at once and a per-sample function ``f: [n, D] -> [n, D]`` (the score at a fixed
``t``; row ``b`` of the output depends on row ``b`` of the input only) the operator applies the
block-diagonal Jacobian ``J = diag(J_1, …, J_n)``, ``J_b = ∂f_b/∂x_b`` ``[D, D]``:

    jvp(v)    = J v                       [n, D]
    vjp(u)    = Jᵀ u                      [n, D]
    matvec(v) = ½ (J + Jᵀ) v              [n, D]   (symmetric: the Hessian of log p_t)

A learned score is not exactly a gradient field, so J is not exactly symmetric
(``ScoreJacobian.SELF_ADJOINT`` is False); its symmetric part, applied by ``matvec`` and
``dense()``, is what the spectral routines see. ``Jᵀ u`` always comes from one reverse pass whose
graph is kept, so each product costs backward passes only. ``J v`` has four paths
(``JVP_MODES`` without ``"auto"``), on two backends:

=============  ===========  ====================================================================
mode           backend      ``J v``
=============  ===========  ====================================================================
``forward``    torch.func   forward-mode AD (``torch.func.jvp``); exact, one forward pass.
``reverse``    torch.func   double vjp: ``u ↦ Jᵀ u`` is linear and its vjp at ``v`` is ``J v``.
``autograd``   autograd     the same double vjp through ``torch.autograd.grad(create_graph=True)``
                            — works with old-style ``torch.autograd.Function`` s (static
                            ``forward(ctx, x)`` without ``setup_context``) that every
                            ``torch.func`` transform rejects.
``fd``         autograd     central difference ``(f(x + h v) - f(x - h v)) / 2h`` with
                            ``h = ε^{1/3} (1 + rms(x_b)) / rms(v_b)`` per sample (``ε`` the
                            dtype's machine epsilon): truncation error O(h²), rounding O(ε/h);
                            about 1e-10 relative in float64, 1e-4 in float32. Needs forward
                            passes only, so it works through ops without any J·v formula.
=============  ===========  ====================================================================

A path can fail loudly (an op without a forward-mode formula, an old-style Function) or — worse
— silently: through an op decorated with ``@once_differentiable`` the double vjp returns 0 for that
op's contribution while ``Jᵀ u`` is exact. :func:`adjoint_error` checks ``⟨u, J v⟩ = ⟨Jᵀ u, v⟩``
for random ``u, v``, and :func:`select_jvp_mode` (also what ``mode="auto"`` does) takes the first
path, in the order above, whose adjoint error is within ``rtol``. The test checks that ``J v`` is
consistent with ``Jᵀ u``; it cannot see a backward formula that is itself wrong but consistent
with the path's own J·v (a wrong, twice-differentiable custom backward).

Scaled-dot-product attention runs on its "math" backend inside the operator: the fused CPU/GPU
kernels have neither forward-mode nor double-backward formulas.

Products are never cleaned: a row whose derivatives are not finite (``sqrt`` at 0 inside the
model, say, with a finite output) comes back NaN / ±inf, and :meth:`ScoreJacobian.finite_rows`
says which rows those are.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from memwatch.errors import MemwatchError
from memwatch.validation import check_int

__all__ = [
    "ScoreJacobian",
    "JacobianPath",
    "select_jvp_mode",
    "adjoint_error",
    "default_rtol",
    "reference_jacobian",
    "map_chunks",
    "is_out_of_memory",
    "JVP_MODES",
]

JVP_MODES = ("auto", "forward", "reverse", "autograd", "fd")
"""Valid ``mode`` / ``jvp_mode`` values: ``"auto"`` (verified selection) and the four J·v paths,
tried by ``"auto"`` in this order."""

_PATH_ORDER = JVP_MODES[1:]
_PARTIAL_HINT = "an op without a double-backward formula, such as a @once_differentiable function"
_ONCE_DIFFERENTIABLE_HINT = f"J·v is 0 while Jᵀu is not — {_PARTIAL_HINT}"
_UNREACHED = f"the double backward does not reach the cotangent (J·v would be 0): {_PARTIAL_HINT}"


# ---------------------------------------------------------------------- backends
class _FuncGraph:
    """``torch.func`` backend: ``Jᵀ u`` through ``torch.func.vjp`` (graph kept); ``J v`` by forward
    mode or by the double vjp. Trusts its inputs (``x`` ``[n, D]``, ``fn`` flat)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self._fn, self._x = fn, x
        with _autodiff_context():
            out, self._vjp_fn = torch.func.vjp(fn, x)
        self.output = out.detach()
        self._double_vjp: Callable[[Tensor], tuple[Tensor]] | None = None

    def vjp(self, u: Tensor) -> Tensor:
        with _autodiff_context():
            return self._vjp_fn(u)[0].detach()

    def vjp_rows(self, basis: Tensor, chunk_size: int | None) -> Tensor:
        """``Jᵀ e`` for each ``e`` in ``basis`` ``[m, n, D]`` -> ``[m, n, D]``, vectorized with ``vmap``."""
        try:
            with _autodiff_context():
                return torch.func.vmap(lambda e: self._vjp_fn(e)[0].detach(), chunk_size=chunk_size)(basis)
        except RuntimeError as err:  # an op without a batching rule: one product at a time
            if is_out_of_memory(err):
                raise
            return torch.stack([self.vjp(e) for e in basis])

    def jvp_forward(self, v: Tensor) -> Tensor:
        with _autodiff_context():
            return torch.func.jvp(self._fn, (self._x,), (v,))[1].detach()

    def jvp_reverse(self, v: Tensor) -> Tensor:
        with _autodiff_context():
            if self._double_vjp is None:
                _, self._double_vjp = torch.func.vjp(lambda u: self._vjp_fn(u)[0], torch.zeros_like(self.output))
            return self._double_vjp(v)[0].detach()


class _AutogradGraph:
    """``torch.autograd`` backend (no ``torch.func``): ``Jᵀ u`` by ``torch.autograd.grad`` on one
    kept graph; ``J v`` by double backward or by a central difference. Trusts its inputs."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> None:
        self._fn = fn
        self._x = x.detach().requires_grad_(True)
        with _autodiff_context():
            self._out = fn(self._x)
        if not self._out.requires_grad:
            raise RuntimeError("the output of `fn` does not depend on its input through autograd")
        self.output = self._out.detach()
        self._cotangent: Tensor | None = None  # w, with g = Jᵀ w recorded twice-differentiably
        self._transposed: Tensor | None = None

    def vjp(self, u: Tensor) -> Tensor:
        with _autodiff_context():
            return torch.autograd.grad(self._out, self._x, u, retain_graph=True)[0].detach()

    def vjp_rows(self, basis: Tensor, chunk_size: int | None) -> Tensor:
        """``Jᵀ e`` for each ``e`` in ``basis`` ``[m, n, D]`` -> ``[m, n, D]``, batched in chunks."""
        parts = []
        for chunk in basis.split(chunk_size or basis.shape[0]):
            try:
                with _autodiff_context():
                    grads = torch.autograd.grad(self._out, self._x, chunk, retain_graph=True, is_grads_batched=True)
                parts.append(grads[0].detach())
            except RuntimeError as err:  # no batching rule inside the backward: one product at a time
                if is_out_of_memory(err):
                    raise
                parts.append(torch.stack([self.vjp(e) for e in chunk]))
        return torch.cat(parts)

    def jvp_double(self, v: Tensor) -> Tensor:
        with _autodiff_context():
            if self._transposed is None:
                self._cotangent = torch.zeros_like(self.output, requires_grad=True)
                (self._transposed,) = torch.autograd.grad(self._out, self._x, self._cotangent, create_graph=True)
            if not self._transposed.requires_grad:
                raise RuntimeError(_UNREACHED)
            try:
                return torch.autograd.grad(self._transposed, self._cotangent, v, retain_graph=True)[0].detach()
            except RuntimeError as err:
                if "not have been used in the graph" not in str(err):
                    raise
                raise RuntimeError(_UNREACHED) from err

    def jvp_central(self, v: Tensor) -> Tensor:
        eps = torch.finfo(v.dtype).eps
        x = self._x.detach()
        rms_x = x.pow(2).mean(1, keepdim=True).sqrt()
        rms_v = v.pow(2).mean(1, keepdim=True).sqrt().clamp_min(eps)
        h = eps ** (1 / 3) * (1 + rms_x) / rms_v  # [n, 1]; a zero row of v gives a zero product
        with torch.no_grad():  # forward passes only
            return (self._fn(x + h * v) - self._fn(x - h * v)) / (2 * h)


# mode -> (backend, name of its J·v method, description)
_PATHS: dict[str, tuple[type, str, str]] = {
    "forward": (_FuncGraph, "jvp_forward", "forward-mode AD"),
    "reverse": (_FuncGraph, "jvp_reverse", "double vjp through torch.func"),
    "autograd": (_AutogradGraph, "jvp_double", "double backward through torch.autograd"),
    "fd": (_AutogradGraph, "jvp_central", "central finite difference, O(h²) error"),
}


# ---------------------------------------------------------------------- operator
class ScoreJacobian:
    """Block-diagonal Jacobian of a per-sample function at ``x``, as a linear operator.

    ``J = diag(J_1, …, J_n)``, ``J_b = ∂f_b/∂x_b`` ``[D, D]``; products act on ``[n, D]``.

    Args:
        fn: per-sample function ``[n, *shape] -> [n, *shape]``.
        x: ``[n, *shape]`` point at which to linearize.
        mode: how to compute ``J v``, one of ``JVP_MODES`` (see the module docstring). A named path
            is used as is, without a check (``"forward"`` runs one zero-tangent jvp at once, so an
            unsupported model raises here). ``"auto"`` runs :func:`select_jvp_mode` on ``fn`` at
            ``x`` (one adjoint pair per sample, default ``rtol``; costs about four extra products
            per construction, so callers that build many operators should select once and pass
            the mode) and keeps the first path that passes, with a ``RuntimeWarning`` when that
            is not forward mode; when none passes, it warns with the reasons and
            :meth:`jvp` (hence :meth:`matvec`) returns NaN — not measured — while :meth:`vjp` and
            :meth:`dense` still work if some backend could run ``fn``.
        generator: randomness of the ``"auto"`` adjoint test; ``None`` = a generator seeded with 0
            (so ``"auto"`` repeats). Unused by the named modes.

    Attributes:
        output: ``[n, D]`` ``fn(x)`` flattened (detached).
        mode: the J·v path in use (one of ``JVP_MODES[1:]``), or ``None`` when ``"auto"`` found no
            consistent path.
        path: the :class:`JacobianPath` chosen by ``"auto"``; ``None`` for a named mode.
        SELF_ADJOINT: False — ``J`` is not symmetric; ``matvec`` applies its symmetric part.

    Raises:
        MemwatchError: ``mode`` not in ``JVP_MODES``; ``"auto"`` and no backend can run ``fn``.

    Example:
        >>> A = torch.randn(3, 3)
        >>> op = ScoreJacobian(lambda x: x @ A.T, torch.randn(2, 3))
        >>> op.mode, torch.allclose(op.jvp(torch.eye(3)[:2]), A[:, :2].T)
        ('forward', True)
    """

    SELF_ADJOINT = False

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        x: Tensor,
        mode: str = "auto",
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        if mode not in JVP_MODES:
            raise MemwatchError(f"`mode` must be one of {JVP_MODES}, got {mode!r}")
        self.n = x.shape[0]
        self.sample_shape = tuple(x.shape[1:])
        self.dim = x[0].numel()
        # its own memory: forward AD refuses a primal whose rows share it (a probe repeated by ``expand``)
        self._x = x.detach().reshape(self.n, self.dim).contiguous()
        self._fn = fn
        self.path: JacobianPath | None = None
        if mode == "auto":
            gen = torch.Generator(device="cpu").manual_seed(0) if generator is None else generator
            self.path, graphs = _select(self._flat_fn, self._x, _PATH_ORDER, gen, None, 1)
            self._adopt(self.path, graphs)
        else:
            backend, jvp, _ = _PATHS[mode]
            self._graph = backend(self._flat_fn, self._x)
            self._jvp = getattr(self._graph, jvp)
            self.mode = mode
            if mode == "forward":
                self._jvp(torch.zeros_like(self._x))
        self.output = self._graph.output

    # ------------------------------------------------------------------ products
    def vjp(self, u: Tensor) -> Tensor:
        """``Jᵀ u`` ``[n, D]`` for ``u`` ``[n, D]`` (or ``[n, *shape]``)."""
        return self._graph.vjp(self._check(u, "u"))

    def jvp(self, v: Tensor) -> Tensor:
        """``J v`` ``[n, D]`` for ``v`` ``[n, D]`` (or ``[n, *shape]``), by the path ``self.mode``."""
        return self._jvp(self._check(v, "v"))

    def matvec(self, v: Tensor) -> Tensor:
        """``½ (J + Jᵀ) v`` ``[n, D]`` for ``v`` ``[n, D]``: the symmetric part of ``J``."""
        v = self._check(v, "v")
        return 0.5 * (self._jvp(v) + self._graph.vjp(v))

    def dense(self, symmetric: bool = True, chunk_size: int | None = None) -> Tensor:
        """The Jacobian ``[n, D, D]`` (``J_b[i, j] = ∂f_bi/∂x_bj``), ``½ (J + Jᵀ)`` if ``symmetric``.

        Costs ``D`` vjp products (so it does not depend on the J·v path), vectorized in chunks of
        ``chunk_size`` basis vectors (``None``: all ``D`` at once; memory grows with ``n · chunk_size``).
        """
        basis = torch.eye(self.dim, dtype=self._x.dtype, device=self._x.device)
        basis = basis[:, None, :].expand(self.dim, self.n, self.dim)
        jac = rearrange(self._graph.vjp_rows(basis, chunk_size), "i b j -> b i j")
        return 0.5 * (jac + jac.transpose(1, 2)) if symmetric else jac

    def finite_rows(self, product: Tensor | None = None) -> Tensor:
        """``[n]`` bool: True where ``output`` (and ``product`` ``[n, D]``, if given) is finite.

        Products are returned as computed, NaN / ±inf included; this mask says which samples they
        are not valid for (e.g. a finite score with NaN derivatives).
        """
        ok = torch.isfinite(self.output).all(1)
        if product is not None:
            ok = ok & torch.isfinite(product.reshape(self.n, -1)).all(1)
        return ok

    # ------------------------------------------------------------------ private
    def _flat_fn(self, x_flat: Tensor) -> Tensor:
        out = self._fn(x_flat.reshape(-1, *self.sample_shape))
        return out.reshape(x_flat.shape[0], self.dim)

    def _check(self, v: Tensor, name: str) -> Tensor:
        if v.shape[0] != self.n or v[0].numel() != self.dim:
            raise MemwatchError(f"`{name}` must have shape [n={self.n}, D={self.dim}], got {tuple(v.shape)}")
        return v.reshape(self.n, self.dim)

    def _adopt(self, path: JacobianPath, graphs: dict[type, object]) -> None:
        """Keep the selected path's backend; without one, J·v is NaN (not measured)."""
        if path.consistent:
            backend, jvp, description = _PATHS[path.mode]
            self._graph, self.mode = graphs[backend], path.mode
            self._jvp = getattr(self._graph, jvp)
            if path.mode != "forward":
                rejected = "; ".join(f"{m}: {o}" for m, o in path.tried.items() if m != path.mode)
                warnings.warn(
                    f"memwatch: J·v path {rejected}; memwatch falls back to {path.mode} mode "
                    f"({description}; {path.tried[path.mode]})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        usable = [g for g in graphs.values() if not isinstance(g, BaseException)]
        if not usable:
            raise MemwatchError(f"`fn` cannot be differentiated by any backend: {path.message}")
        warnings.warn(f"memwatch: {path.message}; J·v is reported as NaN", RuntimeWarning, stacklevel=3)
        self._graph, self.mode = usable[0], None
        self._jvp = lambda v: torch.full_like(v, math.nan)


# ---------------------------------------------------------------------- verification
@dataclass(frozen=True)
class JacobianPath:
    """The outcome of :func:`select_jvp_mode`.

    Attributes:
        mode: the first path (one of ``JVP_MODES[1:]``) that passed the adjoint test; ``None`` if none did.
        consistent: whether ``mode`` passed, i.e. its J·v agrees with Jᵀu to ``rtol``.
        adjoint_error: the largest per-sample adjoint error of ``mode`` (finite samples only);
            when none passed, the smallest over the paths that ran (NaN if none ran).
        message: one line naming the chosen path and why the earlier ones were rejected (an
            exception's text or an adjoint error), or why every path was rejected.
        tried: for each path tried, in order, its outcome as text.
    """

    mode: str | None
    consistent: bool
    adjoint_error: float
    message: str
    tried: dict[str, str] = field(default_factory=dict)


def default_rtol(dtype: torch.dtype) -> float:
    """Largest adjoint error a path may have: ``1e-6`` for float64, ``1e-3`` for float32, ``3e-2`` below.

    Exact AD paths sit near machine precision (about 1e-15 / 1e-6); the ``"fd"`` path's
    O(h²) + O(ε/h) error (about 1e-10 / 1e-4) passes with room to spare; a broken path (a zero or
    partial J·v) is off by O(1) on the adjoint test of :func:`adjoint_error`.
    """
    if dtype == torch.float64:
        return 1e-6
    return 1e-3 if dtype == torch.float32 else 3e-2


def adjoint_error(op: ScoreJacobian, generator: torch.Generator, num_vectors: int = 2) -> Tensor:
    """Per-sample adjoint test of the operator's J·v against its Jᵀu.

    For ``num_vectors`` random pairs per sample, with ``u, g ~ N(0, I)`` ``[n, D]`` drawn from
    ``generator`` and ``v = g/‖g‖ + Jᵀu/‖Jᵀu‖`` (the second term makes the test see a wrong J·v at
    O(1) instead of O(1/√D), as a purely random ``v`` would):

        err_b = |⟨u, J v⟩ − ⟨Jᵀ u, v⟩| / (‖u‖ ‖J v‖ + ‖Jᵀ u‖ ‖v‖ + tiny)

    maximized over the pairs. 0 for an exact pair of products (up to rounding, ~1e-15 in float64);
    ≈ 0.7 when J·v is 0 and Jᵀu is not.

    Args:
        op: the operator under test.
        generator: source of ``u`` and ``g`` (on its own device; moved to the operator's).
        num_vectors: pairs per sample, ``>= 1``.

    Returns:
        ``[n]`` errors in ``[0, 1]``; NaN for a sample whose products are not finite.

    Raises:
        MemwatchError: ``num_vectors < 1``.
    """
    check_int("num_vectors", num_vectors, 1)
    return _adjoint(op._graph, op._jvp, op._x, generator, num_vectors)[0]


def select_jvp_mode(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    preferred: str = "auto",
    *,
    generator: torch.Generator,
    rtol: float | None = None,
    num_vectors: int = 2,
) -> JacobianPath:
    """Choose the first J·v path for ``fn`` at ``x`` whose adjoint test passes.

    Paths are tried in the order ``"forward"``, ``"reverse"``, ``"autograd"``, ``"fd"`` (a named
    ``preferred`` path first, then the others in that order). A path is rejected when building it
    or a product raises (``RuntimeError`` / ``NotImplementedError``; out-of-memory is re-raised),
    or when its :func:`adjoint_error`, maximized over the samples with finite products, exceeds
    ``rtol`` (or no sample has finite products). Costs about one forward pass per backend and
    ``num_vectors`` (jvp + vjp) per path tried.

    Call it once per model (at the first check) and pass ``result.mode`` on as ``jvp_mode``;
    if ``result.consistent`` is False, no J·v of this model can be trusted (``result.message``
    says why) and its sharpness is not measured.

    Args:
        fn: per-sample function ``[n, *shape] -> [n, *shape]``.
        x: ``[n, *shape]`` a few representative inputs (e.g. two probes at the check's noise level).
        preferred: one of ``JVP_MODES``; a named path is tried first.
        generator: randomness of the adjoint test (same generator state, same result).
        rtol: largest adjoint error accepted, in ``(0, 1)``; ``None`` = :func:`default_rtol` of ``x.dtype``.
        num_vectors: adjoint-test pairs per sample, ``>= 1``.

    Returns:
        :class:`JacobianPath`.

    Raises:
        MemwatchError: ``preferred`` not in ``JVP_MODES``, ``rtol`` not in ``(0, 1)``, ``num_vectors < 1``.

    Example:
        >>> path = select_jvp_mode(torch.nn.Tanh(), torch.randn(2, 3), generator=torch.Generator().manual_seed(0))
        >>> path.mode, path.consistent
        ('forward', True)
    """
    if preferred not in JVP_MODES:
        raise MemwatchError(f"`preferred` must be one of {JVP_MODES}, got {preferred!r}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise MemwatchError(f"`rtol` must be a number in (0, 1) or None, got {rtol!r}")
    check_int("num_vectors", num_vectors, 1)
    n, shape = x.shape[0], tuple(x.shape[1:])
    flat = x.detach().reshape(n, -1)

    def flat_fn(z: Tensor) -> Tensor:
        return fn(z.reshape(-1, *shape)).reshape(z.shape[0], -1)

    order = _PATH_ORDER if preferred == "auto" else (preferred, *(m for m in _PATH_ORDER if m != preferred))
    return _select(flat_fn, flat, order, generator, rtol, num_vectors)[0]


def _select(
    flat_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    order: tuple[str, ...],
    generator: torch.Generator,
    rtol: float | None,
    num_vectors: int,
) -> tuple[JacobianPath, dict[type, object]]:
    """Try the paths in ``order``; the path and the backends built (or the error building each)."""
    rtol = default_rtol(x.dtype) if rtol is None else float(rtol)
    graphs: dict[type, object] = {}
    tried: dict[str, str] = {}
    errors: list[float] = []
    for mode in order:
        backend, jvp, _ = _PATHS[mode]
        try:
            if backend not in graphs:
                graphs[backend] = _build(backend, flat_fn, x)
            if isinstance(graphs[backend], BaseException):
                raise graphs[backend]
            err, zero_jv = _adjoint(graphs[backend], getattr(graphs[backend], jvp), x, generator, num_vectors)
        except (RuntimeError, NotImplementedError) as exc:
            if is_out_of_memory(exc):
                raise
            tried[mode] = f"failed ({type(exc).__name__}: {_first_line(exc)})"
            continue
        finite = torch.isfinite(err)
        if not bool(finite.any()):
            tried[mode] = f"products not finite for any of the {x.shape[0]} sample(s)"
            continue
        worst = float(err[finite].max())
        errors.append(worst)
        note = "" if bool(finite.all()) else f"; {int((~finite).sum())} of {x.shape[0]} sample(s) not finite, ignored"
        if worst <= rtol:
            tried[mode] = f"adjoint error {worst:.1e} <= rtol {rtol:.0e}{note}"
            message = f"J·v by {mode} ({tried[mode]})" + _rejected(tried, mode)
            return JacobianPath(mode, True, worst, message, tried), graphs
        if bool(zero_jv[finite].all()):
            hint = f"{_ONCE_DIFFERENTIABLE_HINT}; "
        elif mode in ("reverse", "autograd"):
            hint = f"J·v misses part of the Jacobian ({_PARTIAL_HINT}); "
        else:
            hint = ""
        tried[mode] = f"{hint}adjoint error {worst:.2g} > rtol {rtol:.0e}{note}"
    summary = "; ".join(f"{m}: {o}" for m, o in tried.items())
    message = f"no J·v path passes the adjoint test ({summary})"
    return JacobianPath(None, False, min(errors, default=math.nan), message, tried), graphs


def _build(backend: type, flat_fn: Callable[[Tensor], Tensor], x: Tensor) -> object:
    """The backend on ``fn`` at ``x``, or the (non-OOM) error that building it raised."""
    try:
        return backend(flat_fn, x)
    except (RuntimeError, NotImplementedError) as exc:
        if is_out_of_memory(exc):
            raise
        return exc


def _adjoint(graph, jvp, x: Tensor, generator: torch.Generator, num_vectors: int) -> tuple[Tensor, Tensor]:
    """``(err [n], zero_jv [n])``: adjoint errors as in :func:`adjoint_error`, and whether J·v was 0
    for every pair while Jᵀu was not."""
    tiny = torch.finfo(x.dtype).tiny
    errs, zero = [], []
    for _ in range(num_vectors):
        u, g = (torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype) for _ in range(2))
        u, g = u.to(x.device), g.to(x.device)
        ju = graph.vjp(u)
        ju_norm = ju.norm(dim=1, keepdim=True)
        v = g / g.norm(dim=1, keepdim=True) + torch.where(ju_norm > 0, ju / ju_norm.clamp_min(tiny), 0.0)
        jv = jvp(v)
        gap = ((u * jv).sum(1) - (ju * v).sum(1)).abs()
        scale = u.norm(dim=1) * jv.norm(dim=1) + ju_norm[:, 0] * v.norm(dim=1) + tiny
        errs.append(gap / scale)
        zero.append((jv == 0).all(1) & (ju_norm[:, 0] > 0))
    err = torch.stack(errs).amax(0)  # NaN propagates
    return err, torch.stack(zero).all(0)


def _rejected(tried: dict[str, str], chosen: str) -> str:
    others = [f"{m}: {o}" for m, o in tried.items() if m != chosen]
    return f"; rejected {'; '.join(others)}" if others else ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


# ---------------------------------------------------------------------- helpers
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
