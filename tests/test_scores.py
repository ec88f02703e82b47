"""Tests of jaxleak.scores.LayerScores, the result type of every measure."""

import json
import math

import numpy as np
import pytest

from jaxleak.scores import LayerScores, Score


def _scores():
    return LayerScores(
        "sensitivity",
        {
            "Conv_0": Score(2.0, (1.5, 2.5), {"raw": np.float32(0.5), "raw_ci": (0.4, 0.6)}),
            "Conv_1": Score(np.float64(3.0), None, {"k": np.int64(4)}),
            "Dense_0": Score(-1.0, None, {"arr": np.arange(3)}),
            "Dense_1": Score(float("nan"), None, {}),
        },
        unit="dimensionless",
        meta={"method": "hutchinson", "probes": 16},
    )


def test_mapping_order_and_access():
    s = _scores()
    assert list(s) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"] and len(s) == 4
    assert s["Conv_0"]["value"] == 2.0 and s["Conv_0"]["ci"] == (1.5, 2.5)
    assert s["Conv_0"]["raw"] == pytest.approx(0.5)
    with pytest.raises(KeyError):
        s["Conv_0"]["missing"]


def test_top_shares_ranks():
    s = _scores()
    assert s.top() == "Conv_1"
    shares = s.shares()
    assert shares["Conv_0"] == pytest.approx(0.4) and shares["Conv_1"] == pytest.approx(0.6)
    assert shares["Dense_0"] == 0.0 and shares["Dense_1"] == 0.0  # negative and NaN count as 0
    assert s.ranks() == {"Conv_1": 1, "Conv_0": 2, "Dense_0": 3, "Dense_1": 4}
    tie = LayerScores("m", {"a": Score(1.0), "b": Score(1.0)})
    assert tie.top() == "a"  # first in forward order on ties
    with pytest.raises(ValueError):
        LayerScores("m", {}).top()


def test_to_dict_is_plain_json_and_round_trips():
    s = _scores()
    d = s.to_dict()
    text = json.dumps(d, allow_nan=False)  # NaN must have become null
    assert json.loads(text) == d
    assert d["top"] == ["Conv_1"] and d["unit"] == "dimensionless" and d["meta"]["probes"] == 16
    assert d["verdict"]["kind"] == "scale" and d["verdict"]["detected"] is None
    layer = d["layers"]["Conv_0"]
    assert layer["ci"] == [1.5, 2.5] and layer["raw_ci"] == [0.4, 0.6] and layer["rank"] == 2
    assert isinstance(layer["raw"], float) and d["layers"]["Conv_1"]["k"] == 4
    assert d["layers"]["Dense_0"]["arr"] == [0, 1, 2]
    assert d["layers"]["Dense_1"]["value"] is None
    back = LayerScores.from_dict(d)
    assert list(back) == list(s) and math.isnan(back["Dense_1"].value)
    assert back.to_dict() == d


def test_all_zero_shares():
    s = LayerScores("m", {"a": Score(0.0), "b": Score(-2.0)})
    assert s.shares() == {"a": 0.0, "b": 0.0}


def test_rank_by_an_extra_field():
    from jaxleak.scores import LayerScores, Score

    s = LayerScores("subspace_distance", {"a": Score(0.9, None, {"excess": 0.01}),
                                          "b": Score(0.5, None, {"excess": 0.2})}, rank_by="excess")
    assert s.top() == "b" and s.ranks() == {"b": 1, "a": 2}
    d = s.to_dict()
    assert d["top"] == ["b"] and d["meta"]["rank_by"] == "excess"
    assert LayerScores.from_dict(d).top() == "b"


def test_max_t_rejects_only_beyond_every_permutation_maximum():
    from jaxleak.scores import max_t

    # 39 permutations: a rejection at 0.05 allows at most one permutation maximum at or above the observed
    nulls = {"a": np.arange(39.0), "b": np.arange(39.0)[::-1].copy()}
    p, critical = max_t({"a": 100.0, "b": 19.0}, nulls)
    assert p["a"] == pytest.approx(1 / 40) and p["b"] > 0.5 and math.isfinite(critical)
    p, critical = max_t({"a": 100.0}, {"a": np.arange(19.0)})  # 19 permutations: no p below 1/20 = 0.05
    assert p["a"] == pytest.approx(1 / 20) and math.isnan(critical)
    p, critical = max_t({"a": float("nan")}, {"a": np.arange(30.0)})  # no finite statistic: no test
    assert p == {} and math.isnan(critical)


def _test_entry(layers, ties=None, meta=None):
    ties = ties or {}
    return LayerScores("v_information", {k: Score(v, ci, {"detected": ci[0] > 0, "detectable": 0.05,
                                                          "tied_with_top": ties.get(k)})
                                         for k, (v, ci) in layers.items()}, unit="bits", meta=meta).to_dict()


def test_verdict_names_top_layers_only_when_detected_and_lists_ties():
    from jaxleak.scores import verdict

    none = verdict(_test_entry({"a": (0.02, (-0.01, 0.05)), "b": (0.03, (-0.02, 0.08))},
                               meta={"detectable_what": "an attack gain"}))
    assert none["top"] is None and none["detected"] == []
    assert none["text"] == ("none detected; this run would detect an attack gain of 0.05 bits or more "
                            "(80% power, family-wise over 2 layers)")
    one = verdict(_test_entry({"a": (0.02, (-0.01, 0.05)), "b": (0.30, (0.2, 0.4)), "c": (0.1, (0.05, 0.15))}))
    assert one["top"] == ["b"] and one["detected"] == ["b", "c"]
    # a tie is the measure's paired decision (tied_with_top), and only a detected layer can tie;
    # overlapping marginal intervals alone decide nothing
    tie = verdict(_test_entry({"a": (0.25, (-0.1, 0.6)), "b": (0.30, (0.2, 0.4)), "c": (0.1, (0.05, 0.15))},
                              ties={"a": True, "c": True}))
    assert tie["top"] == ["b", "c"] and "tied with c" in tie["text"] and "a" not in tie["top"]
    overlap = verdict(_test_entry({"b": (0.30, (0.2, 0.4)), "c": (0.25, (0.15, 0.35))}, ties={"c": False}))
    assert overlap["top"] == ["b"]
    assert _test_entry({"a": (0.02, (-0.01, 0.05))})["top"] is None
    cannot = verdict(_test_entry({"a": (0.02, (-0.01, 0.05))}, meta={"cannot_reject": "too few permutations"}))
    assert cannot["text"] == "none detected; this run cannot detect anything: too few permutations"
    assert "0.05" not in cannot["text"]
