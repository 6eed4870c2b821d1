"""Each merge method's tensor function against an independent float64 computation."""

from __future__ import annotations

import math

import pytest
import torch

from surgery.core.errors import UsageError
from surgery.merge.methods import (continual, dare, linear, opcm, select, slerp, sparsify, streaming,
                                   task_arithmetic, ties)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- linear / task arithmetic ---------------------------------------------------------------

def test_linear_weighted_mean_and_plain_sum():
    xs = [_rand(5, 3, seed=i) for i in range(3)]
    w = [0.5, 2.0, 1.5]
    expect = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(linear.linear(xs, w), expect, atol=1e-12)
    assert torch.allclose(linear.linear(xs, w, normalize=False), expect * sum(w), atol=1e-12)


def test_linear_zero_weight_sum_is_a_usage_error():
    with pytest.raises(UsageError, match="sum to zero.*`normalize` off"):
        linear.linear([_rand(2), _rand(2, seed=1)], [1.0, -1.0])


def test_task_arithmetic_matches_formula():
    base = _rand(4, 6)
    ms = [base + 0.1 * _rand(4, 6, seed=i + 1) for i in range(3)]
    w, lam = [1.0, 0.5, -0.25], 0.7
    expect = base + lam * sum(wi * (m - base) for wi, m in zip(w, ms))
    assert torch.allclose(task_arithmetic.task_arithmetic(base, ms, w, lam), expect, atol=1e-12)
    assert torch.allclose(task_arithmetic.task_arithmetic(base, ms, w, lam, normalize=True),
                          base + (expect - base) / sum(w), atol=1e-12)


# ---- TIES -----------------------------------------------------------------------------------

def test_trim_keeps_the_largest_magnitudes():
    d = torch.tensor([0.1, -3.0, 2.0, -0.5, 1.0, 0.0], dtype=torch.float64)
    assert ties.trim(d, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0, 1.0, 0.0]
    assert torch.equal(ties.trim(d, 1.0), d)
    assert ties.trim(d, 0.0).abs().sum() == 0
    assert int((ties.trim(d, 0.01) != 0).sum()) == 1    # at least one entry survives


def _trim_by_stable_sort(d: torch.Tensor, density: float) -> torch.Tensor:
    """The documented rule spelled out: a stable descending sort of the float32 magnitudes
    (equal ones stay in flat order), the first k positions kept."""
    flat = d.reshape(-1)
    k = max(1, int(density * flat.numel()))
    order = torch.sort(flat.abs().float(), descending=True, stable=True).indices[:k]
    out = torch.zeros_like(flat)
    out[order] = flat[order]
    return out.reshape(d.shape)


@pytest.mark.parametrize("density", [0.013, 0.3, 0.5, 0.77, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_breaks_threshold_ties_by_flat_index(density, dtype):
    # bf16-rounded values: few distinct magnitudes, so the k-th largest is shared by many entries
    g = torch.Generator().manual_seed(3)
    d = (torch.randn(40_000, generator=g) * 0.01).bfloat16().to(dtype)
    d[::7] = 0.0
    d[5] = -0.0
    expect = _trim_by_stable_sort(d, density)
    assert torch.equal(ties.trim(d, density), expect)
    k = max(1, int(density * d.numel()))
    thr = d.abs().float().sort(descending=True).values[k - 1]
    assert int((d.abs().float() == thr).sum()) > 1          # the case under test really has ties


def test_trim_special_values_and_threshold_zero():
    d = torch.tensor([0.0, -0.0, float("inf"), 1e-45, -1e-45, 3.0, 0.0, -float("inf"), 0.0])
    for density in [0.1, 0.3, 0.5, 0.7, 0.9]:
        assert torch.equal(ties.trim(d, density), _trim_by_stable_sort(d, density)), density


def test_magnitude_threshold_is_the_same_for_any_chunking():
    g = torch.Generator().manual_seed(4)
    mag = (torch.randn(10_001, generator=g) * 0.02).bfloat16().float().abs()
    k = 4321
    whole = ties.magnitude_threshold(lambda: [mag], k)
    chunked = ties.magnitude_threshold(lambda: mag.split(997), k)
    assert (whole.bits, whole.quota) == (chunked.bits, chunked.quota)
    keep_whole = whole.keeper()(mag.view(torch.int32))
    keeper = chunked.keeper()
    keep_chunked = torch.cat([keeper(c.view(torch.int32)) for c in mag.split(997)])
    assert torch.equal(keep_whole, keep_chunked) and int(keep_whole.sum()) == k
    # the kept set: everything above the k-th largest value, then tied entries lowest index first
    sorted_desc = torch.sort(mag, descending=True, stable=True).indices[:k]
    expect = torch.zeros_like(keep_whole)
    expect[sorted_desc] = True
    assert torch.equal(keep_whole, expect)


def _magnitude_cases():
    g = torch.Generator().manual_seed(6)
    ties_and_zeros = (torch.randn(6_000, generator=g) * 0.01).bfloat16().float().abs()
    ties_and_zeros[::3] = 0.0                                  # bf16: few distinct values, many ties
    return {"bf16 ties and zeros": ties_and_zeros, "all zero": torch.zeros(300), "all equal": torch.full((300,), 0.5),
            "special": torch.tensor([0.0, float("inf"), 1e-45, 3.0, 0.0, float("inf"), 3.0, 1e-45, 0.0]),
            "distinct": torch.randn(2_000, generator=g).abs()}


@pytest.mark.parametrize("case", list(_magnitude_cases()))
def test_sorted_thresholds_equal_the_radix_passes(case):
    """Thresholds from sorted magnitudes (two binary searches) are the radix selection's, for
    every k around the ties, the zeros and the ends, either tie order, and k as a function."""
    from surgery.merge.methods.select import magnitude_thresholds, sorted_bits, sorted_thresholds

    mag = _magnitude_cases()[case]
    n, nonzero = mag.numel(), int((mag > 0).sum())
    order = sorted_bits(mag.split(97), n)
    assert torch.equal(order, torch.sort(mag.view(torch.int32)).values)
    ks = {-1, 0, 1, 2, n // 3, n // 2, n - 1, n, n + 5, nonzero - 1, nonzero, nonzero + 1}
    targets = [(k, last) for k in sorted(ks) for last in (False, True)]
    targets.append((lambda numel, zeros: (numel - zeros) // 2 + 1, True))
    radix = magnitude_thresholds(lambda: ([c] for c in mag.split(101)), [(0, k, last) for k, last in targets])
    got = sorted_thresholds(order, targets)
    assert [(t.bits, t.quota, t.skip) for t in got] == [(t.bits, t.quota, t.skip) for t in radix]


def test_sorted_cache_admits_until_full_and_never_evicts():
    from surgery.merge.methods.select import SortedCache

    cache = SortedCache(40)
    calls = []

    def compute(v):
        calls.append(v)
        return torch.full((v,), v, dtype=torch.int32)

    assert cache.get(("a",), 6, lambda: compute(6)).tolist() == [6] * 6
    assert cache.get(("b",), 5, lambda: compute(5)) is None            # 24 + 20 > 40 bytes: not admitted
    assert cache.get(("c",), 4, lambda: compute(4)) is not None         # 24 + 16 fits
    assert cache.get(("a",), 6, lambda: compute(6)) is not None and calls == [6, 4]
    assert cache.nbytes == 40


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs"])
@pytest.mark.parametrize("held", [True, False])
def test_gta_rows_with_a_sorted_cache_write_the_same_bytes(monkeypatch, method, held):
    """Trimming from the run's sorted magnitudes (admitted, or too big for the cache: the radix
    passes) gives the bytes of a merge without the cache, on a second merge at other densities too."""
    from surgery.merge.methods.select import SortedCache

    monkeypatch.setattr(streaming, "SUB_ELEMENTS", 40)
    monkeypatch.setattr(streaming, "STATS_ELEMENTS", 40)
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 1 << 30 if held else 0)
    g = torch.Generator().manual_seed(7)
    base = (torch.randn(37, 11, generator=g) * 0.1).bfloat16().float()
    models = [(base + (torch.randn(37, 11, generator=g) * 0.01).bfloat16().float()).bfloat16().float()
              for _ in range(3)]
    models[1][::2] = base[::2]                                  # entries that never moved: |τ| = 0
    kind = "magnitude" if method == "ties" else "outliers"
    cache = SortedCache(2 * 37 * 11 * 4)                        # two of the three models fit

    def run(densities, options):
        rules = [sparsify.Sparsify(kind, d, gamma=0.05) for d in densities]
        inputs = sparsify.row_inputs(base.shape, lambda a, e: base[a:e].clone(), lambda i, a, e: models[i][a:e].clone(),
                                     3)
        inputs.ctx.options.update(options)
        rows = sparsify.GtaRows(inputs, rules, [1.0, 0.6, 0.8], consensus=method != "breadcrumbs", normalize=True,
                                lam=0.9, rescale=False, seed=0, name="tensor")
        return rows(0, 37)

    for densities in ([0.5, 0.3, 0.9], [0.97, 0.6, 0.2]):
        expect = run(densities, {})
        assert torch.equal(run(densities, {"sorted_cache": cache}), expect)
    assert cache.nbytes == 2 * 37 * 11 * 4 and len(cache._entries) == 2


@pytest.mark.parametrize("blocks", [[(0, 37)], [(0, 5), (5, 20), (20, 37)], [(20, 37), (0, 20)]])
def test_ties_rows_streams_the_same_result(monkeypatch, blocks):
    """Row-block TIES (thresholds from streamed passes, requested in or out of order) equals
    the whole-tensor computation bit for bit."""
    monkeypatch.setattr(streaming, "SUB_ELEMENTS", 40)       # several sub-blocks per request
    monkeypatch.setattr(streaming, "STATS_ELEMENTS", 40)     # several blocks per selection pass
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 0)     # never the read-once path
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(37, 11, generator=g) * 0.1).bfloat16().float()
    models = [(base + (torch.randn(37, 11, generator=g) * 0.01).bfloat16().float()).bfloat16().float() for _ in range(3)]
    w, dens = [1.0, 0.6, 0.8], [0.5, 0.3, 1.0]
    expect = ties.ties(base, models, w, dens, lam=0.9)
    rows = ties.TiesRows(base.shape, lambda a, e: base[a:e].clone(), lambda i, a, e: models[i][a:e].clone(),
                         3, w, dens, lam=0.9)
    got = torch.empty_like(base)
    for a, e in blocks:
        got[a:e] = rows(a, e)
    assert torch.equal(got, expect)
    # and the read-once path
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 1 << 30)
    once = ties.TiesRows(base.shape, lambda a, e: base[a:e].clone(), lambda i, a, e: models[i][a:e].clone(),
                         3, w, dens, lam=0.9)
    assert torch.equal(once(0, 37), expect)


def test_ties_closed_form_example():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    b = torch.tensor([-3.0, -1.0, 1.0, -0.5], dtype=torch.float64)
    # density 1: elected signs from a + b = [-2, -3, 4, 0] -> [-, -, +, + (tie goes to +)]
    # element 0: only b agrees -> -3 / 1; element 1: both -> (-2 - 1)/2; element 2: (3 + 1)/2; element 3: only a -> 0.5
    out = ties.ties(base, [a, b], [1.0, 1.0], [1.0, 1.0])
    assert out.tolist() == [-3.0, -1.5, 2.0, 0.5]
    # without normalize the agreeing entries are summed
    assert ties.ties(base, [a, b], [1.0, 1.0], [1.0, 1.0], normalize=False).tolist() == [-3.0, -3.0, 4.0, 0.5]


def _ties_reference(base, models, weights, densities, lam):
    """Element by element, in float64, straight from the TIES recipe (mergekit variant)."""
    deltas = []
    for m, dens in zip(models, densities):
        d = (m - base).reshape(-1)
        k = max(1, int(dens * d.numel()))
        thr = d.abs().sort(descending=True).values[k - 1]
        deltas.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))   # no ties in random data
    out = torch.zeros_like(deltas[0])
    for j in range(out.numel()):
        vals = [w * d[j].item() for w, d in zip(weights, deltas)]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        agree = [(v, w) for v, w in zip(vals, weights) if v != 0 and math.copysign(1.0, v) == sign]
        num = sum(v for v, _ in agree)
        den = sum(w for _, w in agree) or 1.0
        out[j] = num / den
    return base + lam * out.reshape(base.shape)


def test_ties_matches_elementwise_reference():
    base = _rand(6, 7)
    ms = [base + _rand(6, 7, seed=i + 1) for i in range(3)]
    w, dens = [1.0, 0.6, 0.8], [0.5, 0.7, 0.3]
    got = ties.ties(base, ms, w, dens, lam=0.9)
    assert torch.allclose(got, _ties_reference(base, ms, w, dens, 0.9), atol=1e-12)


def _ties_combine_reference(weighted, weights, normalize):
    """mergekit's combine spelled out per model, in the inputs' dtype: the sign of Σ wd_i
    (0 counts as +), then the agreeing entries (nonzero, of that sign) added in model order
    onto +0, and the agreeing weights likewise."""
    total = weighted[0].clone()
    for wd in weighted[1:]:
        total = total + wd
    sign = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    mixed, divisor = torch.zeros_like(total), torch.zeros_like(total)
    for wd, w in zip(weighted, weights):
        agree = wd * sign > 0
        mixed = mixed + torch.where(agree, wd, torch.zeros_like(wd))
        divisor = divisor + torch.where(agree, torch.full_like(wd, w), torch.zeros_like(wd))
    if normalize:
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_ties_combine_has_the_bits_of_the_per_model_reference(monkeypatch, dtype, normalize):
    """The chunked P/N form (positive and negative parts, chosen by the elected sign) gives the
    reference's bits: signed zeros included (+0 where no model agrees), negative weights, a
    divisor that cancels to 0, and chunk edges (a chunk of 1000 entries over 4321)."""
    monkeypatch.setattr(sparsify, "COMBINE_CHUNK", 1000)
    g = torch.Generator().manual_seed(5)
    n = 4321
    weights = [0.7, -0.3, 1.2, 0.3]
    weighted = []
    for w in weights:
        tau = (torch.randn(n, generator=g) * 0.01).bfloat16().to(dtype)
        tau[torch.rand(n, generator=g) < 0.3] = 0.0
        tau[torch.rand(n, generator=g) < 0.1] = -0.0
        weighted.append(tau * w)
    for wd in weighted:
        wd[:50] = -0.0                         # nothing agrees there: the result is +0
    weighted[1][60:70], weighted[3][60:70] = -1.0, 1.0    # the weights -0.3 and 0.3 agree: divisor 0
    want = _ties_combine_reference(weighted, weights, normalize)
    got = sparsify.ties_combine_weighted([w.clone() for w in weighted], weights, normalize)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    assert torch.equal(got.view(bits), want.view(bits))
    assert not torch.signbit(got[:50]).any()


@pytest.mark.parametrize("w", [1.0, 0.37, -0.37, 0.0, -0.0])
def test_mask_values_times_x_has_the_bits_of_mask_then_weight(w):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5000, generator=g)
    x[::7] = -0.0
    keep = torch.rand(5000, generator=g) < 0.6
    for dtype, bits in [(torch.float32, torch.int32), (torch.float64, torch.int64)]:
        xs = x.to(dtype)
        got = xs * select.mask_values(keep, dtype, w)
        want = (xs * keep) * w
        assert torch.equal(got.view(bits), want.view(bits))


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 16])
def test_position_finds_the_jth_true_entry(block):
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(3001, generator=g) < 0.2).numpy()
    where = mask.nonzero()[0]
    for j in [1, 2, len(where) // 2, len(where)]:
        assert select._position_np(mask, j, block) == where[j - 1]
    with pytest.raises(IndexError):
        select._position_np(mask, len(where) + 1, block)


# ---- DARE -----------------------------------------------------------------------------------

def _splitmix64_top24(key, e):
    """SplitMix64's e-th output (0-based) for state ``key``, top 24 bits, in Python integers."""
    m = (1 << 64) - 1
    z = (key + (e + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) >> 40


def _dare_keep_reference(seed, name, model, numel, density):
    """The documented draw, spelled out: entry e survives when r_e / 2^24 < density, r_e the top
    24 bits of the e-th output of SplitMix64 started at drop_seed(seed, name, model)."""
    key = dare.drop_seed(seed, name, model)
    return torch.tensor([_splitmix64_top24(key, e) / 2 ** 24 < density for e in range(numel)])


def test_dare_drop_is_seeded_and_rescaled():
    d = _rand(700, 300)                        # 210,000 entries: four draw chunks, the last one short
    drop = lambda s, **kw: dare.dare_drop(d, 0.3, seed=s, tensor_name="w", model_index=0, **kw)  # noqa: E731
    a, b = drop(1), drop(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, drop(2))
    kept = a != 0
    assert torch.equal(kept.reshape(-1), _dare_keep_reference(1, "w", 0, d.numel(), 0.3))
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    # mergekit 0.1.5's rescale: the survivors keep the whole task vector's L1 norm
    factor = float(d.abs().sum() / d[kept].abs().sum())
    assert abs(factor - 1 / 0.3) < 0.05
    assert torch.allclose(a[kept], d[kept] * factor, atol=1e-12)
    assert torch.allclose(drop(1, rescale=False)[kept], d[kept])
    assert dare.dare_drop(d, 1.0, seed=1, tensor_name="w", model_index=0) is d
    # any slice of the flat tensor gets the same decisions as the whole
    flat = d.reshape(-1)
    part = dare.dare_drop(flat[65_000:140_123], 0.3, seed=1, tensor_name="w", model_index=0, start=65_000,
                          numel=flat.numel(), rescale=False)
    assert torch.equal(part != 0, kept.reshape(-1)[65_000:140_123])


def test_dare_seed_depends_on_tensor_and_model_not_on_order():
    assert dare.drop_seed(0, "w", 0) == dare.drop_seed(0, "w", 0)
    assert len({dare.drop_seed(0, "w", 0), dare.drop_seed(0, "w", 1), dare.drop_seed(0, "v", 0),
                dare.drop_seed(1, "w", 0)}) == 4


def test_draws_are_uniform_and_any_range_equals_the_whole():
    r = sparsify.draw_bits(3, "w", 1, 0, 1 << 20)
    assert int(r.min()) >= 0 and int(r.max()) < 2 ** 24
    u = r.double() / 2 ** 24
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 2e-3
    hist = torch.bincount((u * 16).long(), minlength=16).double() / u.numel()
    assert float((hist - 1 / 16).abs().max()) < 2e-3                    # every sixteenth equally often
    lag = float(((u[1:] - 0.5) * (u[:-1] - 0.5)).mean()) * 12            # neighbours uncorrelated
    assert abs(lag) < 1e-2
    assert torch.equal(sparsify.draw_bits(3, "w", 1, 12_345, 99_999), r[12_345:99_999])
    assert torch.equal(sparsify.uniforms(3, "w", 1, 1 << 20, 5, 9), u[5:9])


def test_cpu_draws_equal_the_tensor_op_draws_of_other_devices():
    # the CPU computes SplitMix64 in numpy uint64; other devices in int64 tensor ops: same bits
    z = sparsify._mixed_torch(5, "layer.w", 2, 70_000, 200_001, "cpu")
    assert torch.equal(torch.from_numpy(sparsify._mixed(5, "layer.w", 2, 70_000, 200_001).view("int64")), z)
    r = (z >> 40).bitwise_and_((1 << 24) - 1)
    assert torch.equal(sparsify.draw_bits(5, "layer.w", 2, 70_000, 200_001), r)
    for density in (0.3, 0.5, 1 - 2 ** -30):       # the last rounds up to 2^24: every entry kept
        want = r < math.ceil(density * 2 ** 24)
        assert torch.equal(sparsify.keep_mask(5, "layer.w", 2, 0, 70_000, 200_001, density), want)
    assert bool(sparsify.keep_mask(5, "layer.w", 2, 0, 0, 1000, 1 - 2 ** -30).all())


def test_dare_linear_and_ties_match_manual_drop():
    base = _rand(30, 20)
    ms = [base + _rand(30, 20, seed=i + 1) for i in range(2)]
    w, dens = [1.0, 0.5], [0.4, 0.6]
    dropped = []
    for i, (m, p) in enumerate(zip(ms, dens)):
        keep = _dare_keep_reference(7, "x", i, base.numel(), p).reshape(base.shape)
        tau = m - base
        dropped.append(torch.where(keep, tau * (tau.abs().sum() / tau[keep].abs().sum()), torch.zeros_like(base)))
    lin = dare.dare_linear(base, ms, w, dens, seed=7, tensor_name="x")
    assert torch.allclose(lin, base + w[0] * dropped[0] + w[1] * dropped[1], atol=1e-12)
    tie = dare.dare_ties(base, ms, w, dens, seed=7, tensor_name="x", normalize=True)
    ref = ties.ties(base, [base + d for d in dropped], w, [1.0, 1.0], normalize=True)
    assert torch.allclose(tie, ref, atol=1e-12)


@pytest.mark.parametrize("consensus", [False, True])
def test_dare_blocks_equal_the_whole_tensor(monkeypatch, consensus):
    """Row blocks (several blocks per L1 pass) give the bytes of the whole-tensor computation."""
    monkeypatch.setattr(streaming, "STATS_ELEMENTS", 100)
    base = _rand(41, 13).float()
    ms = [base + 0.1 * _rand(41, 13, seed=i + 1).float() for i in range(3)]
    w, dens = [1.0, 0.5, 0.8], [0.4, 0.6, 1.0]
    rules = [sparsify.Sparsify("random", d) for d in dens]
    kw = dict(consensus=consensus, normalize=True, lam=0.9, rescale=True, seed=5, name="t")
    whole = sparsify.whole(rules, base, ms, w, **kw)
    monkeypatch.setattr(streaming, "IN_MEMORY_BYTES", 0)
    monkeypatch.setattr(streaming, "SUB_ELEMENTS", 50)
    rows = sparsify.GtaRows(sparsify.row_inputs(base.shape, lambda a, e: base[a:e].clone(),
                                                lambda i, a, e: ms[i][a:e].clone(), 3), rules, w, **kw)
    parts = [rows(a, min(41, a + 9)) for a in range(0, 41, 9)]
    assert torch.equal(torch.cat(parts), whole)


# ---- SLERP ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_orthogonal_closed_form(t):
    v0 = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    v1 = torch.tensor([[0.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    theta = math.pi / 2
    expect = math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1
    assert torch.allclose(slerp.slerp(t, v0, v1), expect, atol=1e-12)


def test_slerp_general_angle_against_formula():
    v0, v1 = _rand(10, seed=1), _rand(10, seed=2)
    cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
    th = math.acos(cos)
    expect = (math.sin(0.3 * th) * v1 + math.sin(0.7 * th) * v0) / math.sin(th)
    assert torch.allclose(slerp.slerp(0.3, v0, v1), expect, atol=1e-12)


def test_slerp_falls_back_to_linear_when_nearly_parallel():
    v0 = _rand(50)
    v1 = 1.5 * v0 + 1e-4 * _rand(50, seed=3)          # |cos| > 0.9995
    assert torch.equal(slerp.slerp(0.3, v0, v1), 0.7 * v0 + 0.3 * v1)
    anti = -2.0 * v0                                  # antiparallel: linear too
    assert torch.equal(slerp.slerp(0.4, v0, anti), 0.6 * v0 + 0.4 * anti)


# ---- OPCM -----------------------------------------------------------------------------------

def test_split_rank_on_plain_sum_of_singular_values():
    s = torch.tensor([3.0, 2.0, 1.0])                  # cumsum/6 = 0.5, 0.833, 1.0
    assert opcm.split_rank(s, 0.5) == 1                 # strictly greater than alpha
    assert opcm.split_rank(s, 0.4) == 0
    assert opcm.split_rank(s, 0.9) == 2
    assert opcm.split_rank(s, 1.0) == 0 and opcm.split_rank(s, 1.5) == 0   # none exceeds: r = 0
    assert opcm.split_rank(torch.zeros(3), 0.5) == 0


def _opcm_reference(m, tau, alpha, keep_diagonal=False):
    """FusionBench's rule with a full float64 SVD: zero the top-left r×r block and the diagonal
    of Uᵀ τ V (diagonal only where M has a nonzero singular value)."""
    u, s, vh = torch.linalg.svd(m, full_matrices=True)
    v = vh.T
    total = s.sum()
    frac = (torch.cumsum(s, 0) / total).clamp(max=1.0)   # the ratio cannot exceed 1
    above = (frac > alpha).nonzero()
    r = int(above[0]) if len(above) else 0
    p = u.T @ tau @ v
    rank = int((s > s.max() * max(m.shape) * 1.2e-7).sum())
    if not keep_diagonal:
        idx = torch.arange(rank)
        p[idx, idx] = 0
    p[:r, :r] = 0
    return u @ p @ v.T, r


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8, 1.0, 1.5])
@pytest.mark.parametrize("decomposition", ["svd", "gram"])
def test_projection_matches_full_svd_reference(shape, alpha, decomposition):
    m = _rand(*shape, seed=1)
    tau = _rand(*shape, seed=2)
    got, r = opcm.project_task_vector(m, tau, alpha, decomposition=decomposition)
    ref, r_ref = _opcm_reference(m, tau, alpha)
    assert r == r_ref
    assert torch.allclose(got, ref, atol=1e-9)
    if alpha >= 1:
        assert r == 0                                   # only the diagonal is removed


@pytest.mark.parametrize("decomposition", ["svd", "gram"])
def test_projection_keep_diagonal_switch(decomposition):
    m, tau = _rand(9, 6, seed=3), _rand(9, 6, seed=4)
    got, _ = opcm.project_task_vector(m, tau, 0.5, keep_diagonal=True, decomposition=decomposition)
    ref, _ = _opcm_reference(m, tau, 0.5, keep_diagonal=True)
    assert torch.allclose(got, ref, atol=1e-9)
    off, _ = opcm.project_task_vector(m, tau, 0.5, keep_diagonal=False, decomposition=decomposition)
    assert not torch.allclose(got, off)


@pytest.mark.parametrize("decomposition", ["svd", "gram"])
def test_projection_with_rank_deficient_merged_vector(decomposition):
    m = _rand(10, 3, seed=5) @ _rand(3, 7, seed=6)      # rank 3 of 7
    tau = _rand(10, 7, seed=7)
    got, r = opcm.project_task_vector(m, tau, 0.5, decomposition=decomposition)
    ref, r_ref = _opcm_reference(m, tau, 0.5)
    assert r == r_ref
    assert torch.allclose(got, ref, atol=1e-8)
    # the part of τ outside M's row and column spaces is untouched
    q_u, _ = torch.linalg.qr(m)
    q_v, _ = torch.linalg.qr(m.T)
    outside = lambda x: x - q_u @ (q_u.T @ x) - (x - q_u @ (q_u.T @ x)) @ q_v @ q_v.T  # noqa: E731
    assert torch.allclose(outside(got), outside(tau), atol=1e-9)
    zero, r0 = opcm.project_task_vector(torch.zeros(4, 5, dtype=torch.float64), _rand(4, 5), 0.5,
                                        decomposition=decomposition)
    assert r0 == 0 and torch.equal(zero, _rand(4, 5))   # nothing to project against


def test_gram_decomposition_accuracy_against_exact_svd():
    # fine-tune-like task vectors in float32: a few strong directions plus dense noise
    g = torch.Generator().manual_seed(0)
    for rows, cols in [(256, 96), (96, 256)]:
        m = (torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g) + 0.1 * torch.randn(rows, cols, generator=g))
        tau = torch.randn(rows, cols, generator=g) * 0.5
        exact, _ = opcm.project_task_vector(m, tau, 0.5, decomposition="svd")
        fast, _ = opcm.project_task_vector(m, tau, 0.5, decomposition="gram")
        assert float((fast - exact).norm() / exact.norm()) < 1e-3


def test_opcm_tensor_first_step_and_other_tensors():
    tau = _rand(5)
    s, r = opcm.opcm_tensor(None, tau, 1.0, alpha=0.5, project=False)
    assert s is tau and r is None
    prev = _rand(5, seed=1)
    s, _ = opcm.opcm_tensor(prev, tau, 1.7, alpha=0.5, project=False)
    assert torch.allclose(s, 1.7 * prev + tau)


# ---- continual baselines --------------------------------------------------------------------

def test_continual_baselines_fold():
    taus = [_rand(4, 3, seed=i) for i in range(4)]
    s = None
    for i, t in enumerate(taus):
        s = continual.continual_task_arithmetic_step(s, t, i + 1, 0.3)
    assert torch.allclose(s, 0.3 * sum(taus), atol=1e-12)
    s = None
    for i, t in enumerate(taus):
        s = continual.continual_weight_average_step(s, t, i + 1)
    assert torch.allclose(s, sum(taus) / 4, atol=1e-12)
    s = None
    for i, t in enumerate(taus):
        s = continual.magmax_step(s, t, i + 1)
    stacked = torch.stack(taus)
    idx = stacked.abs().argmax(0, keepdim=True)
    assert torch.equal(s, stacked.gather(0, idx)[0])
    # a later task vector wins a tie in magnitude
    assert continual.magmax_step(torch.tensor([1.0]), torch.tensor([-1.0]), 2).item() == -1.0


def _gta_inputs(dtype, nonfinite):
    """A base and three models with the edge cases of TIES' combine: τ = +0 (a model equal to
    the base), −0 in the base, models whose τ cancel, chunk edges (19200 = 9·2048 + 768), and
    with ``nonfinite`` a NaN and ±inf meeting at one entry."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 300, generator=g, dtype=dtype)
    models = [base + 0.01 * torch.randn(64, 300, generator=g, dtype=dtype) for _ in range(3)]
    models[1][0, :20] = base[0, :20]
    models[2][1, :10] = 2 * base[1, :10] - models[0][1, :10]
    base[2, :5], models[0][2, :5] = -0.0, 0.0
    if nonfinite:
        models[0][3, 0] = float("nan")
        models[1][3, 1], models[2][3, 1] = float("inf"), float("-inf")
    return base, models


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["none", "magnitude", "random", "outliers", "della"])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_fused_ties_kernel_has_the_bits_of_the_torch_path(dtype, kind, nonfinite):
    """TIES in one numba pass (tune's merges) against GtaRows' torch passes, bit for bit (NaN
    at the same entries: a NaN's payload is not a value), over every sparsification, density
    1 and below, negative and zero weights, normalize, λ and the L1 rescale."""
    from surgery.merge.methods import fused

    assert fused.kernel() is not None          # numba is a dependency: the kernel must compile here
    base, models = _gta_inputs(dtype, nonfinite)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for density in (1.0, 0.7):
        rules = [sparsify.Sparsify(kind, density, 0.05 if kind == "outliers" else 0.0,
                                   0.1 if kind == "della" else 0.0)] * 3
        for w in [(1.0, 1.0, 1.0), (0.5, -0.3, 1.2), (0.0, 0.0, 0.0), (1.0, -1.0, 0.0)]:
            for normalize in (False, True):
                for lam, rescale in [(1.0, False), (0.7, False), (1.0, True), (0.7, True)]:
                    got, want = (sparsify.whole(rules, base, models, w, consensus=True, normalize=normalize, lam=lam,
                                                rescale=rescale, seed=3, fused=f) for f in (True, False))
                    nan = want.isnan()
                    assert torch.equal(got.isnan(), nan)
                    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (density, w, normalize, lam,
                                                                                       rescale)
