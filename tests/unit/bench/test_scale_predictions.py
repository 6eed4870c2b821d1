"""benchmarks/scale.py's cost model: a unit's seconds are shared by all the tensors it wrote, and
a tensor class the measured layers lack is priced like the measured classes of its kind."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_scale", BENCH / "scale.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


SHAPE = {"hidden": 64, "inter": 128, "layers": 1, "vocab": 256, "kv": 64}
L0 = "model.layers.0."


def _projected_flops(m, n):
    k = min(m, n)
    return m * n * k + k ** 3


def test_a_unit_of_two_matrices_costs_each_half(scale):
    secs = {L0 + "self_attn.o_proj.weight": 2.0, L0 + "self_attn.k_proj.weight": 1.0}
    members = {L0 + "self_attn.o_proj.weight": [L0 + "self_attn.o_proj.weight", L0 + "self_attn.q_proj.weight"],
               L0 + "self_attn.k_proj.weight": [L0 + "self_attn.k_proj.weight"]}
    costs = scale.class_costs(secs, 1, True, SHAPE, members)
    per = 1.0 / _projected_flops(64, 64)
    for cls in ("o_proj", "q_proj", "k_proj"):
        assert costs[cls]["per_flop"] == pytest.approx(per)
    assert costs["o_proj"]["with"] == ["q_proj"] and costs["q_proj"]["seconds"] is None
    # without the membership (an older run) the unit is its largest tensor alone: twice the cost
    old = scale.class_costs(secs, 1, True, SHAPE)
    assert old["o_proj"]["per_flop"] == pytest.approx(2 * per) and "q_proj" not in old


def test_a_missing_projected_class_is_priced_like_the_projected_ones(scale):
    # the measured classes: two projected matrices at 1e-3 and 3e-3 s/flop, one elementwise at 1
    costs = {"k_proj": {"per_flop": 1e-3}, "v_proj": {"per_flop": 3e-3}, "embed_tokens": {"per_flop": 1.0}}
    got = scale.predict(costs, SHAPE, passes=2, use_projection=True, inputs=2, workers=[1, 1000],
                        bandwidth_gbs=1e9, overhead_s=0.0)
    expected = 0.0
    largest = 0.0
    for name, shp in scale.llama_tensors(SHAPE):
        cls = scale.tensor_class(name)
        if cls in ("k_proj", "v_proj"):
            t = costs[cls]["per_flop"] * _projected_flops(*shp)
        elif cls == "embed_tokens":
            t = 1.0 * math.prod(shp)
        elif cls == "norm":   # elementwise, priced like the only elementwise class measured
            t = 1.0 * math.prod(shp)
        else:                 # q/o/MLP/head: the median of the projected classes, 2e-3
            t = 2e-3 * _projected_flops(*shp)
        expected += t
        largest = max(largest, t)
    assert expected > 1e4 and largest > 10 * expected / 1000
    assert got["compute_core_s"] == pytest.approx(2 * expected, rel=1e-5)
    assert got["largest_unit_s"] == pytest.approx(largest, rel=1e-5)
    # one worker: the passes' sum; many: each pass waits for its largest unit
    assert got["by_workers"][1]["compute_s"] == pytest.approx(2 * expected, rel=1e-5)
    assert got["by_workers"][1000]["compute_s"] == pytest.approx(2 * largest, rel=1e-5)
