"""The merge-method interface: declarations, range checks, per-tensor resolution, recipe
warnings, and the command line's -p parsing, each against values written out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from surgery.core.errors import UsageError
from surgery.merge import METHODS, MergeRequest, ModelEntry
from surgery.merge.method import Param, check_declaration, unit
from surgery.merge.params import Params

LLAMA = Path(__file__).resolve().parents[3] / "fixtures" / "llama-tiny"


@pytest.mark.parametrize("param, good, bad", [
    (unit("density", low_open=True), [1e-9, 0.5, 1.0, 1], [0.0, -0.5, 1.5, math.nan, math.inf, "0.5", True]),
    (unit("t"), [0.0, 0.3, 1.0], [-0.01, 1.01, math.nan]),
    (Param("lambda", 1.0), [-3.0, 0.0, 1e6, 2], [math.inf, -math.inf, math.nan, "x", None, False]),
    (Param("scaling", 0.3, low=0.0), [0.0, 5.0], [-1e-9]),
    (Param("normalize", True, type="bool"), [True, False], [1, 0.0, "true"]),
    (Param("rule", "a", type="str", choices=("a", "b")), ["a", "b"], ["c", 1]),
])
def test_param_check(param, good, bad):
    for v in good:
        param.check(v, "here")
    for v in bad:
        with pytest.raises(UsageError, match=f"here: `{param.name}`"):
            param.check(v, "here")


def test_range_text():
    assert unit("d", low_open=True).range_text() == "(0, 1]"
    assert unit("t").range_text() == "[0, 1]"
    assert Param("s", 0.3, low=0.0).range_text() == "≥ 0"
    assert Param("x", 1.0).range_text() == "any finite number"


def test_every_declaration_is_consistent():
    for m in METHODS.values():
        check_declaration(m)
        assert m.paper.startswith("http") and m.summary, m.name
    from surgery.merge.method import Batch

    with pytest.raises(UsageError, match="default: `t` = 2.0"):
        check_declaration(Batch("bad", "http://x", "s", (unit("t", 2.0),), lambda c: None))


def _params(method, settings=None, per=None, origin=None, n=2):
    models = [ModelEntry(f"m{i}", dict((per or [{}] * n)[i])) for i in range(n)]
    return Params(METHODS[method], MergeRequest(method, "b", models, dict(settings or {}), origin=origin), 5)


def test_resolution_precedence_and_gradients():
    p = _params("ties", {"density": 0.4, "lambda": [0.0, 1.0]}, [{"density": 0.9}, {}])
    name = "model.layers.2.mlp.up_proj.weight"          # layer 2 of 5: t = 0.5
    assert p.per_model(name) == [{"weight": 1.0, "density": 0.9}, {"weight": 1.0, "density": 0.4}]
    assert p.shared(name) == {"lambda": 0.5, "normalize": True, "rescale": False, "int8_mask": False}
    assert p.shared("model.embed_tokens.weight")["lambda"] == 0.0


def test_unknown_parameters_error_on_the_command_line_warn_in_recipes():
    with pytest.raises(UsageError, match="does not take `alpha`"):
        _params("ties", {"alpha": 0.5})
    p = _params("slerp", {"t": 0.3}, [{"weight": 0.5}], origin="r.yml", n=1)
    assert len(p.warnings) == 1 and "does not take `weight`" in p.warnings[0] and "ignored" in p.warnings[0]
    assert p.shared("x") == {"t": 0.3}
    p = _params("ties", {}, [{"lambda": 0.5}, {}], origin="r.yml")
    assert "global parameter" in p.warnings[0] and p.shared("x")["lambda"] == 1.0


def test_every_scalar_of_a_setting_is_checked():
    with pytest.raises(UsageError, match="`density` = 2.0 is out of range"):
        _params("ties", {"density": [{"filter": "mlp", "value": 0.5}, {"value": [0.1, 2.0]}]})
    # a list of booleans picks by layer position, as mergekit does: value[int(t·(len−1))]
    p = _params("ties", {"normalize": [True, False]})
    assert p.shared("model.layers.3.mlp.up_proj.weight")["normalize"] is True     # t = 0.75 of 5 layers -> index 0
    assert p.shared("model.layers.4.mlp.up_proj.weight")["normalize"] is False    # t = 1 -> index 1
    with pytest.raises(UsageError, match="`normalize` must be true or false"):
        _params("ties", {"normalize": [True, 0.5]})


def test_cli_param_parsing():
    from surgery.commands.merge import _parse_params

    shared, per = _parse_params(["density=0.5", "2:weight=0.25", "lambda=[0.1, 0.9]", "normalize=false"], 2)
    assert shared == {"density": 0.5, "lambda": [0.1, 0.9], "normalize": False}
    assert per == [{}, {"weight": 0.25}]
    for bad, msg in [("x", "write KEY=VALUE"), ("0:weight=1", "must be 1 to 2"), ("3:weight=1", "must be 1 to 2"),
                     ("weight=", "needs a value")]:
        with pytest.raises(UsageError, match=msg):
            _parse_params([bad], 2)
