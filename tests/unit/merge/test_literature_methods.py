"""TSV-M, Iso-C, Iso-CTS, DOP and WUDI tensor functions against independent float64
computations written from the papers' formulas (full LAPACK SVDs, autograd)."""

from __future__ import annotations

import pytest
import torch

from surgery.merge.methods import dop, isotropic, subspace, tsv, wudi


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _polar_svd(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _taus(shape, n=3, seed=0):
    common = _rand(*shape, seed=100 + seed)
    return [(common + _rand(*shape, seed=seed + i, scale=0.5 + i)).float() for i in range(n)]


# ---- helpers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (16, 16)])
def test_top_svd_and_polar_against_lapack(shape):
    m = _rand(*shape).float()
    u, s, vt = subspace.top_svd(m, 5)
    ref_u, ref_s, ref_vh = torch.linalg.svd(m.double(), full_matrices=False)
    assert torch.allclose(s.double(), ref_s[:5], rtol=1e-5)
    # singular vectors up to sign: the rank-5 reconstruction is sign free
    assert _rel((u * s) @ vt, (ref_u[:, :5] * ref_s[:5]) @ ref_vh[:5]) < 1e-5
    assert _rel(subspace.polar(m), _polar_svd(m.double())) < 1e-6
    assert _rel(subspace.singular_values(m), ref_s) < 1e-6


def test_polar_of_a_rank_deficient_matrix_is_the_isometry_on_its_range():
    a = _rand(20, 3) @ _rand(3, 8, seed=1)                    # rank 3
    p = subspace.polar(a.float())
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    assert _rel(p, u[:, :3] @ vh[:3]) < 1e-5
    u, s, vt = subspace.top_svd(a.float(), 5)                 # asks for more than the rank
    assert s[3:].abs().max() == 0 and u[:, 3:].abs().max() == 0 and vt[3:].abs().max() == 0


# ---- TSV-M ------------------------------------------------------------------------------------

def _tsv_reference(taus):
    return _tsv_reference_r(taus, int(min(taus[0].shape) * (1 / len(taus))))


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (36, 36)])
def test_tsv_matrix_matches_the_formula(shape):
    taus = _taus(shape)
    out = tsv.tsv_matrix(taus)
    assert out.dtype == torch.float32 and out.shape == shape
    assert _rel(out, _tsv_reference(taus)) < 1e-5


def test_tsv_keeps_int_k_over_t_directions_and_zero_when_too_small():
    taus = _taus((10, 7), n=3)        # int(7 · 1/3) = 2 directions per task
    assert _rel(tsv.tsv_matrix(taus), _tsv_reference(taus)) < 1e-5
    assert tsv.tsv_matrix(_taus((5, 2), n=3)).abs().max() == 0   # int(2/3) = 0, as the reference


def test_tsv_of_weighted_task_vectors_rescales_the_unweighted_factors():
    # the factors of the unweighted τ_i, with σ scaled by w_i, are TSV-M of the w_i τ_i (the
    # reference on the weighted matrices); a zero weight drops the model's directions
    taus = _taus((40, 24))
    for w in ([0.5, 1.5, 2.0], [1.0, -0.7, 0.3], [1.2, 0.0, 0.8]):
        weighted = [t * x for t, x in zip(taus, w)]
        kept = [t for t, x in zip(weighted, w) if x != 0]
        ref = _tsv_reference(kept) if len(kept) == len(taus) else _tsv_reference_r(kept, int(24 / len(taus)))
        assert _rel(tsv.tsv_matrix(taus, w), ref) < 1e-5
    factors = tsv.tsv_factors(taus)
    assert torch.equal(tsv.tsv_from_factors(factors, [0.5, 1.5, 2.0], (40, 24)), tsv.tsv_matrix(taus, [0.5, 1.5, 2.0]))


def test_factor_cache_keeps_entries_until_its_byte_limit():
    cache = subspace.FactorCache(max_bytes=2 * 400)
    calls = []

    def compute(i):
        calls.append(i)
        return (torch.full((10, 10), float(i)),)             # 400 bytes

    for i in (0, 1, 0, 2, 0, 1):
        assert cache.get(("t", i), lambda i=i: compute(i))[0][0, 0] == i
    # 0 stays (recently used), 1 is evicted by 2 and computed again
    assert calls == [0, 1, 2, 1] and cache.nbytes == 800
    assert subspace.cached({}, ("t", 5), lambda: 5) == 5


def _tsv_reference_r(taus, r):
    us, ss, vhs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        us.append(u[:, :r]), ss.append(s[:r]), vhs.append(vh[:r])
    u, s, vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    return _polar_svd(u) @ torch.diag(s) @ _polar_svd(vh)


def test_tsv_of_identical_task_vectors_is_determined():
    t = _taus((20, 12), n=1)[0]
    out = tsv.tsv_matrix([t, t.clone()])
    # both tasks keep the same 6 directions: the polar factor of [U6 U6] is U6/√2 per block,
    # so Δ = Σ_blocks (U6/√2) σ (V6ᵀ/√2) = U6 σ V6ᵀ — the rank-6 truncation of τ
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    assert _rel(out, (u[:, :6] * s[:6]) @ vh[:6]) < 1e-4


# ---- Iso-C / Iso-CTS -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_iso_c_matrix_flattens_the_spectrum(shape):
    total = sum(_taus(shape))
    out = isotropic.iso_c_matrix(total)
    u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
    assert _rel(out, s.mean() * u @ vh) < 1e-5
    assert torch.allclose(torch.linalg.svdvals(out.double()), s.mean().expand(len(s)), rtol=1e-4)


@pytest.mark.parametrize("k,n,f", [(576, 3, 0.8), (64, 3, 0.8), (10, 4, 0.0), (9, 3, 1.0), (2, 3, 0.1)])
def test_iso_cts_common_rank(k, n, f):
    c, per = isotropic.common_rank(k, n, f)
    assert c + n * per == k and 0 <= c <= k
    ref_c = k - round((k - int(k * f)) / n) * n      # the reference's rule, where it is valid
    if ref_c >= 0:
        assert (c, per) == (ref_c, (k - ref_c) // n)
    else:                                           # k = 2, n = 3: the reference would slice with c = -1
        assert (c, per) == (2, 0)


def _iso_cts_reference(taus, f):
    n = len(taus)
    k = min(taus[0].shape)
    c, per = isotropic.common_rank(k, n, f)
    total = sum(t.double() for t in taus)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    uc, sc, vhc = u[:, :c], s[:c], vh[:c]
    us, ss, vhs = [], [], []
    for t in taus:
        w = t.double() - uc @ uc.T @ t.double()
        a, b, d = torch.linalg.svd(w, full_matrices=False)
        us.append(a[:, :per]), ss.append(b[:per]), vhs.append(d[:per])
    U = torch.cat(us + [uc], 1)
    V = torch.cat(vhs + [vhc], 0)
    S = torch.cat(ss + [sc])
    return S.mean() * _polar_svd(U) @ _polar_svd(V)


@pytest.mark.parametrize("shape,f", [((40, 24), 0.8), ((24, 40), 0.5), ((30, 30), 0.0)])
def test_iso_cts_matrix_matches_the_formula(shape, f):
    taus = _taus(shape)
    assert _rel(isotropic.iso_cts_matrix(taus, f), _iso_cts_reference(taus, f)) < 1e-5


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    taus = _taus((30, 18))
    assert _rel(isotropic.iso_cts_matrix(taus, 1.0), isotropic.iso_c_matrix(sum(taus))) < 1e-5


# ---- DOP ----------------------------------------------------------------------------------------

def test_dop_split_rank_is_searchsorted_left():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])          # cumsum ratios 0.4 0.7 0.9 1.0
    assert [dop.split_rank(s, e) for e in (0.3, 0.4, 0.75, 0.99999, 1.0)] == [0, 0, 2, 3, 3]
    assert dop.split_rank(torch.zeros(3), 0.5) == 0


def _dop_reference(prev, tau, *, alpha, lr, steps, mgda, ema, beta, eps, space):
    """The paper's loop with autograd in float64: losses L_i = ‖S Uᵀ Δ‖² + ‖Δ V S‖²."""
    targets = [prev.double(), tau.double()]
    projs = []
    for x in targets:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        r = int((torch.cumsum(s, 0) / s.sum() < eps).sum())
        projs.append((u[:, :r], s[:r], vh[:r].T))
    w = torch.nn.Parameter((targets[0] + targets[1]) / 2)
    opt = torch.optim.Adam([w], lr=lr)

    def loss(i):
        u, s, v = projs[i]
        d = w - targets[i]
        lu = (torch.diag(s) @ u.T @ d).pow(2).sum()
        lv = (d @ v @ torch.diag(s)).pow(2).sum()
        return {"uv": lu + lv, "u": lu, "v": lv}[space]

    sol_ema = [alpha, 1 - alpha]
    for _ in range(steps):
        if mgda:
            gs, ls = [], []
            for i in range(2):
                opt.zero_grad()
                li = loss(i)
                li.backward()
                gs.append(w.grad.clone() / li.item()), ls.append(li.item())
            v11, v12, v22 = (float((a * b).sum()) for a, b in ((gs[0], gs[0]), (gs[0], gs[1]), (gs[1], gs[1])))
            c = 0.999 if v12 >= v11 else 0.001 if v12 >= v22 else (v22 - v12) / (v11 + v22 - 2 * v12)
            sol = [c, 1 - c]
            if ema:
                sol_ema = [beta * sol_ema[i] + (1 - beta) * sol[i] for i in range(2)]
                sol = sol_ema
        else:
            sol = [alpha, 1 - alpha]
        opt.zero_grad()
        (sol[0] * loss(0) + sol[1] * loss(1)).backward()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("shape,mgda,ema,space", [((30, 12), True, True, "uv"), ((12, 30), True, False, "uv"),
                                                  ((20, 20), False, True, "u"), ((40, 10), True, True, "v")])
def test_dop_matrix_matches_an_autograd_reference(shape, mgda, ema, space):
    prev = _rand(*shape, seed=1, scale=1e-3).float()
    tau = _rand(*shape, seed=2, scale=2e-3).float()
    kw = dict(alpha=0.8, lr=1e-4, mgda=mgda, ema=ema)
    out = dop.dop_matrix(prev, tau, num_steps=20, ema_beta=0.9, svd_epsilon=0.99, space=space, **kw)
    ref = _dop_reference(prev, tau, steps=20, beta=0.9, eps=0.99, space=space, **kw)
    start = (prev.double() + tau.double()) / 2
    assert _rel(ref, start) > 0.05                    # the optimisation moved the weights
    assert _rel(out, ref) < 1e-4


def test_dop_matrix_with_zero_steps_is_the_average_and_survives_a_zero_target():
    prev, tau = _rand(8, 6).float(), _rand(8, 6, seed=3).float()
    assert torch.allclose(dop.dop_matrix(prev, tau, num_steps=0), (prev + tau) / 2)
    out = dop.dop_matrix(torch.zeros(8, 6), tau, num_steps=5)
    assert torch.isfinite(out).all()


# ---- WUDI ---------------------------------------------------------------------------------------

def _wudi_reference(taus, lr, steps):
    tvs = torch.stack([t.double() for t in taus])
    norms = tvs.reshape(len(taus), -1).pow(2).sum(1)
    w = torch.nn.Parameter(tvs.sum(0))
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        prod = (w.unsqueeze(0) - tvs) @ tvs.transpose(1, 2)
        loss = (prod.pow(2) / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach()


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_wudi_matrix_matches_an_autograd_reference(shape):
    taus = [t * 1e-3 for t in _taus(shape)]
    out = wudi.wudi_matrix(taus, lr=1e-5, iter_num=50)
    ref = _wudi_reference(taus, 1e-5, 50)
    assert _rel(ref, sum(t.double() for t in taus)) > 0.05
    assert _rel(out, ref) < 1e-4


def test_wudi_ignores_a_zero_task_vector():
    taus = [t * 1e-3 for t in _taus((10, 6), n=2)]
    with_zero = wudi.wudi_matrix(taus + [torch.zeros(10, 6)], iter_num=20)
    assert torch.allclose(with_zero, wudi.wudi_matrix(taus, iter_num=20))
