"""Cone programs in SCS form with unique, strictly complementary solutions, and a Clarabel oracle."""

import math

import numpy as np
import torch


def _lp(rng):
    n = 5
    G = rng.standard_normal((8, n))
    x0 = rng.standard_normal(n)
    h = G @ x0 + rng.random(8) + 0.1
    A = np.vstack([np.ones((1, n)), G, np.eye(n), -np.eye(n)])          # z: sum x = sum x0; l: Gx<=h, |x|<=3
    b = np.concatenate([[x0.sum()], h, 3 + np.abs(x0), 3 + np.abs(x0)])
    c = rng.standard_normal(n)
    return A, b, c, {"z": 1, "l": 8 + 2 * n}


def _socp(rng):
    n = 4
    a = rng.standard_normal(n)
    # ‖x − a‖ ≤ 2 (q 5), ‖x[:2]‖ ≤ 3 (q 3), x ≥ −5 (l 4), one equality
    A = np.vstack([np.r_[[1.0], np.zeros(n - 1)][None],
                   -np.eye(n),
                   np.zeros((1, n)), -np.eye(n),
                   np.zeros((1, n)), -np.eye(n)[:2]])
    b = np.concatenate([[a[0]], 5 * np.ones(n), [2.0], -a, [3.0], np.zeros(2)])
    c = rng.standard_normal(n)
    return A, b, c, {"z": 1, "l": n, "q": [n + 1, 3]}


def _sdp(rng):
    k = 3
    d = k * (k + 1) // 2
    C = rng.standard_normal((k, k))
    C = C + C.T
    rows, cols = [], []
    for j in range(k):
        for i in range(j, k):
            rows.append(i)
            cols.append(j)
    scale = np.array([1.0 if i == j else math.sqrt(2) for i, j in zip(rows, cols)])
    svecC = np.array([C[i, j] for i, j in zip(rows, cols)]) * scale
    trace = np.array([1.0 if i == j else 0.0 for i, j in zip(rows, cols)])
    # x = svec X; min tr(CX)  s.t. tr X = 1 (z), X₀₀ ≤ 0.25 and X₁₁ ≤ 0.6 (l 2), X ⪰ 0 (s k)
    diag = [i for i, (r, cc) in enumerate(zip(rows, cols)) if r == cc]
    A = np.zeros((3 + d, d))
    b = np.zeros(3 + d)
    A[0] = trace
    b[0] = 1.0
    A[1, diag[0]], b[1] = 1.0, 0.25
    A[2, diag[1]], b[2] = 1.0, 0.6
    A[3:] = -np.eye(d)
    return A, b, svecC, {"z": 1, "l": 2, "s": [k]}


def _exp(rng):
    k = 4
    q = rng.standard_normal(k)
    # x = (p, t); max Σt + qᵀp  s.t. Σp = 1 (z), p ≤ 0.6 (l k), (tᵢ, pᵢ, 1) ∈ K_exp (tᵢ ≤ −pᵢ log pᵢ)
    n = 2 * k
    A = np.zeros((1 + k + 3 * k, n))
    b = np.zeros(A.shape[0])
    A[0, :k], b[0] = 1.0, 1.0
    A[1:1 + k, :k], b[1:1 + k] = np.eye(k), 0.6
    for i in range(k):
        r = 1 + k + 3 * i
        A[r, k + i] = -1.0
        A[r + 1, i] = -1.0
        b[r + 2] = 1.0
    c = -np.concatenate([q, np.ones(k)])
    return A, b, c, {"z": 1, "l": k, "ep": k}


CASES = {"lp": _lp, "socp": _socp, "sdp": _sdp, "exp": _exp}


def case(name, seed=0):
    A, b, c, cones = CASES[name](np.random.default_rng(seed))
    return torch.tensor(A), torch.tensor(b), torch.tensor(c), cones


def clarabel_solve(A, b, c, cones, tol=1e-11):
    """Solve with Clarabel directly (rows permuted to its PSD triangle order); returns x, y, s."""
    import clarabel
    import scipy.sparse as sp
    A, b, c = (np.asarray(t, dtype=float) for t in (A, b, c))
    perm, at, cl = [], 0, []
    for key in ("z", "l"):
        if cones.get(key, 0):
            perm += list(range(at, at + cones[key]))
            at += cones[key]
            cl.append(clarabel.ZeroConeT(cones[key]) if key == "z" else clarabel.NonnegativeConeT(cones[key]))
    for k in cones.get("q", []):
        perm += list(range(at, at + k))
        at += k
        cl.append(clarabel.SecondOrderConeT(k))
    for k in cones.get("s", []):
        pos = {}
        idx = 0
        for j in range(k):
            for i in range(j, k):
                pos[(i, j)] = at + idx
                idx += 1
        perm += [pos[(j, i)] for j in range(k) for i in range(j + 1)]  # Clarabel: upper triangle by columns
        at += idx
        cl.append(clarabel.PSDTriangleConeT(k))
    for _ in range(cones.get("ep", 0)):
        perm += list(range(at, at + 3))
        at += 3
        cl.append(clarabel.ExponentialConeT())
    perm = np.array(perm)
    st = clarabel.DefaultSettings()
    st.verbose = False
    st.tol_gap_abs = st.tol_gap_rel = st.tol_feas = tol
    st.tol_ktratio = 1e-9
    n = A.shape[1]
    solver = clarabel.DefaultSolver(sp.csc_matrix((n, n)), c, sp.csc_matrix(A[perm]), b[perm], cl, st)
    sol = solver.solve()
    y, s = np.empty(len(b)), np.empty(len(b))
    y[perm], s[perm] = np.array(sol.z), np.array(sol.s)
    return np.array(sol.x), y, s, str(sol.status)
