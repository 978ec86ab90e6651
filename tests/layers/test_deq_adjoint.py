"""picard_adjoint with the fixed-point map's own products (``map_mv``) against the plain ``mv``: the same
solution, statuses and counts; only ``map_vjp`` is called when present."""

import pytest
import torch

from implicitdiff import Status
from implicitdiff.implicit.fixed_point_adjoint import picard_adjoint


def _picard_adjoint(mv, R, **kw):
    """The map's own products passed explicitly (``Products.map_mv``) where the test's ``mv`` carries them."""
    return picard_adjoint(mv, R, map_mv=getattr(mv, "map_vjp", None), **kw)

D = torch.float64


def _contractions(rhos, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(len(rhos), n, n, generator=g, dtype=D)
    A = A / torch.linalg.matrix_norm(A, 2)[:, None, None] * torch.tensor(rhos, dtype=D)[:, None, None]
    return A, torch.randn(len(rhos), n, generator=g, dtype=D)


def _products(A, log):
    """``mv(x) = Aᵀx − x`` per sample, plain and as an object carrying ``map_vjp(x) = Aᵀx``; ``log`` counts calls."""
    def tm(x):
        log.append("map_vjp")
        return (A.mT @ x.unsqueeze(-1)).squeeze(-1)

    def plain(x):
        log.append("mv")
        return (A.mT @ x.unsqueeze(-1)).squeeze(-1) - x

    class WithMap:
        map_vjp = staticmethod(tm)

        def __call__(self, x):
            return plain(x)

    return plain, WithMap()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_map_vjp_gives_the_plain_iteration(seed):
    """On random contractions (rates 0.3–0.8, one zero right-hand side) both forms converge to
    x = −(I − Aᵀ)⁻¹ R with the same statuses, counts and residuals; with map_vjp, mv is never called."""
    A, R = _contractions([0.3, 0.8, 0.6, 0.5], seed=seed)
    R[2] = 0.0
    log = []
    plain, with_map = _products(A, log)
    x0, i0 = _picard_adjoint(plain, R, rtol=1e-12, atol=0.0, max_iter=300)
    assert set(log) == {"mv"}
    log.clear()
    x1, i1 = _picard_adjoint(with_map, R, rtol=1e-12, atol=0.0, max_iter=300)
    assert set(log) == {"map_vjp"} and len(log) == int(i1.iterations[0])
    exact = -torch.linalg.solve(torch.eye(6, dtype=D) - A.mT, R.unsqueeze(-1)).squeeze(-1)
    assert i0.status.tolist() == i1.status.tolist() == [Status.SUCCESS] * 4
    assert i0.iterations.tolist() == i1.iterations.tolist()
    torch.testing.assert_close(x1, x0, rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(x1, exact, rtol=1e-10, atol=1e-12)
    assert bool((x1[2] == 0).all())
    torch.testing.assert_close(i1.residual, i0.residual, rtol=1e-3, atol=1e-15)
    assert bool((i1.residual <= 1e-12).all())


def test_map_vjp_statuses_on_failures():
    """A diverging sample (A = 2I) stopping the batch, then a NaN right-hand side: the same statuses, counts and
    iterates either way."""
    A, R = _contractions([0.5, 0.95, 0.3], n=5, seed=3)
    A = torch.cat([A, 2.0 * torch.eye(5, dtype=D)[None]])
    R = torch.cat([R, torch.ones(1, 5, dtype=D)])
    log = []
    plain, with_map = _products(A, log)
    runs = [_picard_adjoint(mv, R, rtol=1e-12, atol=0.0, max_iter=60) for mv in (plain, with_map)]
    # the batch stops when sample 3 diverges (2^27 > 1e8): samples 0 and 1 are then unconverged
    for x, info in runs:
        assert info.status.tolist() == [Status.MAX_ITERATIONS, Status.MAX_ITERATIONS, Status.SUCCESS,
                                        Status.DIVERGED]
        assert float(info.residual[3]) > 1e8
    assert runs[0][1].iterations.tolist() == runs[1][1].iterations.tolist()
    torch.testing.assert_close(runs[1][0][:3], runs[0][0][:3], rtol=1e-10, atol=1e-13)
    R[1] = float("nan")
    runs = [_picard_adjoint(mv, R, rtol=1e-12, atol=0.0, max_iter=60) for mv in (plain, with_map)]
    assert runs[0][1].status.tolist() == runs[1][1].status.tolist()
    assert runs[1][1].status.tolist()[1] == Status.NONFINITE


@pytest.mark.parametrize("dtype, rtol, recursion", [(torch.float64, 1e-6, True), (torch.float64, 1e-10, True),
                                                     (torch.float64, 1e-15, False), (torch.float32, 1e-6, False)])
def test_residual_recursion_only_where_its_rounding_is_negligible(dtype, rtol, recursion):
    """With map_vjp, float64 at ordinary tolerances propagates the residual itself (G ← (∂f/∂z)ᵀ G: the
    products are taken of the residuals, never of the iterates after the first); at a tolerance near
    rounding and in float32 it takes G as the difference of two iterates.  Either way the *true*
    residual ‖(∂f/∂z)ᵀx − x − R‖ of the returned x meets the tolerance the status claims."""
    A, R = _contractions([0.3, 0.7, 0.9], n=6, seed=4)
    A, R = A.to(dtype), R.to(dtype)
    seen = []

    def tm(x):
        seen.append(x.clone())
        return (A.mT @ x.unsqueeze(-1)).squeeze(-1)

    class WithMap:
        map_vjp = staticmethod(tm)

        def __call__(self, x):
            return tm(x) - x

    x, info = _picard_adjoint(WithMap(), R, rtol=rtol, atol=0.0, max_iter=200)   # the default
    # the recursion multiplies residuals, whose norms shrink; the plain form multiplies iterates (norm ≥ ‖R‖/2)
    late = torch.linalg.vector_norm(seen[-1], dim=-1) / torch.linalg.vector_norm(R, dim=-1)
    assert bool((late < 1e-2).all()) == recursion
    if rtol < 1e-14:   # below rounding: not claimed converged unless it truly is
        true = torch.linalg.vector_norm((A.mT @ x.unsqueeze(-1)).squeeze(-1) - x - R, dim=-1)
        ok = info.status == Status.SUCCESS
        assert bool((true[ok] <= 2 * rtol * torch.linalg.vector_norm(R, dim=-1)[ok]).all())
        return
    assert info.status.tolist() == [Status.SUCCESS] * 3
    true = torch.linalg.vector_norm((A.mT @ x.unsqueeze(-1)).squeeze(-1) - x - R, dim=-1)
    assert bool((true <= rtol * torch.linalg.vector_norm(R, dim=-1) * (1 + 1e-3)).all()), (true, rtol)
