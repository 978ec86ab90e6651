"""CvxpyLayer: the probe's findings — forward mode (torch.func.jvp, jacfwd, forward_ad), an empty batch, and
messages that name the user's parameters (a NaN, a parameter given twice)."""

import pytest
import torch

from implicitdiff._core.errors import InputError
from implicitdiff.implicit.sparse_affine import SparseAffineFn

from .test_cvxpy_layer import PROBLEMS, _directions, random_values

cp = pytest.importorskip("cvxpy")

F64 = torch.float64


# ----------------------------------------------------------------------------- forward mode
def test_sparse_affine_jvp_and_jacfwd_equal_the_dense_map():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(4, 6, generator=g, dtype=F64) * (torch.rand(4, 6, generator=g) < 0.5)
    M = dense.to_sparse().coalesce()
    Mt = M.t().coalesce()
    p, v = torch.randn(3, 6, generator=g, dtype=F64), torch.randn(3, 6, generator=g, dtype=F64)
    out, tangent = torch.func.jvp(lambda q: SparseAffineFn.apply(q, M, Mt), (p,), (v,))
    assert torch.allclose(out, p @ dense.T, atol=1e-14) and torch.allclose(tangent, v @ dense.T, atol=1e-14)
    J = torch.func.jacfwd(lambda q: SparseAffineFn.apply(q[None], M, Mt)[0])(p[0])
    assert torch.allclose(J, dense, atol=1e-14)


@pytest.mark.parametrize("name", ["readme", "socp", "psd", "exp"])
def test_forward_mode_through_the_layer_equals_reverse_mode_and_finite_differences(name):
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, variables, rtol=1e-10)
    values = random_values(params, seed=11)
    d = _directions(params, values, seed=4)
    outs, tangents = torch.func.jvp(lambda *ps: layer(*ps), tuple(values), tuple(d))
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
    # reverse mode: ⟨w, J d⟩ = ⟨Jᵀ w, d⟩
    leaves = [v.clone().requires_grad_() for v in values]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(layer(*leaves), ws)), leaves)
    forward = sum(float((t * w).sum()) for t, w in zip(tangents, ws))
    reverse = sum(float((gr * t).sum()) for gr, t in zip(grads, d))
    assert abs(forward - reverse) <= 1e-8 * max(1.0, abs(reverse)), (forward, reverse)
    # finite differences of the forward alone, per output entry
    h = 1e-5
    plus = layer(*[v + h * t for v, t in zip(values, d)])
    minus = layer(*[v - h * t for v, t in zip(values, d)])
    for t, a, b in zip(tangents, plus, minus):
        fd = (a - b) / (2 * h)
        assert torch.allclose(t, fd, atol=1e-6 * max(1.0, float(fd.abs().max()))), (t, fd)
    assert max(float(t.abs().max()) for t in tangents) > 1e-3  # not a vacuous comparison
    # the forward_ad API gives the same tangents
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(v, t) for v, t in zip(values, d)]
        for t, o in zip(tangents, layer(*duals)):
            assert torch.allclose(fwAD.unpack_dual(o).tangent, t, atol=1e-12)


def test_jacfwd_through_the_layer_equals_jacrev():
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS["socp"]()
    layer = CvxpyLayer(prob, params, variables, rtol=1e-10)
    values = random_values(params, seed=12)

    def first(*ps):
        return layer(*ps)[0]

    Jf = torch.func.jacfwd(first, argnums=(0, 1))(*values)
    Jr = torch.func.jacrev(first, argnums=(0, 1))(*values)
    for a, b in zip(Jf, Jr):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-9)
    assert float(Jr[0].abs().max()) > 1e-3


# ----------------------------------------------------------------------------- an empty batch
@pytest.mark.parametrize("shared", [False, True], ids=["all-batched", "one-shared"])
def test_an_empty_batch_gives_empty_results_and_zero_gradients(shared):
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS["psd"]()
    con = prob.constraints[1]  # y ≥ 0: its dual variable is read from the dual solution
    layer = CvxpyLayer(prob, params, variables + [con.dual_variables[0]])
    values = [v.expand((0,) + v.shape) for v in random_values(params, seed=3)]
    if shared:
        values[1] = random_values(params, seed=3)[1]
    leaves = [v.clone().requires_grad_() for v in values]
    outs = layer(*leaves)
    assert [tuple(o.shape) for o in outs] == [(0, 3, 3), (0, 2), (0, 2)]
    info = layer.last_info
    assert info.status.shape == info.residual.shape == info.iterations.shape == (0,)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves)
    assert all(g.shape == v.shape and not bool(g.any()) for g, v in zip(grads, values))


# ----------------------------------------------------------------------------- messages naming the parameters
def _named_problem():
    x = cp.Variable(2)
    A, b = cp.Parameter((3, 2), name="A"), cp.Parameter(3, name="b")
    prob = cp.Problem(cp.Minimize(0.5 * cp.pnorm(A @ x - b, p=1)), [x >= 0])
    return prob, A, b, x


@pytest.mark.parametrize("on_failure", ["raise", "nan"])
def test_a_nan_parameter_is_named_in_the_error(on_failure):
    from implicitdiff.nn import CvxpyLayer

    prob, A, b, x = _named_problem()
    layer = CvxpyLayer(prob, [A, b], [x], on_failure=on_failure)
    At, bt = torch.ones(3, 2, dtype=F64), torch.ones(3, dtype=F64)
    with pytest.raises(InputError, match=r"parameter 1 \(cvxpy Parameter 'b'\) contains 1 NaN or Inf"):
        layer(At, torch.tensor([1.0, float("nan"), 1.0], dtype=F64))
    batched = At.repeat(2, 1, 1)
    batched[1, 0, 0] = batched[1, 2, 1] = float("inf")  # in the second element of a batch
    with pytest.raises(InputError, match=r"parameter 0 \(cvxpy Parameter 'A'\) contains 2 NaN or Inf"):
        layer(batched, bt)


def test_a_parameter_given_twice_is_named():
    from implicitdiff.nn import CvxpyLayer

    prob, A, b, x = _named_problem()
    with pytest.raises(InputError, match=r"each once \(given more than once: \['A'\]\)"):
        CvxpyLayer(prob, [A, A, b], [x])
    with pytest.raises(InputError, match=r"given more than once: \['A'\]; missing: \['b'\]"):
        CvxpyLayer(prob, [A, A], [x])


# ----------------------------------------------------------------------------- vmap over grad / vjp / jvp / jacrev
@pytest.mark.parametrize("shared", [False, True], ids=["all-vmapped", "rest-shared"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_vmap_over_derivatives_of_the_layer_equals_a_loop(name, shared):
    """``vmap`` over ``grad`` / ``vjp`` / ``jvp`` / ``jacrev`` of the layer (the saved solution is itself vmapped:
    cone_program's ``_Derivative`` folds it into the batch) equals the same derivative taken element by element."""
    from implicitdiff.nn import CvxpyLayer

    prob, params, variables = PROBLEMS[name]()
    layer = CvxpyLayer(prob, params, variables)
    V = 3
    batched = random_values(params, batch=(V,), seed=5)
    args = [batched[0]] + (random_values(params, seed=6)[1:] if shared else batched[1:])
    dims = (0,) + ((None,) if shared else (0,)) * (len(args) - 1)
    gen = torch.Generator().manual_seed(7)
    direction = torch.randn(args[0].shape[1:], dtype=F64, generator=gen)  # a tangent of the first parameter
    weight = torch.randn(variables[0].shape, dtype=F64, generator=gen)  # a cotangent of the first variable

    def first(*ps):
        return layer(*ps)[0]

    def loss(*ps):
        return sum((o * o).sum() for o in layer(*ps))

    transforms = {
        "grad": torch.func.grad(loss),
        "vjp": lambda *ps: torch.func.vjp(first, *ps)[1](weight)[0],
        "jvp": lambda *ps: torch.func.jvp(lambda p0: first(p0, *ps[1:]), (ps[0],), (direction,))[1],
        "jacrev": torch.func.jacrev(first),
    }
    for what, fn in transforms.items():
        mapped = torch.func.vmap(fn, in_dims=dims)(*args)
        loop = torch.stack([fn(*[a[i] if d == 0 else a for a, d in zip(args, dims)]) for i in range(V)])
        assert mapped.shape == loop.shape, what
        torch.testing.assert_close(mapped, loop, rtol=1e-7, atol=1e-9, msg=what)
        assert float(loop.abs().max()) > 1e-3, what  # a derivative that is not trivially zero
