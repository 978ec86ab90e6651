"""OptNet's mini-Sudoku (Amos & Kolter, 2017, §5.2): learn the rules of 4×4 Sudoku as the
equality constraints of a QP layer, from puzzles and their solutions alone.

A board is a one-hot tensor ``z ∈ R^{4×4×4}`` (cell × digit, 64 numbers).  The model is one
QP layer with no hidden layers::

    z*(puzzle) = argmin_z  ½·0.1‖z‖² − puzzleᵀz   s.t.   A z = b,  z ≥ 0

where ``A`` (40 × 64, random at the start) and ``b = A exp(log z₀)`` (so that ``z₀ > 0`` is
always feasible) are learned by Adam on the squared error against the solution.  The true
rules — each cell holds one digit, each row, column and 2×2 box holds each digit once — are
40 independent linear equalities, which is what ``A`` has to discover.  A prediction is
correct when the per-cell argmax equals the solution on every cell.

Puzzles are generated here: all 288 4×4 solutions are enumerated and cells are blanked at
random while the solution stays unique.  Run with ``implicitdiff demo sudoku`` or
``python examples/sudoku.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import torch

from ..nn import QPLayer
from ._optional import progress, pyplot, threads

__all__ = ["main", "run", "solutions", "make_puzzles", "sudoku_constraints", "board_error"]

N = 4  # board side; boxes are 2 × 2
NX = N ** 3


def main(args) -> dict:
    """Entry point of ``implicitdiff demo sudoku`` (``args.out``: output folder; ``args.quick``)."""
    return run(args)


def solutions() -> torch.Tensor:
    """All 288 solutions of 4×4 Sudoku as digit boards ``(288, 4, 4)`` with values 0..3."""
    rows = list(itertools.permutations(range(N)))
    found = []

    def ok(board):
        cols = list(zip(*board))
        if any(len(set(c)) != len(c) for c in cols):
            return False
        for r0 in range(0, len(board), 2):
            for c0 in (0, 2):
                box = [board[r][c] for r in range(r0, min(r0 + 2, len(board))) for c in (c0, c0 + 1)]
                if len(set(box)) != len(box):
                    return False
        return True

    def extend(board):
        if len(board) == N:
            found.append(board)
            return
        for r in rows:
            if ok(board + [r]):
                extend(board + [r])

    extend([])
    return torch.tensor(found, dtype=torch.long)


def make_puzzles(count: int, *, generator: torch.Generator, max_blanks: int = 10):
    """``count`` puzzles with a unique solution: ``(features, labels)``, one-hot ``(count, 4, 4, 4)``
    (a blank cell is all zeros in ``features``)."""
    flat = solutions().reshape(-1, N * N).numpy()
    idx = torch.randint(len(flat), (count,), generator=generator)
    orders = torch.argsort(torch.rand(count, N * N, generator=generator), dim=-1).numpy()
    puzzles = flat[idx.numpy()]
    given = np.ones_like(puzzles, dtype=bool)
    for i in range(count):
        for cell in orders[i]:
            if (~given[i]).sum() >= max_blanks:
                break
            given[i, cell] = False
            # still unique: exactly one of the 288 solutions agrees with the remaining clues
            if ((flat[:, given[i]] == puzzles[i, given[i]]).all(-1)).sum() != 1:
                given[i, cell] = True
    puzzles, given = torch.from_numpy(puzzles), torch.from_numpy(given)
    labels = torch.nn.functional.one_hot(puzzles, N).to(torch.float64).reshape(count, N, N, N)
    features = labels * given.reshape(count, N, N, 1)
    return features, labels


def sudoku_constraints() -> torch.Tensor:
    """The true rules as a full-row-rank ``(40, 64)`` matrix ``A`` with ``A z = 1`` (for reference)."""
    rows = []
    e = torch.eye(NX, dtype=torch.float64).reshape(N, N, N, NX)
    for i, j in itertools.product(range(N), range(N)):
        rows.append(e[i, j].sum(0))  # cell (i, j) holds one digit
    for d in range(N):
        for i in range(N):
            rows.append(e[i, :, d].sum(0))  # row i holds d once
            rows.append(e[:, i, d].sum(0))  # column i holds d once
        for r0, c0 in itertools.product((0, 2), (0, 2)):
            rows.append(e[r0:r0 + 2, c0:c0 + 2, d].reshape(-1, NX).sum(0))  # box holds d once
    M = torch.stack(rows)
    keep = []
    for r in range(M.shape[0]):  # greedy independent rows
        if torch.linalg.matrix_rank(M[keep + [r]]) > len(keep):
            keep.append(r)
    return M[keep]


def board_error(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of boards whose per-cell argmax differs from the solution in some cell."""
    wrong = (pred.argmax(-1) != labels.argmax(-1)).flatten(1).any(-1)
    return float(wrong.to(torch.float64).mean())


class OptNetSudoku(torch.nn.Module):
    """The OptNet-Eq model: a QP layer with learned ``A`` and ``b = A exp(log z₀)``."""

    def __init__(self, n_eq: int, *, generator: torch.Generator, q_penalty: float = 0.1):
        super().__init__()
        eye = torch.eye(NX, dtype=torch.float64)
        A0 = torch.rand(n_eq, NX, generator=generator, dtype=torch.float64)
        self.qp = QPLayer(NX, learn=("A",), Q=q_penalty * eye, G=-eye, h=torch.zeros(NX, dtype=torch.float64),
                          A=A0, on_failure="nan")
        self.log_z0 = torch.nn.Parameter(torch.zeros(NX, dtype=torch.float64))

    def forward(self, puzzles):
        b = self.qp.A @ self.log_z0.exp()
        z = self.qp(p=-puzzles.reshape(puzzles.shape[0], -1), b=b)
        return z.reshape(puzzles.shape)


def run(args=None, *, quick=None, out=None, plot=True, progress_bar=True) -> dict:
    """Train and evaluate; print a table per epoch, write ``sudoku.png`` into ``out``; return the history."""
    quick = bool(getattr(args, "quick", False)) if quick is None else quick
    out = (getattr(args, "out", None) or ".") if out is None else out
    g = torch.Generator().manual_seed(0)
    n_train, n_test, epochs, batch = (800, 200, 10, 100) if quick else (1500, 300, 14, 150)
    t0 = time.perf_counter()
    with threads(1):
        X, Y = make_puzzles(n_train + n_test, generator=g)
        Xtr, Ytr, Xte, Yte = X[:n_train], Y[:n_train], X[n_train:], Y[n_train:]
        model = OptNetSudoku(sudoku_constraints().shape[0], generator=g)
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        print(f"OptNet Sudoku 4×4: {n_train} training / {n_test} test puzzles (generated), "
              f"QP with {NX} variables, {NX} inequalities z ≥ 0, {model.qp.A.shape[0]} learned equalities")
        header = f"{'epoch':>5}  {'train loss':>10}  {'train err':>9}  {'test err':>8}  {'time':>6}"
        history = []
        with torch.no_grad():
            test_err = board_error(model(Xte), Yte)
        print(header)
        print(f"{0:>5}  {'—':>10}  {'—':>9}  {test_err:>8.3f}  {time.perf_counter() - t0:>5.1f}s")
        history.append(dict(epoch=0, train_loss=None, train_err=None, test_err=test_err))
        for epoch in range(1, epochs + 1):
            perm = torch.randperm(n_train, generator=g)
            losses, errs = [], []
            steps = range(0, n_train, batch)
            for i in progress(steps, total=len(steps), desc=f"epoch {epoch}", enabled=progress_bar):
                idx = perm[i:i + batch]
                pred = model(Xtr[idx])
                ok = torch.isfinite(pred).flatten(1).all(-1)  # an element whose QP failed is skipped
                loss = ((pred[ok] - Ytr[idx][ok]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                errs.append(board_error(pred.detach(), Ytr[idx]))
            with torch.no_grad():
                test_err = board_error(model(Xte), Yte)
            row = dict(epoch=epoch, train_loss=sum(losses) / len(losses), train_err=sum(errs) / len(errs),
                       test_err=test_err)
            history.append(row)
            print(f"{epoch:>5}  {row['train_loss']:>10.4f}  {row['train_err']:>9.3f}  {test_err:>8.3f}  "
                  f"{time.perf_counter() - t0:>5.1f}s")
    res = dict(history=history, final_test_error=history[-1]["test_err"], seconds=time.perf_counter() - t0)
    res["plot"] = _plot(history, out) if plot else None
    print(f"final test error {res['final_test_error']:.3f} after {epochs} epochs, {res['seconds']:.1f} s")
    return res


def _plot(history, out):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "sudoku.png")
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = [h["epoch"] for h in history if h["train_err"] is not None]
    ax.plot(ep, [h["train_err"] for h in history if h["train_err"] is not None], "o-", label="train")
    ax.plot([h["epoch"] for h in history], [h["test_err"] for h in history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("board error")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("OptNet learns 4×4 Sudoku (learned equalities)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path

