"""checks.memory: the bytes autograd keeps for the backward, by hooks and by walking the graph."""

import torch

from implicitdiff.checks.memory import graph_saved_bytes, saved_bytes, saved_bytes_and_output

F64 = torch.float64


def test_saved_bytes_counts_saved_outputs_not_inputs():
    x = torch.randn(7, 5, dtype=F64, requires_grad=True)
    assert saved_bytes(lambda: x * x, exclude=(x,)) == 0  # mul saves only its inputs
    assert saved_bytes(lambda: x.exp(), exclude=(x,)) == 7 * 5 * 8  # exp saves its output
    assert saved_bytes(lambda: x * x) == 7 * 5 * 8  # the one input storage, counted once
    assert saved_bytes(lambda: x.detach().exp()) == 0  # no graph, nothing kept


def test_a_graph_dropped_along_the_way_is_not_counted():
    x = torch.randn(100, dtype=F64, requires_grad=True)

    def fn():
        dropped = x.exp().sin()  # recorded, then discarded: not memory of the backward
        del dropped
        return x.exp()

    nbytes, out = saved_bytes_and_output(fn, exclude=(x,))
    assert nbytes == 100 * 8 and out.grad_fn is not None


def test_graph_walk_agrees_with_saved_tensor_hooks():
    x = torch.randn(7, 5, dtype=F64, requires_grad=True)
    A = torch.randn(5, 5, dtype=F64, requires_grad=True)

    def build():  # exp saves its output, sin its input (the exp's output), mul the sin: two 7×5 storages
        return ((x @ A).exp().sin() * x).sum()

    assert graph_saved_bytes(build(), exclude=(x, A)) == saved_bytes(build, exclude=(x, A)) == 2 * 7 * 5 * 8
    assert graph_saved_bytes(build()) == saved_bytes(build)


def test_graph_walk_sees_a_custom_functions_saved_tensors():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            y = t * t
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * y

    x = torch.randn(11, dtype=F64, requires_grad=True)
    assert graph_saved_bytes(Square.apply(x).sum(), exclude=(x,)) == 11 * 8
