"""freeze=False (the plain phase without masks) against freeze=True (the masked loop) for Picard and
Anderson's lazy start: same statuses and iteration counts, residuals no larger, the hand-over to the
masked loop on NaN/Inf, divergence, a slow rate and an exhausted budget, the trace, the cases where
freeze=False is a no-op, and the speculative evaluation's contract."""

import math

import pytest
import torch

import solver_problems
from solver_problems import tanh_map
from implicitdiff import Status
from implicitdiff._core.residual import FixedPointResidual
from implicitdiff.solvers.anderson import anderson
from implicitdiff.solvers.picard import picard

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]

# Anderson with the DEQ's lazy start; Picard plain.  Both take freeze=...
SOLVERS = {
    "picard": lambda F, y0, params=(), **kw: picard(F, y0, params, **kw),
    "anderson": lambda F, y0, params=(), **kw: anderson(F, y0, params, start_rate=0.8, **kw),
}


def tanh_problem(batch, n, dtype, norm=0.6, seed=3):
    return solver_problems.tanh_problem(torch.Generator().manual_seed(seed), batch, n, dtype, norm)


def affine(rates, x, thresholds=None):
    """``F(y) = a_i y + x_i − y`` per element (``y*_i = x_i / (1 − a_i)``, Picard rate ``|a_i|``); with
    ``thresholds``, ``F`` is NaN where an entry of ``y_i`` exceeds ``thresholds_i`` (a residual that
    breaks down part-way, as a function of the iterate only: the same for every path)."""
    a = torch.as_tensor(rates, dtype=x.dtype).unsqueeze(-1)

    def F(y):
        f = a * y + x - y
        if thresholds is not None:
            f = f + 0.0 * torch.sqrt(thresholds.unsqueeze(-1) - y)   # sqrt(< 0) = NaN
        return f

    return F


def both(name, F, y0, params=(), **kw):
    return SOLVERS[name](F, y0, params, freeze=True, **kw), SOLVERS[name](F, y0, params, freeze=False, **kw)


def same_outcome(frozen, plain, iterations=True):
    assert plain.info.status.tolist() == frozen.info.status.tolist()
    if iterations:
        assert plain.info.iterations.tolist() == frozen.info.iterations.tolist()


def mixes_after_hand_over(name):
    """Anderson: after the plain phase hands over to the masked loop it mixes, whereas freeze=True's lazy start
    keeps plain steps while the *running* elements contract fast: the counts of the others then differ."""
    return name == "anderson"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SOLVERS))
def test_same_statuses_and_iterations_smaller_residuals(name, dtype):
    """On a batch of contractions freeze=False reports the masked loop's statuses and per-element iteration
    counts; its solutions agree within the tolerance and an element that kept iterating is no less accurate."""
    W, x = tanh_problem((6,), 8, dtype)
    y0 = torch.zeros(6, 8, dtype=dtype)
    frozen, plain = both(name, tanh_map, y0, (W, x), batch_dims=1)
    same_outcome(frozen, plain)
    assert plain.info.status.tolist() == [Status.SUCCESS] * 6
    # the iteration counts differ across elements: some of them kept iterating in the plain phase
    assert len(set(plain.info.iterations.tolist())) > 1
    rtol = 1e-10 if dtype == F64 else 1e-6
    assert bool((plain.info.residual <= rtol).all())
    # ‖y − y*‖ ≤ ‖F(y)‖ / (1 − L), L = 0.6: both within 2.5 · rtol ‖F(y0)‖ of the root
    f0 = tanh_map(y0, W, x).norm(dim=-1)
    bound = 2 * 2.5 * rtol * f0 + (1e-6 if dtype == F32 else 1e-15)
    assert bool(((plain.y - frozen.y).norm(dim=-1) <= bound).all())
    # the reported residual is that of the returned iterate, and no larger than the frozen one's
    fn = tanh_map(plain.y, W, x).norm(dim=-1)
    torch.testing.assert_close(plain.info.residual, fn / f0, rtol=1e-6 if dtype == F32 else 1e-12,
                               atol=(1e-7 if dtype == F32 else 1e-16))
    slack = 2 * torch.finfo(dtype).eps
    assert bool((plain.info.residual <= frozen.info.residual + slack).all())
    # an element that converged before the slowest one is strictly more accurate in float64
    if dtype == F64:
        early = plain.info.iterations < plain.info.iterations.max()
        assert bool((plain.info.residual[early] < frozen.info.residual[early]).all())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nonfinite_element_hands_over_to_the_masked_loop(name):
    """An element whose residual turns NaN part-way: NONFINITE, the others SUCCESS, as with freeze=True; the
    element holds its last finite iterate, and the statuses and iteration counts match the masked loop's."""
    x = torch.tensor([[1.0, -1.0], [1.0, 0.5], [0.3, 0.2]], dtype=F64)
    # element 1: y_k = 2 x (1 − 0.5^k) crosses 1.9 at k = 5 (y_4 = 1.875): F(y_5) is NaN
    thresholds = torch.tensor([1e300, 1.9, 1e300], dtype=F64)
    F = affine([0.5, 0.5, 0.5], x, thresholds)
    y0 = torch.zeros(3, 2, dtype=F64)
    frozen, plain = both(name, F, y0, batch_dims=1)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    # the failed element's count is the masked loop's: 4 accepted steps and the failed fifth
    assert int(plain.info.iterations[1]) == int(frozen.info.iterations[1]) == 5
    assert bool(torch.isfinite(plain.y).all())
    # the last finite iterate: y_4 = 2 x (1 − 1/16), where F is still finite
    torch.testing.assert_close(plain.y[1], 2 * x[1] * (1 - 0.5 ** 4), rtol=1e-15, atol=0.0)
    assert bool(torch.isfinite(F(plain.y)).all())
    torch.testing.assert_close(plain.y[[0, 2]], 2 * x[[0, 2]], rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nonfinite_at_the_start(name):
    """An element that is NaN from y0 on: NONFINITE at once (0 iterations), the others converge, as frozen."""
    x = torch.tensor([[1.0, -1.0], [float("nan"), 0.5], [0.3, 0.2]], dtype=F64)
    frozen, plain = both(name, affine([0.5, 0.5, 0.5], x), torch.zeros(3, 2, dtype=F64), batch_dims=1)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    assert plain.info.iterations.tolist()[1] == 0 and bool((plain.y[1] == 0).all())   # y0 is finite
    torch.testing.assert_close(plain.y[[0, 2]], 2 * x[[0, 2]], rtol=1e-9, atol=0.0)


def test_diverging_element_picard():
    """An expanding element (rate 2) is DIVERGED once ‖F‖ > 1e8 ‖F(y0)‖, after 27 plain steps (the hand-over),
    the contracting ones SUCCESS, with the masked loop's iteration counts."""
    x = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.3, 0.2]], dtype=F64)
    frozen, plain = both("picard", affine([0.5, 2.0, 0.3], x), torch.zeros(3, 2, dtype=F64), batch_dims=1,
                         max_iter=200)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.DIVERGED, Status.SUCCESS]
    same_outcome(frozen, plain)
    assert int(plain.info.iterations[1]) == math.ceil(math.log2(1e8)) and float(plain.info.residual[1]) > 1e8
    torch.testing.assert_close(plain.y[[0, 2]], x[[0, 2]] / torch.tensor([[0.5], [0.7]], dtype=F64),
                               rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_diverging_element(name):
    """An element that blows up in one step (F(y) = 1e5 (1 + y)²: ‖F(y1)‖ ≈ 1e15 > 1e8 ‖F(y0)‖) is DIVERGED
    after 1 iteration, the others SUCCESS, as with freeze=True (Anderson's mixing cannot rescue it: it is
    stopped before any history exists)."""
    x = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.3, 0.2]], dtype=F64)
    contract = affine([0.5, 0.5, 0.3], x)
    bad = torch.tensor([[False], [True], [False]])
    F = lambda y: torch.where(bad, 1e5 * (1 + y) ** 2, contract(y))  # noqa: E731
    frozen, plain = both(name, F, torch.zeros(3, 2, dtype=F64), batch_dims=1, max_iter=200)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.DIVERGED, Status.SUCCESS]
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    assert int(plain.info.iterations[1]) == 1 and float(plain.info.residual[1]) > 1e8
    torch.testing.assert_close(plain.y[1], frozen.y[1], rtol=0.0, atol=0.0)
    torch.testing.assert_close(plain.y[[0, 2]], x[[0, 2]] / torch.tensor([[0.5], [0.7]], dtype=F64),
                               rtol=1e-9, atol=0.0)


def _matrices(rates, n=8, seed=5):
    """Per element a symmetric ``M_i`` with eigenvalues spread in ``[rate_i / 2, rate_i]`` (Picard's rate
    ``rate_i``; Anderson needs several steps too: ``n`` distinct eigenvalues)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rho in rates:
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
        out.append((Q * torch.linspace(rho / 2, rho, n, dtype=F64)) @ Q.mT)
    return torch.stack(out), torch.randn(len(rates), n, generator=g, dtype=F64)


def linear(M, c):
    """``F(y) = M y + c − y`` per element."""
    return lambda y: (M @ y.unsqueeze(-1)).squeeze(-1) + c - y


@pytest.mark.parametrize("name", list(SOLVERS))
def test_max_iterations(name):
    """A slow element (rate 0.97) out of max_iter: MAX_ITERATIONS after max_iter iterations, the fast ones
    SUCCESS, as frozen (Picard: the same counts; the plain phase spends the whole budget)."""
    M, c = _matrices([0.1, 0.97, 0.2])
    F = linear(M, c)
    y0 = torch.zeros_like(c)
    frozen, plain = both(name, F, y0, batch_dims=1, max_iter=8, rtol=1e-4)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.MAX_ITERATIONS, Status.SUCCESS]
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    assert plain.info.iterations.tolist()[1] == 8 and float(plain.info.residual[1]) > 1e-4
    # the reported residual is the returned iterate's
    torch.testing.assert_close(plain.info.residual, F(plain.y).norm(dim=-1) / F(y0).norm(dim=-1),
                               rtol=1e-10, atol=0.0)
    if name == "picard":   # plain or frozen, the slow element took the same 8 plain steps
        torch.testing.assert_close(plain.y[1], frozen.y[1], rtol=1e-14, atol=0.0)
    # max_iter = 0: nothing runs
    frozen, plain = both(name, F, y0, batch_dims=1, max_iter=0)
    assert plain.info.status.tolist() == [Status.MAX_ITERATIONS] * 3
    same_outcome(frozen, plain)
    assert torch.equal(plain.y, y0)


def test_anderson_hands_over_to_mixing_on_a_slow_contraction():
    """Rate 0.97 is slower than start_rate 0.8: the plain phase hands over to mixing, which converges many
    times faster than Picard, to the exact solution."""
    M, c = _matrices([0.97] * 3)
    F = linear(M, c)
    y0 = torch.zeros_like(c)
    exact = torch.linalg.solve(torch.eye(8, dtype=F64) - M, c)
    fast = anderson(F, y0, batch_dims=1, start_rate=0.8, freeze=False, max_iter=200, trace=True)
    slow = picard(F, y0, batch_dims=1, freeze=False, max_iter=2000)
    assert fast.info.status.tolist() == slow.info.status.tolist() == [Status.SUCCESS] * 3
    torch.testing.assert_close(fast.y, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(slow.y, exact, rtol=0, atol=1e-8)
    # Picard: ≈ log(1e-10) / log(0.97) ≈ 750 steps; mixing: a few dozen
    assert int(slow.info.iterations.min()) > 500
    assert bool((fast.info.iterations * 5 < slow.info.iterations).all())
    # the trace across the hand-over: one row per iteration, the last one that of the returned y
    k = int(fast.info.iterations.max())
    assert fast.trace.shape == (k + 1, 3)
    torch.testing.assert_close(fast.trace[-1], F(fast.y).norm(dim=-1), rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_trace(name):
    """trace=True with freeze=False: (k + 1, B) rows, row 0 = ‖F(y0)‖, the last = ‖F(y)‖ of the returned y."""
    W, x = tanh_problem((4,), 6, F64)
    y0 = 0.1 * torch.ones(4, 6, dtype=F64)
    res = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=False, trace=True)
    k = int(res.info.iterations.max())
    assert res.trace.shape == (k + 1, 4)
    torch.testing.assert_close(res.trace[0], tanh_map(y0, W, x).norm(dim=-1), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(res.trace[-1], tanh_map(res.y, W, x).norm(dim=-1), rtol=1e-8, atol=1e-17)
    # the frozen trace has the same shape and first row; both decrease on this contraction
    frozen = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=True, trace=True)
    assert frozen.trace.shape == res.trace.shape and torch.equal(frozen.trace[0], res.trace[0])
    assert bool((res.trace[1:] <= res.trace[:-1] + 1e-15).all())
    # the iterations count the rows above the tolerance
    tol = 1e-10 * res.trace[0]
    assert res.info.iterations.tolist() == (res.trace > tol).long().cumprod(0).sum(0).tolist()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_trace_across_a_nonfinite_hand_over(name):
    """The trace keeps the plain phase's rows and goes on with the masked loop's: (k + 1, B) rows, the failed
    element's column that of freeze=True (its residuals up to its last finite iterate, then repeated)."""
    x = torch.tensor([[1.0, -1.0], [1.0, 0.5], [0.3, 0.2]], dtype=F64)
    F = affine([0.5, 0.5, 0.5], x, torch.tensor([1e300, 1.9, 1e300], dtype=F64))
    frozen, plain = both(name, F, torch.zeros(3, 2, dtype=F64), batch_dims=1, trace=True)
    k = int(plain.info.iterations.max())
    assert plain.trace.shape == (k + 1, 3) and bool(torch.isfinite(plain.trace).all())
    torch.testing.assert_close(plain.trace[:, 1], frozen.trace[:k + 1, 1], rtol=1e-15, atol=0.0)
    # the converged elements' last row is the residual of their returned iterate
    torch.testing.assert_close(plain.trace[-1, [0, 2]], F(plain.y)[[0, 2]].norm(dim=-1), rtol=1e-8, atol=1e-15)
    if name == "picard":
        assert plain.trace.shape == frozen.trace.shape


NOOP = {
    "unbatched": (dict(batch_dims=0), lambda y0: y0[0]),
    "callback": (dict(batch_dims=1, callback=lambda k, y, r: None), lambda y0: y0),
    "check_every=2": (dict(batch_dims=1, check_every=2), lambda y0: y0),
}


@pytest.mark.parametrize("case", list(NOOP))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_freeze_false_is_a_no_op_where_the_plain_phase_does_not_apply(name, case):
    """batch_dims=0, a callback or check_every > 1: freeze=False gives freeze=True's result bit for bit."""
    kw, pick = NOOP[case]
    W, x = tanh_problem((4,), 6, F64)
    if case == "unbatched":
        W, x = W[0], x[0]
    y0 = pick(torch.zeros(4, 6, dtype=F64))
    frozen, plain = both(name, tanh_map, y0, (W, x), trace=True, **kw)
    assert torch.equal(plain.y, frozen.y)
    assert torch.equal(plain.info.status, frozen.info.status)
    assert torch.equal(plain.info.residual, frozen.info.residual)
    assert torch.equal(plain.info.iterations, frozen.info.iterations)
    assert torch.equal(plain.trace, frozen.trace)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_element_with_zero_initial_residual(name):
    """An element with F(y0) = 0 exactly is SUCCESS in 0 iterations and stays at y0 (residual 0) while the
    others run; a batch where every element starts converged runs no step."""
    W, x = tanh_problem((3,), 5, F64)
    x[1] = 0.0                                # tanh(W·0 + 0) − 0 = 0
    y0 = torch.zeros(3, 5, dtype=F64)
    frozen, plain = both(name, tanh_map, y0, (W, x), batch_dims=1, trace=True)
    same_outcome(frozen, plain)
    assert plain.info.status.tolist() == [Status.SUCCESS] * 3
    assert plain.info.iterations.tolist()[1] == 0 and int(plain.info.iterations.min()) == 0
    assert bool((plain.y[1] == 0).all()) and float(plain.info.residual[1]) == 0.0
    assert bool((plain.trace[:, 1] == 0).all())
    calls = []

    def counted(y, W, x):
        calls.append(1)
        return tanh_map(y, W, x)

    x0 = torch.zeros_like(x)
    res = SOLVERS[name](counted, y0, (W, x0), batch_dims=1, freeze=False, trace=True)
    assert res.info.status.tolist() == [Status.SUCCESS] * 3 and res.info.iterations.tolist() == [0] * 3
    assert len(calls) == 1 and res.trace.shape == (1, 3) and bool((res.y == 0).all())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_zero_initial_residual_keeps_the_plain_phase(name):
    """An element with F(y0) = 0 exactly does not stop the plain phase (float64, default rtol: the others' q
    starts at 1/rtol = 1e10, above a divergence bound of 1e8 · tiny / tiny for that element): the others still run
    unmasked — the speculative evaluation is asked for — and Anderson's counts are freeze=True's (no mixing on this
    fast contraction)."""
    W, x = tanh_problem((3,), 5, F64)
    x[1] = 0.0
    y0 = torch.zeros(3, 5, dtype=F64)
    frozen = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=True)
    F = Speculating(tanh_map, (W, x))
    plain = SOLVERS[name](F, y0, (W, x), batch_dims=1, freeze=False, recorder=F)
    same_outcome(frozen, plain)
    assert F.asked and F.asked[-1].data_ptr() == plain.y.data_ptr() and plain.recording is F.asked[-1]


@pytest.mark.parametrize("name", list(SOLVERS))
def test_float32(name):
    """float32 (rtol 1e-6): same statuses and counts as frozen, residuals within the tolerance, and a NaN element
    still NONFINITE."""
    W, x = tanh_problem((5,), 7, F32)
    frozen, plain = both(name, tanh_map, torch.zeros(5, 7, dtype=F32), (W, x), batch_dims=1)
    same_outcome(frozen, plain)
    assert plain.y.dtype == F32 and bool((plain.info.residual <= 1e-6).all())
    x32 = torch.tensor([[1.0, -1.0], [1.0, 0.5], [0.3, 0.2]], dtype=F32)
    F = affine([0.5, 0.5, 0.5], x32, torch.tensor([1e30, 1.9, 1e30], dtype=F32))
    frozen, plain = both(name, F, torch.zeros(3, 2, dtype=F32), batch_dims=1)
    assert plain.info.status.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    assert int(plain.info.iterations[1]) == 5 and bool(torch.isfinite(plain.y).all())


class Speculating:
    """A residual that counts its plain calls, and a recorder for it (the contract of ``recorder=``,
    :class:`~implicitdiff.implicit.speculation.Recorder`): ``record`` gives the same value and logs the
    iterate it was asked for; ``take`` returns that iterate when it is the one the solver returns."""

    def __init__(self, F, params=()):
        self.F, self.params, self.asked, self.plain = F, params, [], 0

    def __call__(self, y, *params):
        self.plain += 1
        return self.F(y, *params)

    def record(self, y):
        self.asked.append(y)
        return self.F(y, *self.params)

    def take(self, y):
        last = self.asked[-1] if self.asked else None
        return last if last is not None and last.data_ptr() == y.data_ptr() and last.shape == y.shape else None


@pytest.mark.parametrize("name", list(SOLVERS))
def test_speculative_evaluation_is_the_last_one(name):
    """freeze=False calls ``recorder.record`` for the evaluation it predicts to be the last: same result bit for bit,
    and (on this linear contraction) the last speculated iterate is the returned y itself, same storage."""
    W, x = tanh_problem((4,), 6, F64)
    y0 = torch.zeros(4, 6, dtype=F64)
    ref = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=False)
    F = Speculating(tanh_map, (W, x))
    res = SOLVERS[name](F, y0, (W, x), batch_dims=1, freeze=False, recorder=F)
    assert torch.equal(res.y, ref.y) and torch.equal(res.info.iterations, ref.info.iterations)
    assert ref.recording is None and res.recording is F.asked[-1]
    k = int(res.info.iterations.max())
    assert 1 <= len(F.asked) <= 3 and F.plain + len(F.asked) == k + 1   # one evaluation per iteration, plus F(y0)
    assert F.asked[-1].data_ptr() == res.y.data_ptr() and F.asked[-1].shape == res.y.shape
    # freeze=True never speculates
    F = Speculating(tanh_map, (W, x))
    res = SOLVERS[name](F, y0, (W, x), batch_dims=1, freeze=True, recorder=F)
    assert F.asked == [] and res.recording is None


def test_speculation_with_non_flat_iterates():
    """With two batch dims and a (2, 3) state per element, ``record`` receives iterates of y0's shape and the
    returned y shares the last one's storage."""
    g = torch.Generator().manual_seed(0)
    A = 0.4 * torch.randn(6, 6, generator=g, dtype=F64) / 6 ** 0.5
    x = torch.randn(2, 3, 2, 3, generator=g, dtype=F64)

    def T(y):
        return torch.tanh((y.reshape(2, 3, 6) @ A.mT).reshape(y.shape) + x)

    F = Speculating(lambda y: T(y) - y)
    res = picard(F, torch.zeros(2, 3, 2, 3, dtype=F64), batch_dims=2, freeze=False, recorder=F)
    assert res.info.status.shape == (2, 3) and bool((res.info.status == Status.SUCCESS).all())
    assert F.asked and all(y.shape == (2, 3, 2, 3) for y in F.asked)
    assert F.asked[-1].data_ptr() == res.y.data_ptr()
    torch.testing.assert_close(res.y, T(res.y), rtol=0, atol=1e-9)
    assert math.isfinite(float(res.info.residual.max()))


class WithMap(FixedPointResidual):
    """``F = T − id`` as a :class:`FixedPointResidual` (as ``fixed_point_residual`` builds it); counts the calls
    of ``F`` and of its map."""

    __slots__ = ("T", "calls")

    def __init__(self, T):
        self.T, self.calls = T, {"F": 0, "map": 0}
        super().__init__(self._map)

    def __call__(self, y, *params):
        self.calls["F"] += 1
        return self.T(y, *params) - y

    def _map(self, y, *params):
        self.calls["map"] += 1
        return self.T(y, *params)


def _tanh_T(y, W, x):
    return tanh_map(y, W, x) + y


@pytest.mark.parametrize("name", list(SOLVERS))
def test_fixed_point_map_steps(name):
    """A residual carrying ``F.map = T``: the plain steps call T (y ← T(y)) instead of F, with freeze=True's
    statuses and counts and the same solution within the tolerance; with β ≠ 1 they call F."""
    W, x = tanh_problem((5,), 6, F64)
    y0 = torch.zeros(5, 6, dtype=F64)
    frozen = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=True)
    F = WithMap(_tanh_T)
    plain = SOLVERS[name](F, y0, (W, x), batch_dims=1, freeze=False)
    same_outcome(frozen, plain)
    k = int(plain.info.iterations.max())
    assert F.calls == {"F": 1, "map": k}          # F(y0) for the reference norms, then T once per step
    assert bool((plain.info.residual <= 1e-10).all())
    f0 = tanh_map(y0, W, x).norm(dim=-1)
    torch.testing.assert_close(plain.info.residual, tanh_map(plain.y, W, x).norm(dim=-1) / f0, rtol=1e-9,
                               atol=1e-16)
    assert bool(((plain.y - frozen.y).norm(dim=-1) <= 5e-10 * f0).all())
    damped = WithMap(_tanh_T)
    res = SOLVERS[name](damped, y0, (W, x), batch_dims=1, freeze=False, beta=0.8)
    assert damped.calls["map"] == 0 and bool((res.info.status == Status.SUCCESS).all())
    ref = SOLVERS[name](tanh_map, y0, (W, x), batch_dims=1, freeze=False, beta=0.8)
    assert torch.equal(res.y, ref.y) and torch.equal(res.info.iterations, ref.info.iterations)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_fixed_point_map_hand_over(name):
    """With ``F.map`` too a NaN element hands over to the masked loop: NONFINITE, its last finite iterate kept,
    the others SUCCESS as frozen."""
    x = torch.tensor([[1.0, -1.0], [1.0, 0.5], [0.3, 0.2]], dtype=F64)
    G = affine([0.5, 0.5, 0.5], x, torch.tensor([1e300, 1.9, 1e300], dtype=F64))
    frozen = SOLVERS[name](G, torch.zeros(3, 2, dtype=F64), batch_dims=1, freeze=True)
    F = WithMap(lambda y: G(y) + y)
    plain = SOLVERS[name](F, torch.zeros(3, 2, dtype=F64), batch_dims=1, freeze=False)
    same_outcome(frozen, plain, iterations=not mixes_after_hand_over(name))
    assert F.calls["map"] >= 4 and int(plain.info.iterations[1]) == 5
    torch.testing.assert_close(plain.y[1], 2 * x[1] * (1 - 0.5 ** 4), rtol=1e-15, atol=0.0)


@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=["no elements", "empty state"])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_empty_batch(name, shape):
    """No elements, or elements with an empty state (converged at once): freeze=False gives freeze=True's result."""
    F = lambda y: 0.5 * y + 1.0 - y  # noqa: E731
    y0 = torch.zeros(shape, dtype=F64)
    frozen, plain = both(name, F, y0, batch_dims=1, trace=True)
    assert plain.y.shape == shape and plain.info.status.shape == (shape[0],)
    assert plain.info.status.tolist() == [Status.SUCCESS] * shape[0]
    same_outcome(frozen, plain)
    assert plain.trace.shape == frozen.trace.shape == (1, shape[0])


def test_anderson_hand_over_seeds_the_history_with_the_last_plain_step():
    """After the plain phase hands over (rate too slow for start_rate), mixing starts at once with the phase's
    last step as its first history column — as freeze=True's lazy start does — so on a batch where every
    element is slow both modes take the same iterations to the same solution; without the seed the masked
    loop would first take one more plain step."""
    M, c = _matrices([0.9, 0.93, 0.95])
    F = linear(M, c)
    y0 = torch.zeros_like(c)
    frozen, plain = both("anderson", F, y0, batch_dims=1, max_iter=200, rtol=1e-10)
    same_outcome(frozen, plain)
    assert plain.info.status.tolist() == [Status.SUCCESS] * 3
    exact = torch.linalg.solve(torch.eye(M.shape[-1], dtype=F64) - M, c)
    torch.testing.assert_close(plain.y, exact, rtol=0, atol=1e-8)
    torch.testing.assert_close(frozen.y, exact, rtol=0, atol=1e-8)
    # the mixing does start: far fewer iterations than Picard's ≈ log(1e-10) / log(0.95) ≈ 450
    assert int(plain.info.iterations.max()) < 60


def test_an_element_that_meets_the_tolerance_and_leaves_it_again_counts_every_step():
    """Element 0: a non-normal map (ρ = 0.5, ‖J‖ ≈ 4) whose residual dips below the tolerance at step 1 and rises
    above it at step 2; element 1: a slow contraction that keeps the batch running.  Out of steps there
    (max_iter = 2), the masked loop takes over with nothing left: element 0 is reported MAX_ITERATIONS with its
    true residual, and its count is both steps, not the step it first met the tolerance.  (freeze=True stops it
    at step 1, converged: the plain phase is meant for contractions.)"""
    Ms = torch.stack([torch.tensor([[0.5, 4.0], [0.0, 0.5]], dtype=F64), 0.9 * torch.eye(2, dtype=F64)])
    F = lambda y: torch.einsum("bij,bj->bi", Ms, y) - y      # noqa: E731  residual r_k = M^k r_0 (linear)
    r0 = torch.tensor([[1.0, -0.1], [1.0, 0.0]], dtype=F64)
    y0 = torch.linalg.solve(Ms - torch.eye(2, dtype=F64), r0)                 # F(y0) = r0
    torch.testing.assert_close(F(y0), r0)
    out = picard(F, y0, batch_dims=1, freeze=False, rtol=0.12, max_iter=2, trace=True)
    norms = out.trace[:, 0]
    tol = 0.12 * float(norms[0])
    assert float(norms[1]) <= tol < float(norms[2])   # met at step 1, left at step 2
    assert out.info.status.tolist() == [Status.MAX_ITERATIONS] * 2 and out.info.iterations.tolist() == [2, 2]
    frozen = picard(F, y0, batch_dims=1, freeze=True, rtol=0.12, max_iter=2)
    assert frozen.info.status.tolist() == [Status.SUCCESS, Status.MAX_ITERATIONS]
    assert frozen.info.iterations.tolist() == [1, 2]
