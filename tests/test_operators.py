import warnings

import pytest
import torch
from autograd_ops import NoForwardTanh

from memwatch.operators import ScoreJacobian, map_chunks, reference_jacobian


def _mlp(d=6, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, 32), torch.nn.Tanh(), torch.nn.Linear(32, d)).double()


class _ReverseOnly(torch.nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.lin = _mlp(d)

    def forward(self, x):
        return self.lin(NoForwardTanh.apply(x))


@pytest.mark.parametrize("mode", ["forward", "reverse", "autograd"])
def test_products_match_dense_reference(mode):
    net = _mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = reference_jacobian(net, x)
    op = ScoreJacobian(net, x, mode=mode)
    v = torch.randn(5, 6, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.jvp(v), torch.einsum("bij,bj->bi", ref, v), **tol)
    torch.testing.assert_close(op.vjp(v), torch.einsum("bji,bj->bi", ref, v), **tol)
    sym = 0.5 * (ref + ref.transpose(1, 2))
    torch.testing.assert_close(op.matvec(v), torch.einsum("bij,bj->bi", sym, v), **tol)
    torch.testing.assert_close(op.dense(), sym, **tol)
    torch.testing.assert_close(op.dense(symmetric=False), ref, **tol)
    torch.testing.assert_close(op.output, net(x).detach())


@pytest.mark.parametrize("mode", ["forward", "reverse", "autograd"])
def test_a_probe_repeated_without_a_copy_is_differentiated_like_its_copies(mode):
    """Lanczos repeats each probe for its start vectors (``einops.repeat``: a view whose rows share
    memory, for one probe); forward AD refuses such a primal unless the operator copies it."""
    net, x = _mlp(), torch.randn(1, 6, dtype=torch.float64)
    op = ScoreJacobian(net, x.expand(3, 6), mode=mode)
    torch.testing.assert_close(op.dense(symmetric=False), reference_jacobian(net, x).expand(3, 6, 6))


def test_image_shaped_inputs_are_flattened():
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    op = ScoreJacobian(conv, x)
    assert op.dim == 32 and op.output.shape == (3, 32)
    torch.testing.assert_close(op.dense(symmetric=False), reference_jacobian(conv, x))


def test_falls_back_to_reverse_mode_with_a_warning():
    net = _ReverseOnly()
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="falls back to reverse mode"):
        op = ScoreJacobian(net, x, mode="auto")
    assert op.mode == "reverse"
    ref = torch.stack([torch.autograd.functional.jacobian(lambda z: net(z[None])[0], xi) for xi in x])
    v = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(op.jvp(v), torch.einsum("bij,bj->bi", ref, v))
    with pytest.raises((RuntimeError, NotImplementedError)):
        ScoreJacobian(net, x, mode="forward")


def test_forward_mode_is_kept_when_supported():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ScoreJacobian(_mlp(), torch.randn(2, 6, dtype=torch.float64)).mode == "forward"
    with pytest.raises(ValueError, match="`mode` must be one of"):
        ScoreJacobian(_mlp(), torch.randn(2, 6, dtype=torch.float64), mode="fwd")


def test_map_chunks_caps_rows_and_concatenates():
    seen = []

    def fn(rows):
        seen.append(rows.stop - rows.start)
        return (torch.arange(rows.start, rows.stop),)

    (out,) = map_chunks(fn, 10, 4)
    assert seen == [4, 4, 2] and out.tolist() == list(range(10))


def test_map_chunks_halves_on_out_of_memory():
    sizes = []

    def fn(rows):
        sizes.append(rows.stop - rows.start)
        if rows.stop - rows.start > 3:
            raise torch.OutOfMemoryError("fake")
        return (torch.arange(rows.start, rows.stop),)

    with pytest.warns(RuntimeWarning, match="max_batch=3"):
        (out,) = map_chunks(fn, 6, 8)
    assert out.tolist() == list(range(6)) and sizes == [6, 3, 3]


def test_map_chunks_treats_cpu_allocator_failure_as_out_of_memory():
    def fn(rows):
        if rows.stop - rows.start > 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return (torch.arange(rows.start, rows.stop),)

    with pytest.warns(RuntimeWarning, match="max_batch=2"):
        (out,) = map_chunks(fn, 4, 4)
    assert out.tolist() == [0, 1, 2, 3]


def test_map_chunks_reraises_other_errors():
    def fn(rows):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        map_chunks(fn, 4, 4)
