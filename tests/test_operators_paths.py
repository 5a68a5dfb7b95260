"""J·v paths: the adjoint test, path selection, and models that break one path or another.

Every reference is a dense ``torch.func.jacfwd`` Jacobian in float64 of the model or of its
mathematically identical twin built from plain torch ops (the custom Functions below have no
forward-mode formula, so jacfwd cannot run through them).
"""

import warnings

import pytest
import torch
from autograd_ops import OldStyleTanh, OnceTanh
from torch.autograd.function import once_differentiable

from memwatch.operators import (
    JVP_MODES,
    JacobianPath,
    ScoreJacobian,
    adjoint_error,
    default_rtol,
    reference_jacobian,
    select_jvp_mode,
)

D = 6
PATHS = ("forward", "reverse", "autograd", "fd")
EXACT = dict(rtol=1e-10, atol=1e-12)
FD = dict(rtol=1e-6, atol=1e-8)  # central difference in float64: O(h²) + O(ε/h) ≈ 1e-10 relative


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _layers(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(D, 16).double(), torch.nn.Linear(16, D).double()


class _WrongOnceTanh(OnceTanh):
    """A @once_differentiable tanh whose backward formula is wrong (1 - y instead of 1 - y²)."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y)


class _Net(torch.nn.Module):
    """``x ↦ [x +] W₂ act(W₁ x)``; ``act`` a plain function or a custom Function's ``apply``."""

    def __init__(self, act=torch.tanh, residual=False):
        super().__init__()
        self.lin1, self.lin2 = _layers()
        self.act, self.residual = act, residual

    def forward(self, x):
        y = self.lin2(self.act(self.lin1(x)))
        return x + y if self.residual else y


def _x(n=4, seed=1):
    return torch.randn(n, D, dtype=torch.float64, generator=_gen(seed))


def _assert_products_match(op, ref, v, jvp_tol):
    sym = 0.5 * (ref + ref.transpose(1, 2))
    torch.testing.assert_close(op.jvp(v), torch.einsum("bij,bj->bi", ref, v), **jvp_tol)
    torch.testing.assert_close(op.vjp(v), torch.einsum("bji,bj->bi", ref, v), **EXACT)
    torch.testing.assert_close(op.matvec(v), torch.einsum("bij,bj->bi", sym, v), **jvp_tol)
    torch.testing.assert_close(op.dense(symmetric=False), ref, **EXACT)
    torch.testing.assert_close(op.dense(), sym, **EXACT)


def test_jvp_modes_keep_the_old_names_and_add_the_new_paths():
    assert JVP_MODES == ("auto", *PATHS)


@pytest.mark.parametrize("mode", PATHS)
def test_adjoint_test_passes_for_a_smooth_mlp_in_every_mode(mode):
    op = ScoreJacobian(_Net(), _x(), mode=mode)
    err = adjoint_error(op, _gen(), num_vectors=3)
    assert err.shape == (4,) and bool(torch.isfinite(err).all())
    assert float(err.max()) < (1e-9 if mode == "fd" else 1e-14)
    assert float(err.max()) < default_rtol(torch.float64)


@pytest.mark.parametrize("residual", [False, True])
def test_adjoint_error_is_order_one_for_a_broken_jvp(residual):
    op = ScoreJacobian(_Net(OnceTanh.apply, residual=residual), _x(), mode="reverse")  # J·v silently misses tanh
    err = adjoint_error(op, _gen())
    assert bool((err > (1e-2 if residual else 0.3)).all()), err


def test_once_differentiable_op_rejects_the_double_vjp_and_falls_back_to_finite_differences():
    net, twin, x = _Net(OnceTanh.apply), _Net(), _x()
    path = select_jvp_mode(net, x, generator=_gen())
    assert path.consistent and path.mode == "fd" and path.adjoint_error < default_rtol(torch.float64)
    assert list(path.tried) == list(PATHS)
    assert "NotImplementedError" in path.tried["forward"]
    assert "J·v is 0 while Jᵀu is not" in path.tried["reverse"] and "@once_differentiable" in path.tried["reverse"]
    assert "does not reach the cotangent" in path.tried["autograd"]
    assert "rejected" in path.message and "reverse: J·v is 0" in path.message
    v = torch.randn(4, D, dtype=torch.float64, generator=_gen(2))
    _assert_products_match(ScoreJacobian(net, x, mode=path.mode), reference_jacobian(twin, x), v, FD)


def test_once_differentiable_op_in_a_residual_branch_is_caught_although_jvp_is_not_zero():
    net, twin, x = _Net(OnceTanh.apply, residual=True), _Net(residual=True), _x()
    v = torch.randn(4, D, dtype=torch.float64, generator=_gen(2))
    assert bool((ScoreJacobian(net, x, mode="reverse").jvp(v) != 0).any())  # silently partial: only x ↦ x
    path = select_jvp_mode(net, x, generator=_gen())
    assert path.consistent and path.mode == "fd"
    for mode in ("reverse", "autograd"):
        assert "misses part of the Jacobian" in path.tried[mode] and "> rtol" in path.tried[mode]
    with pytest.warns(RuntimeWarning, match="falls back to fd mode"):
        op = ScoreJacobian(net, x)
    assert op.mode == "fd" and op.path == select_jvp_mode(net, x, generator=_gen(0), num_vectors=1)
    _assert_products_match(op, reference_jacobian(twin, x), v, FD)


def test_old_style_function_works_through_the_autograd_backend():
    net, twin, x = _Net(OldStyleTanh.apply), _Net(), _x()
    path = select_jvp_mode(net, x, generator=_gen())
    assert path.consistent and path.mode == "autograd" and path.adjoint_error < 1e-14
    for mode in ("forward", "reverse"):
        assert "setup_context" in path.tried[mode]
        with pytest.raises(RuntimeError, match="setup_context"):
            ScoreJacobian(net, x, mode=mode)
    v = torch.randn(4, D, dtype=torch.float64, generator=_gen(2))
    ref = reference_jacobian(twin, x)
    _assert_products_match(ScoreJacobian(net, x, mode="autograd"), ref, v, EXACT)
    _assert_products_match(ScoreJacobian(net, x, mode="fd"), ref, v, FD)
    with pytest.warns(RuntimeWarning, match="setup_context.*falls back to autograd mode"):
        assert ScoreJacobian(net, x).mode == "autograd"


def test_no_consistent_path_is_reported_with_every_reason():
    net, x = _Net(_WrongOnceTanh.apply), _x()
    path = select_jvp_mode(net, x, generator=_gen())
    assert not path.consistent and path.mode is None
    assert list(path.tried) == list(PATHS)
    assert path.message.startswith("no J·v path passes the adjoint test")
    assert "forward: failed (NotImplementedError" in path.message
    assert "reverse: J·v is 0 while Jᵀu is not — an op without a double-backward formula" in path.message
    assert "autograd: failed (RuntimeError: the double backward does not reach the cotangent" in path.message
    assert "fd: adjoint error" in path.message and "> rtol 1e-06" in path.message
    assert 1e-3 < path.adjoint_error <= 1  # the finite difference sees the true J, the backward a wrong one
    with pytest.warns(RuntimeWarning, match="no J·v path passes.*J·v is reported as NaN"):
        op = ScoreJacobian(net, x)
    assert op.mode is None and not op.path.consistent
    v = torch.randn(4, D, dtype=torch.float64, generator=_gen(2))
    assert bool(torch.isnan(op.jvp(v)).all()) and bool(torch.isnan(op.matvec(v)).all())
    assert bool(torch.isfinite(op.vjp(v)).all())  # Jᵀu itself still runs (it is what the model's backward says)


def _kink(x):
    """Finite everywhere, NaN derivatives where x₀ = 0: sqrt(x₀²) differentiated as inf · 0."""
    return torch.tanh(x) + torch.sqrt(x[:, :1] ** 2)


@pytest.mark.parametrize("mode", PATHS)
def test_nan_derivatives_are_reported_per_row_and_kept(mode):
    x = _x()
    x[[1, 3], 0] = 0.0
    op = ScoreJacobian(_kink, x, mode=mode)
    assert op.finite_rows().tolist() == [True] * 4  # the output is finite
    v = torch.randn(4, D, dtype=torch.float64, generator=_gen(2))
    bad = [False, True, False, True]
    for product in (op.vjp(v), op.matvec(v)) + (() if mode == "fd" else (op.jvp(v),)):
        assert (~op.finite_rows(product)).tolist() == bad
        assert bool(torch.isnan(product[[1, 3]]).any(1).all())  # NaN kept, not zeroed
    good = [0, 2]
    ref = reference_jacobian(_kink, x[good])
    tol = FD if mode == "fd" else EXACT
    torch.testing.assert_close(op.matvec(v)[good], torch.einsum("bij,bj->bi", 0.5 * (ref + ref.mT), v[good]), **tol)
    assert bool(torch.isnan(op.dense()[[1, 3]]).any())


def test_selection_ignores_non_finite_rows_and_says_so():
    x = _x()
    x[1, 0] = 0.0
    path = select_jvp_mode(_kink, x, generator=_gen())
    assert path.consistent and path.mode == "forward"
    assert "1 of 4 sample(s) not finite, ignored" in path.tried["forward"]
    x[:, 0] = 0.0
    path = select_jvp_mode(_kink, x, generator=_gen())
    assert not path.consistent and "products not finite for any of the 4 sample(s)" in path.tried["forward"]


def test_selection_is_deterministic_given_a_generator():
    net, x = _Net(OnceTanh.apply, residual=True), _x()
    a = select_jvp_mode(net, x, generator=_gen(5))
    b = select_jvp_mode(net, x, generator=_gen(5))
    assert a == b and isinstance(a, JacobianPath)
    op = ScoreJacobian(_Net(), x, mode="reverse")
    torch.testing.assert_close(adjoint_error(op, _gen(3)), adjoint_error(op, _gen(3)), rtol=0, atol=0)
    fd = ScoreJacobian(_Net(), x, mode="fd")
    assert not torch.equal(adjoint_error(fd, _gen(3)), adjoint_error(fd, _gen(4)))


def test_preferred_path_is_tried_first():
    path = select_jvp_mode(_Net(), _x(), preferred="fd", generator=_gen())
    assert path.mode == "fd" and list(path.tried) == ["fd"]
    path = select_jvp_mode(_Net(OldStyleTanh.apply), _x(), preferred="reverse", generator=_gen())
    assert path.mode == "autograd" and list(path.tried) == ["reverse", "forward", "autograd"]


def test_auto_keeps_forward_mode_silently_for_a_smooth_model():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = ScoreJacobian(_Net(), _x())
    assert op.mode == "forward" and op.path.consistent and op.path.tried.keys() == {"forward"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(preferred="central"), r"`preferred` must be one of \('auto', 'forward', 'reverse', 'autograd', 'fd'\)"),
        (dict(rtol=0.0), r"`rtol` must be a number in \(0, 1\) or None, got 0.0"),
        (dict(rtol=2), r"`rtol`"),
        (dict(num_vectors=0), r"`num_vectors` must be a positive integer, got 0"),
    ],
)
def test_bad_selection_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_jvp_mode(_Net(), _x(), generator=_gen(), **kwargs)


def test_products_check_their_shape():
    op = ScoreJacobian(_Net(), _x(), mode="reverse")
    with pytest.raises(ValueError, match=r"`v` must have shape \[n=4, D=6\], got \(3, 6\)"):
        op.jvp(torch.zeros(3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="`num_vectors`"):
        adjoint_error(op, _gen(), num_vectors=0)


def test_tiny_diffusers_unet_ends_up_on_a_consistent_path():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' advice on casting to float64
        unet = diffusers.UNet2DModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8,
        ).double()
    unet.eval().requires_grad_(False)

    def fn(z):
        return unet(z, 10).sample

    x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=_gen(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback notice, if forward mode fails here
        op = ScoreJacobian(fn, x)  # "auto": select_jvp_mode on fn at x
    assert op.path.consistent and op.mode == op.path.mode and op.path.adjoint_error < 1e-12, op.path.message
    v = torch.randn(1, 192, dtype=torch.float64, generator=_gen(2))
    independent = ScoreJacobian(fn, x, mode="fd").jvp(v)  # forward passes only
    torch.testing.assert_close(op.jvp(v), independent, rtol=1e-6, atol=1e-8)
