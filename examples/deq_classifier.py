"""A deep equilibrium classifier on three interleaved spirals, trained on CPU in about a minute.

    python examples/deq_classifier.py [--steps 600] [--width 64] [--seed 0]

The data are generated here (no download): three 2-D spiral arms with noise, 3000 training and
1000 test points.  The model is

    x ─ Linear(2, w) ─▶ u        z* = tanh(Ŵ z* + u)        logits = Linear(w, 3)(z*)

where the hidden state ``z*`` is the *equilibrium* of one cell, found by Anderson mixing in the
forward pass; the backward pass solves the adjoint fixed point at ``z*`` (constant memory in the
number of iterations) and every parameter of the cell gets its gradient.  ``Ŵ`` is ``W`` scaled
to Frobenius norm ≤ 0.95, which keeps the cell a contraction throughout training; a small Jacobian
penalty (``jac_reg``, a Hutchinson estimate of ``‖∂f/∂z‖_F²``) keeps it well conditioned, so the
solver needs few iterations.

Expected on a 2-core machine with one thread: test accuracy ≥ 95 % (97 % with the defaults) after
600 steps, about 6 forward iterations per batch, 15–30 s.  It prints the final accuracy and the mean
number of forward iterations.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tiny matrices: one passive thread is fastest
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from implicitdiff.nn import DEQ  # noqa: E402  (to become implicitdiff.nn.DEQ)


def spirals(n: int, *, classes: int = 3, noise: float = 0.2, generator=None):
    """``n`` points on ``classes`` interleaved spiral arms in the plane: ``(x (n, 2), y (n,))``."""
    y = torch.randint(classes, (n,), generator=generator)
    r = torch.rand(n, generator=generator)                      # radius in [0, 1)
    t = 7.0 * r + y * (2 * math.pi / classes)                   # angle: over a turn
    x = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1) * 3.0
    return x + noise * r.unsqueeze(1) * torch.randn(n, 2, generator=generator), y


class Cell(torch.nn.Module):
    """``f(z, u) = tanh(Ŵ z + u)`` with ``Ŵ = W · min(1, γ / ‖W‖_F)``: applied until ``z`` stops changing.

    ``‖Ŵ‖₂ ≤ ‖Ŵ‖_F ≤ γ < 1`` and ``|tanh′| ≤ 1`` make ``f`` a contraction in ``z`` for any weights,
    so the equilibrium exists, is unique, and every solver finds it — during all of training.
    """

    def __init__(self, width: int, gamma: float = 0.95):
        super().__init__()
        self.W = torch.nn.Linear(width, width, bias=False)
        self.gamma = gamma
        torch.nn.init.normal_(self.W.weight, std=0.5 / math.sqrt(width))

    def forward(self, z, u):
        W = self.W.weight
        W = W * torch.clamp(self.gamma / torch.linalg.matrix_norm(W), max=1.0)
        return torch.tanh(z @ W.mT + u)


class Classifier(torch.nn.Module):
    def __init__(self, width: int, classes: int = 3, jac_reg: int = 1):
        super().__init__()
        self.inject = torch.nn.Linear(2, width)
        self.deq = DEQ(Cell(width), solver="anderson", rtol=1e-4, max_iter=50, jac_reg=jac_reg)
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x):
        u = self.inject(x)
        return self.head(self.deq(u))


def _progress(iterable, total):
    try:
        from tqdm import tqdm
    except ImportError:  # plain prints every tenth of the way
        def plain():
            for i, item in enumerate(iterable):
                if i % max(1, total // 10) == 0:
                    print(f"step {i}/{total}", flush=True)
                yield item
        return plain(), None
    bar = tqdm(iterable, total=total, desc="training")
    return bar, bar


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--jac-weight", type=float, default=0.1, help="weight of the Jacobian penalty")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train = spirals(3000, generator=g)
    x_test, y_test = spirals(1000, generator=g)

    model = Classifier(args.width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    iterations = []
    t0 = time.perf_counter()
    steps, bar = _progress(range(args.steps), args.steps)
    for step in steps:
        idx = torch.randint(len(x_train), (args.batch,), generator=g)
        logits = model(x_train[idx])
        loss = torch.nn.functional.cross_entropy(logits, y_train[idx]) + args.jac_weight * model.deq.jac_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        iterations.append(float(model.deq.last_info.iterations.float().mean()))
        if bar is not None and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", iters=f"{iterations[-1]:.1f}")

    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        test_iters = float(model.deq.last_info.iterations.float().mean())
    print(f"test accuracy {100 * accuracy:.1f}% after {args.steps} steps in {time.perf_counter() - t0:.0f} s; "
          f"mean forward iterations {sum(iterations) / len(iterations):.1f} (training), {test_iters:.1f} (test)")
    return accuracy


if __name__ == "__main__":
    main()
