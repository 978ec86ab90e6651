"""linalg.kkt: the KKT factorization of the QP, against dense oracles (float64)."""

import torch

from implicitdiff.linalg.kkt import ActiveSetKKT, KKTFactorization, kkt_factor, kkt_precompute

F64 = torch.float64


def _data(g, B=4, n=8, m=5, k=2):
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = L @ L.mT + 0.5 * torch.eye(n, dtype=F64)
    G = torch.randn(B, m, n, generator=g, dtype=F64)
    A = torch.randn(B, k, n, generator=g, dtype=F64)
    return Q, G, A


def _dense_active_kkt(Q, G, A, act):
    """The exact active-set KKT matrix [[Q, (MG)ᵀ, Aᵀ], [MG, −(I − M), 0], [A, 0, 0]] of one element."""
    n, m, k = Q.shape[-1], G.shape[-2], A.shape[-2]
    GM = G * act[:, None]
    K = torch.zeros(n + m + k, n + m + k, dtype=F64)
    K[:n, :n] = Q
    K[n:n + m, :n], K[:n, n:n + m] = GM, GM.T
    K[n:n + m, n:n + m] = -torch.diag(1 - act)
    K[n + m:, :n], K[:n, n + m:] = A, A.T
    return K


def _factor(Q, G, A, act, delta):
    pre = kkt_precompute("dual", Q, G, A, None, delta)
    winv = act / delta + (1 - act)
    return kkt_factor("dual", pre, Q, G * act[..., None], A, winv, delta, act)


def test_active_set_solve_matches_the_dense_system_after_put_with_different_active_sizes():
    """Elements re-factored with a larger active set are put back (padding the smaller factor): every
    element's refined solve equals the dense solve of its own exact active-set KKT system."""
    g = torch.Generator().manual_seed(0)
    Q, G, A = _data(g)
    B, n, m, k = Q.shape[0], Q.shape[-1], G.shape[-2], A.shape[-2]
    delta = torch.tensor(1e-10, dtype=F64)
    act = (torch.rand(B, m, generator=g) < 0.3).to(F64)
    act[:, 0] = 1.0
    act2 = act.clone()
    act2[1:3, :4] = 1.0  # elements 1, 2 get more active rows: a bigger factored block
    full = _factor(Q, G, A, act, delta)
    idx = torch.tensor([1, 2])
    part = _factor(Q[idx], G[idx], A[idx], act2[idx], delta)
    merged = full.put(part, idx)
    assert isinstance(merged, KKTFactorization)
    act[idx] = act2[idx]
    kkt = ActiveSetKKT(act, merged, refine_steps=3)
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    (x, y, v), relres = kkt.solve(Q, G, A, r)
    assert float(relres.max()) < 1e-12
    for i in range(B):
        want = torch.linalg.solve(_dense_active_kkt(Q[i], G[i], A[i], act[i]), torch.cat([t[i] for t in r]))
        torch.testing.assert_close(torch.cat([x[i], y[i], v[i]]), want, atol=1e-9, rtol=1e-9)


def test_convexified_kkt_solves_the_original_system():
    """With ``rho``, the factor is of Q + ρAᵀA, and the solve still answers the original K x = r."""
    g = torch.Generator().manual_seed(1)
    _, G, _ = _data(g, B=2)
    B, n, m, k = 2, 8, G.shape[-2], 2
    # indefinite along range(Aᵀ) only: convex on null(A), as the solver convexifies
    A = torch.cat([torch.eye(k, dtype=F64), torch.zeros(k, n - k, dtype=F64)], dim=-1).expand(B, k, n).clone()
    Q = torch.diag(torch.tensor([-1.0, -2.0] + [1.0] * (n - k), dtype=F64)).expand(B, n, n).clone()
    rho = torch.full((B,), 5.0, dtype=F64)
    Qr = Q + rho[:, None, None] * A.mT @ A
    act = torch.ones(B, m, dtype=F64)
    act[:, -2:] = 0
    delta = torch.tensor(1e-10, dtype=F64)
    kkt = ActiveSetKKT(act, _factor(Qr, G, A, act, delta), refine_steps=3, rho=rho)
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    (x, y, v), relres = kkt.solve(Q, G, A, r)
    assert float(relres.max()) < 1e-10
    for i in range(B):
        K = _dense_active_kkt(Q[i], G[i], A[i], act[i])
        assert torch.linalg.cond(K) < 1e8
        want = torch.linalg.solve(K, torch.cat([t[i] for t in r]))
        torch.testing.assert_close(torch.cat([x[i], y[i], v[i]]), want, atol=1e-8, rtol=1e-8)


def test_flatten_round_trip():
    g = torch.Generator().manual_seed(2)
    Q, G, A = _data(g, B=2)
    act = torch.ones(2, G.shape[-2], dtype=F64)
    kkt = ActiveSetKKT(act, _factor(Q, G, A, act, torch.tensor(1e-10, dtype=F64)), 2, torch.ones(2, dtype=F64))
    static, tensors = kkt.flatten()
    back = ActiveSetKKT.unflatten(static, tensors)
    assert back.refine_steps == 2 and back.factor.kind == "dual" and torch.equal(back.rho, kkt.rho)
    assert all(torch.equal(a, b) for a, b in zip(back.factor.tensors, kkt.factor.tensors))


def _dense_lp_kkt(G, A, winv, delta):
    """The regularized KKT matrix of one LP element (``Q = 0``), dense: the reference the factorizations solve."""
    n, m, k = G.shape[-1], G.shape[-2], A.shape[-2]
    K = torch.zeros(n + m + k, n + m + k, dtype=F64)
    K[:n, :n] = delta * torch.eye(n, dtype=F64)
    K[n:n + m, :n], K[:n, n:n + m] = G, G.T
    K[n:n + m, n:n + m] = -torch.diag(1 / winv)
    K[n + m:, :n], K[:n, n + m:] = A, A.T
    K[n + m:, n + m:] = -delta * torch.eye(k, dtype=F64)
    return K


def test_primal_factor_with_bound_rows_equals_the_dense_product():
    """Rows of G with one nonzero (bounds) go on the diagonal of GᵀWG, the others through the product:
    the regularized system's solve equals the dense oracle, with and without a row mask, for a G whose
    elements have different numbers of bound rows (padding of the product's rows); Q = None as Q = 0."""
    g = torch.Generator().manual_seed(3)
    B, n, k = 3, 6, 2
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    G = torch.cat([2.0 * eye, -eye, torch.randn(B, 2, n, generator=g, dtype=F64)], dim=1)
    G[1, 0, 3] = 0.7  # element 1: one bound row made dense (3 dense rows), element 2: a zero-valued bound
    G[2, 4] = 0.0
    m = G.shape[-2]
    Q = torch.zeros(B, n, n, dtype=F64)
    A = torch.randn(B, k, n, generator=g, dtype=F64)
    delta = torch.tensor(1e-3, dtype=F64)
    pre = kkt_precompute("primal", Q, G, A)
    assert pre and pre[0].shape[-1] == 3
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    for mask in (None, (torch.rand(B, m, generator=g) < 0.5).to(F64)):
        winv = torch.rand(B, m, generator=g, dtype=F64) + 0.1
        GM = G if mask is None else G * mask[..., None]
        x, y, v = kkt_factor("primal", pre, Q, GM, A, winv, delta, mask).solve(GM, A, *r)
        xd, yd, vd = kkt_factor("primal", (), Q, GM, A, winv, delta).solve(GM, A, *r)
        for i in range(B):
            want = torch.linalg.solve(_dense_lp_kkt(GM[i], A[i], winv[i], delta), torch.cat([t[i] for t in r]))
            torch.testing.assert_close(torch.cat([x[i], y[i], v[i]]), want, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(torch.cat([x, y, v], -1), torch.cat([xd, yd, vd], -1), atol=1e-9, rtol=1e-9)
        for split in (pre, ()):  # Q = None (an LP: no Q term) factors the same matrix as the zero Q
            with_q, no_q = (kkt_factor("primal", split, q, GM, A, winv, delta, mask).tensors[0] for q in (Q, None))
            assert torch.equal(with_q, no_q)


def test_primal_factor_is_accurate_at_the_end_of_an_lp():
    """The end game of an LP with an equality: ``Q = 0``, the weights of the n − k active rows ~1/δ (bounds on
    n − 2 coordinates and one dense row), the others ~1e-11.  ``H = δI + GᵀWG`` is then ~δ along a direction
    only the equality pins, which the dense row makes oblique: its Cholesky loses every digit there
    (cond(H) ~ 1/δ² > 1/eps) and a Schur complement ``A H⁻¹ Aᵀ`` built on it gave steps wrong by 10⁸
    (batch elements stalled at a residual of ~1).  The factorization must solve the regularized system
    as a dense LU does (to the ~cond(K)·eps that LU itself has)."""
    g = torch.Generator().manual_seed(4)
    B, n, k = 4, 6, 1
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    G = torch.cat([eye, -eye, torch.randn(B, 4, n, generator=g, dtype=F64) / n ** 0.5], dim=1)
    m = G.shape[-2]
    Q = torch.zeros(1, n, n, dtype=F64)
    A = torch.randn(B, k, n, generator=g, dtype=F64)
    A = A / A.abs().amax(-1, keepdim=True)
    delta = torch.tensor(2e-9, dtype=F64)
    active = torch.zeros(B, m, dtype=torch.bool)
    for i in range(B):  # bounds (upper or lower) on n − 2 coordinates, the last dense row: a vertex with A
        perm = torch.randperm(n, generator=g)[: n - 2]
        active[i, perm + n * int(torch.randint(2, (1,), generator=g))] = True
        active[i, -1] = True
    s = torch.where(active, 1e-10, 0.5 + torch.rand(B, m, generator=g, dtype=F64))
    lam = torch.where(active, 0.5 + torch.rand(B, m, generator=g, dtype=F64), 1e-11)
    winv = lam / (s + delta * lam)  # as the interior point factors it
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    for pre in ((), kkt_precompute("primal", Q, G, A)):
        x, y, v = kkt_factor("primal", pre, Q, G, A, winv, delta).solve(G, A, *r)
        for i in range(B):
            want = torch.linalg.solve(_dense_lp_kkt(G[i], A[i], winv[i], delta), torch.cat([t[i] for t in r]))
            err = (torch.cat([x[i], y[i], v[i]]) - want).abs().max() / want.abs().max()
            assert float(err) < 1e-5, (i, float(err))


def test_active_set_solve_reads_g_unmasked_only_where_the_factor_masks_rows():
    """``ActiveSetKKT.solve`` passes ``G`` unmasked to a factorization that masks its rows itself (the dual
    kind, the primal kind with a bound-row split) and ``diag(active) G`` to the plain primal one: every
    kind's refined solve equals the dense solve of the exact active-set KKT system, its product the dense one."""
    g = torch.Generator().manual_seed(5)
    B, n, k = 3, 6, 1
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    G = torch.cat([2.0 * eye, -eye, torch.randn(B, 2, n, generator=g, dtype=F64)], dim=1)
    m = G.shape[-2]
    L = torch.randn(B, n, n, generator=g, dtype=F64)
    Q = L @ L.mT + torch.eye(n, dtype=F64)
    A = torch.randn(B, k, n, generator=g, dtype=F64)
    delta = torch.tensor(1e-10, dtype=F64)
    act = torch.zeros(B, m, dtype=F64)
    act[:, :n] = (torch.rand(B, n, generator=g) < 0.5).to(F64)  # upper bounds only: independent active rows
    act[:, -1] = 1.0
    winv = act / delta + (1 - act)
    r = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
    factors = [_factor(Q, G, A, act, delta),
               kkt_factor("primal", kkt_precompute("primal", Q, G, A), Q, G, A, winv, delta, act),
               kkt_factor("primal", (), Q, G * act[..., None], A, winv, delta, act)]
    assert [f.masks_rows for f in factors] == [True, True, False]
    for f in factors:
        (x, y, v), relres = ActiveSetKKT(act, f, refine_steps=3).solve(Q, G, A, r)
        assert float(relres.max()) < 1e-12
        for i in range(B):
            want = torch.linalg.solve(_dense_active_kkt(Q[i], G[i], A[i], act[i]), torch.cat([t[i] for t in r]))
            torch.testing.assert_close(torch.cat([x[i], y[i], v[i]]), want, atol=1e-9, rtol=1e-9)
        # the product with K (the bound-row split multiplies by its own masked rows) is the dense one
        u = tuple(torch.randn(B, d, generator=g, dtype=F64) for d in (n, m, k))
        Ku = torch.cat(ActiveSetKKT(act, f, refine_steps=3).matvec(Q, G, A, *u), -1)
        for i in range(B):
            want = _dense_active_kkt(Q[i], G[i], A[i], act[i]) @ torch.cat([t[i] for t in u])
            torch.testing.assert_close(Ku[i], want, atol=1e-12, rtol=1e-12)


def test_bound_row_split_finds_each_bound_column_and_value():
    """The bound-row split's column (read off Σⱼ j·Gᵢⱼ / g) and value of every bound row equal the
    definition (the column of the row's only nonzero, its value), for values of any sign and size: also
    a huge one (the product overflows: the argmax fallback) and a subnormal one."""
    g = torch.Generator().manual_seed(5)
    B, n = 3, 7
    eye = torch.eye(n, dtype=F64).expand(B, n, n)
    vals = torch.randn(B, 2 * n, 1, generator=g, dtype=F64) * 10
    G = torch.cat([eye, -eye], dim=1)[:, torch.randperm(2 * n, generator=g)] * vals
    G = torch.cat([G, torch.randn(B, 3, n, generator=g, dtype=F64)], dim=1)
    for big in (None, 1.7e308, 3e-320):
        Gb = G.clone()
        if big is not None:
            Gb[1, 2] = 0.0
            Gb[1, 2, 3] = -big  # a bound row −big·z₃ ≤ h
        dense, Gd, col, gv = kkt_precompute("primal", Gb.new_zeros(1, n, n), Gb, Gb.new_zeros(B, 0, n))
        nz = Gb != 0
        bound = nz.sum(-1) == 1
        bound.scatter_(1, dense, False)
        want_col = nz.to(torch.int8).argmax(-1)
        assert torch.equal(col[bound], want_col[bound])
        assert torch.equal(gv, torch.where(bound, Gb.sum(-1), 0.0))
        assert torch.equal(Gd, torch.gather(Gb, 1, dense.unsqueeze(-1).expand(-1, -1, n)))


def test_cholesky_lower_in_place_equals_the_copying_factor_and_reuses_the_memory():
    from implicitdiff.linalg.kkt import cholesky_lower, cholesky_lower_

    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 7, 7, dtype=torch.float64, generator=g)
    S = X @ X.mT + 0.1 * torch.eye(7, dtype=torch.float64)
    S[2] = -torch.eye(7, dtype=torch.float64)  # not positive definite: info reports it
    L_ref, info_ref = cholesky_lower(S)
    work = S.clone()
    L, info = cholesky_lower_(work)
    assert L.data_ptr() == work.data_ptr()
    assert torch.equal(info, info_ref) and int(info[2]) > 0 and int(info[0]) == 0
    ok = info == 0
    torch.testing.assert_close(L[ok], L_ref[ok], rtol=0, atol=1e-13)
    assert torch.equal(L[ok].triu(1), torch.zeros_like(L[ok]).triu(1))  # the upper triangle is zeroed
    torch.testing.assert_close(L[ok] @ L[ok].mT, S[ok], rtol=1e-12, atol=1e-12)
    # a non-contiguous input is factored through a copy and left as it was
    St = S[ok].mT
    before = St.clone()
    L2, _ = cholesky_lower_(St)
    assert torch.equal(St, before)
    torch.testing.assert_close(L2, L_ref[ok], rtol=0, atol=1e-13)
