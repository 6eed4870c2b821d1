"""Closed forms and float64 references for the numerical kernels of surgery.analyze."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.analyze.linalg import (
    energy_rank,
    is_finite,
    leakage,
    principal_cosines,
    sigma_max,
    sigma_max_exact,
    sigma_max_lanczos,
    singular_values,
    spectrum_metrics,
    subspace_overlap,
)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


def with_singular_values(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    """U diag(s) Vᵀ with random orthonormal U [m, k], V [n, k]: a matrix whose spectrum we choose."""
    k = len(s)
    u, v = orthonormal(m, k, seed), orthonormal(n, k, seed + 1)
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_metrics_closed_form():
    s = [5.0, 3.0, 2.0, 1.0, 0.5]
    w = with_singular_values(40, 24, s)
    m = spectrum_metrics(singular_values(w), energy=0.9, top=3)
    sq = [x * x for x in s]
    assert m["sigma_max"] == pytest.approx(5.0, rel=1e-12)
    assert m["frobenius"] == pytest.approx(math.sqrt(sum(sq)), rel=1e-12)
    assert m["stable_rank"] == pytest.approx(sum(sq) / 25.0, rel=1e-12)
    p = [x / sum(s) for x in s]
    assert m["effective_rank"] == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    # cumulative energy: 25, 34, 38, 39, 39.25 of 39.25 -> 0.637, 0.866, 0.968, ...
    assert m["energy_rank"] == 3
    assert energy_rank(singular_values(w), 0.5) == 1
    assert energy_rank(singular_values(w), 0.866) == 2
    # energy 1.0 counts only the nonzero singular values, not the 19 zeros of the 24-wide matrix
    assert energy_rank(singular_values(w), 1.0) == 5
    assert m["top_singular_values"] == pytest.approx([5.0, 3.0, 2.0], rel=1e-12)


def test_flat_spectrum_ranks_are_full():
    # c·Q for orthogonal Q: every singular value is c, so stable = effective = n.
    n, c = 16, 0.7
    w = c * orthonormal(n, n, 3)
    m = spectrum_metrics(singular_values(w), energy=0.5)
    assert m["sigma_max"] == pytest.approx(c, rel=1e-12)
    assert m["stable_rank"] == pytest.approx(n, rel=1e-9)
    assert m["effective_rank"] == pytest.approx(n, rel=1e-9)
    assert m["energy_rank"] == n // 2


def test_zero_matrix_has_no_ratio_ranks():
    m = spectrum_metrics(singular_values(torch.zeros(5, 3)), energy=0.9, top=2)
    assert m == {"sigma_max": 0.0, "frobenius": 0.0, "stable_rank": None, "effective_rank": None,
                 "energy_rank": 0, "top_singular_values": [0.0, 0.0]}
    assert sigma_max(torch.zeros(50, 40)) == 0.0


@pytest.mark.parametrize("shape", [(64, 64), (200, 48), (48, 200), (300, 1), (1, 300), (513, 97)])
def test_lanczos_matches_float64_svdvals(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(*shape, generator=g)
    ref = float(torch.linalg.svdvals(w.double())[0])
    s, steps, ok = sigma_max_lanczos(w)
    assert ok
    assert abs(s - ref) / ref < 1e-4
    assert s <= ref * (1 + 1e-6)  # a Ritz value never exceeds σ_max (up to float32 rounding)
    assert sigma_max(w) == pytest.approx(ref, rel=1e-4)
    assert sigma_max_exact(w) == pytest.approx(ref, rel=1e-5)


def test_lanczos_clustered_top_values():
    # σ1 and σ2 a hair apart, the rest spread: power iteration would crawl; the Ritz value must not.
    s = [1.0, 0.9999, 0.9998] + [0.9 * 0.97 ** i for i in range(60)]
    w = with_singular_values(400, 120, s, seed=11).float()
    est = sigma_max(w)
    assert abs(est - 1.0) < 1e-4


def test_lanczos_rank_one_terminates_early():
    u, v = orthonormal(300, 1, 5), orthonormal(200, 1, 6)
    w = (3.5 * u @ v.T).float()
    s, steps, ok = sigma_max_lanczos(w)
    assert ok and steps <= 4  # the residual is checked from the 4th step on
    assert s == pytest.approx(3.5, rel=1e-5)


def test_lanczos_falls_back_to_svd_when_not_converged():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(120, 100, generator=g)
    _, _, ok = sigma_max_lanczos(w, max_steps=2, tol=1e-12)
    assert not ok
    # sigma_max still returns the exact value through the fallback
    assert sigma_max(w, max_steps=2, tol=1e-12) == pytest.approx(float(torch.linalg.svdvals(w.double())[0]), rel=1e-5)


def test_finiteness():
    w = torch.ones(4, 4)
    assert is_finite(w)
    w[1, 2] = float("nan")
    assert not is_finite(w)
    w[1, 2] = float("inf")
    assert not is_finite(w)
    # huge finite entries overflow the float32 sum: the full check must still say finite
    assert is_finite(torch.full((3, 3), 3e38))
    big = torch.full((3, 3), 3e38)
    big[2, 2] = float("-inf")
    assert not is_finite(big)


def test_overlap_identical_orthogonal_rotated():
    e = torch.eye(6, dtype=torch.float64)
    a = e[:, :2]
    same = subspace_overlap(a, a)
    assert same["mean_cos2"] == pytest.approx(1.0)
    assert same["angles_deg"] == pytest.approx([0.0, 0.0], abs=1e-5)
    orth = subspace_overlap(a, e[:, 2:4])
    assert orth["mean_cos2"] == pytest.approx(0.0, abs=1e-15)
    assert orth["angles_deg"] == pytest.approx([90.0, 90.0])
    theta = math.radians(30.0)
    b = torch.stack([math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 4], e[:, 1]], dim=1)
    rot = subspace_overlap(a, b)
    assert sorted(rot["angles_deg"]) == pytest.approx([0.0, 30.0], abs=1e-6)
    assert rot["mean_cos2"] == pytest.approx((1 + math.cos(theta) ** 2) / 2)
    assert rot["chance"] == pytest.approx(2 / 6)
    # a subspace and a rotation of it inside itself: same subspace, angles 0
    r = orthonormal(2, 2, 9)
    assert subspace_overlap(a, a @ r)["mean_cos2"] == pytest.approx(1.0)


def test_principal_cosines_match_scipy():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = orthonormal(30, 5, 1), orthonormal(30, 3, 2)
    ours = sorted(torch.rad2deg(torch.arccos(principal_cosines(a, b))).tolist())
    ref = sorted(math.degrees(x) for x in scipy_linalg.subspace_angles(a.numpy(), b.numpy()))
    assert ours == pytest.approx(ref, abs=1e-6)


def test_leakage_closed_form():
    m, n, r = 12, 10, 3
    u, v = orthonormal(m, m, 21), orthonormal(n, n, 22)
    inside = torch.outer(u[:, 0], v[:, 1])             # in the top-r block
    outside = torch.outer(u[:, r], v[:, r + 1])        # orthogonal on both sides
    half = torch.outer(u[:, 1], v[:, r])                # left inside, right outside
    assert leakage(inside, u[:, :r], v[:, :r]) == pytest.approx({"left": 1, "right": 1, "block": 1, "total": 1})
    assert leakage(outside, u[:, :r], v[:, :r]) == pytest.approx({"left": 0, "right": 0, "block": 0, "total": 0}, abs=1e-12)
    assert leakage(half, u[:, :r], v[:, :r]) == pytest.approx({"left": 1, "right": 0, "block": 0, "total": 1}, abs=1e-12)
    # 3·inside + 4·outside: 9/25 of the energy is in the block
    mix = leakage(3 * inside + 4 * outside, u[:, :r], v[:, :r])
    assert mix["total"] == pytest.approx(9 / 25)
    assert leakage(torch.zeros(m, n), u[:, :r], v[:, :r])["total"] is None


def test_leakage_total_matches_direct_projection():
    m, n, r = 20, 15, 4
    u, v = orthonormal(m, r, 31), orthonormal(n, r, 32)
    d = torch.randn(m, n, generator=torch.Generator().manual_seed(33), dtype=torch.float64)
    pu = torch.eye(m, dtype=torch.float64) - u @ u.T
    pv = torch.eye(n, dtype=torch.float64) - v @ v.T
    direct = 1 - float((pu @ d @ pv).norm() ** 2 / d.norm() ** 2)
    assert leakage(d, u, v)["total"] == pytest.approx(direct, rel=1e-10)
