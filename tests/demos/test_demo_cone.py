"""The cone demo runs (tiny), learns, and its gradient check passes."""

import math

import pytest
import torch

pytest.importorskip("cvxpy")

from implicitdiff.demos import cone as D  # noqa: E402


def test_tiny_training_learns_the_ellipse():
    result = D._train(epochs=4, n_points=24)
    h = result["history"]
    assert h[-1]["train"] < 0.5 * h[0]["train"] and h[-1]["shape"] < h[0]["shape"]


def test_true_ellipse_projections_are_projections():
    layer = D.projection_layer()
    L, c = D.true_ellipse()
    y = torch.tensor([[2.5, 0.0], [0.6, -0.4], [-2.0, -2.0]], dtype=torch.float64)
    (x,) = layer(y, L, c)
    r = torch.linalg.vector_norm((x @ L.T) - c, dim=-1)
    assert torch.allclose(x[1], y[1], atol=1e-7)  # the centre is inside: its own projection
    assert torch.allclose(r[[0, 2]], torch.ones(2, dtype=torch.float64), atol=1e-7)  # outside: on the boundary
    # the optimality condition: y − x is normal to the ellipse at x, i.e. parallel to Lᵀ(Lx − c)
    for i in (0, 2):
        n = L.T @ (L @ x[i] - c)
        d = y[i] - x[i]
        assert abs(float(n[0] * d[1] - n[1] * d[0])) < 1e-6 * float(n.norm() * d.norm()) and float(n @ d) > 0


def test_demo_runs_quick(tmp_path, capsys):
    class Args:
        quick, out = True, str(tmp_path)

    results = D.run(Args())
    assert results["gradient"]["passed"] and results["report"]["solved"] == results["report"]["batch"]
    assert math.isfinite(results["train"]["history"][-1]["train"])
    assert "learning a hidden ellipse" in capsys.readouterr().out
