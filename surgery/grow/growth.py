"""Parameter-token growth: append new key/value tokens to a Pattention layer.

Plain functions over tensors. Growing a layer from ``n`` to ``N = n + m`` tokens keeps the
old tokens in rows ``[0, n)`` (as the released code's ``custom_load_fn_incremental``
does) and fills rows ``[n, N)`` by one of four initialisations:

``tile``
    keys: the old keys repeated (N = c·n); values: zero. Each score is repeated c times,
    so ‖A‖₂ grows by √c (l2 norms), ‖GeLU(A)‖₂ by √c and ‖exp A‖₁ by c, matched by the
    live scale √N = √c·√n (resp. N = c·n); the copies carry zero value. Exact for all
    three normalisations.
``gram``
    keys with Gram matrix K_newᵀK_new = (m/n_eff)·K_oldᵀK_old, values zero. Then
    ‖A_new‖² = (m/n_eff)‖A_old‖² for every input, so ‖A‖ grows by √((n_eff+m)/n_eff),
    matched by the scale. Exact for ``l2_norm_gelu`` only (GeLU is applied after the
    norm); needs m ≥ rank(K_old), since K_newᵀK_new has rank ≤ m.
``zero``
    zero keys and values. ‖A‖ is unchanged, so the scale must stay at the old √n_eff:
    the grown checkpoint records it (``*_norm_slot_num``) and is exact only for a forward
    that honours that field (this package's; not the released TokenFormer code). Not
    exact for ``softmax`` (exp(0) = 1 adds m to the denominator).
``random``
    the released code's init for new tokens: keys N(0, 0.02²) (``init_method: normal``),
    values N(0, (2/(L·√d))²) (``wang_init``). Approximate.

``n_eff`` is the count the normalisation scales by: ``n`` unless a frozen count is recorded.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..core.errors import UsageError

INITS = ("tile", "gram", "zero", "random")
KEY_STD = 0.02  # GPT-NeoX init_method_std for `init_method: normal`


def exact_for(init: str, norm_type: str) -> bool:
    """Whether ``init`` preserves the function of a model with ``norm_type`` (given a forward
    that honours a recorded frozen scale)."""
    if init == "tile":
        return True
    if init == "gram":
        return norm_type == "l2_norm_gelu"
    if init == "zero":
        return norm_type in ("l2_norm_gelu", "gelu_l2_norm")
    return False


def new_scale_tokens(init: str, n: int, N: int, n_eff: float) -> float:
    """The normalisation count after growth that keeps the function (see module doc)."""
    if init == "tile":
        return n_eff * (N // n)
    if init == "zero":
        return n_eff
    return n_eff + (N - n)  # gram (exact) and random (as the released code: the live count)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name): reproducible and independent of order."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def tile_keys(keys: torch.Tensor, new_n: int) -> torch.Tensor:
    """``keys`` [n, d] repeated to [new_n, d]; ``new_n`` must be a multiple of n."""
    n = keys.shape[0]
    if new_n % n:
        raise UsageError(f"tile growth needs a multiple of {n} tokens, got {new_n}.")
    return keys.repeat(new_n // n, 1)


def pad_zeros(tokens: torch.Tensor, new_n: int) -> torch.Tensor:
    """``tokens`` [n, d] followed by zero rows up to [new_n, d]."""
    pad = tokens.new_zeros(new_n - tokens.shape[0], tokens.shape[1])
    return torch.cat((tokens, pad), dim=0)


def _gram_spectrum(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Singular values (descending) and right singular vectors of ``keys`` from the eigen-
    decomposition of its d×d Gram matrix (cheaper than an SVD of [n, d] when n > d), and the
    numerical rank at float32 resolution (stored keys carry no more)."""
    k64 = keys.to(torch.float64)
    w, vecs = torch.linalg.eigh(k64.T @ k64)
    s = w.flip(0).clamp_min(0).sqrt()
    vecs = vecs.flip(1)
    if s.numel() == 0 or s[0] == 0:
        return s, vecs, 0
    tol = s[0] * max(keys.shape) * torch.finfo(torch.float32).eps
    return s, vecs, int((s > tol).sum())


def key_rank(keys: torch.Tensor) -> int:
    """Numerical rank of ``keys`` [n, d] at float32 resolution."""
    return _gram_spectrum(keys)[2]


def gram_keys(keys: torch.Tensor, m: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``m`` new keys whose Gram matrix is ``ratio · keysᵀ keys``.

    With keysᵀ keys = V S² Vᵀ (rank r), the new keys are √ratio · Q S_r V_rᵀ for a random
    Q [m, r] with orthonormal columns (QR of a seeded Gaussian), so
    K_newᵀ K_new = ratio · V_r S_r² V_rᵀ = ratio · keysᵀ keys (up to the dropped
    directions below float32 resolution).

    Raises:
        UsageError: m < rank(keys): no m rows can carry that Gram matrix.
    """
    s, vecs, r = _gram_spectrum(keys)
    if m < r:
        raise UsageError(f"gram growth needs at least rank(K) = {r} new tokens, got {m}.")
    if r == 0:
        return torch.zeros(m, keys.shape[1], dtype=torch.float64)
    g = torch.randn(m, r, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    return math.sqrt(ratio) * q @ (s[:r, None] * vecs[:, :r].T)


def random_tokens(m: int, d: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``m`` tokens drawn from N(0, std²)."""
    return torch.randn(m, d, generator=generator, dtype=torch.float64) * std


def value_std(num_layers: int, hidden_size: int) -> float:
    """GPT-NeoX ``wang_init`` std, used by the released code for value tokens: 2/(L·√d)."""
    return 2.0 / num_layers / math.sqrt(hidden_size)


def grow_keys(keys: torch.Tensor, new_n: int, init: str, *, n_eff: float, seed: int, name: str) -> torch.Tensor:
    """The grown key tokens [new_n, d] (float64): old keys first, then the new ones."""
    n, d = keys.shape
    k = keys.to(torch.float64)
    if new_n == n:
        return k
    m = new_n - n
    if init == "tile":
        return tile_keys(k, new_n)
    if init == "gram":
        return torch.cat((k, gram_keys(k, m, m / n_eff, tensor_generator(seed, name))), dim=0)
    if init == "zero":
        return pad_zeros(k, new_n)
    if init == "random":
        return torch.cat((k, random_tokens(m, d, KEY_STD, tensor_generator(seed, name))), dim=0)
    raise UsageError(f"unknown growth init {init!r}; choose one of {', '.join(INITS)}.")


def grow_values(values: torch.Tensor, new_n: int, init: str, *, seed: int, name: str,
                num_layers: int, hidden_size: int) -> torch.Tensor:
    """The grown value tokens [new_n, d_out] (float64): zero new rows except for ``random``."""
    n, d = values.shape
    v = values.to(torch.float64)
    if new_n == n:
        return v
    if init == "random":
        new = random_tokens(new_n - n, d, value_std(num_layers, hidden_size), tensor_generator(seed, name))
        return torch.cat((v, new), dim=0)
    if init not in INITS:
        raise UsageError(f"unknown growth init {init!r}; choose one of {', '.join(INITS)}.")
    return pad_zeros(v, new_n)
