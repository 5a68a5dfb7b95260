"""Autograd Functions without forward-mode AD or without a second derivative, shared by the operator and fault tests."""

import torch
from torch.autograd.function import once_differentiable


class NoForwardTanh(torch.autograd.Function):
    """tanh with a backward formula but no forward-mode (jvp) formula."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)


class OnceTanh(NoForwardTanh):
    """tanh whose backward is @once_differentiable (like many C++/CUDA extension ops)."""

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return NoForwardTanh.backward(ctx, grad)


class OldStyleTanh(torch.autograd.Function):
    """tanh as an old-style Function: forward(ctx, x), no setup_context (torch.func rejects it)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2)
