"""Matrix-free Krylov solvers, forward only: one signature, one stopping rule, batched.

Forward only means a result that autograd would differentiate through the iterations (an input, or
a tensor ``A``'s matvec or ``M`` uses, requires grad under grad mode) raises
:class:`~implicitdiff.InputError`: that gradient would be wrong.  The exact gradient of a solve is
:func:`implicitdiff.linear_solve` with ``solver=`` one of these; or call them under ``torch.no_grad()``.

Every solver is ``solver(A, b, x0=None, *, rtol=None, atol=0.0, max_iter=None, M=None,
callback=None, check_every=None) -> KrylovResult(x, info)`` and stops an element when

    ``‖b − A x‖ ≤ max(rtol · ‖b‖, atol)``

(``lsqr``/``lsmr`` also stop at a least-squares solution: ``‖Aᵀr‖ ≤ rtol · ‖A‖ · ‖r‖``).
``A`` is a dense ``(*, m, n)`` tensor, a 2-D ``torch.sparse`` tensor, a
:class:`~implicitdiff.linalg.LinearOperator` or a callable ``x -> A x``; ``b`` is ``(*, m)``
with independent systems in its leading dims, each converging (and frozen) on its own, with no
Python loop over them.  ``check_every`` sets how often the loop reads the "all converged" flag —
a host sync: every iteration on CPU (cheap), every 10 on CUDA; ``callback(x)`` runs after every
iteration.  Solvers report, never raise, a failed solve:
``info.status`` per element (``SUCCESS``, ``MAX_ITERATIONS``, ``BREAKDOWN``, ``NONFINITE``);
pass the result to :func:`implicitdiff._core.failure.apply_on_failure` to raise.

========== ===================================== ==================================
solver     operator                              notes
========== ===================================== ==================================
cg         symmetric positive definite           ``pᵀAp ≤ 0`` → BREAKDOWN
minres     symmetric (possibly indefinite)       ``M`` must be SPD
gmres      any square                            restarted, ``restart=min(20, n)``
bicgstab   any square                            ``ρ ≈ 0`` → BREAKDOWN
lsqr       any shape, any rank                   min-norm least squares, needs ``Aᵀ``
lsmr       any shape, any rank                   as lsqr, monotone ``‖Aᵀr‖``
========== ===================================== ==================================
"""

from ._common import KrylovResult as KrylovResult
from .bicgstab import bicgstab as bicgstab
from .cg import cg as cg
from .gmres import gmres as gmres
from .lsmr import lsmr as lsmr
from .lsqr import lsqr as lsqr
from .minres import minres as minres
