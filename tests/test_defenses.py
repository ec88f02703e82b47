"""Defences against NumPy references, closed forms and dp_accounting called directly."""

import math

import jax
import numpy as np
import pytest
import scipy.optimize
import scipy.stats
from dp_accounting import dp_event, pld, rdp

from jaxleak import defenses, grads
from jaxleak.errors import InputError, UnknownNameError
from jaxleak.task import Task
from jaxleak.train import train


def _rows(seed=0, n=6, sizes=(("a", 30), ("b", 50))):
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.uniform(-2, 2, (n, 1)))  # norms from well below to well above C = 1
    return {name: (scale * rng.standard_normal((n, p)) / math.sqrt(p)).astype(np.float32) for name, p in sizes}


# ---------------------------------------------------------------- accounting

@pytest.mark.parametrize("sigma,q,steps,delta", [(1.1, 0.01, 1000, 1e-5), (0.8, 0.05, 200, 1e-6), (2.0, 1.0, 3, 1e-5)])
def test_dp_epsilon_agrees_with_dp_accounting(sigma, q, steps, delta):
    for name, accountant in (("rdp", rdp.RdpAccountant()), ("pld", pld.PLDAccountant())):
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        assert defenses.dp_epsilon(sigma, q, steps, delta, accountant=name) == pytest.approx(
            accountant.get_epsilon(delta), rel=1e-9)


def test_dp_epsilon_matches_analytic_gaussian_mechanism():
    # One Gaussian mechanism with sensitivity 1 and std sigma (Balle & Wang 2018, Theorem 8):
    # delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma).
    sigma, delta = 1.0, 1e-5
    phi = scipy.stats.norm.cdf
    gap = lambda eps: phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma) - delta
    exact = scipy.optimize.brentq(gap, 0.0, 50.0)
    got = defenses.dp_epsilon(sigma, 1.0, 1, delta, accountant="pld")
    assert got == pytest.approx(exact, abs=2e-3)
    assert got >= exact - 1e-9  # PLD discretisation is pessimistic, never optimistic
    assert defenses.dp_epsilon(sigma, 1.0, 1, delta) >= got  # RDP is looser


def test_dp_epsilon_edge_cases():
    assert defenses.dp_epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert defenses.dp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert defenses.dp_epsilon(2.0, 0.01, 100, 1e-5) < defenses.dp_epsilon(1.0, 0.01, 100, 1e-5)
    for bad in [dict(sampling_rate=0.0), dict(delta=1.0), dict(steps=-1), dict(accountant="moments")]:
        args = dict(noise_multiplier=1.0, sampling_rate=0.1, steps=10, delta=1e-5) | bad
        with pytest.raises(InputError):
            defenses.dp_epsilon(**args)


# ---------------------------------------------------------------- transforms

def test_clipping_bounds_norms_against_loop():
    g = _rows()
    c = 1.0
    out = {k: np.asarray(v) for k, v in defenses.clip_rows(g, c).items()}
    for i in range(6):
        row = np.concatenate([g["a"][i], g["b"][i]])
        norm = np.linalg.norm(row)
        ref = row * min(1.0, c / norm)
        np.testing.assert_allclose(np.concatenate([out["a"][i], out["b"][i]]), ref, rtol=1e-6, atol=1e-7)
    norms = np.asarray(defenses.row_norms(out))
    assert np.all(norms <= c * (1 + 1e-6))
    before = np.asarray(defenses.row_norms(g))
    assert np.any(before < c) and np.any(before > c)  # both branches exercised

    per = {k: np.asarray(v) for k, v in defenses.clip_rows(g, c, per_layer=True).items()}
    for name in g:
        assert np.all(np.linalg.norm(per[name], axis=1) <= c / math.sqrt(2) * (1 + 1e-6))
    assert np.all(np.asarray(defenses.row_norms(per)) <= c * (1 + 1e-6))


def test_dp_aggregate_mean_and_noise_std():
    g = _rows(n=5)
    key = jax.random.key(0)
    clean = defenses.dp_aggregate(g, key, clip_norm=0.5, noise_multiplier=0.0)
    clipped = {k: np.asarray(v) for k, v in defenses.clip_rows(g, 0.5).items()}
    for name in g:
        np.testing.assert_allclose(clean[name], clipped[name].mean(axis=0), rtol=1e-5, atol=1e-7)
    zeros = {"w": np.zeros((4, 200_000), np.float32)}
    noisy = np.asarray(defenses.dp_aggregate(zeros, key, clip_norm=0.5, noise_multiplier=2.0)["w"])
    # sigma C / N = 0.25; the sample std of 2e5 draws is within 1% of it with overwhelming probability
    assert np.std(noisy) == pytest.approx(0.25, rel=0.01)
    assert abs(np.mean(noisy)) < 0.25 * 5 / math.sqrt(200_000)


def test_prune_keeps_exactly_the_top_fraction():
    g = _rows(n=4, sizes=(("a", 37), ("b", 100)))
    for fraction in (0.01, 0.1, 0.25, 1.0):
        out = {k: np.asarray(v) for k, v in defenses.prune(g, fraction).items()}
        for name, v in g.items():
            k = defenses.keep_count(v.shape[1], fraction)
            assert k == max(1, round(fraction * v.shape[1]))
            for i in range(v.shape[0]):
                kept = np.flatnonzero(out[name][i])
                ref = np.sort(np.argsort(-np.abs(v[i]))[:k])
                np.testing.assert_array_equal(kept, ref)
                np.testing.assert_array_equal(out[name][i][kept], v[i][kept])


def test_sign_and_quantisation_levels():
    g = _rows(n=3, sizes=(("a", 64),))
    g["a"][0, :3] = 0.0
    s = np.asarray(defenses.sign(g)["a"])
    np.testing.assert_array_equal(s, np.sign(g["a"]))
    for bits in (2, 3, 4):
        levels = 2 ** (bits - 1) - 1
        q = np.asarray(defenses.quantize(g, bits)["a"])
        for i in range(3):
            m = np.max(np.abs(g["a"][i]))
            j = q[i] / m * levels
            np.testing.assert_allclose(j, np.round(j), atol=1e-4)  # on the grid m * j / L
            assert len(np.unique(np.round(j))) <= 2 ** bits - 1
            assert np.all(np.abs(q[i] - g["a"][i]) <= m / (2 * levels) + 1e-6)
            ref = np.sign(g["a"][i]) * np.round(np.abs(g["a"][i]) / m * levels) * m / levels
            np.testing.assert_allclose(q[i], ref, rtol=1e-5, atol=1e-7)


def test_stochastic_quantisation_is_unbiased():
    g = {"a": np.random.default_rng(1).standard_normal((1, 50)).astype(np.float32)}
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: defenses.quantize(g, 2, k)["a"])(keys))
    m = np.abs(g["a"]).max()
    # each draw is one of the two neighbouring levels {floor, ceil} of |g| / m, so its sd is <= m / 2
    np.testing.assert_allclose(draws.mean(axis=0), g["a"], atol=5 * (m / 2) / math.sqrt(4000))


# ---------------------------------------------------------------- helpers

def test_defended_updates_rows():
    g = _rows(n=7)
    none = defenses.defended_updates(g, None)
    assert none.noise_std is None
    for name in g:
        np.testing.assert_array_equal(none.updates[name], g[name])
    dp = defenses.DP(clip_norm=0.5, noise_multiplier=0.0)
    clipped = defenses.defended_updates(g, dp)
    ref = defenses.clip_rows(g, 0.5)
    for name in g:
        np.testing.assert_allclose(clipped.updates[name], ref[name], rtol=1e-6)
    noisy = defenses.DP(clip_norm=0.5, noise_multiplier=1.5)
    a = defenses.defended_updates(g, noisy, seed=3, chunk_size=3)
    b = defenses.defended_updates(g, noisy, seed=3, chunk_size=256)
    assert a.noise_std == {"a": 0.75, "b": 0.75}
    for name in g:
        np.testing.assert_allclose(a.updates[name], b.updates[name], rtol=1e-6)  # chunking does not change noise
    c = defenses.defended_updates(g, noisy, seed=4)
    assert not np.allclose(a.updates["a"], c.updates["a"])
    pruned = defenses.defended_updates(g, defenses.Prune(0.1))
    assert pruned.noise_std is None
    assert np.all(np.count_nonzero(pruned.updates["b"], axis=1) == 5)


@pytest.fixture(scope="module")
def small(digits):
    task = Task.init("mlp", digits, seed=0)
    return task, digits.x[:64], digits.y[:64]


def test_defended_client_updates_reduce_to_plain_and_clipped_references(small):
    task, x, y = small
    kw = dict(batch_size=4, local_steps=2, lr=0.1, num_updates=3, seed=5)
    plain = grads.client_updates(task, x, y, **kw)
    same, std = defenses.defended_client_updates(task, x, y, None, **kw)
    assert std is None
    np.testing.assert_array_equal(same.victims, plain.victims)
    for name in plain.updates:
        np.testing.assert_allclose(same.updates[name], plain.updates[name], rtol=1e-5, atol=1e-7)

    # K = 1, no noise: the update is the mean of the clipped per-example gradients (batch-of-one reference)
    c = 0.05
    kw1 = dict(batch_size=4, local_steps=1, lr=0.1, num_updates=3, seed=5)
    dp0, _ = defenses.defended_client_updates(task, x, y, defenses.DP(c, 0.0), **kw1)
    batches = grads.client_batches(64, batch_size=4, num_updates=3, seed=5)
    for u in range(3):
        per = grads.layer_grads(task, x[batches[u]], y[batches[u]])
        total = np.sqrt(sum(np.sum(v ** 2, axis=1) for v in per.values()))
        assert np.all(total > c)  # clipping is active
        for name, v in per.items():
            ref = np.mean(v * np.minimum(1.0, c / total)[:, None], axis=0)
            np.testing.assert_allclose(dp0.updates[name][u], ref, rtol=1e-4, atol=1e-8)

    # with noise, K = 1: u_noisy - u_clean is exactly the noise, std sigma C / B
    noisy, std = defenses.defended_client_updates(task, x, y, defenses.DP(c, 4.0), **kw1)
    assert std == {name: 4.0 * c / 4 for name in plain.updates}
    diff = np.concatenate([(noisy.updates[n] - dp0.updates[n]).ravel() for n in plain.updates])
    assert np.std(diff) == pytest.approx(4.0 * c / 4, rel=0.03)


def test_training_with_a_defense(small):
    task, x, y = small
    plain = train(task, x, y, epochs=2, batch_size=16, lr=1e-2, seed=0)
    # DP with no noise and a clip far above every gradient norm is plain training
    loose = train(task, x, y, epochs=2, batch_size=16, lr=1e-2, seed=0, defense=defenses.DP(1e6, 0.0))
    for a, b in zip(jax.tree.leaves(plain.task.params), jax.tree.leaves(loose.task.params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    noisy = train(task, x, y, epochs=2, batch_size=16, lr=1e-2, seed=0, defense=defenses.DP(1.0, 1.0))
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(noisy.task.params))
    assert not np.allclose(jax.tree.leaves(noisy.task.params)[0], jax.tree.leaves(plain.task.params)[0])


def test_configurations():
    assert defenses.names() == ["dp", "prune", "sign", "quantize", "dropout"]
    dp = defenses.make("dp", clip_norm=2.0, noise_multiplier=0.5)
    assert dp == defenses.DP(2.0, 0.5)
    assert defenses.to_dict(dp) == {"name": "dp", "clip_norm": 2.0, "noise_multiplier": 0.5, "per_layer": False}
    assert defenses.to_dict(None) == {"name": "none"}
    assert dp.noise_std(batch_size=4, local_steps=4) == pytest.approx(0.5 * 2.0 / (4 * 2))
    assert defenses.model_options(defenses.Dropout(0.3)) == {"dropout": 0.3}
    assert defenses.model_options(dp) == {}
    with pytest.raises(UnknownNameError):
        defenses.make("blur")
    with pytest.raises(InputError, match="options"):
        defenses.make("prune", keep=0.1)
    for bad in (lambda: defenses.Prune(0.0), lambda: defenses.Prune(1.5), lambda: defenses.Quantize(1),
                lambda: defenses.DP(0.0, 1.0), lambda: defenses.Dropout(1.0)):
        with pytest.raises(InputError):
            bad()
    with pytest.raises(InputError, match="key"):
        defenses.apply(dp, {"a": np.zeros((1, 3))})
