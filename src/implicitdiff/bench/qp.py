"""Benchmark: the batched QP layer (``qp``) against ProxSuite's QPLayer, qpth and cvxpylayers, with a cvxpy reference.

What is measured, in one process, float64, medians of interleaved repeats (:mod:`._harness`):

* **time** of the forward alone and of forward + backward (``∇`` of ``(z · w).sum()`` with a fixed
  random ``w`` to all six tensors ``Q, p, G, h, A, b``), reported as *ratios peer / ours* (the
  speed-up; higher is better);
* **agreement** on the first ``R`` instances of each batch with a reference: a tight cvxpy
  (Clarabel, tolerances 1e-12) solve finished by a dense numpy solve of the KKT system on its
  active set (so exact to rounding); ``max |z − z_ref|`` and ``max |∇ − ∇_ref|``, where ``∇_ref``
  is the exact active-set KKT gradient (the reduced system ``[[Q, Cᵀ], [C, 0]]``, numpy);
* **float32**: the same instances in float32 against the float64 reference.

Instances (as in OptNet): ``Q = LLᵀ/n + 10⁻³I``, ``G``, ``A`` Gaussian, a random ``z₀`` and slack
``s₀ ≥ 0`` (half of them zero) with ``h = Gz₀ + s₀``, ``b = Az₀``; ``m = n`` inequalities and
``k = 0`` or ``n/5`` equalities; batch 128, ``n = 10, 50, 100``.  The LP family has ``Q = 0``, a box
``|zᵢ| ≤ 1`` and ``n/2`` random rows; qpth needs a positive definite ``Q`` and gets ``10⁻⁶I``
(so it solves a slightly different problem), and so does ProxSuite's QPLayer
(``proxsuite.torch.qplayer.QPFunction``, its defaults: ``eps = 1e-9``, ``eps_backward = 1e-4``; the
inequalities as ``−10²⁰ ≤ Gz ≤ h``; CPU only).  cvxpylayers (``Q = LLᵀ`` as ``½‖Lᵀz‖²``, the DPP
form) is slow: it runs on the first ``R`` instances and its time is scaled to the batch (per
instance × 128); its layer construction is excluded and it runs with one worker
(``n_jobs_forward = n_jobs_backward = 1``), as the others run on one thread.  Peers that are not installed are skipped.

Targets (DESIGN §5), batch 128, n = 100, 100 inequalities, 20 equalities, forward + backward: ≥ 1.5×
faster than ProxSuite's QPLayer, ≥ 6× qpth and ≥ 20× cvxpylayers, gradients within 1e-8 of the exact
active-set gradient on every reference instance; LPs (batch 128, n = 100): ≥ 10× qpth, ≥ 5× cvxpylayers.
Ours runs at its defaults (``rtol = 1e-10``), every peer at its own.

``device="cuda"`` runs ours and qpth on the GPU (instances made on the CPU and moved; ProxSuite and
cvxpylayers are CPU-only and skipped there; references on the CPU).

Example:
    >>> from implicitdiff.bench.qp import run
    >>> results = run(quick=True, out="/tmp/bench-qp.json", plot=False)   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from typing import NamedTuple

import torch

from ..layers.qp import qp
from ._harness import configure_threads, format_table, machine_info, time_callables, write_json

__all__ = ["run", "DEFAULT_OUT", "TARGETS"]

DEFAULT_OUT = "bench-qp.json"
# minimum speed-up, forward + backward: the QP target case and the LP case (batch 128, n = 100)
TARGETS = {"proxsuite": 1.5, "qpth": 6.0, "cvxpylayers": 20.0, "lp_qpth": 10.0, "lp_cvxpylayers": 5.0}
GRAD_TOL = 1e-8
F64 = torch.float64


class Case(NamedTuple):
    label: str
    family: str  # "qp" | "lp"
    n: int
    m: int
    k: int
    batch: int


def _cases(quick):
    if quick:
        return [Case("qp n=10", "qp", 10, 10, 0, 8), Case("qp n=10 eq", "qp", 10, 10, 2, 8),
                Case("lp n=10", "lp", 10, 25, 0, 8)]
    cs = []
    for n in (10, 50, 100):
        cs += [Case(f"qp n={n}", "qp", n, n, 0, 128), Case(f"qp n={n} eq", "qp", n, n, n // 5, 128)]
    return cs + [Case(f"lp n={n}", "lp", n, 2 * n + n // 2, 0, 128) for n in (10, 50, 100)]


def _instance(case, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    B, n, m, k = case.batch, case.n, case.m, case.k

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)
    z0 = r(B, n) if case.family == "qp" else 0.3 * torch.rand(B, n, generator=g, dtype=F64)
    if case.family == "qp":
        L = r(B, n, n)
        Q = L @ L.mT / n + 1e-3 * torch.eye(n, dtype=F64)
        G = r(B, m, n)
        s0 = torch.rand(B, m, generator=g, dtype=F64) * (torch.rand(B, m, generator=g) > 0.5)
    else:
        Q = torch.zeros(B, n, n, dtype=F64)
        eye = torch.eye(n, dtype=F64).expand(B, n, n)
        G = torch.cat([eye, -eye, r(B, m - 2 * n, n) / math.sqrt(n)], dim=1)
        s0 = torch.cat([1 - z0, 1 + z0, torch.rand(B, m - 2 * n, generator=g, dtype=F64)], dim=1)
    h = (G @ z0[..., None])[..., 0] + s0
    A = r(B, k, n)
    b = (A @ z0[..., None])[..., 0]
    p, w = r(B, n), r(B, n)
    return tuple(t.to(dtype) for t in (Q, p, G, h, A, b)), w.to(dtype)


# ----------------------------------------------------------------------------- methods
def _grads(z, w, params):
    return torch.autograd.grad((z * w).sum(), params, allow_unused=True)


def _ours(P, w):
    P = [t.detach().requires_grad_() for t in P]
    return P, _grads(qp(*P), w, P)


def _ours_fwd(P):
    with torch.no_grad():
        return qp(*P)


def _proxsuite_fn():
    try:
        from proxsuite.torch.qplayer import QPFunction
    except (ImportError, OSError):  # not installed, or its compiled part (cmeel) cannot load
        return None
    return QPFunction


def _proxsuite(P, w, family, fwd_only=False):
    """ProxSuite's QPLayer at its defaults; ``−10²⁰ ≤ Gz ≤ h``; ``Q + 10⁻⁶I`` for LPs (as qpth)."""
    QPFunction = _proxsuite_fn()
    Q, p, G, h, A, b = [t.detach().requires_grad_() for t in P]
    Qq = Q + 1e-6 * torch.eye(Q.shape[-1], dtype=Q.dtype) if family == "lp" else Q
    e = torch.Tensor().to(Q.dtype)
    args = (Qq, p, A if A.shape[-2] else e, b if b.shape[-1] else e, G, torch.full_like(h, -1e20), h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fwd_only:
            with torch.no_grad():
                return QPFunction()(*args)[0]
        z = QPFunction()(*args)[0]
    return [Q, p, G, h, A, b], _grads(z, w, [Q, p, G, h, A, b])


def _qpth_fn():
    try:
        from qpth.qp import QPFunction
    except ImportError:
        return None
    return QPFunction


def _qpth(P, w, family, fwd_only=False):
    QPFunction = _qpth_fn()
    Q, p, G, h, A, b = [t.detach().requires_grad_() for t in P]
    Qq = Q + 1e-6 * torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device) if family == "lp" else Q
    e = torch.Tensor().to(dtype=Q.dtype, device=Q.device)
    args = (Qq, p, G, h, A if A.shape[-2] else e, b if b.shape[-1] else e)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fwd_only:
            with torch.no_grad():
                return QPFunction(verbose=-1)(*args)
        z = QPFunction(verbose=-1)(*args)
    return [Q, p, G, h, A, b], _grads(z, w, [Q, p, G, h, A, b])


def _cvxpylayer(n, m, k):
    try:
        cp = importlib.import_module("cvxpy")
        CvxpyLayer = importlib.import_module("cvxpylayers.torch").CvxpyLayer
    except ImportError:
        return None
    L, p = cp.Parameter((n, n)), cp.Parameter(n)
    G, h, A, b = cp.Parameter((m, n)), cp.Parameter(m), cp.Parameter((k, n)), cp.Parameter(k)
    z = cp.Variable(n)
    cons = [G @ z <= h] + ([A @ z == b] if k else [])
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(L.T @ z) + p @ z), cons)
    params = [L, p, G, h] + ([A, b] if k else [])
    return CvxpyLayer(prob, parameters=params, variables=[z])


def _cvxpylayers(layer, P, w, family):
    Q, p, G, h, A, b = [t.detach() for t in P]
    n = Q.shape[-1]
    L = torch.linalg.cholesky(Q) if family == "qp" else torch.zeros_like(Q)
    ins = [L, p, G, h] + ([A, b] if A.shape[-2] else [])
    ins = [t.clone().requires_grad_() for t in ins]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one worker, like every other contender (diffcp's default pool would use every core)
        (z,) = layer(*ins, solver_args={"n_jobs_forward": 1, "n_jobs_backward": 1})
    gs = _grads(z, w, ins)
    return z.detach(), dict(zip(["L", "p", "G", "h", "A", "b"], gs)), n


# ----------------------------------------------------------------------------- reference
def _reference(P, R):
    """Tight cvxpy (Clarabel) solves of the first ``R`` instances, each finished by a dense solve of the
    equality-constrained KKT system on its active set: ``[(z, λ, ν)]`` (numpy), or ``None``."""
    try:
        cp = importlib.import_module("cvxpy")
    except ImportError:
        return None
    import numpy as np

    out = []
    for i in range(R):
        Q, p, G, h, A, b = (t[i].double().cpu().numpy() for t in P)
        Q = 0.5 * (Q + Q.T)
        z = cp.Variable(p.shape[0])
        cons = [G @ z <= h] + ([A @ z == b] if A.shape[0] else [])
        prob = cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + p @ z), cons)
        for tol in (1e-12, 1e-10, 1e-8):
            try:
                prob.solve(solver=cp.CLARABEL, tol_gap_abs=tol, tol_gap_rel=tol, tol_feas=tol, max_iter=400)
                break
            except cp.error.SolverError:
                continue
        lam = np.maximum(cons[0].dual_value, 0)
        act = lam > 1e-7 * max(1.0, lam.max())
        C = np.concatenate([G[act], A])
        n, r = Q.shape[0], C.shape[0]
        K = np.block([[Q, C.T], [C, np.zeros((r, r))]])
        x = np.linalg.lstsq(K, np.concatenate([-p, h[act], b]), rcond=None)[0]
        lam_ref = np.zeros_like(lam)
        lam_ref[act] = x[n:n + act.sum()]
        out.append((x[:n], lam_ref, x[n + act.sum():]))
    return out


def _active_set_grads(P, i, ref, w):
    """The exact gradient of ``w·z`` on the reference's active set (dense numpy KKT solve)."""
    import numpy as np

    Q, p, G, h, A, b = (t[i].double().cpu().numpy() for t in P)
    z, lam, nu = ref
    act = lam > 1e-7 * max(1.0, np.abs(lam).max())
    C = np.concatenate([G[act], A])
    n, r = Q.shape[0], C.shape[0]
    K = np.block([[0.5 * (Q + Q.T), C.T], [C, np.zeros((r, r))]])
    u = np.linalg.lstsq(K, np.concatenate([w[i].double().cpu().numpy(), np.zeros(r)]), rcond=None)[0]
    uz, uc = u[:n], u[n:]
    mu = np.concatenate([lam[act], nu])
    gC = -(np.outer(uc, z) + np.outer(mu, uz))
    gG = np.zeros_like(G)
    gG[act] = gC[: act.sum()]
    gh = np.zeros(G.shape[0])
    gh[act] = uc[: act.sum()]
    return dict(Q=-0.5 * (np.outer(uz, z) + np.outer(z, uz)), p=-uz, G=gG, h=gh, A=gC[act.sum():],
                b=uc[act.sum():])


def _max_err(got: dict, refs: list, names, R):
    worst = 0.0
    for i in range(R):
        for nm in names:
            g = got.get(nm)
            if g is None:
                continue
            d = float((g[i].double().cpu() - torch.as_tensor(refs[i][nm])).abs().max()) if g[i].numel() else 0.0
            worst = max(worst, d if math.isfinite(d) else float("inf"))
    return worst


# ----------------------------------------------------------------------------- one case
def _add_peer(fns, rows, name, run, P, w, family) -> bool:
    """Run peer ``name`` once; if it works, add its forward and forward+backward to ``fns`` (else
    record its error in ``rows``). Returns whether it is timed."""
    try:
        run(P, w, family)
    except Exception as err:  # noqa: BLE001 - a peer failing is a result
        rows[f"{name}_error"] = f"{type(err).__name__}: {str(err)[:100]}"
        return False
    fns[f"{name} fwd"] = lambda: run(P, w, family, fwd_only=True)
    fns[name] = lambda: run(P, w, family)
    return True


def _measure(case, *, repeats, R, cvx_R, cvx_repeats, device="cpu"):
    P, w = _instance(case)
    P, w = tuple(t.to(device) for t in P), w.to(device)
    cpu = torch.device(device).type == "cpu"
    rows = dict(case=case.label, family=case.family, n=case.n, m=case.m, k=case.k, batch=case.batch)
    fns = {"ours fwd": lambda: _ours_fwd(P), "ours": lambda: _ours(P, w)}
    prox_ok = cpu and _proxsuite_fn() is not None and _add_peer(fns, rows, "proxsuite", _proxsuite, P, w, case.family)
    qpth_ok = _qpth_fn() is not None and _add_peer(fns, rows, "qpth", _qpth, P, w, case.family)
    t = time_callables(fns, warmup=1, repeats=repeats, device=device)
    for name, tm in t.items():
        rows[f"{name} ms".replace(" ", "_")] = 1e3 * tm.median
    # cvxpylayers (CPU only): the first cvx_R instances, time scaled to the batch
    layer = _cvxpylayer(case.n, case.m, case.k) if cpu else None
    cvx = None
    if layer is not None:
        Psub = [x[:cvx_R] for x in P]
        samples = []
        for _ in range(cvx_repeats):
            t0 = time.perf_counter()
            cvx = _cvxpylayers(layer, Psub, w[:cvx_R], case.family)
            samples.append(time.perf_counter() - t0)
        rows["cvxpylayers_ms"] = 1e3 * sorted(samples)[len(samples) // 2] * case.batch / cvx_R
        rows["cvxpylayers_note"] = (f"median of {cvx_repeats} runs on {cvx_R} instances, scaled to {case.batch} "
                                    "(per instance x batch)")
    ours = rows["ours_ms"]
    rows["speedup_qpth"] = rows.get("qpth_ms", math.nan) / ours
    rows["speedup_proxsuite"] = rows.get("proxsuite_ms", math.nan) / ours
    rows["speedup_cvxpylayers"] = rows.get("cvxpylayers_ms", math.nan) / ours
    # agreement with the reference
    refs = _reference(P, R)
    if refs is not None:
        zr = torch.from_numpy(__import__("numpy").array([r[0] for r in refs]))
        grefs = [_active_set_grads(P, i, refs[i], w) for i in range(R)]
        names = ("Q", "p", "G", "h", "A", "b")
        Pq, gq = _ours(P, w)
        zo = _ours_fwd(P)
        zr = zr.to(device)
        rows["ours_z_err"] = float((zo[:R] - zr).abs().max())
        rows["ours_grad_err"] = _max_err(dict(zip(names, gq)), grefs, names, R)
        if qpth_ok:
            zq = _qpth(P, w, case.family, fwd_only=True)
            _, gqq = _qpth(P, w, case.family)
            rows["qpth_z_err"] = float((zq[:R] - zr).abs().max())
            rows["qpth_grad_err"] = _max_err(dict(zip(names, gqq)), grefs, names, R)
        if prox_ok:
            zx = _proxsuite(P, w, case.family, fwd_only=True)
            _, gx = _proxsuite(P, w, case.family)
            rows["proxsuite_z_err"] = float((zx[:R] - zr).abs().max())
            rows["proxsuite_grad_err"] = _max_err(dict(zip(names, gx)), grefs, names, R)
        if cvx is not None:
            Rc = min(R, cvx_R)
            rows["cvxpylayers_z_err"] = float((cvx[0][:Rc] - zr[:Rc].cpu()).abs().max())
            rows["cvxpylayers_grad_err"] = _max_err(cvx[1], grefs, ("p", "G", "h", "A", "b"), Rc)
        # float32: ours and qpth on the same instances, against the float64 reference
        P32 = tuple(x.float() for x in P)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            z32 = _ours_fwd(P32).double()
            scale = 1 + zr.abs().amax(-1)
            rows["ours_f32_bad"] = int(((z32[:R] - zr).abs().amax(-1) > 1e-3 * scale).sum())
            if qpth_ok:
                try:
                    zq32 = _qpth(P32, w.float(), case.family, fwd_only=True).double()
                    bad = ~((zq32[:R] - zr).abs().amax(-1) <= 1e-3 * scale)
                    rows["qpth_f32_bad"] = int(bad.sum())
                except Exception as err:  # noqa: BLE001
                    rows["qpth_f32_bad"] = f"error: {type(err).__name__}"
        rows["reference_instances"] = R
    return rows


def _batch_sweep(sizes, repeats, device="cpu"):
    out = []
    for B in sizes:
        case = Case(f"qp n=50 eq B={B}", "qp", 50, 50, 10, B)
        P, w = _instance(case)
        P, w = tuple(t.to(device) for t in P), w.to(device)
        fns = {"ours": lambda: _ours(P, w)}
        if _qpth_fn() is not None:
            fns["qpth"] = lambda: _qpth(P, w, "qp")
        t = time_callables(fns, warmup=1, repeats=repeats, device=device)
        out.append(dict(batch=B, **{f"{k}_ms": 1e3 * v.median for k, v in t.items()}))
    return out


def _summary(rows):
    """The targets of DESIGN §5 at the QP case ``qp n=100 eq`` and the LP case ``lp n=100`` (those run)."""
    qp_row = next((r for r in rows if r["case"] == "qp n=100 eq"), None)
    lp_row = next((r for r in rows if r["case"] == "lp n=100"), None)
    checks = []
    if qp_row is not None:
        checks += [("proxsuite", qp_row, "speedup_proxsuite"), ("qpth", qp_row, "speedup_qpth"),
                   ("cvxpylayers", qp_row, "speedup_cvxpylayers")]
    if lp_row is not None:
        checks += [("lp_qpth", lp_row, "speedup_qpth"), ("lp_cvxpylayers", lp_row, "speedup_cvxpylayers")]
    summary = {}
    for name, row, key in checks:
        v = row.get(key, math.nan)
        if math.isnan(v):  # the peer is not installed (or not on this device): no verdict
            continue
        summary[f"{name}_speedup"] = v
        summary[f"{name}_met"] = bool(v >= TARGETS[name])
    for label, row in (("qp", qp_row), ("lp", lp_row)):
        if row is not None and "ours_grad_err" in row:
            summary[f"{label}_grad_err"] = row["ours_grad_err"]
            summary[f"{label}_grad_met"] = bool(row["ours_grad_err"] <= GRAD_TOL)
    if summary:
        summary["targets_met"] = all(v for k, v in summary.items() if k.endswith("_met"))
    return summary


def run(quick: bool = False, out: str | None = None, *, device: str = "cpu", plot: bool = True, threads: int = 1,
        cases=None) -> dict:
    """Run the benchmark, print the table, write JSON (default ``bench-qp.json``) and a plot; return the results.

    ``device``: where ours and qpth run (``"cuda"``: ProxSuite and cvxpylayers, CPU-only, are skipped).
    ``cases``: labels to run (e.g. ``("qp n=100 eq", "lp n=100")``; default all, or the quick set).
    """
    previous = configure_threads(threads)
    try:
        repeats, R, cvx_R = (2, 4, 4) if quick else (5, 32, 8)
        rows = []
        for case in _cases(quick):
            if cases is not None and case.label not in cases:
                continue
            t0 = time.perf_counter()
            rows.append(_measure(case, repeats=repeats, R=min(R, case.batch), cvx_R=min(cvx_R, case.batch),
                                 cvx_repeats=1 if quick else 3, device=device))
            print(f"  {case.label}: {time.perf_counter() - t0:.1f} s", flush=True)
        sweep = [] if cases is not None else _batch_sweep((8, 32) if quick else (16, 64, 256), repeats, device)
    finally:
        configure_threads(previous)
    cols = [("case", "case", "s"), ("ours_fwd_ms", "ours fwd ms", ".1f"), ("ours_ms", "ours f+b ms", ".1f"),
            ("proxsuite_ms", "proxsuite f+b ms", ".1f"), ("speedup_proxsuite", "× proxsuite", ".2f"),
            ("qpth_ms", "qpth f+b ms", ".1f"), ("speedup_qpth", "× qpth", ".2f"),
            ("cvxpylayers_ms", "cvxpyl. f+b ms*", ".0f"), ("speedup_cvxpylayers", "× cvxpyl.", ".1f"),
            ("ours_grad_err", "ours ∇err", ".1e"), ("proxsuite_grad_err", "proxsuite ∇err", ".1e"),
            ("qpth_grad_err", "qpth ∇err", ".1e"), ("cvxpylayers_grad_err", "cvxpyl. ∇err", ".1e"),
            ("ours_z_err", "ours z err", ".1e"), ("proxsuite_z_err", "proxsuite z err", ".1e"),
            ("qpth_z_err", "qpth z err", ".1e"), ("ours_f32_bad", "ours f32 bad", "s"),
            ("qpth_f32_bad", "qpth f32 bad", "s")]
    table = format_table(rows, cols, title="Batched QP, forward + backward (× = peer time / ours; higher is better)")
    print(table)
    print(f"* cvxpylayers: median of {1 if quick else 3} runs on the first {cvx_R} instances, scaled to the batch "
          f"(per instance × batch); errors on the "
          f"first {R} instances against cvxpy/Clarabel + an active-set KKT solve (∇: the exact active-set gradient); "
          f"f32 bad: float32 solutions off the float64 reference by > 1e-3 (1 + |z|). Tolerances: ours rtol 1e-10; "
          f"ProxSuite eps 1e-9, eps_backward 1e-4; qpth eps 1e-12; cvxpylayers (SCS via diffcp) its defaults")
    summary = _summary(rows)
    if summary:
        print("targets (batch 128, n = 100): " + ", ".join(f"{k} = {v}" for k, v in summary.items()))
    results = dict(benchmark="qp", machine=machine_info(device), settings=dict(quick=quick, threads=threads,
                   repeats=repeats, reference_instances=R, cvxpylayers_instances=cvx_R, device=str(device)),
                   targets=dict(TARGETS, grad_tol=GRAD_TOL), rows=rows, batch_sweep=sweep, summary=summary)
    path = write_json(out or DEFAULT_OUT, results)
    print(f"wrote {path}")
    if plot and sweep:
        results["plot"] = _plot(rows, sweep, os.path.splitext(path)[0] + ".png")
    return results


def _plot(rows, sweep, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path} (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for fam, marker in (("qp", "o"), ("qp eq", "s"), ("lp", "^")):
        sel = [r for r in rows if (r["family"] == "lp") == (fam == "lp") and (r["k"] > 0) == (fam == "qp eq")]
        if not sel:
            continue
        ns = [r["n"] for r in sel]
        for key, style, lab, color in (("ours_ms", "-", "ours", "tab:blue"), ("qpth_ms", "--", "qpth", "tab:orange"),
                                       ("cvxpylayers_ms", ":", "cvxpylayers*", "tab:gray")):
            ys = [r.get(key) for r in sel]
            if all(y is not None for y in ys):
                axes[0].plot(ns, ys, style + marker, color=color, label=f"{lab} ({fam})")
    axes[0].set_xlabel("n (batch 128, m = n; lp: m = 2.5n)")
    axes[0].set_ylabel("forward + backward [ms]")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=3, loc="upper left")
    axes[0].set_ylim(top=axes[0].get_ylim()[1] * 8)  # room for the legend
    bs = [s["batch"] for s in sweep]
    for key, style, color in (("ours_ms", "-o", "tab:blue"), ("qpth_ms", "--s", "tab:orange")):
        if all(key in s for s in sweep):
            axes[1].plot(bs, [s[key] for s in sweep], style, color=color, label=key[:-3])
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xticks(bs, [str(b_) for b_ in bs])
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xlabel("batch size (n = 50, m = 50, k = 10)")
    axes[1].set_ylabel("forward + backward [ms]")
    axes[1].legend(fontsize=8)
    fig.suptitle("Batched QP layer: time vs n and vs batch size (float64, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path
