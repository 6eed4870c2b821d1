"""Numerical kernels: top singular value by Lanczos bidiagonalization, full spectra, subspaces.

Everything here is a plain function of tensors (no files). Inputs are upcast to float32 unless
they are float64 already.
"""

from __future__ import annotations

import math

import torch

# Relative accuracy the fast σ_max aims for. docs/analyze.md promises ≤ 1e-3 against the exact
# value; the stopping rule below is 10× stricter, and a run that does not meet it falls back to a
# full SVD.
SIGMA_TOL = 1e-4
MAX_STEPS = 64


def is_finite(w: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf.

    A NaN or ±Inf entry makes the sum non-finite, so a finite sum proves every entry finite; only
    when the sum is not finite (a bad entry, or an overflow of huge finite values) is every entry
    checked.
    """
    if w.numel() == 0:
        return True
    if math.isfinite(float(w.sum(dtype=torch.float64 if w.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(w).all())


def nonfinite_counts(w: torch.Tensor) -> dict[str, int]:
    """How many entries are NaN, +Inf and -Inf."""
    return {"nan": int(torch.isnan(w).sum()), "posinf": int(torch.isposinf(w).sum()),
            "neginf": int(torch.isneginf(w).sum())}


def _as_float(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def sigma_max_exact(w: torch.Tensor) -> float:
    """Largest singular value from a full SVD (``torch.linalg.svdvals``)."""
    w = _as_float(w)
    if w.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(w)[0])


def sigma_max_lanczos(w: torch.Tensor, *, tol: float = SIGMA_TOL, max_steps: int = MAX_STEPS,
                      seed: int = 0) -> tuple[float, int, bool]:
    """Largest singular value by Golub–Kahan–Lanczos bidiagonalization with full reorthogonalization.

    Each step costs one product with ``w`` and one with ``wᵀ`` (O(mn)), against O(mn·min(m,n)) for
    a full SVD. The Ritz value ``θ`` (top singular value of the small bidiagonal matrix ``B_k``) never
    exceeds ``σ_max``; the residual ``r = β_{k+1}·|p_k|`` of the Ritz triplet bounds the distance from
    ``θ`` to a singular value of ``w``. Iteration stops when ``r ≤ tol·θ`` or, for clustered top
    values, when the quadratic bound ``r²/gap`` is below ``tol·θ`` (Golub & Van Loan §10.1;
    Larsen's PROPACK uses the same residual).

    Args:
        w: A 2-D tensor.
        tol: Relative accuracy asked for.
        max_steps: Krylov dimension cap.
        seed: Seed of the random start vector (results are reproducible).

    Returns:
        ``(sigma, steps, converged)``.
    """
    w = _as_float(w)
    m, n = w.shape
    if w.numel() == 0:
        return 0.0, 0, True
    # Work with the wide orientation's short side as the right vector: fewer reorthogonalization flops.
    if n > m:
        w = w.T
        m, n = n, m
    k_cap = min(max_steps, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=w.dtype).to(w.device)
    v /= v.norm()
    V = torch.empty(k_cap + 1, n, dtype=w.dtype, device=w.device)
    U = torch.empty(k_cap, m, dtype=w.dtype, device=w.device)
    V[0] = v
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    sigma, converged, steps = 0.0, False, 0
    for j in range(k_cap):
        u = w @ V[j]
        if j > 0:
            u -= beta * U[j - 1]
            u -= U[:j].T @ (U[:j] @ u)          # full reorthogonalization (cheap: j ≤ 64)
        alpha = float(u.norm())
        if alpha == 0.0 or not math.isfinite(alpha):
            steps = j + 1
            alphas.append(0.0 if alpha == 0.0 else alpha)
            converged = True
            break
        U[j] = u / alpha
        vn = w.T @ U[j] - alpha * V[j]
        vn -= V[: j + 1].T @ (V[: j + 1] @ vn)
        beta = float(vn.norm())
        alphas.append(alpha)
        betas.append(beta)
        steps = j + 1
        if beta > 0.0:
            V[j + 1] = vn / beta
        # Check convergence every few steps (the small SVD is cheap but not free).
        if beta == 0.0 or j + 1 == k_cap or (j >= 3 and (j % 2 == 1)):
            b = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if len(alphas) > 1:
                b += torch.diag(torch.tensor(betas[:-1], dtype=torch.float64), 1)
            p, s, _ = torch.linalg.svd(b)
            sigma = float(s[0])
            resid = beta * abs(float(p[-1, 0]))  # residual bound on the top Ritz value
            if beta == 0.0 or resid <= tol * sigma:
                converged = True
                break
    if not alphas:
        return 0.0, steps, True
    if sigma == 0.0 and alphas:
        sigma = max(alphas)
    return sigma, steps, converged


def sigma_max(w: torch.Tensor, *, exact: bool = False, tol: float = SIGMA_TOL, max_steps: int = MAX_STEPS,
              seed: int = 0) -> float:
    """Largest singular value of a finite 2-D tensor: Lanczos (default) or full SVD (``exact``).

    The fast path falls back to the full SVD when Lanczos has not met ``tol`` after
    ``max_steps`` steps, or when the matrix is so small that a full SVD is cheaper.
    """
    w = _as_float(w)
    if exact or min(w.shape) <= 32:
        return sigma_max_exact(w)
    s, _, ok = sigma_max_lanczos(w, tol=tol, max_steps=max_steps, seed=seed)
    return s if ok else sigma_max_exact(w)


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """All singular values, descending (``torch.linalg.svdvals``; float32 unless given float64)."""
    w = _as_float(w)
    if w.numel() == 0:
        return torch.zeros(0, dtype=w.dtype)
    return torch.linalg.svdvals(w)


def spectrum_metrics(s: torch.Tensor, *, energy: float = 0.9, top: int = 8) -> dict:
    """Norms and ranks of a matrix from its singular values ``s`` (any order).

    - ``sigma_max``: largest singular value.
    - ``frobenius``: ‖W‖_F = √Σσ².
    - ``stable_rank``: ‖W‖_F² / σ_max² (Rudelson & Vershynin 2007).
    - ``effective_rank``: exp(H(p)), p = σ/Σσ, H the Shannon entropy (Roy & Vetterli 2007).
    - ``energy_rank``: smallest k with Σ_{i≤k} σ_i² / Σσ² ≥ ``energy``.
    - ``top_singular_values``: the ``top`` largest.

    A zero matrix gets σ_max = ‖W‖_F = 0, energy rank 0 and ``None`` for the two ratio ranks.
    """
    s = torch.sort(s.detach().double().cpu().clamp_min(0), descending=True).values
    if s.numel() == 0 or float(s[0]) == 0.0:
        return {"sigma_max": 0.0, "frobenius": 0.0, "stable_rank": None, "effective_rank": None,
                "energy_rank": 0, "top_singular_values": [0.0] * min(top, s.numel())}
    sq = s * s
    total = float(sq.sum())
    p = s / s.sum()
    p = p[p > 0]
    entropy = float(-(p * p.log()).sum())
    frac = torch.cumsum(sq, 0) / total
    # The tiny slack keeps energy=1.0 from failing on the last ulp of the cumulative sum.
    energy_rank = int(torch.searchsorted(frac, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1
    return {
        "sigma_max": float(s[0]),
        "frobenius": math.sqrt(total),
        "stable_rank": total / float(s[0]) ** 2,
        "effective_rank": math.exp(entropy),
        "energy_rank": min(energy_rank, s.numel()),
        "top_singular_values": [float(x) for x in s[:top]],
    }


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² / Σσ² ≥ ``energy`` (0 for a zero matrix)."""
    return int(spectrum_metrics(s, energy=energy, top=0)["energy_rank"])


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between span(a) and span(b), descending.

    ``a`` [d, p] and ``b`` [d, q] must have orthonormal columns (Björck & Golub 1973: the cosines
    are the singular values of aᵀb). There are min(p, q) of them, clamped to [0, 1].
    """
    if a.shape[1] == 0 or b.shape[1] == 0:
        return torch.zeros(0, dtype=a.dtype)
    return torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0)


def subspace_overlap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Overlap of two orthonormal bases: principal angles (degrees) and mean cos².

    ``mean_cos2`` = ‖aᵀb‖_F² / min(p, q): 1 for nested subspaces, 0 for orthogonal ones.
    ``chance`` = max(p, q) / d is its expected value for uniformly random subspaces, the level
    to compare against.
    """
    c = principal_cosines(a, b)
    k = int(c.numel())
    d = int(a.shape[0])
    if k == 0:
        return {"k": 0, "mean_cos2": None, "angles_deg": [], "chance": None}
    angles = torch.rad2deg(torch.arccos(c.double()))
    return {
        "k": k,
        "mean_cos2": float((c.double() ** 2).sum()) / k,
        "angles_deg": [float(x) for x in angles],
        "chance": max(int(a.shape[1]), int(b.shape[1])) / d,
    }


def leakage(delta: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> dict:
    """Share of ‖Δ‖_F² inside the top subspaces ``u`` [m, r] (left) and ``v`` [n, r] (right) of a base.

    - ``left`` = ‖uᵀΔ‖² / ‖Δ‖², ``right`` = ‖Δv‖² / ‖Δ‖², ``block`` = ‖uᵀΔv‖² / ‖Δ‖²;
    - ``total`` = 1 − ‖(I−uuᵀ) Δ (I−vvᵀ)‖² / ‖Δ‖² = left + right − block: the part of the update
      that is not orthogonal to the frozen directions, which orthogonal-subspace fine-tuning
      (Nayak et al. 2025) keeps at zero.

    A zero ``delta`` gives ``None`` everywhere.
    """
    d = delta.double()
    total = float((d * d).sum())
    if total == 0.0:
        return {"left": None, "right": None, "block": None, "total": None}
    u, v = u.double(), v.double()
    ud = u.T @ d
    left = float((ud * ud).sum()) / total
    dv = d @ v
    right = float((dv * dv).sum()) / total
    udv = ud @ v
    block = float((udv * udv).sum()) / total
    return {"left": left, "right": right, "block": block, "total": left + right - block}
