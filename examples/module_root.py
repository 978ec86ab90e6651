"""The pattern for an ``nn.Module`` inside ``implicitdiff.root``: lift its parameters with ``functional_call``.

An implicit layer defined by a module — here the equilibrium of a small recurrent cell::

    z* = tanh(W z* + U x + b)        i.e.  F(z, θ) = z − cell(z, x; θ) = 0,   θ = (W, U, b)

``root`` differentiates the equation, not the solver: every tensor that should receive a gradient
must be an *explicit argument* of ``F``.  A module's parameters are attributes, so hand them over as
a dict (a pytree of tensors) and call the module *functionally* inside ``F``::

    params = dict(cell.named_parameters())
    F = lambda z, params, x: z - torch.func.functional_call(cell, params, (z, x))
    z = implicitdiff.root(F, z0, params, x)
    loss(z).backward()            # fills cell.weight.grad etc. (the dict holds the very Parameters)

Do **not** call ``cell(z, x)`` directly inside ``F``: the parameters would be captured by the
closure, invisible to ``root``, and their gradients would be missing (implicitdiff cannot see
them).  The same holds for any other tensor that needs a gradient (here ``x``): pass it as an
argument.

The script trains the cell's parameters for a few steps with ``torch.optim`` and checks one
gradient against central finite differences.

Run:  python examples/module_root.py      (a few seconds)
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import implicitdiff as idf  # noqa: E402

torch.set_num_threads(1)
D = torch.float64


class Cell(nn.Module):
    """``cell(z, x) = tanh(W z + U x + b)``; ``‖W‖₂ < 1`` keeps the map a contraction (a unique root)."""

    def __init__(self, width, inputs):
        super().__init__()
        self.W = nn.Linear(width, width, bias=False)
        self.U = nn.Linear(inputs, width)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))


def F(z, params, x, cell):
    """The optimality condition ``z − cell(z, x) = 0``, with the module's parameters passed in."""
    return z - torch.func.functional_call(cell, params, (z, x))


def equilibrium(cell, x):
    """``z*`` for a batch ``x: (batch, inputs)``; differentiable in the parameters of ``cell`` and in ``x``."""
    params = dict(cell.named_parameters())        # the Parameters themselves: .grad lands on the module
    z0 = torch.zeros(x.shape[0], cell.W.weight.shape[0], dtype=x.dtype)
    # batch_dims=1: every row is its own problem (per-row convergence, block-diagonal Jacobian)
    return idf.root(lambda z, p, x: F(z, p, x, cell), z0, params, x, batch_dims=1)


def main():
    torch.manual_seed(0)
    width, inputs, batch = 8, 4, 16
    cell = Cell(width, inputs).double()
    head = nn.Linear(width, 1).double()
    x = torch.randn(batch, inputs, dtype=D)
    target = torch.randn(batch, 1, dtype=D)
    opt = torch.optim.Adam([*cell.parameters(), *head.parameters()], lr=0.05)

    for step in range(31):
        opt.zero_grad()
        loss = ((head(equilibrium(cell, x)) - target) ** 2).mean()
        loss.backward()
        if step % 10 == 0:
            norms = ", ".join(f"{name} {p.grad.norm().item():.2e}" for name, p in cell.named_parameters())
            print(f"step {step:2d}  loss {loss.item():.5f}   |grad| of the cell's parameters: {norms}")
        opt.step()
        with torch.no_grad():  # keep W contractive after the step
            s = torch.linalg.matrix_norm(cell.W.weight, ord=2)
            cell.W.weight.mul_(torch.clamp(0.9 / s, max=1.0))

    # check: d loss / d U.bias[0] against central finite differences through fresh solves
    cell.zero_grad()
    loss_of = lambda: ((head(equilibrium(cell, x)) - target) ** 2).mean()  # noqa: E731
    loss_of().backward()
    analytic = float(cell.U.bias.grad[0])
    eps = 1e-6
    with torch.no_grad():
        cell.U.bias[0] += eps
        up = float(loss_of())
        cell.U.bias[0] -= 2 * eps
        down = float(loss_of())
        cell.U.bias[0] += eps
    fd = (up - down) / (2 * eps)
    print(f"d loss / d U.bias[0]: implicit {analytic:.10f}, finite differences {fd:.10f}")
    assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd)), (analytic, fd)


if __name__ == "__main__":
    main()
