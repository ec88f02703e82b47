"""Tests of jaxleak.subspace: principal angles from Grams, Gram formation, the permutation null."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxleak import Task, data, layer_grads
from jaxleak import grads as grads_mod
from jaxleak import subspace
from jaxleak.errors import InputError
from jaxleak.subspace import (balanced_groups, layer_grams, principal_angle_distance, subspace_distance,
                              subspace_distance_from_grams)


def _grams(g0, g1):
    return g0 @ g0.T, g1 @ g1.T, g0 @ g1.T


def _random_rows(rng, n, p, rank):
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, p))


def test_identical_sets_have_distance_zero():
    rng = np.random.default_rng(0)
    g = _random_rows(rng, 12, 40, 5)
    assert principal_angle_distance(*_grams(g, g), k=5) == pytest.approx(0.0, abs=1e-6)
    # another basis of the same row space is still distance 0
    h = rng.normal(size=(9, 12)) @ g
    assert principal_angle_distance(*_grams(g, h), k=5) == pytest.approx(0.0, abs=1e-6)


def test_orthogonal_sets_have_distance_one():
    rng = np.random.default_rng(1)
    g0 = np.zeros((10, 30))
    g1 = np.zeros((10, 30))
    g0[:, :15] = rng.normal(size=(10, 15))
    g1[:, 15:] = rng.normal(size=(10, 15))
    assert principal_angle_distance(*_grams(g0, g1), k=4) == pytest.approx(1.0, abs=1e-9)


def test_known_principal_angles():
    # span{e1, e2} against span{cos a e1 + sin a e3, cos b e2 + sin b e4}
    a, b = 0.3, 1.1
    p = 6
    g0 = np.zeros((2, p))
    g0[0, 0] = g0[1, 1] = 1.0
    g1 = np.zeros((2, p))
    g1[0, [0, 2]] = np.cos(a), np.sin(a)
    g1[1, [1, 3]] = np.cos(b), np.sin(b)
    want = np.sqrt((np.sin(a) ** 2 + np.sin(b) ** 2) / 2)
    assert principal_angle_distance(*_grams(3 * g0, 0.5 * g1), k=2) == pytest.approx(want, rel=1e-9)


def test_symmetric_and_invariant_to_order_and_rotation():
    rng = np.random.default_rng(2)
    g0 = _random_rows(rng, 15, 25, 6)
    g1 = _random_rows(rng, 15, 25, 6) + 0.5 * g0
    d = principal_angle_distance(*_grams(g0, g1), k=4)
    assert 0.05 < d < 0.95
    k00, k11, k01 = _grams(g0, g1)
    assert principal_angle_distance(k11, k00, k01.T, k=4) == pytest.approx(d, rel=1e-9)
    p0, p1 = rng.permutation(15), rng.permutation(15)
    assert principal_angle_distance(*_grams(g0[p0], g1[p1]), k=4) == pytest.approx(d, rel=1e-9)
    q, _ = np.linalg.qr(rng.normal(size=(25, 25)))
    assert principal_angle_distance(*_grams(g0 @ q, g1 @ q), k=4) == pytest.approx(d, rel=1e-8)


def test_distance_needs_a_valid_rank():
    rng = np.random.default_rng(3)
    g = _random_rows(rng, 8, 20, 3)
    with pytest.raises(InputError, match="numerical rank"):
        principal_angle_distance(*_grams(g, g), k=4)


def test_from_grams_null_and_p_value():
    rng = np.random.default_rng(4)
    n, p = 30, 60
    base = rng.normal(size=(4, p))
    g0 = rng.normal(size=(n, 4)) @ base + 0.05 * rng.normal(size=(n, p))
    g1 = rng.normal(size=(n, 4)) @ rng.normal(size=(4, p)) + 0.05 * rng.normal(size=(n, p))
    g = np.concatenate([g0, g1])
    z = np.repeat([0, 1], n)
    res = subspace_distance_from_grams(g @ g.T, z, rank=4, permutations=19, seed=0)
    assert res["k"] == 4 and res["n_per_group"] == n and len(res["null"]) == 19
    assert res["value"] > 0.9 and res["excess"] > 0.2
    assert res["p_value"] == pytest.approx(1 / 20)
    assert res["excess"] == pytest.approx(res["value"] - res["null_mean"])
    # both groups from one distribution: no excess
    g_same = np.concatenate([g0, rng.normal(size=(n, 4)) @ base + 0.05 * rng.normal(size=(n, p))])
    same = subspace_distance_from_grams(g_same @ g_same.T, z, rank=4, permutations=19, seed=0)
    assert same["p_value"] > 0.05 and abs(same["excess"]) < 3 * same["null_sd"] + 1e-3


def test_energy_rank_and_cap():
    lam = np.array([5.0, 3.0, 1.0, 0.5, 0.5, 0.0])
    assert subspace.energy_rank(lam, 0.5) == 1
    assert subspace.energy_rank(lam, 0.8) == 2
    assert subspace.energy_rank(lam, 0.9) == 3
    assert subspace.choose_rank(lam, lam, 4, energy=0.99, rank=None) == 2  # capped at n // 2
    assert subspace.choose_rank(lam, lam, 12, energy=0.5, rank=4) == 4
    assert subspace.choose_rank(lam, lam, 12, energy=0.5, rank=9) == 5  # numerical rank


class _Odd(nn.Module):
    """Convolutions of every supported form, a Dense on a 3-D input, and a GroupNorm (fallback)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="VALID")(x))
        x = nn.tanh(nn.Conv(5, (2, 2), kernel_dilation=2, padding=((1, 0), (2, 1)), use_bias=False)(x))
        x = nn.GroupNorm(num_groups=1)(x)
        x = nn.Conv(3, (1, 1), strides=(1, 2))(x)
        x = nn.Dense(6)(x.reshape(x.shape[0], -1, 3))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def _reference_grams(task, x, y):
    g = layer_grads(task, x, y)
    return {k: v.astype(np.float64) @ v.astype(np.float64).T for k, v in g.items()}


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", max_examples=300)


@pytest.mark.parametrize("granularity", ["module", "tensor"])
def test_grams_from_activations_and_errors_are_exact(digits, granularity):
    module = _Odd()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    task = Task.from_linen(module, variables, input_shape=(8, 8, 1), granularity=granularity)
    x, y = digits.x[:11], digits.y[:11]
    grams, sources = layer_grams(task, x, y, chunk_size=4)
    ref = _reference_grams(task, x, y)
    assert list(grams) == task.layer_names
    for name in task.layer_names:
        expected_source = "exact" if "GroupNorm" in name else "activations/errors"
        assert sources[name] == expected_source, name
        np.testing.assert_allclose(grams[name], ref[name], rtol=1e-4, atol=1e-6 * np.abs(ref[name]).max())


def _no_factored_forms(monkeypatch):
    """The factor engine without Dense/Conv factors: every layer's per-example gradient is formed."""
    from jaxleak import grads

    monkeypatch.setattr(grads, "_dense_layer_factors", lambda *args: None)
    monkeypatch.setattr(grads, "_conv_layer_factors", lambda *args: None)


def test_grams_split_into_channel_blocks_and_sketches(digits, monkeypatch):
    task = Task.init("lenet", digits, seed=1)
    x, y = digits.x[:9], digits.y[:9]
    ref = _reference_grams(task, x, y)
    monkeypatch.setattr(subspace, "_HOST_FLOATS", 9 * 2000)
    plans = subspace.linear_plans(task, task.layers, x, y)
    passes = subspace._passes(plans, 9)
    blocks = [(plan.layer.name, lo, hi) for items in passes for plan, lo, hi in items]
    conv1 = [b[1:] for b in blocks if b[0] == "Conv_1"]
    assert len(conv1) >= 2 and conv1[0][0] == 0 and conv1[-1][1] == 16  # split into channel blocks ...
    assert all(a[1] == b[0] for a, b in zip(conv1, conv1[1:]))          # ... that tile the channels
    for items in passes:  # every pass keeps its features within the budget
        assert sum(9 * (p.positions * (p.a_dim + p.d_dim) if p.route == "factored" else p.a_dim * (hi - lo))
                   for p, lo, hi in items) <= 9 * 2000
    assert len(passes) > 1
    grams, sources = layer_grams(task, x, y)
    assert set(sources.values()) == {"activations/errors"}
    for name in task.layer_names:
        np.testing.assert_allclose(grams[name], ref[name], rtol=1e-4, atol=1e-6 * np.abs(ref[name]).max())
    # outer-product layers too large for exact Grams at this n are sketched; the rest stay exact
    big = max(task.layer_names, key=lambda name: task.layer(name).size)
    monkeypatch.setattr(subspace, "_OUTER_FLOATS", 9 * task.layer(big).size - 1)
    grams_b, sources_b = layer_grams(task, x, y)
    for name, plan in zip(task.layer_names, subspace.linear_plans(task, task.layers, x, y)):
        assert sources_b[name] == ("sketch" if plan.route == "outer" and task.layer(name).size >= task.layer(big).size
                                   else "activations/errors"), name
    np.testing.assert_allclose(np.diag(grams_b[big]), np.diag(ref[big]), rtol=0.2)
    monkeypatch.undo()
    monkeypatch.setattr(subspace, "_HOST_FLOATS", 9 * 2000)
    # a model the interceptor cannot see: small layers exact, large ones sketched
    opaque = Task(task.apply_fn, task.params, task.input_shape, name="opaque")
    _no_factored_forms(monkeypatch)
    monkeypatch.setattr(subspace, "_HOST_FLOATS", 9 * 1000)
    grams, sources = layer_grams(opaque, x, y)
    for name in task.layer_names:
        want = "exact" if task.layer(name).size <= 1000 else "sketch"
        assert sources[name] == want
        if want == "exact":
            np.testing.assert_allclose(grams[name], ref[name], rtol=1e-4, atol=1e-6 * np.abs(ref[name]).max())
        else:  # count-sketch: unbiased, close on the diagonal for width 4096
            np.testing.assert_allclose(np.diag(grams[name]), np.diag(ref[name]), rtol=0.2)


def test_balanced_groups(digits):
    z = digits.latent["thickness"].copy()
    z[:40] = 1  # unbalance it
    idx, grp = balanced_groups(z, seed=0)
    n = idx.size // 2
    assert np.all(z[idx[:n]] == 0) and np.all(z[idx[n:]] == 1) and np.all(grp == np.repeat([0, 1], n))
    assert len(set(idx.tolist())) == idx.size
    idx_s, _ = balanced_groups(z, seed=0, strata=digits.y)
    m = idx_s.size // 2
    np.testing.assert_array_equal(np.bincount(digits.y[idx_s[:m]], minlength=10),
                                  np.bincount(digits.y[idx_s[m:]], minlength=10))
    idx_c, _ = balanced_groups(z, seed=0, strata=digits.y, max_per_group=20)
    assert idx_c.size == 40
    np.testing.assert_array_equal(balanced_groups(z, seed=3)[0], balanced_groups(z, seed=3)[0])


@pytest.mark.parametrize("z, match", [
    (np.zeros(300, int), "takes 1 value"),
    (np.arange(300) % 3, "takes 3 value"),
    (np.ones((300, 2), int), "has shape"),
    (np.linspace(0, 1, 300), "integer"),
])
def test_bad_latent(digits, z, match):
    task = Task.init("mlp", digits)
    with pytest.raises(InputError, match=match):
        subspace_distance(task, digits.x, digits.y, z)


def test_latent_determined_by_label_needs_unstratified(digits):
    task = Task.init("mlp", digits)
    z = (digits.y >= 5).astype(int)
    with pytest.raises(InputError, match="at least 2"):
        subspace_distance(task, digits.x, digits.y, z, max_per_group=8, permutations=2)
    res = subspace_distance(task, digits.x, digits.y, z, max_per_group=8, permutations=2, stratify=False)
    assert res.meta["stratified_by_label"] is False


def test_default_run_shape_and_null_below_one(digits):
    task = Task.init("lenet", digits)
    res = subspace_distance(task, digits.x, digits.y, digits.latent["thickness"], max_per_group=64,
                            permutations=10)
    assert res.measure == "subspace_distance" and list(res) == task.layer_names
    for name, s in res.items():
        assert 0.0 <= s.value <= 1.0
        assert 1 <= s["k"] <= 32 and s["n_per_group"] == 64
        assert s["gram_source"] == "activations/errors"
        assert s["null_mean"] < 0.9, name  # the default k keeps the null informative (METHOD 3.2)
        assert 1 / 11 <= s["p_value"] <= 1.0
    d = res.to_dict()
    assert set(d["layers"]["Conv_0"]) >= {"value", "null_mean", "null_sd", "excess", "p_value", "k",
                                         "n_per_group", "gram_source"}
    before = dict(grads_mod.TRACE_COUNTS)
    subspace_distance(task.with_params(jax.tree.map(lambda p: 0.9 * p, task.params)), digits.x, digits.y,
                      digits.latent["thickness"], max_per_group=64, permutations=10, seed=1)
    assert dict(grads_mod.TRACE_COUNTS) == before


@pytest.mark.slow
def test_planted_signal_is_found_and_grows():
    strengths = (0.0, 0.5, 1.0, 2.0)
    seeds = range(4)
    excess = np.zeros((len(strengths), len(seeds)))
    significant_at_zero = 0
    task = None
    for i, s in enumerate(strengths):
        for j in seeds:
            ds = data.load("planted", strength=s, seed=j)
            base = Task.init("lenet", ds, seed=0)
            task = base if task is None else task.with_params(base.params)
            res = subspace_distance(task, ds.x, ds.y, ds.latent["z"], max_per_group=128, permutations=19, seed=j)
            excess[i, j] = np.mean([v["excess"] for v in res.values()])
            if s == 0.0:
                significant_at_zero += sum(v["p_value"] <= 0.05 for v in res.values())
    mean = excess.mean(axis=1)
    # no signal: few layer tests significant across seeds (5 layers x 4 seeds, ~1 expected)
    assert significant_at_zero <= 5, excess
    assert np.all(np.diff(mean) > 0), mean
    assert mean[-1] > mean[0] + 0.01


def _maxt_scores(observed, nulls):
    from jaxleak.scores import Score

    out = {}
    for name, d in observed.items():
        null = np.asarray(nulls[name])
        out[name] = Score(d, None, {"null_mean": null.mean(), "null_sd": null.std(ddof=1),
                                    "excess": d - null.mean()})
    return out


def test_max_t_matches_the_rule_by_hand():
    from jaxleak.subspace import cannot_reject, with_verdicts

    # two layers, 4 shuffles; each layer standardised by the mean and sd of its 5 distances (observed included)
    nulls = {"a": np.array([0.0, 1.0, 2.0, 3.0]), "b": np.array([3.0, 2.0, 1.0, 0.0])}
    sd = np.std([0.0, 1.0, 2.0, 3.0], ddof=1)
    obs = {"a": 1.5 + 2.5 * sd, "b": 1.5 + 0.2 * sd}
    out = with_verdicts(_maxt_scores(obs, nulls), nulls)
    every = {k: np.append(nulls[k], obs[k]) for k in nulls}
    t = {k: (every[k] - every[k].mean()) / every[k].std(ddof=1) for k in nulls}  # last entry: the observed
    max_t = np.maximum(t["a"][:4], t["b"][:4])
    assert out["a"]["p_adjusted"] == pytest.approx((1 + np.sum(max_t >= t["a"][4])) / 5)
    assert out["b"]["p_adjusted"] == pytest.approx((1 + np.sum(max_t >= t["b"][4])) / 5)
    # by hand: b's observed sits among its nulls (t_b below two shuffles' maxima), a's above all of them
    assert out["a"]["p_adjusted"] == pytest.approx(1 / 5) and out["b"]["p_adjusted"] > 1 / 5
    assert not out["a"]["detected"]  # 4 shuffles: no p below 1/5
    assert out["a"]["detectable"] is None and cannot_reject(4) is not None and cannot_reject(100) is None


def test_max_t_controls_the_family_wise_error_and_keeps_power_on_41_layers():
    """Exchangeable nulls (the observed value is one more draw): at most 5% of runs detect anything, with
    R = 100 over 41 layers; a layer 6 null sds above its null is detected, which Holm with R = 100 cannot."""
    from jaxleak.subspace import with_verdicts

    rng = np.random.default_rng(0)
    layers, r, runs = 41, 100, 300
    false = 0
    for _ in range(runs):
        # correlated layers (a shared component), as layers of one model are
        draws = rng.standard_normal((r + 1, layers)) + rng.standard_normal((r + 1, 1))
        names = [f"l{i}" for i in range(layers)]
        nulls = {n: draws[1:, i] for i, n in enumerate(names)}
        out = with_verdicts(_maxt_scores({n: draws[0, i] for i, n in enumerate(names)}, nulls), nulls)
        false += any(out[n]["detected"] for n in names)
    rate = false / runs
    assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / runs), rate
    draws = rng.standard_normal((r + 1, layers))
    draws[0, 7] = draws[1:, 7].mean() + 6 * draws[1:, 7].std(ddof=1)
    names = [f"l{i}" for i in range(layers)]
    nulls = {n: draws[1:, i] for i, n in enumerate(names)}
    out = with_verdicts(_maxt_scores({n: draws[0, i] for i, n in enumerate(names)}, nulls), nulls)
    assert out["l7"]["detected"] and out["l7"]["p_adjusted"] < 0.05
    assert [n for n in names if out[n]["detected"]] == ["l7"]
    assert all(out[n]["detectable"] is not None for n in names)


def test_subspace_ties_use_the_paired_permutation_differences():
    from jaxleak.subspace import with_verdicts

    rng = np.random.default_rng(1)
    shared = rng.standard_normal(200)
    nulls = {"a": shared + 0.1 * rng.standard_normal(200), "b": shared + 0.1 * rng.standard_normal(200),
             "c": rng.standard_normal(200)}
    sd = {k: v.std(ddof=1) for k, v in nulls.items()}
    obs = {"a": nulls["a"].mean() + 10 * sd["a"], "b": nulls["b"].mean() + 9.9 * sd["b"],
           "c": nulls["c"].mean() + 5 * sd["c"]}
    out = with_verdicts(_maxt_scores(obs, nulls), nulls)
    assert all(out[k]["detected"] for k in obs)
    # a and b: excess differs by ~0.1 sd, inside the spread of their paired differences -> tied;
    # c: 5 sd below a, outside -> below the top
    assert out["b"]["tied_with_top"] is True and out["c"]["tied_with_top"] is False
    assert out["a"]["tied_with_top"] is None

