"""The seed demo: why a solve ``A y = x`` with many solutions needs an explicit solution map.

The note this library grew from: knowing ``∂L/∂y₁, ∂L/∂y₂`` and ``x = a₁y₁ + a₂y₂``,
what is ``∂L/∂x``?  Not one number: ``y₁ = f(x)`` is free, and each choice
(a *selection*) is a different function ``y(x)`` with a different gradient.
Every valid choice satisfies ``a₁f'(x) + a₂g'(x) = 1`` — in matrix form
``A dy/dx = I`` — and they agree exactly when ``ambiguity(A, ∂L/∂y) = 0``.

The demo prints four sections and writes ``seed_demo.png``:

1. the 1×2 example with the note's two selections ``f(x) = x/(2a₁)`` and
   ``f(x) = 0`` (and the minimum-norm one), autograd next to the closed forms;
2. the 2×2 example, where ``dy/dx = A⁻¹`` is unique;
3. ``A J = I`` checked with ``torch.func.jacrev`` for ``min_norm``,
   ``Pinned`` and ``Nearest`` on a 3×5 matrix — three different ``J``;
4. a 3×5 matrix ``A`` learned by gradient descent through
   ``linear_solve(A, b, selection="min_norm")``.
"""

from __future__ import annotations

import os
import time

import torch

from ..layers.linear_solve import ambiguity, linear_solve
from ..linalg.selection import Nearest, Pinned
from ._optional import progress, pyplot, threads

__all__ = ["main", "run", "seed_1x2", "seed_2x2", "jacobian_identity", "fit"]

F64 = torch.float64


def main(args) -> dict:
    """Entry point of ``implicitdiff demo seed`` (``args.out``: folder of the plot; ``args.quick``)."""
    return run(out=getattr(args, "out", None) or ".", quick=bool(getattr(args, "quick", False)))


def run(*, out: str = ".", quick: bool = False, plot: bool = True, progress_bar: bool = True) -> dict:
    """Run the four sections, print them, write ``seed_demo.png`` into ``out``; return the numbers."""
    t0 = time.perf_counter()
    with threads(1):  # tiny problems: one thread is fastest, and immune to a busy machine
        results = {
            "seed_1x2": seed_1x2(),
            "seed_2x2": seed_2x2(),
            "jacobian_identity": jacobian_identity(),
            "fit": fit(steps=60 if quick else 200, progress_bar=progress_bar),
        }
    results["plot"] = _plot(results, out) if plot else None
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return results


def _section(title: str) -> None:
    print(f"\n== {title} ==")


def _table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for k, r in enumerate([header, *rows]):
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def seed_1x2(a1: float = 1.0, a2: float = 2.0, x: float = 3.0, ybar=(1.0, 1.0)) -> dict:
    """``x = a₁y₁ + a₂y₂``: three selections, three gradients ``∂L/∂x`` for ``L = ȳ·y``."""
    _section(f"1. the seed, 1×2: x = a₁y₁ + a₂y₂ with a₁ = {a1:g}, a₂ = {a2:g}, x = {x:g}")
    A = torch.tensor([[a1, a2]], dtype=F64)
    g = torch.tensor(ybar, dtype=F64)
    g1, g2 = ybar
    print(f"One equation, two unknowns: y(x) is a choice. With L = ȳ·y, ȳ = ∂L/∂y = ({g1:g}, {g2:g}):")
    choices = {
        # the note's first selection: y₁ = f(x) = x / (2a₁), so y₂ = x / (2a₂); values depend on x
        "f(x) = x/(2a₁): Pinned([0], x/(2a₁))": (lambda x: Pinned([0], x / (2 * a1)),
                                                  g1 / (2 * a1) + g2 / (2 * a2), "ȳ₁/(2a₁) + ȳ₂/(2a₂)"),
        # the note's second selection: y₁ = f(x) = 0, so y₂ = x / a₂
        "f(x) = 0:       Pinned([0], 0.0)": (lambda x: Pinned([0], 0.0), g2 / a2, "ȳ₂/a₂"),
        # the minimum-norm solution y = A⁺x
        'min-norm:       "min_norm"': (lambda x: "min_norm", (a1 * g1 + a2 * g2) / (a1 ** 2 + a2 ** 2),
                                       "(a₁ȳ₁ + a₂ȳ₂)/(a₁² + a₂²)"),
    }
    rows, out = [], {}
    for name, (select, closed, formula) in choices.items():
        xt = torch.tensor([x], dtype=F64, requires_grad=True)
        y = linear_solve(A, xt, selection=select(xt))
        (g @ y).backward()
        dydx = torch.func.jacrev(lambda x: linear_solve(A, x, selection=select(x)))(xt.detach())  # (2, 1)
        identity = float((A @ dydx).squeeze())  # a₁f'(x) + a₂g'(x)
        grad = float(xt.grad)
        y = y.detach()
        rows.append((name, f"({float(y[0]):.3f}, {float(y[1]):.3f})", f"{identity:.6f}", f"{grad:.6f}",
                     f"{formula} = {closed:.6f}"))
        out[name] = {"y": y.tolist(), "grad": grad, "closed_form": closed, "a_dydx": identity}
    _table(("selection", "y = (y₁, y₂)", "a₁f' + a₂g'", "∂L/∂x (autograd)", "closed form"), rows)
    amb = float(ambiguity(A, g))
    print(f"ambiguity(A, ȳ) = {amb:.4f}  (> 0: the selections disagree, as the table shows)")
    a_dir = torch.tensor([a1, a2], dtype=F64)
    amb_row = float(ambiguity(A, a_dir))
    print(f"ambiguity(A, ȳ = (a₁, a₂)) = {amb_row:.1e}  (ȳ ⟂ null(A): every selection gives ∂L/∂x = "
          f"{float(a_dir @ a_dir) / (a1 ** 2 + a2 ** 2):g})")
    return {"selections": out, "ambiguity": amb, "ambiguity_row_space": amb_row}


def seed_2x2(A=((2.0, 1.0), (1.0, 3.0)), x=(1.0, 2.0), ybar=(1.0, -1.0)) -> dict:
    """``x₁ = a₁y₁ + a₂y₂, x₂ = a₃y₁ + a₄y₂``: ``dy/dx = A⁻¹``, ``∂L/∂x = A⁻ᵀ ȳ`` — one answer."""
    _section("2. the seed, 2×2: x₁ = a₁y₁ + a₂y₂, x₂ = a₃y₁ + a₄y₂")
    A = torch.tensor(A, dtype=F64)
    xt = torch.tensor(x, dtype=F64, requires_grad=True)
    g = torch.tensor(ybar, dtype=F64)
    J = torch.func.jacrev(lambda x: linear_solve(A, x))(xt.detach())
    (g @ linear_solve(A, xt)).backward()
    closed = torch.linalg.solve(A.mT, g)
    err_J = float((J - torch.linalg.inv(A)).abs().max())
    err_I = float((A @ J - torch.eye(2, dtype=F64)).abs().max())
    err_g = float((xt.grad - closed).abs().max())
    print(f"A = {A.tolist()}, x = {list(x)}, ȳ = {list(ybar)}")
    print(f"dy/dx (jacrev) = {[[round(v, 6) for v in r] for r in J.tolist()]}; max |dy/dx − A⁻¹| = {err_J:.1e}")
    print(f"max |A·dy/dx − I| = {err_I:.1e}")
    print(f"∂L/∂x (autograd) = {[round(v, 6) for v in xt.grad.tolist()]}; closed form A⁻ᵀȳ = "
          f"{[round(v, 6) for v in closed.tolist()]}; max diff {err_g:.1e}")
    amb = float(ambiguity(A, g))
    print(f"ambiguity(A, ȳ) = {amb:.1e}: a square invertible A has one solution map")
    return {"jacobian_err": err_J, "identity_err": err_I, "grad_err": err_g, "ambiguity": amb}


def jacobian_identity(m: int = 3, n: int = 5) -> dict:
    """``A J = I`` for three selections of a wide ``A``, whose Jacobians ``J = dy/db`` all differ."""
    _section(f"3. A·dy/db = I for every selection ({m}×{n} A, J by torch.func.jacrev)")
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(m, n, generator=gen, dtype=F64)
    b = torch.randn(m, generator=gen, dtype=F64)
    ybar = torch.randn(n, generator=gen, dtype=F64)
    y0 = torch.randn(n, generator=gen, dtype=F64)
    w = 0.5 + torch.rand(n, generator=gen, dtype=F64)
    pinned = list(range(m, n))
    selections = {
        '"min_norm"': "min_norm",
        f"Nearest(y0, weight)": Nearest(y0, w),
        f"Pinned({pinned}, v)": Pinned(pinned, torch.linspace(-1.0, 1.0, n - m, dtype=F64)),
    }
    Js = {name: torch.func.jacrev(lambda b, s=s: linear_solve(A, b, selection=s))(b) for name, s in selections.items()}
    J_mn = Js['"min_norm"']
    rows, out = [], {}
    for name, J in Js.items():
        err = float((A @ J - torch.eye(m, dtype=F64)).abs().max())
        diff = float((J - J_mn).abs().max())
        grad = J.mT @ ybar
        rows.append((name, f"{err:.1e}", f"{diff:.3f}", "(" + ", ".join(f"{v:+.3f}" for v in grad.tolist()) + ")"))
        out[name] = {"identity_err": err, "diff_from_min_norm": diff, "grad": grad.tolist()}
    _table(("selection", "max |A·J − I|", "max |J − J_min_norm|", "∂L/∂b = Jᵀȳ for a random ȳ"), rows)
    amb = float(ambiguity(A, ybar))
    print(f"ambiguity(A, ȳ) = {amb:.3f}: the part of ȳ in null(A) is what the selections disagree on")
    return {"selections": out, "ambiguity": amb}


def fit(*, m: int = 3, n: int = 5, k: int = 32, steps: int = 200, lr: float = 0.05, progress_bar: bool = True) -> dict:
    """Learn ``A`` (``m × n``) so that ``linear_solve(A, B, selection="min_norm")`` matches targets ``Y``.

    Targets ``Y = A_true⁺ B`` for ``k`` right-hand sides; the fit starts from a
    perturbed ``A_true`` and runs Adam on the mean squared error — gradients
    through the min-norm solve, reusing its QR factorization in backward.
    """
    _section(f"4. learning a {m}×{n} A through linear_solve(A, B, selection='min_norm'), {k} right-hand sides")
    gen = torch.Generator().manual_seed(2)
    A_true = torch.randn(m, n, generator=gen, dtype=F64)
    B = torch.randn(m, k, generator=gen, dtype=F64)
    Y = torch.linalg.pinv(A_true) @ B
    A = (A_true + 0.5 * torch.randn(m, n, generator=gen, dtype=F64)).requires_grad_(True)
    opt = torch.optim.Adam([A], lr=lr)
    losses = []
    t0 = time.perf_counter()
    for _ in progress(range(steps), total=steps, desc="fit", enabled=progress_bar):
        opt.zero_grad()
        loss = (linear_solve(A, B, selection="min_norm") - Y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
    _table(("step", "loss"), [(str(s), f"{losses[s]:.3e}") for s in marks])
    pinv_err = float((torch.linalg.pinv(A.detach()) - torch.linalg.pinv(A_true)).abs().max())
    print(f"loss {losses[0]:.3e} → {losses[-1]:.3e} in {steps} steps ({seconds:.2f} s); "
          f"max |A⁺ − A_true⁺| = {pinv_err:.3e}")
    return {"losses": losses, "pinv_err": pinv_err, "seconds": seconds}


def _plot(results: dict, out: str):
    plt = pyplot()
    if plt is None:
        print("\n(matplotlib is not installed: no plot; `pip install \"implicitdiff[demo]\"` adds it)")
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "seed_demo.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    sel = results["seed_1x2"]["selections"]
    names = [s.split(":")[0] for s in sel]
    pos = range(len(names))
    ax1.bar(pos, [v["grad"] for v in sel.values()], color="tab:blue", label="autograd (linear_solve)")
    ax1.scatter(pos, [v["closed_form"] for v in sel.values()], color="tab:red", zorder=3, label="closed form")
    ax1.set_xticks(list(pos), names)
    ax1.set_ylabel("∂L/∂x")
    ax1.set_title(f"x = a₁y₁ + a₂y₂: one x, three selections\nambiguity = {results['seed_1x2']['ambiguity']:.3f}")
    ax1.legend()
    ax2.semilogy(results["fit"]["losses"])
    ax2.set_xlabel("Adam step")
    ax2.set_ylabel("mean squared error")
    ax2.set_title("learning A through linear_solve(A, B, 'min_norm')")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"\nplot written to {path}")
    return path
