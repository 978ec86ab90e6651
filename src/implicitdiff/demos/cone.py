"""The cone demo: learn a hidden ellipse from projections onto it, through an SOCP layer.

A point ``y`` of the plane is projected onto the ellipse ``E = {x : ‖Lx − c‖ ≤ 1}`` by a
second-order cone program, written in cvxpy and made a layer by :class:`~implicitdiff.nn.CvxpyLayer`::

    x*(y; L, c) = argmin_x ‖x − y‖²   s.t.   ‖Lx − c‖₂ ≤ 1

We see 192 points and their projections onto a hidden ellipse ``(L*, c*)`` (generated here, no
downloads) and learn ``L`` (2 × 2) and ``c`` from the unit circle by Adam on the squared error
between ``x*(y; L, c)`` and the observed projections: every gradient comes from the implicit
derivative of the cone program's solution map (``cone_program``'s backward), through the affine
map from ``(y, L, c)`` to the cone program's data.  The ellipse is identified by its shape matrix
``M = LᵀL`` and its centre ``L⁻¹c`` (``L`` itself only up to a rotation on the left), which the
demo reports per epoch, with a plot ``cone_demo.png`` of the true, initial and learned ellipses.

Three sections: 1. training (a table per epoch); 2. one batch's solver report
(``layer.last_info``); 3. the gradient of the layer against central finite differences in float64.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..checks.check_gradients import check_gradients
from ..nn import CvxpyLayer
from ._optional import progress, pyplot, threads

__all__ = ["run", "projection_layer", "true_ellipse", "ellipse_error"]

F64 = torch.float64


def projection_layer(layer_cls=CvxpyLayer):
    """The SOCP ``argmin ‖x − y‖² s.t. ‖Lx − c‖ ≤ 1`` as a layer called ``layer(y, L, c) -> (x,)``."""
    import cvxpy as cp

    x = cp.Variable(2)
    y, L, c = cp.Parameter(2), cp.Parameter((2, 2)), cp.Parameter(2)
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - y)), [cp.norm(L @ x - c, 2) <= 1])
    return layer_cls(problem, parameters=[y, L, c], variables=[x])


def true_ellipse():
    """The hidden ``(L*, c*)``: semi-axes 1.6 and 0.7, rotated by 30°, centred at (0.6, −0.4)."""
    t = math.radians(30.0)
    R = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=F64)
    L = torch.diag(torch.tensor([1 / 1.6, 1 / 0.7], dtype=F64)) @ R.T
    centre = torch.tensor([0.6, -0.4], dtype=F64)
    return L, L @ centre


def ellipse_error(L, c, L_true, c_true):
    """``(‖M − M*‖_F / ‖M*‖_F, ‖centre − centre*‖)`` with ``M = LᵀL``, ``centre = L⁻¹c``."""
    M, M_true = L.T @ L, L_true.T @ L_true
    centre, centre_true = torch.linalg.solve(L, c), torch.linalg.solve(L_true, c_true)
    return float(torch.linalg.norm(M - M_true) / torch.linalg.norm(M_true)), float(torch.linalg.norm(centre - centre_true))


def run(args) -> dict:
    """Entry point of ``implicitdiff demo cone`` (``args.quick``: fewer epochs; ``args.out``: plot folder)."""
    quick = bool(getattr(args, "quick", False))
    out = getattr(args, "out", None) or "."
    t0 = time.perf_counter()
    with threads(1):
        results = {"train": _train(epochs=8 if quick else 24, n_points=64 if quick else 192)}
        results["report"] = _report(results["train"]["layer"], results["train"]["params"])
        results["gradient"] = _gradient_check(results["train"]["layer"])
    results["plot"] = _plot(results, out)
    results["train"].pop("layer")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return results


def _train(epochs: int, n_points: int, steps_per_epoch: int = 5, layer_cls=CvxpyLayer) -> dict:
    print("\n== 1. learning a hidden ellipse from projections onto it (an SOCP layer) ==")
    g = torch.Generator().manual_seed(0)
    layer = projection_layer(layer_cls)
    L_true, c_true = true_ellipse()
    y = 3.0 * (2 * torch.rand(n_points, 2, generator=g, dtype=F64) - 1)
    y_test = 3.0 * (2 * torch.rand(n_points, 2, generator=g, dtype=F64) - 1)
    with torch.no_grad():
        (target,) = layer(y, L_true, c_true)
        (target_test,) = layer(y_test, L_true, c_true)
    L = torch.eye(2, dtype=F64).requires_grad_()
    c = torch.zeros(2, dtype=F64, requires_grad=True)
    opt = torch.optim.Adam([L, c], lr=0.06)
    history = []
    print(f"  {'epoch':>5}  {'train mse':>10}  {'test mse':>10}  {'shape err':>9}  {'centre err':>10}")
    every = max(1, epochs // 8)
    for epoch in progress(range(epochs + 1), total=epochs + 1, desc="epochs"):
        train = None
        for _ in range(steps_per_epoch if epoch else 0):
            (x,) = layer(y, L, c)
            loss = (x - target).square().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            train = float(loss.detach())  # before the step: the epoch's last training loss
        if epoch % every and epoch != epochs:
            continue
        with torch.no_grad():
            if train is None:
                train = float((layer(y, L, c)[0] - target).square().sum(-1).mean())
            test = float((layer(y_test, L, c)[0] - target_test).square().sum(-1).mean())
        shape, centre = ellipse_error(L.detach(), c.detach(), L_true, c_true)
        history.append(dict(epoch=epoch, train=train, test=test, shape=shape, centre=centre))
        print(f"  {epoch:5d}  {train:10.2e}  {test:10.2e}  {shape:9.3f}  {centre:10.3f}")
    print(f"  learned M = LᵀL within {100 * history[-1]['shape']:.1f}% of the hidden one, centre within "
          f"{history[-1]['centre']:.3f} (from the unit circle at the origin: {100 * history[0]['shape']:.0f}%, "
          f"{history[0]['centre']:.2f})")
    return {"history": history, "layer": layer, "params": (y, L.detach(), c.detach()),
            "ellipses": {"true": (L_true, c_true), "learned": (L.detach(), c.detach()),
                         "initial": (torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64))},
            "points": (y, target)}


def _report(layer, params) -> dict:
    print("\n== 2. the solver's report on the last batch (layer.last_info) ==")
    y, L, c = params
    with torch.no_grad():
        layer(y, L, c)
    info = layer.last_info
    status = info.status.reshape(-1)
    print(f"  {int((status == 0).sum())} of {status.numel()} solved; relative residual ≤ "
          f"{float(info.residual.max()):.1e}; at most {int(info.iterations.max())} interior-point iterations")
    return {"solved": int((status == 0).sum()), "batch": status.numel(), "residual": float(info.residual.max())}


def _gradient_check(layer) -> dict:
    print("\n== 3. the layer's gradient against central finite differences (float64) ==")
    L_true, c_true = true_ellipse()
    y = torch.tensor([[2.0, 1.5], [-1.8, 0.3]], dtype=F64)  # outside: the constraint is active
    w = torch.tensor([[0.3, -1.1], [0.7, 0.2]], dtype=F64)

    def loss(L, c):
        return (layer(y, L, c)[0] * w).sum()

    report = check_gradients(loss, L_true.clone(), c_true.clone())
    print(report)
    return {"passed": bool(report)}


def _plot(results: dict, out: str):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    tr = results["train"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.6))
    s = torch.linspace(0, 2 * math.pi, 200, dtype=F64)
    circle = torch.stack([torch.cos(s), torch.sin(s)], 1)
    for name, style in (("initial", ":"), ("true", "-"), ("learned", "--")):
        L, c = tr["ellipses"][name]
        pts = torch.linalg.solve(L, (circle + c).T).T  # {x : Lx − c = u, ‖u‖ = 1}
        a1.plot(pts[:, 0], pts[:, 1], style, lw=2, label=name)
    y, target = tr["points"]
    a1.scatter(y[:, 0], y[:, 1], s=4, c="tab:gray", label="points y")
    a1.scatter(target[:, 0], target[:, 1], s=4, c="k", label="projections")
    a1.set(aspect="equal", title="hidden, initial and learned ellipse")
    a1.legend(fontsize=8, loc="upper left")
    h = tr["history"]
    a2.semilogy([r["epoch"] for r in h], [r["train"] for r in h], label="train mse")
    a2.semilogy([r["epoch"] for r in h], [r["test"] for r in h], label="test mse")
    a2.semilogy([r["epoch"] for r in h], [r["shape"] for r in h], label="shape error")
    a2.set(xlabel="epoch", title="training through the SOCP layer")
    a2.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cone_demo.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
