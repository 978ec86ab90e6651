r"""A DPP cvxpy problem as a cone program whose data are an affine function of its parameters.

cvxpy canonicalizes a DPP problem once into a *parametrized* cone program (its ``ParamConeProg``):
the nonzeros of ``[A | b]`` and the entries of ``c`` are a sparse linear function of the stacked
parameter vector ``p̃ = (p, 1)``.  :func:`canonicalize` reads that function once and turns it into
three sparse matrices ``M_A, M_b, M_c`` (columns: the user's parameters flattened in C order, then
the constant 1), so that per call

    vec(A) = M_A p̃   (dense ``(*, m, n)``),   b = M_b p̃,   c = M_c p̃

runs in torch as one sparse × dense product per block — batched on a leading dimension,
differentiable (the backward is the transposed product), on the parameters' device and dtype.
The cone program ``minimize cᵀx s.t. Ax + s = b, s ∈ K`` is in the SCS convention of
:func:`~implicitdiff.cone_program` (cvxpy's own SCS data, with quadratic objectives expanded into
second-order cones), and each variable is read back from ``x`` by one gather.

Layout details that the maps encode (cvxpy's conventions, checked in the tests against
``problem.get_problem_data(cp.SCS)`` entry by entry):

* a parameter or variable of shape ``s`` occupies ``prod(s)`` consecutive entries in column-major
  (Fortran) order; a *symmetric* one (``symmetric=True``, ``PSD=True``…) that cvxpy lowered to its
  upper triangle occupies ``k(k+1)/2`` entries, the upper triangle row by row (so only the upper
  triangle of a symmetric parameter receives a gradient — as in cvxpylayers);
* ``[A | b]`` is stored as ``-A`` and ``b`` (cvxpy writes ``A x + b ∈ K``, SCS ``b − A x ∈ K``);
* the data are SCS's *without* its quadratic objective (a solver that declares none, as cvxpylayers'
  default DIFFCP does): quadratic atoms become second-order cones under the plain DPP rules, so
  ``quad_form(x - c, P)`` or ``matrix_frac(x - c, P)`` with a parameter ``c`` stay DPP.

A parameter's declared sign or definiteness (``nonneg``, ``pos``, ``nonpos``, ``neg``, ``PSD``, ``NSD``,
``integer``, ``boolean``) is an assumption of the canonicalization: cvxpy may drop a constraint it makes
redundant.  The values passed are checked against it as cvxpy checks an assigned value (same tolerances).

cvxpy is imported lazily, inside :func:`canonicalize`: ``import implicitdiff`` never imports it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from .._core.errors import InputError
from .._core.options import check_real
from .._core.validate import autocast_hint, check_finite, is_vmapped
from ..implicit.sparse_affine import SparseAffineFn
from .cone_program import cone_program

__all__ = ["canonicalize", "Canonical", "CONE_KEYS", "solve_canonical", "rtol_from_solver_args"]

CONE_KEYS = ("z", "l", "q", "s", "ep")  # what cone_program takes, in SCS's row order


_TOL, _EIG_TOL = 1e-10, 1e-8  # cvxpy's GENERAL_PROJECTION_TOL and PSD_NSD_PROJECTION_TOL

# a parameter's declared value attribute: (the test its values must pass, what it means), as cvxpy's
# Leaf._validate_value checks an assigned value; a PSD/NSD parameter is read by its upper triangle
_VALUE_RULES = {
    "nonneg": (lambda t: t >= -_TOL, "nonnegative"),
    "pos": (lambda t: t >= -_TOL, "positive"),
    "nonpos": (lambda t: t <= _TOL, "nonpositive"),
    "neg": (lambda t: t <= _TOL, "negative"),
    "integer": (lambda t: (t - t.round()).abs() <= _TOL, "integer"),
    "boolean": (lambda t: ((t - t.round()).abs() <= _TOL) & (t >= -_TOL) & (t <= 1 + _TOL), "0 or 1"),
    "PSD": (lambda t: torch.linalg.eigvalsh(t.double(), UPLO="U") >= -_EIG_TOL, "positive semidefinite"),
    "NSD": (lambda t: torch.linalg.eigvalsh(t.double(), UPLO="U") <= _EIG_TOL, "negative semidefinite"),
}


class _Map(NamedTuple):
    """``out[..., target] += p̃[..., source] · coefficient`` into a flat output of ``size`` entries, held as
    the sparse ``(size, len(p̃))`` matrix of those triples."""

    matrix: torch.Tensor  # sparse COO, coalesced
    transposed: torch.Tensor  # its transpose, coalesced (the backward's map)
    size: int
    params: frozenset  # which user parameters it reads


class _Output(NamedTuple):
    index: torch.Tensor  # int64, the entries of x or y gathered into the variable (C order of ``shape``)
    shape: tuple
    dual: bool = False  # read from y (a constraint's dual variable) instead of x
    scale: Optional[torch.Tensor] = None  # per entry (a PSD dual: 1/√2 off the diagonal, undoing svec)


class Canonical:
    """The parametrized cone program of a DPP problem: ``params → (A, b, c)`` and ``x → variables``.

    Built by :func:`canonicalize`; holds no reference to cvxpy objects after construction except
    the shapes and names it needs.  ``m, n``: rows and columns of ``A``; ``cones``: the SCS cone dict.
    """

    def __init__(self, m, n, cones, param_shapes, param_names, param_attributes, maps, outputs):
        self.m, self.n, self.cones = m, n, cones
        self.param_shapes = param_shapes
        self.param_names = param_names  # the cvxpy Parameters' names, for messages
        self.param_attributes = param_attributes  # per parameter, the value attributes it declares (_VALUE_RULES)
        self.param_sizes = [_prod(s) for s in param_shapes]
        self.maps = maps  # {"A": _Map, "b": _Map, "c": _Map}
        self.outputs = outputs  # [_Output]
        self._cache: dict = {}

    # ---------------------------------------------------------------- parameters -> (A, b, c)
    def batch_shape(self, params: Sequence[torch.Tensor]) -> tuple:
        """Check the parameter tensors (number, shape, dtype, device, finite, declared attributes); the batch
        shape ``()`` or ``(B,)``."""
        if len(params) != len(self.param_shapes):
            raise InputError(f"the layer takes {len(self.param_shapes)} parameter tensors (one per cvxpy Parameter, "
                             f"in the order given to the layer), got {len(params)}")
        batch = None
        ref = None
        for i, (t, shape) in enumerate(zip(params, self.param_shapes)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"parameter {i} must be a torch.Tensor of shape {shape} (or (B, *{shape})), got "
                                 f"{type(t).__name__}")
            if not t.is_floating_point() or t.dtype not in (torch.float32, torch.float64):
                raise InputError(f"parameter {i} has dtype {t.dtype}; pass float32 or float64 (e.g. t.double()"
                                 f"{autocast_hint(t)})")
            if ref is None:
                ref = t
            elif t.dtype != ref.dtype or t.device != ref.device:
                raise InputError(f"parameter {i} is {t.dtype} on {t.device} but parameter 0 is {ref.dtype} on "
                                 f"{ref.device}; pass every parameter with one dtype on one device")
            if tuple(t.shape) == shape:
                continue
            if t.dim() == len(shape) + 1 and tuple(t.shape[1:]) == shape:
                if batch is not None and batch != t.shape[0]:
                    raise InputError(f"parameter {i} has batch size {t.shape[0]} but an earlier one has {batch}; "
                                     "batched parameters must share their leading dimension")
                batch = t.shape[0]
                continue
            raise InputError(f"parameter {i} has shape {tuple(t.shape)} but its cvxpy Parameter has shape {shape}; "
                             f"pass {shape} or (B, *{shape}) with a leading batch dimension")
        for i, t in enumerate(params):
            check_finite(f"parameter {i} (cvxpy Parameter {self.param_names[i]!r})", t)
        self._check_values(params)
        return () if batch is None else (batch,)

    def data(self, params: Sequence[torch.Tensor]):
        """``(A, b, c, batch)`` for the parameter tensors: ``A`` ``(*, m, n)``, ``b`` ``(*, m)``, ``c`` ``(*, n)``.

        Each of ``A, b, c`` is batched only if a parameter it depends on is; the others broadcast.  If
        parameters are batched but none of ``A, b, c`` reads them (e.g. a constant term of the objective),
        ``c`` is built batched so that the solution stays connected to them (a zero gradient).
        An empty batch (``B = 0``) gives empty batched data.
        """
        batch = self.batch_shape(params)
        ref = params[0] if params else None
        dtype = ref.dtype if ref is not None else torch.float64
        device = ref.device if ref is not None else torch.device("cpu")
        maps = self._maps_on(dtype, device)
        batched = {i for i, t in enumerate(params) if t.dim() > len(self.param_shapes[i])}
        unread = batched and not any(mp.params & batched for mp in maps.values())
        B = batch[0] if batch else 1
        one = torch.ones(1, 1, dtype=dtype, device=device)
        full = None
        single = None
        out = {}
        for name, mp in maps.items():
            if mp.params & batched or (unread and name == "c"):
                if full is None:
                    full = torch.cat([t.reshape(B, size) if i in batched else t.reshape(1, size).expand(B, size)
                                      for i, (t, size) in enumerate(zip(params, self.param_sizes))]
                                     + [one.expand(B, 1)], dim=1)
                p, lead = full, batch
            else:
                if single is None:  # the columns of batched parameters are zero here, and never read
                    single = torch.cat([t.new_zeros(1, size) if i in batched else t.reshape(1, size)
                                        for i, (t, size) in enumerate(zip(params, self.param_sizes))] + [one], dim=1)
                p, lead = single, ()
            flat = SparseAffineFn.apply(p, mp.matrix, mp.transposed)  # batch-major: the solver's products read rows
            out[name] = flat.reshape(lead + ((self.m, self.n) if name == "A" else (mp.size,)))
        return out["A"], out["b"], out["c"], batch

    def _check_values(self, params: Sequence[torch.Tensor]) -> None:
        """Raise if a parameter tensor breaks its Parameter's declared value attribute (see the module
        docstring); one host sync per declared attribute, skipped under vmap as :func:`check_finite` is."""
        for i, (t, attrs) in enumerate(zip(params, self.param_attributes)):
            if is_vmapped(t):
                continue
            for attr in attrs:
                ok, meaning = _VALUE_RULES[attr]
                if not bool(ok(t.detach()).all()):
                    raise InputError(f"parameter {i} (cvxpy Parameter {self.param_names[i]!r}) is declared "
                                     f"{attr}=True but its value is not {meaning} (as cvxpy checks it); the "
                                     "canonical problem assumes it, so pass values that satisfy it or declare the "
                                     "Parameter without the attribute")

    def _maps_on(self, dtype, device):
        key = (dtype, str(device))
        if key not in self._cache:
            self._cache[key] = {name: mp._replace(matrix=mp.matrix.to(device=device, dtype=dtype),
                                                  transposed=mp.transposed.to(device=device, dtype=dtype))
                                for name, mp in self.maps.items()}
        return self._cache[key]

    # ---------------------------------------------------------------- (x, y) -> variables
    def variables(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple:
        """The variables' values from the primal solution ``x`` ``(*, n)`` (and the dual ``y`` ``(*, m)`` for
        constraints' dual variables): a tuple of ``(*, *shape)``."""
        lead = tuple(x.shape[:-1])
        vals = []
        for out in self.outputs:
            src = y if out.dual else x
            if src is None:
                raise InputError("this layer returns a constraint's dual variable: pass the dual solution y")
            v = src[..., out.index.to(src.device)]
            if out.scale is not None:
                v = v * out.scale.to(device=v.device, dtype=v.dtype)
            vals.append(v.reshape(lead + out.shape))
        return tuple(vals)


def solve_canonical(canon: Canonical, params: Sequence[torch.Tensor], *, rtol=None, on_failure="raise"):
    """Solve the canonical cone program at the parameter tensors: ``(variables tuple, SolveInfo)``.

    ``A, b, c`` are built by :meth:`Canonical.data` and handed to
    :func:`~implicitdiff.cone_program` (which differentiates the solution map; the gradient reaches the
    parameters through the affine map).  Failed elements follow ``on_failure`` there; an empty batch
    gives empty results (zero gradients) there too.
    """
    A, b, c, _ = canon.data(params)
    x, y, _, info = cone_program(A, b, c, canon.cones, rtol=rtol, on_failure=on_failure, return_info=True)
    return canon.variables(x, y), info


_EPS_KEYS = ("eps", "eps_abs", "eps_rel")


def rtol_from_solver_args(solver_args: Optional[dict], default=None):
    """The ``rtol`` that cvxpylayers' ``solver_args`` ask for: ``eps`` / ``eps_abs`` / ``eps_rel`` (the
    smallest given); any other key raises :class:`InputError` (it has no meaning for ``cone_program``)."""
    if solver_args is None:
        return default
    if not isinstance(solver_args, dict):
        raise InputError(f"solver_args must be a dict (e.g. {{'eps': 1e-8}}), got {type(solver_args).__name__}")
    other = [k for k in solver_args if k not in _EPS_KEYS]
    if other:
        raise InputError(f"solver_args {other} have no counterpart in implicitdiff.cone_program; only {_EPS_KEYS} "
                         "(the relative tolerance, rtol) apply. Remove the others")
    eps = [check_real(f"solver_args[{k!r}]", solver_args[k], low=0.0, low_open=True) for k in _EPS_KEYS
           if k in solver_args]
    return min(eps) if eps else default


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ==================================================================== canonicalization (imports cvxpy)
def canonicalize(problem, parameters, variables, *, canon_backend: Optional[str] = None) -> Canonical:
    """Canonicalize a DPP ``cvxpy.Problem`` once; see the module docstring.

    Args:
        problem: a ``cvxpy.Problem`` that is DCP under DPP rules (``problem.is_dpp()``).
        parameters: the problem's ``cvxpy.Parameter`` objects, all of them, in the order the tensors
            will be passed.
        variables: ``cvxpy.Variable`` objects of the problem whose values are returned, in order, or the
            dual variables of its constraints (``constraint.dual_variables[0]``), read from ``y``.
        canon_backend: passed to ``problem.get_problem_data`` (cvxpy's canonicalization backend).

    Raises:
        InputError: not a ``cvxpy.Problem``, not DPP, parameters that are not exactly the
            problem's, variables that are not the problem's, cones ``cone_program`` does not take
            (power cones), parameters with attributes that change their stored size (``diag``,
            sparsity patterns), integer or boolean variables.
    """
    import cvxpy as cp

    if not isinstance(problem, cp.Problem):
        raise InputError(f"problem must be a cvxpy.Problem, got {type(problem).__name__}")
    for name, seq in (("parameters", parameters), ("variables", variables)):
        if not isinstance(seq, (list, tuple)):
            raise InputError(f"{name} must be a list or tuple of cvxpy objects, got {type(seq).__name__}")
    parameters, variables = list(parameters), list(variables)
    if not problem.is_dcp(dpp=True):
        why = "it is DCP but not DPP" if problem.is_dcp() else "it is not even DCP"
        raise InputError(f"problem must be DPP (disciplined parametrized programming), but {why}: products of "
                         "parameters with parameter-dependent expressions of variables are not affine in the "
                         "parameters. Rewrite it so parameters enter affinely (see cvxpy's DPP rules), e.g. replace "
                         "a product of two parameters by a new parameter")
    discrete = [v.name() for v in problem.variables() if v.attributes["integer"] or v.attributes["boolean"]]
    if discrete or any(isinstance(con, getattr(cp.constraints, "FiniteSet", ())) for con in problem.constraints):
        what = f"integer or boolean variables {discrete}" if discrete else "a FiniteSet constraint"
        raise InputError(f"the problem has {what}: a mixed-integer program has no solution map to differentiate, "
                         "and cone_program solves convex cone programs only. Relax them to continuous "
                         "variables (e.g. 0 <= x <= 1 for a boolean)")
    bad = [p for p in parameters if not isinstance(p, cp.Parameter)]
    if bad:
        raise InputError(f"parameters must be cvxpy.Parameter objects; got {[type(b).__name__ for b in bad]}")
    own = problem.parameters()
    given, owned = [p.id for p in parameters], {p.id for p in own}
    wrong = {"given more than once": list(dict.fromkeys(p.name() for p in parameters if given.count(p.id) > 1)),
             "missing": [p.name() for p in own if p.id not in given],
             "not in the problem": [p.name() for p in parameters if p.id not in owned]}
    if any(wrong.values()):
        what = "; ".join(f"{k}: {v}" for k, v in wrong.items() if v)
        raise InputError(f"parameters must be exactly the problem's parameters, each once ({what}); pass "
                         "problem.parameters() in the order you will feed them")
    own_vars = {v.id for v in problem.variables()}
    duals = {dv.id: con for con in problem.constraints for dv in con.dual_variables}
    for v in variables:
        if not isinstance(v, cp.Variable) or (v.id not in own_vars and v.id not in duals):
            raise InputError(f"variables must be cvxpy.Variables of the problem or dual variables of its constraints; "
                             f"{v!r} is neither (the problem's variables: {[w.name() for w in problem.variables()]})")
    try:
        data, chain, _ = problem.get_problem_data(solver=_cone_data_solver(), canon_backend=canon_backend)
    except cp.error.DCPError as err:  # pragma: no cover - is_dcp(dpp=True) caught it above
        raise InputError(f"problem is not DPP: {err}") from None
    except cp.error.SolverError as err:  # cvxpy found no reduction to SCS's cones (e.g. norm_inf of a parametrized
        # expression in cvxpy 1.9): its own message names no atom
        raise InputError(f"cvxpy could not reduce this problem to the cones cone_program takes (z, l, q, s, ep): "
                         f"{err} Rewrite the atom cvxpy cannot reduce for an SCS-type solver, e.g. "
                         "cp.norm_inf(v) as cp.max(cp.abs(v)).") from None
    prog = data[cp.settings.PARAM_PROB]
    cones = _cones(data["dims"])
    idx, ptr, (m, n1) = prog.reduced_A.problem_data_index
    m, n = int(m), int(n1) - 1
    pmap = _param_columns(prog, chain, parameters)
    maps = _maps(prog, idx, ptr, m, n, pmap)
    outputs = [_output(prog, chain, v) if v.id in own_vars else _dual_output(prog, chain, v, duals[v.id])
               for v in variables]
    return Canonical(m, n, cones, [tuple(int(s) for s in p.shape) for p in parameters],
                     [p.name() for p in parameters],
                     [tuple(a for a in _VALUE_RULES if p.attributes.get(a)) for p in parameters], maps, outputs)


def _cone_data_solver():
    """cvxpy's SCS interface, declaring no quadratic objective (see the module docstring)."""
    from cvxpy.reductions.solvers.conic_solvers.scs_conif import SCS

    class ConeProgramData(SCS):
        def name(self):
            return "IMPLICITDIFF_CONE_PROGRAM"  # a custom solver may not take an official name

        def supports_quad_obj(self):
            return False

    return ConeProgramData()


def _cones(dims) -> dict:
    from cvxpy.reductions.solvers.conic_solvers.scs_conif import dims_to_solver_dict

    d = dims_to_solver_dict(dims)
    unsupported = {k: v for k, v in d.items() if k not in CONE_KEYS + ("f",) and v not in (0, [], None)}
    if unsupported:
        raise InputError(f"the problem needs cones that cone_program does not take ({unsupported}: power cones). "
                         "Build the power atoms (power, pnorm with p ∉ {1, 2, inf}, geo_mean, …) with approx=True "
                         "(cvxpy's default: second-order cones) and do not write PowCone3D/PowConeND constraints")
    return {"z": int(d.get("z", d.get("f", 0))), "l": int(d.get("l", 0)), "q": [int(q) for q in d.get("q", [])],
            "s": [int(s) for s in d.get("s", [])], "ep": int(d.get("ep", 0))}


def _id_map(chain, name):
    compose = getattr(chain, name, None)  # cvxpy ≥ 1.7 renames lowered variables and parameters
    return {k: v[0] for k, v in compose().items()} if compose is not None else {}


def _param_columns(prog, chain, parameters):
    """``column of p̃ → index into the flat user vector`` (parameters in user order, each in C order, then 1)."""
    import numpy as np

    ids = _id_map(chain, "compose_param_id_map")
    P = int(prog.total_param_size)
    col2flat = np.full(P + 1, -1, dtype=np.int64)
    col2param = np.full(P + 1, -1, dtype=np.int64)
    offset = 0
    for i, par in enumerate(parameters):
        shape = tuple(int(s) for s in par.shape)
        pid = ids.get(par.id, par.id)
        col, size = int(prog.param_id_to_col[pid]), int(prog.param_id_to_size[pid])
        col2flat[col:col + size] = offset + _stored_to_c_order(shape, size, f"parameter {par.name()}")
        col2param[col:col + size] = i
        offset += _prod(shape)
    col2flat[P] = offset  # the constant 1
    if (col2flat < 0).any():  # pragma: no cover - cvxpy columns that no parameter claims
        raise InputError("cvxpy's parametrized program has parameter columns that no given parameter fills")
    return col2flat, col2param


def _stored_to_c_order(shape, size, what):
    """For each stored entry (cvxpy's order), the C-order flat index of the entry in ``shape``."""
    import numpy as np

    total = _prod(shape)
    if size == total:  # column-major
        return np.arange(total).reshape(shape).flatten(order="F")
    k = shape[-1] if len(shape) == 2 and shape[0] == shape[1] else -1
    if k > 0 and size == k * (k + 1) // 2:  # a symmetric matrix lowered to its upper triangle, row by row
        r, c = np.triu_indices(k)
        return r * k + c
    raise InputError(f"{what} is stored in {size} entries for shape {shape}: attributes such as diag=True or a "
                     "sparsity pattern are not supported; declare it without them")


def _maps(prog, idx, ptr, m, n, pmap):
    import numpy as np

    col2flat, col2param = pmap
    mat = prog.reduced_A.reduced_mat.tocoo()
    nz_col = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))  # column of [A | b] of each stored nonzero
    k, j, v = mat.row, mat.col, mat.data
    rows, cols = np.asarray(idx)[k], nz_col[k]
    in_A = cols < n
    maps = {"A": _make(rows[in_A] * n + cols[in_A], j[in_A], -v[in_A], m * n, col2flat, col2param),
            "b": _make(rows[~in_A], j[~in_A], v[~in_A], m, col2flat, col2param)}
    q = prog.q.tocoo() if hasattr(prog.q, "tocoo") else None
    if q is None:  # pragma: no cover - a dense q
        import scipy.sparse as sp
        q = sp.coo_matrix(np.asarray(prog.q))
    keep = q.row < n  # the last row is the objective's constant offset
    maps["c"] = _make(q.row[keep], q.col[keep], q.data[keep], n, col2flat, col2param)
    return maps


def _make(target, col, coef, size, col2flat, col2param):
    import numpy as np

    P = len(col2flat) - 1
    params = frozenset(int(i) for i in np.unique(col2param[col[col < P]]))
    index = torch.as_tensor(np.stack([np.asarray(target, dtype=np.int64), col2flat[col]]))
    width = int(col2flat[P]) + 1  # the user's flat parameters, then the constant 1
    # in range by construction (rows < m, columns < n, parameter columns checked in _param_columns): no
    # invariant check, which costs more than the rest of this map's set-up
    matrix = torch.sparse_coo_tensor(index, torch.as_tensor(np.asarray(coef, dtype=np.float64)), (int(size), width),
                                     check_invariants=False).coalesce()
    return _Map(matrix, matrix.t().coalesce(), int(size), params)


def _output(prog, chain, var):
    import numpy as np

    ids = _id_map(chain, "compose_var_id_map")
    vid = ids.get(var.id, var.id)
    shape = tuple(int(s) for s in var.shape)
    start = int(prog.var_id_to_col[vid])
    later = sorted(c for c in prog.var_id_to_col.values() if c > start)
    size = (later[0] if later else int(prog.x.size)) - start
    stored = _stored_to_c_order(shape, size, f"variable {var.name()}")  # stored entry -> C position
    if size == _prod(shape):
        index = np.empty(size, dtype=np.int64)
        index[stored] = np.arange(size)
    else:  # upper triangle: each (r, c) reads the stored entry of (min, max)
        k = shape[0]
        pos = {int(s): t for t, s in enumerate(stored)}
        r, c = np.divmod(np.arange(k * k), k)
        index = np.array([pos[int(min(a, b_) * k + max(a, b_))] for a, b_ in zip(r, c)], dtype=np.int64)
    return _Output(torch.as_tensor(start + index), shape)


def _dual_output(prog, chain, var, con):
    """A constraint's dual variable from ``y``: the constraint's rows (cones in SCS's order, constraints in
    cvxpy's order within each), the variable's offset among the constraint's dual variables; a PSD
    constraint's dual is its svec block unpacked (lower triangle by columns, off-diagonals ÷ √2)."""
    import numpy as np
    from cvxpy.constraints import PSD, SOC, ExpCone, NonNeg, PowCone3D, Zero

    try:
        from cvxpy.constraints import SvecPSD
    except ImportError:  # pragma: no cover - cvxpy < 1.7
        SvecPSD = PSD
    ids = getattr(chain, "compose_constr_id_map", lambda: {})()
    cid = ids.get(con.id, con.id)
    cid = cid[0] if isinstance(cid, (list, tuple)) else cid
    kinds = [Zero, NonNeg, SOC, PSD] + ([SvecPSD] if SvecPSD is not PSD else []) + [ExpCone, PowCone3D]
    row, pos = None, 0
    for kind in kinds:
        for c in prog.constr_map.get(kind, []):
            if c.id == cid:
                row = pos
                break
            pos += c.shape[0] * (c.shape[0] + 1) // 2 if kind is PSD else int(c.size)
        if row is not None:
            break
    if row is None:  # pragma: no cover - every constraint of the problem has rows
        raise InputError(f"the dual variable {var.name()} has no rows in cvxpy's cone program")
    shape = tuple(int(s) for s in var.shape)
    if isinstance(con, PSD):
        k = shape[0]
        lower = {(i, j): t for t, (i, j) in enumerate((i, j) for j in range(k) for i in range(j, k))}
        r, c = np.divmod(np.arange(k * k), k)
        index = np.array([lower[(max(a, b_), min(a, b_))] for a, b_ in zip(r, c)], dtype=np.int64)
        scale = torch.as_tensor(np.where(r == c, 1.0, 1.0 / np.sqrt(2.0)))
        return _Output(torch.as_tensor(row + index), shape, dual=True, scale=scale)
    offset = 0
    for dv in con.dual_variables:
        if dv.id == var.id:
            break
        offset += int(dv.size)
    stored = _stored_to_c_order(shape, _prod(shape), f"dual variable {var.name()}")
    index = np.empty(len(stored), dtype=np.int64)
    index[stored] = np.arange(len(stored))
    return _Output(torch.as_tensor(row + offset + index), shape, dual=True)
