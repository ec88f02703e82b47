"""Tests of jaxleak.sensitivity against exact Jacobians, finite differences and a closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import Task, data, models
from jaxleak import grads as grads_mod
from jaxleak.errors import InputError
from jaxleak.sensitivity import layer_jacobians_fn, layer_statistics, per_example_terms, sensitivity


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", max_examples=64)


@pytest.fixture(scope="module")
def lenet(digits):
    return Task.init("lenet", digits, seed=0)


def test_hutchinson_agrees_with_exact(lenet, digits):
    x, y = digits.x[:24], digits.y[:24]
    exact = sensitivity(lenet, x, y, method="exact")
    hutch = sensitivity(lenet, x, y, method="hutchinson", probes=64, seed=3)
    assert list(exact) == lenet.layer_names
    for name in lenet.layer_names:
        e, h = exact[name], hutch[name]
        assert abs(h.value - e.value) / e.value < 0.10, name
        assert abs(h["raw"] - e["raw"]) / e["raw"] < 0.10, name
        # the probes' own error, given these examples, must cover the exact value ...
        lo, hi = h["probe_ci"]
        assert lo <= e.value <= hi, (name, e.value, h["probe_ci"])
        lo, hi = h["raw_probe_ci"]
        assert lo <= e["raw"] <= hi, name
        # ... and so must the wider interval over examples and probes
        assert h.ci[0] <= e.value <= h.ci[1], name
        assert e["grad_norm"] == pytest.approx(h["grad_norm"], rel=1e-5)


def test_probe_interval_shrinks_with_probes(lenet, digits):
    x, y = digits.x[:16], digits.y[:16]
    few = sensitivity(lenet, x, y, probes=4)
    many = sensitivity(lenet, x, y, probes=64)
    for name in lenet.layer_names:
        w_few = few[name]["probe_ci"][1] - few[name]["probe_ci"][0]
        w_many = many[name]["probe_ci"][1] - many[name]["probe_ci"][0]
        assert w_many < w_few


def test_exact_jacobian_matches_central_differences():
    with jax.enable_x64(True):
        module = models.MLP(3, hidden=(5,), activation="tanh")
        shape = (2, 3, 1)
        variables = module.init(jax.random.key(1), jnp.zeros((1, *shape)))
        params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.1, variables["params"])
        task = Task.from_linen(module, {"params": params}, input_shape=shape)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(3, *shape)))
        y = jnp.asarray([0, 2, 1])
        jac = jax.jit(layer_jacobians_fn(task, task.layers))(task.params, x, y)
        grad_fn = jax.jit(grads_mod.per_example_grad_fn(task, task.layers))
        h = 1e-5
        d = int(np.prod(shape))
        for name in task.layer_names:
            assert jac[name].dtype == jnp.float64
        fd = {name: np.zeros((3, task.layer(name).size, d)) for name in task.layer_names}
        for i in range(d):
            e = np.zeros(d)
            e[i] = h
            e = jnp.asarray(e.reshape(shape))
            plus, minus = grad_fn(task.params, x + e, y), grad_fn(task.params, x - e, y)
            for name in task.layer_names:
                fd[name][:, :, i] = (np.asarray(plus[name]) - np.asarray(minus[name])) / (2 * h)
        for name in task.layer_names:
            got = np.asarray(jac[name]).reshape(3, -1, d)
            np.testing.assert_allclose(got, fd[name], rtol=1e-6, atol=1e-8)
            assert np.abs(fd[name]).max() > 1e-3  # the check is not vacuous


def _softmax_regression_jacobian(w, b, x, y):
    """Analytic d g / d x for softmax regression: g_b = p - e_y, g_W = x (p - e_y)^T."""
    d, c = w.shape
    p = jax.nn.softmax(x @ w + b)
    r = p - np.eye(c)[y]
    dp = (np.diag(p) - np.outer(p, p)) @ w.T            # (C, D): dp_c / dx_d
    jb = dp
    jw = np.einsum("ad,c->acd", np.eye(d), r) + np.einsum("a,cd->acd", x, dp)
    return np.concatenate([jb, jw.reshape(d * c, d)])    # tree order: bias, then kernel


def test_softmax_regression_closed_form(digits):
    task = Task.init("mlp", digits, seed=2, hidden=())
    # non-zero bias so the test sees it
    params = jax.tree.map(lambda p: p + 0.05, task.params)
    task = task.with_params(params)
    assert task.layer_names == ["Dense_0"]
    x, y = digits.x[:6], digits.y[:6]
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["Dense_0"]["bias"], np.float64)
    xf = x.reshape(6, -1).astype(np.float64)
    analytic = np.stack([_softmax_regression_jacobian(w, b, xf[i], y[i]) for i in range(6)])
    jac = jax.jit(layer_jacobians_fn(task, task.layers))(task.params, jnp.asarray(x), jnp.asarray(y))["Dense_0"]
    np.testing.assert_allclose(np.asarray(jac).reshape(analytic.shape), analytic, rtol=2e-4, atol=2e-6)
    exact = sensitivity(task, x, y, method="exact")["Dense_0"]
    assert exact["raw"] == pytest.approx(np.sqrt(np.mean(np.sum(analytic ** 2, axis=(1, 2)))), rel=1e-4)
    hutch = sensitivity(task, x, y, probes=64)["Dense_0"]
    assert hutch["raw"] == pytest.approx(exact["raw"], rel=0.1)


def test_ones_surrogate_is_blind_to_the_last_layer(lenet, digits):
    ones = sensitivity(lenet, digits.x[:8], digits.y[:8], method="ones")
    assert ones.meta["surrogate"] is True and "surrogate" in ones.meta["note"]
    last = lenet.layer_names[-1]
    assert ones[last].value == pytest.approx(0.0, abs=1e-5)
    assert all(ones[name].value > 0 for name in lenet.layer_names[:-1])
    exact = sensitivity(lenet, digits.x[:8], digits.y[:8], method="exact")
    assert exact[last].value > 0.1


def test_ones_matches_explicit_vjp(lenet, digits):
    x, y = digits.x[:4], digits.y[:4]
    sq, _ = per_example_terms(lenet, x, y, method="ones")
    jac = jax.jit(layer_jacobians_fn(lenet, lenet.layers))(lenet.params, jnp.asarray(x), jnp.asarray(y))
    for name in lenet.layer_names:
        jt1 = np.asarray(jac[name]).reshape(4, lenet.layer(name).size, -1).sum(axis=1)
        np.testing.assert_allclose(sq[name][:, 0], np.sum(jt1 ** 2, axis=1), rtol=1e-3, atol=1e-6)


def test_exact_terms_are_squared_jacobian_norms(lenet, digits):
    x, y = digits.x[:3], digits.y[:3]
    sq, g2 = per_example_terms(lenet, x, y, method="exact")
    jac = jax.jit(layer_jacobians_fn(lenet, lenet.layers))(lenet.params, jnp.asarray(x), jnp.asarray(y))
    g = grads_mod.layer_grads(lenet, x, y)
    for name in lenet.layer_names:
        np.testing.assert_allclose(sq[name][:, 0], np.sum(np.asarray(jac[name]).reshape(3, -1) ** 2, axis=1),
                                   rtol=1e-5)
        np.testing.assert_allclose(g2[name], np.sum(g[name] ** 2, axis=1), rtol=1e-5)


def test_chunking_does_not_change_the_estimate(lenet, digits):
    x, y = digits.x[:10], digits.y[:10]
    whole = sensitivity(lenet, x, y, probes=4, seed=7)
    chunked = sensitivity(lenet, x, y, probes=4, seed=7, chunk_size=3)
    for name in lenet.layer_names:
        assert chunked[name].value == pytest.approx(whole[name].value, rel=1e-5)
    other = sensitivity(lenet, x, y, probes=4, seed=8)
    assert any(other[n].value != whole[n].value for n in lenet.layer_names)


def test_second_call_does_not_retrace(lenet, digits):
    x, y = digits.x[:8], digits.y[:8]
    sensitivity(lenet, x, y, probes=4, chunk_size=4)
    before = dict(grads_mod.TRACE_COUNTS)
    sensitivity(lenet, x, y, probes=4, chunk_size=4, seed=5)
    moved = lenet.with_params(jax.tree.map(lambda p: p * 1.1, lenet.params))
    sensitivity(moved, x, y, probes=4, chunk_size=4)
    assert dict(grads_mod.TRACE_COUNTS) == before


def test_noise_normalised_fisher(lenet, digits):
    x, y = digits.x[:8], digits.y[:8]
    plain = sensitivity(lenet, x, y, probes=8)
    assert "fisher" not in plain["Conv_0"].extras
    noisy = sensitivity(lenet, x, y, probes=8, noise_std={"Conv_0": 0.5, "Dense_2": 2.0})
    assert noisy["Conv_0"]["fisher"] == pytest.approx(noisy["Conv_0"]["raw"] ** 2 / 0.25)
    assert noisy["Dense_2"]["fisher"] == pytest.approx(noisy["Dense_2"]["raw"] ** 2 / 4.0)
    assert "fisher" not in noisy["Conv_1"].extras
    lo, hi = noisy["Conv_0"]["fisher_ci"]
    assert lo < noisy["Conv_0"]["fisher"] < hi
    everywhere = sensitivity(lenet, x, y, probes=8, noise_std=0.1)
    assert all("fisher" in everywhere[n].extras for n in lenet.layer_names)
    d = everywhere.to_dict()
    assert d["measure"] == "sensitivity" and d["layers"]["Conv_0"]["fisher"] > 0


def test_statistics_on_known_samples():
    rng = np.random.default_rng(0)
    sq = rng.uniform(1.0, 3.0, size=(50, 8))
    g2 = rng.uniform(0.5, 1.5, size=50)
    st = layer_statistics(sq, g2)
    assert st["raw"] == pytest.approx(np.sqrt(sq.mean()))
    assert st["value"] == pytest.approx(np.sqrt(sq.mean() / g2.mean()))
    assert st["grad_norm"] == pytest.approx(np.sqrt(g2.mean()))
    assert st["ci"][0] < st["value"] < st["ci"][1]
    assert st["probe_ci"][0] < st["value"] < st["probe_ci"][1]
    zero = layer_statistics(np.zeros((5, 4)), np.zeros(5))
    assert zero["raw"] == 0.0 and np.isnan(zero["value"])


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "jacobian"}, "unknown sensitivity method"),
    ({"probes": 1}, "probes >= 2"),
    ({"probes": 0}, "positive integer"),
    ({"noise_std": -1.0}, "positive number"),
    ({"noise_std": {"nope": 1.0}}, "unknown layers"),
    ({"layers": ["nope"]}, "no layer"),
])
def test_bad_arguments(lenet, digits, kwargs, match):
    with pytest.raises((InputError, KeyError), match=match):
        sensitivity(lenet, digits.x[:2], digits.y[:2], **kwargs)


def test_activation_route_matches_generic_jvp(lenet, digits, monkeypatch):
    x, y = digits.x[:12], digits.y[:12]
    fast = sensitivity(lenet, x, y, probes=8, seed=4)
    from test_subspace import _no_factored_forms

    _no_factored_forms(monkeypatch)
    plain = Task(lenet.apply_fn, lenet.params, lenet.input_shape, name="plain")  # fresh compile cache
    from jaxleak import grads

    assert not any(s.factored for s in grads.layer_shapes(plain, plain.layers, x, y).values())
    generic = sensitivity(plain, x, y, probes=8, seed=4)
    for name in lenet.layer_names:
        assert generic[name].value == pytest.approx(fast[name].value, rel=1e-4)
        assert generic[name]["grad_norm"] == pytest.approx(fast[name]["grad_norm"], rel=1e-5)


def test_mixed_layers_hutchinson_vs_exact(digits):
    from test_subspace import _Odd

    module = _Odd()
    task = Task.from_linen(module, module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))), input_shape=(8, 8, 1))
    x, y = digits.x[:10], digits.y[:10]
    exact = sensitivity(task, x, y, method="exact")
    hutch = sensitivity(task, x, y, probes=64, seed=1)
    assert any("GroupNorm" in n for n in task.layer_names)
    # one linearised pass: Dense/Conv from their factors, the GroupNorm's per-example gradient formed
    assert hutch.meta["gradients"]["formed"] == [n for n in task.layer_names if "GroupNorm" in n]
    for name in task.layer_names:
        assert abs(hutch[name].value - exact[name].value) / exact[name].value < 0.10, name
        assert hutch[name]["probe_ci"][0] <= exact[name].value <= hutch[name]["probe_ci"][1], name
