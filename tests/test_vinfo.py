"""Tests of empirical V-information (jaxleak/vinfo.py) and its ensemble engine (jaxleak/ensemble.py).

References are independent of the estimator: closed-form mutual information
of jointly Gaussian variables and of a logistic model (1-D Gauss-Hermite
quadrature), shuffled labels (no information), and selection invariance under
poisoned held-out targets (by construction).
"""

import math
import warnings

import jax
import numpy as np
import pytest

from jaxleak import data, ensemble
from jaxleak.errors import InputError
from jaxleak.grads import TRACE_COUNTS
from jaxleak.task import Task
from jaxleak.vinfo import v_information, v_information_from_features

N = 2000
D = 4
FAST = dict(steps=150, folds=5, n_boot=500)


def logistic_mi_bits(beta: np.ndarray) -> float:
    """I(G; Y) for G ~ N(0, I), P(Y=1 | G) = sigmoid(beta . G): a 1-D integral over s = beta . G."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    s = nodes * np.linalg.norm(beta)
    weights = weights / weights.sum()
    p = 1.0 / (1.0 + np.exp(-s))

    def h(q):
        q = np.clip(q, 1e-300, 1.0)
        r = np.clip(1.0 - q, 1e-300, 1.0)
        return -(q * np.log2(q) + (1 - q) * np.log2(r))

    return float(h(np.sum(weights * p)) - np.sum(weights * h(p)))


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(0)
    beta = np.array([2.0, -1.0, 0.5, 0.0])
    signal = rng.normal(size=(N, D))
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-(signal @ beta)))).astype(np.int32)
    noise = rng.normal(size=(N, D))
    features = {"signal": signal.astype(np.float32), "noise": noise.astype(np.float32)}
    return features, y, logistic_mi_bits(beta)


@pytest.fixture(scope="module")
def logistic_scores(logistic):
    features, y, _ = logistic
    return v_information_from_features(features, y, family=("linear",), seed=0, **FAST)


def test_logistic_target_matches_mutual_information(logistic, logistic_scores):
    _, y, truth = logistic
    s = logistic_scores["signal"]
    assert 0.2 < truth < 0.6
    assert s.ci[0] <= truth <= s.ci[1], (s.value, s.ci, truth)
    assert abs(s.value - truth) < 0.06
    assert logistic_scores.unit == "bits"
    assert s["h_null"] - s["h_cond"] == pytest.approx(s.value, abs=1e-9)
    # H_V(T|0) under smoothed training-fold frequencies is the label entropy up to smoothing.
    freq = np.bincount(y) / y.size
    assert s["h_null"] == pytest.approx(-np.sum(freq * np.log2(freq)), abs=0.01)
    assert s["accuracy"] > 0.7 and 0.5 < s["roc_auc"] <= 1.0 and 0.6 < s["balanced_accuracy"] <= 1.0


def test_independent_features_carry_nothing(logistic_scores):
    s = logistic_scores["noise"]
    assert s.ci[0] <= 0.0 <= s.ci[1], (s.value, s.ci)
    assert s["accuracy"] < 0.7


def test_shuffled_labels_ci_includes_zero_and_no_retrace(logistic, logistic_scores):
    features, y, _ = logistic
    before = dict(TRACE_COUNTS)
    for seed in (1, 2):
        shuffled = np.random.default_rng(seed).permutation(y)
        scores = v_information_from_features(features, shuffled, family=("linear",), seed=0, **FAST)
        for name, s in scores.items():
            assert s.ci[0] <= 0.0 <= s.ci[1], (seed, name, s.value, s.ci)
    # Same shapes and members: the ensemble (linear members: the solver) is not traced again.
    assert TRACE_COUNTS["ensemble_solve"] == before["ensemble_solve"] > 0
    assert TRACE_COUNTS["ensemble_score"] == before["ensemble_score"]


def test_gaussian_target_matches_closed_form():
    rho = 0.8
    rng = np.random.default_rng(3)
    g = rng.normal(size=(N, 4))
    direction = np.array([1.0, -1.0, 0.5, 0.0]) / np.linalg.norm([1.0, -1.0, 0.5, 0.0])
    t = rho * (g @ direction) + math.sqrt(1 - rho ** 2) * rng.normal(size=N)
    t = 3.0 * t + 5.0  # the estimate is invariant to the target's location and scale
    scores = v_information_from_features({"g": g}, t[:, None], family=("linear",), seed=0, **FAST)
    s = scores["g"]
    truth = -0.5 * math.log2(1 - rho ** 2)
    assert scores.unit == "bits/dim"
    assert s.ci[0] <= truth <= s.ci[1], (s.value, s.ci, truth)
    assert abs(s.value - truth) < 0.06
    # MSE_0 is the error of the training mean: close to the target variance.
    assert s["mse_null"] == pytest.approx(9.0 * np.var(t / 3.0), rel=0.01)
    assert 0.5 * math.log2(s["mse_null"] / s["mse"]) == pytest.approx(s.value, abs=1e-9)


def test_member_selection_never_reads_held_out_targets():
    rng = np.random.default_rng(5)
    n = 300
    x = rng.normal(size=(2, n, 6)).astype(np.float32)
    y = (x[0, :, 0] + 0.5 * rng.normal(size=n) > 0).astype(np.int32)
    split = ensemble.cross_fit_split(n, 3, seed=0, strata=y)
    members = ensemble.make_members(("linear", "mlp"), (1e-3, 1e-1), seeds=2, hidden=4)
    kw = dict(kind="classification", num_classes=2, steps=60, patience=None)
    clean = ensemble.fit_ensemble(x, y, split, members, **kw)
    poisoned_y = y.copy()
    poisoned_y[split.test[0]] = 1 - poisoned_y[split.test[0]]
    poisoned = ensemble.fit_ensemble(x, poisoned_y, split, members, **kw)
    # Fold 0's training, early stopping and selection are unchanged ...
    np.testing.assert_array_equal(clean.chosen[:, 0], poisoned.chosen[:, 0])
    np.testing.assert_array_equal(clean.best_step[:, 0], poisoned.best_step[:, 0])
    np.testing.assert_array_equal(clean.val_loss[:, 0], poisoned.val_loss[:, 0])
    np.testing.assert_array_equal(clean.val_gain[:, 0], poisoned.val_gain[:, 0])
    np.testing.assert_array_equal(clean.mix[:, 0], poisoned.mix[:, 0])  # prior weight: validation rows only
    # ... while its held-out scores do see the poison (the test can fail).
    assert not np.allclose(clean.heldout_loss[:, split.test[0]], poisoned.heldout_loss[:, split.test[0]])
    # Every example is held out exactly once.
    np.testing.assert_array_equal(split.test.sum(axis=0), np.ones(n))
    assert not np.any(split.test & (split.train | split.val))


def test_attacker_split_never_trains_or_selects_on_victims():
    """With auxiliary data, the victims' targets change nothing but the victims' own scores."""
    rng = np.random.default_rng(6)
    n_v, n_a = 80, 240
    x = rng.normal(size=(2, n_v + n_a, 6)).astype(np.float32)
    y = (x[0, :, 0] + 0.5 * rng.normal(size=n_v + n_a) > 0).astype(np.int32)
    split = ensemble.attacker_split(n_v, n_a, 4, seed=0, strata=y[n_v:])
    assert not np.any((split.train | split.val)[:, :n_v]) and np.all(split.test[:, :n_v])
    assert not np.any(split.test[:, n_v:])
    np.testing.assert_array_equal(split.val[:, n_v:].sum(axis=0), np.ones(n_a))  # each aux row validates once
    members = ensemble.make_members(("linear", "mlp"), (1e-3, 1e-1), seeds=2, hidden=4)
    kw = dict(kind="classification", num_classes=2, steps=60, patience=None)
    clean = ensemble.fit_ensemble(x, y, split, members, **kw)
    poisoned_y = y.copy()
    poisoned_y[:n_v] = 1 - poisoned_y[:n_v]
    poisoned = ensemble.fit_ensemble(x, poisoned_y, split, members, **kw)
    for field in ("chosen", "best_step", "val_loss", "mix", "val_row_loss"):
        np.testing.assert_array_equal(getattr(clean, field), getattr(poisoned, field))
    np.testing.assert_array_equal(clean.rows, np.arange(n_v))  # only the victims are scored
    assert not np.allclose(clean.heldout_loss, poisoned.heldout_loss)


def test_a_layer_trains_as_long_as_its_own_members_improve():
    """Early stopping is per layer: a pure-noise layer (its members stop improving within a few steps) stops
    after `patience` more steps while a layer with a signal goes on, and the noise layer's fit is the same
    whatever layer it is fitted beside (a layer is judged on its own gradient)."""
    rng = np.random.default_rng(11)
    n_v, n_a, width = 60, 300, 8
    signal = rng.normal(size=(n_v + n_a, width)).astype(np.float32)
    y = (signal @ rng.normal(size=width) + 0.3 * rng.normal(size=n_v + n_a) > 0).astype(np.int32)
    noise = rng.normal(size=(n_v + n_a, width)).astype(np.float32)
    split = ensemble.attacker_split(n_v, n_a, 3, seed=0, strata=y[n_v:])
    members = ensemble.make_members(("mlp",), (1e-3, 1e-2), seeds=1, hidden=4)
    kw = dict(kind="classification", num_classes=2, steps=120, lr=0.02, patience=20, segment=10)
    both = ensemble.fit_ensemble(np.stack([noise, signal]), y, split, members, **kw)
    assert both.layer_steps[1] == 120 and both.layer_steps[0] < 120, both.layer_steps  # noise stops early
    assert both.steps_run == 120
    alone = ensemble.fit_ensemble(np.stack([noise, noise]), y, split, members, **kw)
    assert alone.layer_steps[0] == both.layer_steps[0]
    for field in ("best_step", "val_loss", "chosen", "heldout_loss"):
        np.testing.assert_allclose(getattr(alone, field)[0], getattr(both, field)[0], rtol=1e-5, atol=1e-7)
    # solved linear members: a layer's iterations and solution do not depend on the layer beside it
    linear = ensemble.make_members(("linear",), (1e-3, 1e-2))
    both = ensemble.fit_ensemble(np.stack([noise, signal]), y, split, linear, **kw)
    alone = ensemble.fit_ensemble(np.stack([noise, noise]), y, split, linear, **kw)
    np.testing.assert_array_equal(alone.solver_iterations[0], both.solver_iterations[0])
    for field in ("val_loss", "chosen", "heldout_loss"):
        np.testing.assert_allclose(getattr(alone, field)[0], getattr(both, field)[0], rtol=1e-5, atol=1e-7)


def _noise_layers(rng, n, layers=5, width=40):
    return {f"layer{i}": rng.normal(size=(n, width)).astype(np.float32) for i in range(layers)}


def test_shuffled_targets_are_rarely_detected():
    """The null: features with a real signal, targets shuffled; at most 10% of (layer, seed) pairs detected."""
    detected, total, lows = 0, 0, []
    for seed in range(8):
        rng = np.random.default_rng(100 + seed)
        n_v, n_a = 150, 300
        latent = rng.normal(size=n_v + n_a)
        feats = _noise_layers(rng, n_v + n_a)
        for i, f in enumerate(feats.values()):
            f[:, :4] += (0.5 * i * latent)[:, None]  # signal about `latent`, growing with the layer
        z = (latent > 0).astype(np.int32)
        z = rng.permutation(z)  # shuffled: nothing to find
        scores = v_information_from_features({k: v[:n_v] for k, v in feats.items()}, z[:n_v],
                                             aux_features={k: v[n_v:] for k, v in feats.items()},
                                             aux_target=z[n_v:], steps=100, n_boot=300, seed=seed)
        for s in scores.values():
            detected += int(s["detected"])
            total += 1
            lows.append(s.ci[0])
            assert s.ci[0] < s.ci[1]  # never a degenerate interval
    assert total == 40
    assert detected <= 4, detected


def test_pure_noise_names_no_top_layer_and_reports_a_detectable_size():
    """Pure noise: raw, non-degenerate intervals; runs name no top layer and say what they could detect.

    Detection is family-wise at 5% over the layers, so over four independent runs at least three must name
    none."""
    clean = 0
    for seed in range(4):
        rng = np.random.default_rng(10 + seed)
        n_v, n_a = 200, 400
        feats = _noise_layers(rng, n_v + n_a)
        z = rng.integers(0, 2, n_v + n_a).astype(np.int32)
        scores = v_information_from_features({k: v[:n_v] for k, v in feats.items()}, z[:n_v],
                                             aux_features={k: v[n_v:] for k, v in feats.items()},
                                             aux_target=z[n_v:], steps=100, n_boot=500, seed=seed)
        for s in scores.values():
            assert s.ci[0] < s.ci[1], s.ci  # raw (may lie below 0), never degenerate
            assert s.value != 0.0  # the selected attack's own loss, never the null's
            assert 0.0 < s["detectable"] < 0.2
        v = scores.verdict()
        d = scores.to_dict()
        assert d["top"] == v["top"] and d["verdict"] == v
        if v["top"] is None:
            clean += 1
            assert v["detected"] == [] and "none detected; this run would detect" in v["text"]
    assert clean >= 3, clean


def test_planted_latent_is_detected_where_logistic_regression_finds_it():
    """An attacker jaxleak did not write: scikit-learn's LogisticRegression, trained on the auxiliary examples'
    full per-example gradients, scores the victims; every layer where it is 3 standard errors above chance is
    detected (jaxleak reading each layer's top 256 principal components)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from jaxleak.grads import layer_grads

    ds = data.load("planted", strength=0.7, max_examples=1500)
    task = Task.init("mlp", ds, seed=0)
    n_v = 500
    feats = layer_grads(task, ds.x, ds.y)  # the reference reads the full per-example gradients
    z = ds.latent["z"]
    found = []
    for name, f in feats.items():
        f = np.asarray(f, np.float64)
        scaler = StandardScaler().fit(f[n_v:])
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(f[n_v:]), z[n_v:])
        acc = float(np.mean(clf.predict(scaler.transform(f[:n_v])) == z[:n_v]))
        chance = max(np.mean(z[:n_v]), 1 - np.mean(z[:n_v]))
        if acc >= chance + 3 * math.sqrt(chance * (1 - chance) / n_v):
            found.append(name)
    assert found, "the planted strength is too weak for the reference attacker; the test would be vacuous"
    scores = v_information(task, ds.x[:n_v], ds.y[:n_v], z[:n_v], aux=(ds.x[n_v:], ds.y[n_v:], z[n_v:]),
                           sketch_dim=256, steps=150, folds=5, patience=100, n_boot=500, seed=0)
    missed = [name for name in found if not scores[name]["detected"]]
    assert not missed, {name: (scores[name].value, scores[name].ci) for name in found}
    assert scores.meta["aux_examples"] == ds.n - n_v


def test_pairing_statistic_by_hand():
    """The pairing statistic against a loop over permutations: log-likelihood of (permuted) labels for a
    classifier; for a reconstruction, minus the squared error up to terms no permutation changes."""
    from jaxleak.vinfo import _Scored, pairing, permutations

    rng = np.random.default_rng(0)
    n = 7
    perms = permutations(n, 50, seed=3)
    assert perms.shape == (50, n) and all(sorted(p) == list(range(n)) for p in perms.tolist())
    assert np.array_equal(perms, permutations(n, 50, seed=3))
    rows = np.arange(2, 2 + n)  # scored rows of a larger target array
    prob = rng.dirichlet(np.ones(3), size=n)
    y = rng.integers(0, 3, n + 4)
    obs, null = pairing(_Scored(rows, None, None, prob, "m", {}), y, "classification", perms)
    assert obs == pytest.approx(np.mean(np.log(prob[np.arange(n), y[rows]])))
    for r in (0, 17, 49):
        assert null[r] == pytest.approx(np.mean(np.log(prob[np.arange(n), y[rows][perms[r]]])))
    pred = rng.normal(size=(n, 2, 3))
    t = rng.normal(size=(n + 4, 2, 3))
    obs, null = pairing(_Scored(rows, None, None, pred, "m", {}), t, "regression", perms)
    sse = lambda order: np.sum((t[rows][order] - pred) ** 2)  # noqa: E731
    for r in (0, 17, 49):
        # sum ||t_pi(i) - pred_i||^2 = const - 2 n * statistic
        assert sse(perms[r]) - sse(np.arange(n)) == pytest.approx(-2 * n * (null[r] - obs))


def _planted_layers(rng, m: int, widths, u):
    """m rows of standard-normal layers ``l0, l1, ...`` with z (balanced) planted along u in layer l1."""
    z = rng.permutation(np.repeat([0, 1], m // 2))
    f = {f"l{i}": rng.normal(size=(m, w)).astype(np.float32) for i, w in enumerate(widths)}
    f["l1"] += ((2 * z - 1)[:, None] * u).astype(np.float32)
    return f, z


def _scikit_learn_finds(fa, za, fv, zv) -> bool:
    """LogisticRegressionCV on the aux rows of layer l1 (aux-standardised) is >= 3 se above chance on the
    balanced victims."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(fa["l1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of changing attributes
        acc = np.mean(LogisticRegressionCV(Cs=8, cv=5).fit(scaler.transform(fa["l1"]), za).predict(
            scaler.transform(fv["l1"])) == zv)
    return bool(acc >= 0.5 + 3 * np.sqrt(0.25 / zv.size))


def _draws_found_by_scikit_learn(first_seed: int, count: int, widths, directions):
    """Seeds first_seed + 0..count-1: 200 victims and 400 auxiliary rows of planted layers, the planted
    directions from ``directions(rng) -> (u_victims, u_aux)``; the (seed, fv, zv, fa, za) of each draw that
    scikit-learn finds (:func:`_scikit_learn_finds`)."""
    found = []
    for seed in range(count):
        rng = np.random.default_rng(first_seed + seed)
        uv, ua = directions(rng)
        fv, zv = _planted_layers(rng, 200, widths, uv)
        fa, za = _planted_layers(rng, 400, widths, ua)
        if _scikit_learn_finds(fa, za, fv, zv):
            found.append((seed, fv, zv, fa, za))
    return found


def test_weak_signal_found_by_scikit_learn_is_detected():
    """A weak planted signal in one of eight layers (Bayes accuracy 0.64), 200 victims: in every draw where
    scikit-learn's LogisticRegressionCV is >= 3 se above chance on the victims, the layer is detected
    family-wise. (Detection by the gain's own bootstrap p-value, second order in the signal, with Bonferroni
    over the 8 layers misses 3 of the 8 found draws.)"""
    u = np.zeros(48)
    u[:6] = 0.35 / np.sqrt(6)
    found = _draws_found_by_scikit_learn(500, 16, (24, 48, 32, 16, 40, 24, 32, 16), lambda rng: (u, u))
    for seed, fv, zv, fa, za in found:
        s = v_information_from_features(fv, zv, aux_features=fa, aux_target=za, family=("linear",), folds=3,
                                        steps=60, n_boot=500, seed=seed)
        assert s["l1"]["detected"], (seed, s["l1"]["p_pairing"], s["l1"]["p_adjusted"], s["l1"].ci)
    assert len(found) >= 5, len(found)


def test_layer_that_leaks_more_on_the_victims_than_on_the_attackers_rows_is_detected():
    """The attacker's auxiliary rows carry the planted direction weakly (0.2), the victims strongly (1.3),
    as when the victims are the model's training examples and the auxiliary ones are not. Selection by
    auxiliary log loss then often picks a strongly penalised MLP that predicts the prior, whose victim
    predictions carry nothing, while the linear members rank the victims well. Every draw that
    scikit-learn's LogisticRegressionCV finds must be detected: detection tests every member's victim
    predictions under the max-T (testing only the selected attack misses seed 2 of these draws)."""
    ua, uv = np.zeros(96), np.zeros(96)
    ua[:8], uv[:8] = 0.2 / np.sqrt(8), 1.3 / np.sqrt(8)
    found = _draws_found_by_scikit_learn(900, 8, (24, 96, 32, 16, 40, 24, 32, 16), lambda rng: (uv, ua))
    for seed, fv, zv, fa, za in found:
        s = v_information_from_features(fv, zv, aux_features=fa, aux_target=za, folds=3, steps=60, n_boot=200,
                                        seed=seed)
        assert s["l1"]["detected"], (seed, s["l1"]["best_member"], s["l1"]["p_adjusted"])
        assert s["l1"]["detected_by"] is not None
    assert len(found) >= 6, len(found)


def test_every_member_under_the_max_t_keeps_the_family_wise_error():
    """Five layers independent of the labels, each read by 13 correlated members with confidences from
    0.1 to 30 times a shared score, plus a selected attack: over 400 draws, the share of draws with any
    detection stays within the 5% level (binomial 3 standard errors), while a leaking member in one layer
    whose selected attack reads nothing is detected in every draw."""
    from jaxleak.vinfo import _Scored, family_wise, pairing, permutations
    from jaxleak.scores import Score

    n, layers, reps = 60, 5, 400
    scales = np.geomspace(0.1, 30, 13)
    rng = np.random.default_rng(3)
    rows = np.arange(n)
    any_null = caught = 0
    for r in range(reps):
        y = rng.integers(0, 2, n)
        perms = permutations(n, 199, r)

        def stat(score):
            p1 = 1 / (1 + np.exp(-score))
            return pairing(_Scored(rows, None, None, np.stack([1 - p1, p1], 1), "m", {}), y, "classification", perms)

        def run(leak: bool):
            scores, boots, selected, members = {}, {}, {}, {}
            for l in range(layers):
                base = rng.normal(size=n) + (3.0 * (2 * y - 1) if leak and l == 0 else 0.0)
                members[f"l{l}"] = [(f"m{j}", stat(c * (base + 0.5 * rng.normal(size=n)))) for j, c in
                                    enumerate(scales)]
                selected[f"l{l}"] = stat(0.01 * rng.normal(size=n))
                scores[f"l{l}"] = Score(0.0, (-0.1, 0.1), {"se": 0.05})
                boots[f"l{l}"] = rng.normal(size=50)
            return family_wise(scores, boots, selected, member_pairings=members)

        any_null += any(s["detected"] for s in run(False).values())
        if r < 40:
            out = run(True)
            caught += out["l0"]["detected"] and out["l0"]["detected_by"] != "selected attack"
    assert any_null / reps <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / reps), any_null
    assert caught == 40


def test_confident_mistakes_cost_at_most_the_prior_mixture_bound():
    """A held-out example far out on the wrong side costs a bounded loss, not hundreds of nats."""
    rng = np.random.default_rng(11)
    n = 400
    g = rng.normal(size=(n, 2))
    y = (g[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    bad = np.arange(0, n, 100)              # 4 examples far out on the side of the other class
    g[bad, 0] = np.where(y[bad] == 1, -6.0, 6.0)
    split = ensemble.cross_fit_split(n, 5, seed=0, strata=y)
    members = ensemble.make_members(("linear",), (1e-4,))
    fit = ensemble.fit_ensemble(g[None].astype(np.float32), y, split, members, kind="classification",
                                num_classes=2, steps=200, patience=None)
    prior = fit.null_loss  # -log prior of each held-out label
    bound = -np.log(ensemble.MIX_WEIGHTS[0]) + prior
    assert np.all(fit.heldout_loss[0] <= bound + 1e-9)
    # the member alone is far more confident on those examples (the bound is what saves the estimate)
    member_loss = np.asarray(fit.member_test_loss)[0, :, 0].mean()
    assert member_loss > fit.heldout_loss[0].mean() + 0.05
    scores = v_information_from_features({"g": g}, y, family=("linear",), weight_decays=(1e-4,), steps=200,
                                         folds=5, n_boot=200, patience=None)
    assert scores["g"].value > 0.4 and scores["g"].ci[0] > 0.3, scores["g"]
    assert all(w in ensemble.MIX_WEIGHTS for w in scores["g"]["prior_weight"])


def test_reconstructions_stay_within_the_training_range():
    """A held-out example with an extreme feature is not decoded to an extreme target."""
    rng = np.random.default_rng(8)
    n = 300
    g = rng.normal(size=(n, 2))
    t = g[:, :1] + 0.3 * rng.normal(size=(n, 1))
    g[7, 0] = 500.0  # one example far outside every training fold
    split = ensemble.cross_fit_split(n, 5, seed=0)
    fit = ensemble.fit_ensemble(g[None].astype(np.float32), t, split, ensemble.make_members(("linear",), (1e-3,)),
                                kind="regression", steps=150, patience=None)
    others = np.delete(t[:, 0], 7)
    assert fit.chosen[0, split.fold_of[7]] >= 0  # the fold that holds it out uses its decoder
    assert others.min() - 1e-5 <= fit.heldout_pred[0, 7, 0] <= others.max() + 1e-5
    assert fit.heldout_loss[0, 7] <= (others.max() - t[7, 0]) ** 2 + (others.min() - t[7, 0]) ** 2 + 1e-6
    assert fit.member_test_loss[0, split.fold_of[7], 0] < fit.null_loss.mean() * 2  # unclipped: ~500^2 / 60


def test_prior_weight_is_chosen_on_validation_rows_only():
    rng = np.random.default_rng(2)
    loss = rng.exponential(size=(3, 2, 50))
    null = np.full((2, 50), np.log(2.0))
    val = np.zeros((2, 50), bool)
    val[:, :20] = True
    w, mixed = ensemble._mix_with_prior(loss, null, val)
    poisoned = loss.copy()
    poisoned[:, :, 20:] = 500.0  # non-validation rows: confident mistakes
    w2, mixed2 = ensemble._mix_with_prior(poisoned, null, val)
    np.testing.assert_array_equal(w, w2)
    assert np.all(mixed2[..., 20:] <= -np.log(ensemble.MIX_WEIGHTS[0] * 0.5) + 1e-12)
    # the mixture is the probability-space average (1 - w) p + w prior
    p = np.exp(-loss)
    np.testing.assert_allclose(np.exp(-mixed), (1 - w[..., None]) * p + w[..., None] * 0.5, rtol=1e-12)


def test_high_dimensional_target_is_decoded_in_principal_span():
    rng = np.random.default_rng(4)
    n, dims, rank = 600, 40, 3
    z = rng.normal(size=(n, rank))
    basis = np.linalg.qr(rng.normal(size=(dims, rank)))[0]
    t = z @ basis.T + 0.05 * rng.normal(size=(n, dims))  # the target lives near a 3-dim subspace
    g = z + 0.3 * rng.normal(size=(n, rank))
    kw = dict(family=("linear",), weight_decays=(1e-3,), steps=150, folds=5, n_boot=200)
    full = v_information_from_features({"g": g}, t, target_dim=None, **kw)
    reduced = v_information_from_features({"g": g}, t, target_dim=8, **kw)
    too_small = v_information_from_features({"g": g}, t, target_dim=1, **kw)
    assert full.meta["target_reduced_to"] is None and reduced.meta["target_reduced_to"] == 8
    assert reduced["g"].value == pytest.approx(full["g"].value, abs=0.02)
    assert too_small["g"].value < full["g"].value - 0.05  # one direction cannot carry three
    # held-out losses are squared errors of the decoded reconstructions (independent recomputation)
    x = g[None].astype(np.float32)
    split = ensemble.cross_fit_split(n, 5, seed=0)
    fit = ensemble.fit_ensemble(x, t, split, ensemble.make_members(("linear",), (1e-3,)), kind="regression",
                                steps=150, target_dim=8)
    assert fit.heldout_pred.shape == (1, n, 8) and fit.target_basis.shape == (5, dims, 8)
    recon = fit.decode(fit.heldout_pred[0])
    np.testing.assert_allclose(fit.heldout_loss[0], np.sum(np.square(recon - t), axis=1), rtol=1e-4)
    np.testing.assert_allclose(fit.null_loss, np.sum(np.square(fit.decode(fit.null_pred) - t), axis=1), rtol=1e-9)


def test_zero_padding_leaves_a_layer_unchanged():
    rng = np.random.default_rng(7)
    n = 300
    narrow = rng.normal(size=(n, 3))
    y = (narrow @ np.array([1.5, -1.0, 0.0]) + rng.normal(size=n) > 0).astype(np.int32)
    kw = dict(family=("linear",), steps=60, n_boot=100, folds=3, seed=0)
    alone = v_information_from_features({"narrow": narrow}, y, **kw)
    padded = v_information_from_features({"narrow": narrow, "wide": rng.normal(size=(n, 9))}, y, **kw)
    assert padded["narrow"]["features"] == 3
    assert padded["narrow"].value == pytest.approx(alone["narrow"].value, abs=1e-4)
    assert padded["narrow"]["members_chosen"] == alone["narrow"]["members_chosen"]


def test_wide_features_are_reduced_and_flagged():
    rng = np.random.default_rng(8)
    n = 200
    wide = rng.normal(size=(n, 40))
    y = (wide[:, :5].sum(axis=1) > 0).astype(np.int32)
    scores = v_information_from_features({"wide": wide, "small": wide[:, :4]}, y, family=("linear",), steps=30,
                                         sketch_dim=16, folds=3, n_boot=50)
    assert scores["wide"]["features"] == 16
    assert scores["wide"]["reduced"]["size"] == 40 and scores["wide"]["reduced"]["kept"] == 16
    assert scores["wide"]["reduced"]["sketch"] is None and not scores["wide"]["reduced"]["exact"]
    assert 0.4 < scores["wide"]["reduced"]["variance_kept"] < 1
    assert scores["small"]["reduced"] is None
    assert scores.meta["reduced_layers"] == ["wide"] and scores.meta["sketched_layers"] == []
    assert "lower bound" in scores.meta["lower_bound"]
    d = scores.to_dict()
    assert set(d["layers"]["wide"]) >= {"value", "ci", "h_null", "h_cond", "accuracy", "roc_auc", "best_member"}


def test_feature_width_fills_the_budget_by_hand():
    from jaxleak.vinfo import feature_width

    assert feature_width([10, 500, 30], rows=4, dim=16, floats=4 * 540) == 500  # everything whole
    assert feature_width([10, 500, 30], rows=4, dim=16, floats=4 * 300) == 260  # 10 + 30 whole, 260 left
    assert feature_width([10, 500, 600], rows=4, dim=16, floats=4 * 200) == 95  # 10 whole, two share 190
    assert feature_width([10, 500, 600], rows=4, dim=128, floats=4 * 200) == 128  # never below sketch_dim


def test_reduction_keeps_every_inner_product_when_the_rows_span_few_directions():
    """N rows <= sketch_dim: the reduced layer has the Gram matrix of the standardised layer (nothing lost)."""
    from jaxleak.vinfo import _reduce

    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 300)) * rng.uniform(0.1, 10, size=300) + rng.normal(size=300)
    a[:, 7] = 3.0  # a constant column carries nothing
    (f,), reduced = _reduce(["l"], [a], 64, seed=3)
    live = np.arange(300) != 7
    xs = (a[:, live] - a[:, live].mean(0)) / a[:, live].std(0)
    gram = xs @ xs.T
    np.testing.assert_allclose(f.astype(np.float64) @ f.T.astype(np.float64), gram, rtol=0,
                               atol=1e-5 * np.abs(gram).max())
    assert reduced["l"] == {"size": 300, "sketch": None, "kept": 39, "exact": True,
                            "variance_kept": pytest.approx(1.0, abs=1e-6)}


def test_reduction_is_scikit_learn_pca_of_the_standardised_layer():
    """N > sketch_dim: the kept directions and their variance are scikit-learn's top principal components
    of the standardised layer (in another orthonormal basis: the same inner products)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from jaxleak.vinfo import _reduce

    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 120)) @ (rng.normal(size=(120, 120)) * np.linspace(3, 0.1, 120)[:, None])
    (f,), reduced = _reduce(["l"], [a], 16, seed=0)
    pca = PCA(16).fit(StandardScaler().fit_transform(a))
    want = pca.transform(StandardScaler().fit_transform(a))
    np.testing.assert_allclose(f.astype(np.float64) @ f.T.astype(np.float64), want @ want.T, rtol=0,
                               atol=1e-4 * np.abs(want @ want.T).max())
    assert reduced["l"]["kept"] == 16 and not reduced["l"]["exact"]
    assert reduced["l"]["variance_kept"] == pytest.approx(pca.explained_variance_ratio_.sum(), rel=1e-5)
    # a seeded basis: same seed, same features; another seed, the same inner products
    (g,), _ = _reduce(["l"], [a], 16, seed=0)
    (h,), _ = _reduce(["l"], [a], 16, seed=1)
    np.testing.assert_array_equal(f, g)
    assert not np.allclose(f, h)
    np.testing.assert_allclose(h.astype(np.float64) @ h.T, f.astype(np.float64) @ f.T, rtol=0,
                               atol=1e-4 * np.abs(want @ want.T).max())


def test_weak_signal_in_a_reduced_layer_found_by_scikit_learn_is_detected():
    """As above, in a layer wider than sketch_dim (96 columns read as 32): every draw where scikit-learn's
    LogisticRegressionCV on the full layer is >= 3 se above chance is detected. (A count sketch to 32 columns
    folds the other 95 directions' noise onto the signal and misses some of them.)"""
    def direction(rng):
        u = rng.normal(size=96)
        u *= 0.45 / np.linalg.norm(u)
        return u, u

    found = _draws_found_by_scikit_learn(700, 12, (24, 96, 32, 16), direction)
    for seed, fv, zv, fa, za in found:
        s = v_information_from_features(fv, zv, aux_features=fa, aux_target=za, family=("linear",), folds=3,
                                        steps=60, n_boot=500, sketch_dim=32, seed=seed)
        assert s["l1"]["reduced"]["kept"] == 32
        assert s["l1"]["detected"], (seed, s["l1"]["p_pairing"], s["l1"]["p_adjusted"], s["l1"].ci)
    assert len(found) >= 4, len(found)


def test_a_model_layer_is_read_whole_within_the_budget_and_sketched_beyond_it(digits, monkeypatch):
    """On a model: within ``FEATURE_FLOATS`` every layer's exact gradients are reduced (exactly: 60 rows); a
    budget too small for the widest layer count-sketches it to the width that fills the budget, and says so."""
    from jaxleak import defaults, vinfo
    from jaxleak.grads import layer_grads

    ds = digits.subset(np.arange(60))
    task = Task.init("mlp", ds, seed=0)
    z = ds.latent["thickness"]
    kw = dict(family=("linear",), sketch_dim=64, steps=10, folds=2, n_boot=20)
    vinfo._LAST_FEATURES.clear()
    whole = v_information(task, ds.x[:30], ds.y[:30], z[:30], aux=(ds.x[30:], ds.y[30:], z[30:]), **kw)
    sizes = {layer.name: layer.size for layer in task.layers}
    wide = [name for name, p in sizes.items() if p > 64]
    assert wide and whole.meta["reduced_layers"] == wide and whole.meta["sketched_layers"] == []
    # the mlp's Dense layers come from the factor engine; linear members are solved, their iterations named
    assert whole.meta["gradients"] == {"from_factors": task.layer_names, "formed": []}
    assert set(whole.meta["solver_iterations"]) == set(task.layer_names)
    assert all(0 < it <= ensemble.SOLVER_MAX_ITER for it in whole.meta["solver_iterations"].values())
    full = layer_grads(task, ds.x, ds.y)
    for name in wide:
        r = whole[name]["reduced"]
        assert r["size"] == sizes[name] and r["sketch"] is None and r["exact"] and r["kept"] <= 59
        (want,), _ = vinfo._reduce([name], [np.asarray(full[name])], 64, 0)
        got = vinfo._LAST_FEATURES["arrays"][0][task.layer_names.index(name)]
        gram = want.astype(np.float64) @ want.T
        np.testing.assert_allclose(got.astype(np.float64) @ got.T, gram, rtol=0, atol=1e-4 * np.abs(gram).max())
    widest = max(sizes, key=sizes.get)
    width = sizes[widest] - 20  # every other layer fits whole; the widest gets 20 columns fewer than it has
    assert all(p <= width for name, p in sizes.items() if name != widest)
    monkeypatch.setattr(defaults, "FEATURE_FLOATS", 60 * (sum(sizes.values()) - 20))
    vinfo._LAST_FEATURES.clear()
    cut = v_information(task, ds.x[:30], ds.y[:30], z[:30], aux=(ds.x[30:], ds.y[30:], z[30:]), **kw)
    assert cut.meta["sketched_layers"] == [widest] and cut[widest]["reduced"]["sketch"] == width
    assert "lower bound" in cut.meta["lower_bound"]


def test_input_reconstruction_on_a_model(digits):
    ds = digits.subset(np.arange(150))
    task = Task.init("mlp", ds, seed=0)
    scores = v_information(task, ds.x, ds.y, "input", family=("linear",), sketch_dim=32, steps=30, folds=3,
                           n_boot=50)
    assert list(scores) == task.layer_names and scores.unit == "bits/dim"
    for s in scores.values():
        assert math.isfinite(s.value) and s.ci[0] <= s.ci[1]
        assert {"mse", "mse_null", "psnr", "ssim", "h_null", "h_cond"} <= set(s.extras)
        assert 10 * math.log10(1.0 / s["mse"]) == pytest.approx(s["psnr"], abs=3.0)
    # MSE_0 per pixel is at most the pixel variance plus fold-to-fold mean shifts.
    assert scores["Dense_0"]["mse_null"] == pytest.approx(np.var(ds.x, axis=0).mean(), rel=0.05)


def test_latent_and_input_measures_share_one_sketch(digits, monkeypatch):
    """Equal parameters, examples and sketch: the gradients are sketched once; other parameters: again."""
    import jaxleak.grads as grads_lib
    from jaxleak import vinfo

    calls = []
    real = grads_lib.sketch_grads
    monkeypatch.setattr(grads_lib, "sketch_grads", lambda *a, **k: calls.append(1) or real(*a, **k))
    vinfo._LAST_FEATURES.clear()
    ds = digits.subset(np.arange(90))
    task = Task.init("mlp", ds, seed=0)
    z = ds.latent["thickness"]
    kw = dict(family=("linear",), sketch_dim=32, steps=10, folds=2, n_boot=20)
    latent = v_information(task, ds.x[:40], ds.y[:40], z[:40], aux=(ds.x[40:], ds.y[40:], z[40:]), **kw)
    assert len(calls) == 2  # victims and auxiliary examples
    original = v_information(task, ds.x[:40], ds.y[:40], "input", aux=(ds.x[40:], ds.y[40:]), **kw)
    assert len(calls) == 2 and latent.unit == "bits" and original.unit == "bits/dim"
    other = task.with_params(jax.tree.map(lambda p: p * 1.5, task.params))
    v_information(other, ds.x[:40], ds.y[:40], "input", aux=(ds.x[40:], ds.y[40:]), **kw)
    assert len(calls) == 4


@pytest.mark.parametrize(
    "features, target, match",
    [
        ({"a": np.zeros((10, 3))}, np.zeros(9, int), "first axis"),
        ({"a": np.zeros((10, 3)), "b": np.zeros((9, 3))}, np.zeros(10, int), "layer 'b'"),
        ({"a": np.full((10, 3), np.nan)}, np.zeros(10, int), "NaN"),
        ({"a": np.zeros((10, 3))}, np.zeros(10, int), "single class"),
        ({"a": np.zeros((10, 3))}, np.array(["a"] * 10), "integer classes or floating"),
        ({}, np.zeros(10, int), "non-empty"),
    ],
)
def test_bad_inputs_are_named(features, target, match):
    with pytest.raises(InputError, match=match):
        v_information_from_features(features, target)


def test_bad_options_are_named():
    f = {"a": np.random.default_rng(0).normal(size=(60, 3))}
    y = np.arange(60) % 2
    with pytest.raises(InputError, match="unknown attack family 'svm'"):
        v_information_from_features(f, y, family=("svm",))
    with pytest.raises(InputError, match="folds"):
        v_information_from_features(f, y, folds=1)
    with pytest.raises(InputError, match="weight_decays"):
        v_information_from_features(f, y, weight_decays=(-1.0,))


def test_bad_target_for_a_model(digits):
    ds = digits.subset(np.arange(20))
    task = Task.init("mlp", ds, seed=0)
    with pytest.raises(InputError, match="'input'"):
        v_information(task, ds.x, ds.y, "inputs")
    with pytest.raises(InputError, match="latent target"):
        v_information(task, ds.x, ds.y, ds.latent["thickness"][:10])


def test_planted_latent_bit_is_read_from_the_first_layer_and_nothing_without_it():
    """Latent bit z planted in the images: no layer is detected at strength 0; with any strength the
    first Dense layer's gradient (x times its output error: the input itself) gives z almost entirely.

    ``planted`` clips x + 0.1 s (2z - 1) p to [0, 1], so the digits' zero background stays 0 for z = 0 and
    turns positive for z = 1: z is a deterministic function of x at every s > 0, and the MLP family on the
    layer's principal components reaches close to H(z) = 1 bit, never above it.
    """
    task = None
    for strength in (0.0, 0.5, 2.0):
        ds = data.load("planted", strength=strength, max_examples=1000)
        task = task or Task.init("mlp", ds, seed=0)
        scores = v_information(task, ds.x, ds.y, ds.latent["z"], family=("mlp",), seeds=1,
                               weight_decays=(1e-3, 1e-1), sketch_dim=256, steps=150, folds=5, patience=100,
                               n_boot=500, seed=0)
        if strength == 0.0:  # nothing to find: no layer detected (the raw estimate may lie below 0)
            for name, s in scores.items():
                assert s.ci[0] <= 0.0 and not s["detected"], (name, s.value, s.ci)
            continue
        first = scores["Dense_0"]
        assert scores.top() == "Dense_0" and first["detected"], (strength, first.value, first.ci)
        assert 0.8 < first.value and first.ci[1] <= 1.0, (strength, first.value, first.ci)


def test_linear_decoders_are_the_exact_ridge_solution():
    """Closed-form linear decoders equal scikit-learn's Ridge on the fold's standardised training rows."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(11)
    n, w, k = 120, 40, 3
    for rows in (n, 30):  # more rows than features (primal) and fewer (dual)
        x = rng.normal(size=(1, rows, w)).astype(np.float32) * rng.uniform(0.5, 3.0, size=w).astype(np.float32)
        t = rng.normal(size=(1, rows, k))
        split = ensemble.cross_fit_split(rows, 3, seed=1)
        keep = split.train | split.val
        mu, inv_sd = ensemble._fold_standardisation(x, keep)
        wds = np.array([1e-3, 1e-1])
        params, val = ensemble._ridge(x, mu, inv_sd, np.broadcast_to(t, (3, rows, k)), split.train, split.val, wds)
        for f in range(3):
            s = (x[0].astype(np.float64) - mu[0, f]) * inv_sd[0, f]
            for m, wd in enumerate(wds):
                tr = split.train[f]
                ref = Ridge(alpha=tr.sum() * k * wd).fit(s[tr], t[0, tr])
                pred = s @ params["w"][0, f, m] + params["b"][0, f, m]
                np.testing.assert_allclose(pred, ref.predict(s), rtol=1e-4, atol=1e-4)
                ref_val = 0.5 * np.mean(np.square(ref.predict(s[split.val[f]]) - t[0, split.val[f]]))
                assert val[0, f, m] == pytest.approx(ref_val, rel=1e-4)


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_classifiers_are_scikit_learns_logistic_regression(classes):
    """Solved linear classifiers equal scikit-learn's LogisticRegression (lbfgs, tight tolerance, C = 1 / (wd n))
    on each fold's standardised training rows: held-out class probabilities of every member and fold, and
    validation losses; binary with one logit, three classes with a softmax over three."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    n, w = 240, 12
    x = rng.normal(size=(1, n, w)).astype(np.float32) * rng.uniform(0.5, 3.0, size=w).astype(np.float32)
    logits = x[0] @ rng.normal(size=(w, classes)) * 0.5
    y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=1).astype(np.int32)
    split = ensemble.cross_fit_split(n, 3, seed=2)
    wds = (1e-2, 1e-1)
    fit = ensemble.fit_ensemble(x, y, split, ensemble.make_members(("linear",), wds), kind="classification",
                                num_classes=classes)
    assert np.all(fit.best_step == ensemble.SOLVED)
    assert np.all((fit.solver_iterations > 0) & (fit.solver_iterations < ensemble.SOLVER_MAX_ITER))
    mu, inv_sd = ensemble._fold_standardisation(x, split.train | split.val)
    for f in range(3):
        s = (x[0].astype(np.float64) - mu[0, f]) * inv_sd[0, f]
        tr, va = split.train[f], split.val[f]
        held = fit.fold_of == f
        for m, wd in enumerate(wds):
            ref = LogisticRegression(C=1.0 / (wd * tr.sum()), tol=1e-10, max_iter=10_000).fit(s[tr], y[tr])
            np.testing.assert_allclose(fit.member_pred[0, m, held], ref.predict_proba(s[fit.rows[held]]),
                                       atol=2e-3)
            ref_val = -np.mean(np.log(ref.predict_proba(s[va])[np.arange(va.sum()), y[va]]))
            assert fit.val_loss[0, f, m] == pytest.approx(ref_val, rel=1e-3)


def test_mlp_features_are_the_folds_principal_components():
    """z equals scikit-learn's PCA of the fold's non-held-out standardised rows, applied to every row."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(12)
    n, w, r = 200, 30, 5
    x = (rng.normal(size=(1, n, 8)) @ rng.normal(size=(8, w)) + 0.1 * rng.normal(size=(1, n, w))).astype(np.float32)
    split = ensemble.cross_fit_split(n, 4, seed=0)
    keep = split.train | split.val
    mu, inv_sd = ensemble._fold_standardisation(x, keep)
    z, used = ensemble._principal_features(x, mu, inv_sd, keep, np.array([w]), r, shared=False)
    assert z.shape == (1, 4, n, r) and used.tolist() == [r]
    for f in range(4):
        s = (x[0].astype(np.float64) - mu[0, f]) * inv_sd[0, f]
        ref = PCA(r, svd_solver="full").fit(s[keep[f]]).transform(s)
        signs = np.sign(np.sum(ref * z[0, f], axis=0))
        np.testing.assert_allclose(z[0, f], ref * signs, rtol=1e-3, atol=1e-3)
    # a narrow layer keeps all its columns; the rest of its r are zero
    z, used = ensemble._principal_features(x[:, :, :3], mu[:, :, :3], inv_sd[:, :, :3], keep, np.array([3]), r,
                                           shared=False)
    assert used.tolist() == [3] and np.all(z[..., 3:] == 0)


def test_decoders_on_projected_features_with_cross_fitting():
    """Closed-form linear decoders and MLPs on principal components, without auxiliary data (cross-fitting)."""
    rng = np.random.default_rng(13)
    n, w = 240, 300  # wider than mlp_features: the MLPs read 256 principal components
    g = rng.normal(size=(n, w))
    t = g[:, :3] @ rng.normal(size=(3, 4)) + 0.5 * rng.normal(size=(n, 4))
    scores = v_information_from_features({"g": g}, t, steps=40, folds=3, n_boot=100, mlp_features=256)
    assert scores.meta["mlp_features"] == 256 and scores["g"]["detected"]
    # independent reference: scikit-learn's RidgeCV cross-fitted over the same held-out folds
    from sklearn.linear_model import RidgeCV

    split = ensemble.cross_fit_split(n, 3, seed=0)
    se, se0 = 0.0, 0.0
    for f in range(3):
        rest, test = ~split.test[f], split.test[f]
        pred = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(g[rest], t[rest]).predict(g[test])
        se += np.sum(np.square(pred - t[test]))
        se0 += np.sum(np.square(t[rest].mean(axis=0) - t[test]))
    reference = 0.5 * np.log2(se0 / se)
    assert reference > 0.1 and scores["g"].value >= reference - 0.1, (scores["g"].value, reference)


def test_ties_use_paired_resamples_and_detection_is_family_wise():
    """Layer B carries the same signal as A with 8% less noise (the same noise draws): their marginal 95%
    intervals overlap, yet B beats A on the same victims; the paired bootstrap says so, so A is not tied
    with the top layer (an unpaired bootstrap or an overlap rule would call it a tie). C is
    noise, and the max-T adjusted p-values are at least the layers' own. (C's false-detection rate, at most 5%
    over many draws, is test_shuffled_targets_are_rarely_detected's and benchmarks/calibration.py's: one
    draw cannot test it.)"""
    rng = np.random.default_rng(0)

    def make(n):
        z = rng.integers(0, 2, n)
        e = rng.standard_normal((n, 4))
        base = (2 * z - 1)[:, None] * 0.8
        return {"A": base + e, "B": base + 0.92 * e, "C": rng.standard_normal((n, 4))}, z

    f, z = make(300)
    fa, za = make(600)
    s = v_information_from_features(f, z, aux_features=fa, aux_target=za, family=("linear",), folds=3, steps=60,
                                    n_boot=1000)
    a, b = s["A"], s["B"]
    assert a["detected"] and b["detected"]
    assert a.ci[1] > b.ci[0]  # the marginal intervals overlap: the test is not vacuous
    assert a["tied_with_top"] is False and a["vs_top"]["top"] == "B" and a["vs_top"]["ci"][0] > 0
    assert s.to_dict()["top"] == ["B"]
    for name in "ABC":
        assert s[name]["p_adjusted"] >= s[name]["p_pairing"]
    assert s.meta["detectable_what"] == "an attack gain"
