"""Inputs that cannot break jaxleak: a clear JaxleakError or a finite, valid result."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jaxleak as jl
from jaxleak.gradnorm import grad_norms

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (4, 4, 1)


@pytest.fixture(scope="module")
def task():
    ds = jl.data.from_arrays(np.random.default_rng(0).random((6, *SHAPE)), np.arange(6) % 3)
    return jl.Task.init("mlp", ds, 0)


def _finite_result(out):
    for name, v in out.items():
        assert np.all(np.isfinite(v)), name


dtypes = st.sampled_from([np.float32, np.float64, np.int32, np.uint8, np.float16, np.complex64, bool])


@SETTINGS
@given(n=st.integers(0, 5), shape=st.sampled_from([SHAPE, (4, 4), (4, 4, 2), (5, 4, 1), (4,)]), dtype=dtypes,
       poison=st.sampled_from([None, np.nan, np.inf, -np.inf]), ny=st.integers(0, 6), hi=st.integers(1, 4))
def test_layer_grads_inputs(task, n, shape, dtype, poison, ny, hi):
    rng = np.random.default_rng(n)
    x = (rng.random((n, *shape)) * 2).astype(dtype)
    if poison is not None and n and np.issubdtype(x.dtype, np.floating):
        x.flat[0] = poison
    y = rng.integers(0, hi, size=ny)
    try:
        out = jl.layer_grads(task, x, y)
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert x.shape[1:] == SHAPE and n >= 1 and ny == n
    assert [k for k in out] == task.layer_names
    assert all(v.shape[0] == n for v in out.values())
    _finite_result(out)


@SETTINGS
@given(n=st.integers(1, 5), dim=st.integers(-2, 40), seed=st.integers(0, 3))
def test_sketch_grads_inputs(task, n, dim, seed):
    x = np.random.default_rng(seed).random((n, *SHAPE))
    y = np.arange(n) % 3
    try:
        out = jl.sketch_grads(task, x, y, dim=dim, seed=seed)
    except jl.JaxleakError as err:
        assert "dim" in str(err)
        return
    assert dim >= 1
    for layer in task.layers:
        assert out[layer.name].shape == (n, min(layer.size, dim))
    _finite_result(out)


@SETTINGS
@given(n=st.integers(1, 6), b=st.integers(-1, 7), k=st.integers(0, 3), m=st.integers(0, 4),
       lr=st.sampled_from([0.1, 0.0, -1.0, float("nan")]))
def test_client_updates_inputs(task, n, b, k, m, lr):
    x = np.random.default_rng(n).random((n, *SHAPE))
    y = np.arange(n) % 3
    try:
        u, victims = jl.client_updates(task, x, y, batch_size=b, local_steps=k, lr=lr, num_updates=m)
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert 1 <= b <= n and k >= 1 and m >= 1 and lr > 0
    assert victims.shape == (m,) and np.all((0 <= victims) & (victims < n))
    _finite_result(u)


@SETTINGS
@given(values=hnp.arrays(np.float32, (3, *SHAPE), elements=st.floats(-1e6, 1e6, width=32)))
def test_grad_norms_finite_or_clear_error(task, values):
    try:
        scores = grad_norms(task, values, np.array([0, 1, 2]))
    except jl.NonFiniteError as err:
        assert "layer" in str(err)
        return
    for s in scores.values():
        assert np.isfinite(s.value) and s.ci[0] <= s.value <= s.ci[1]


@SETTINGS
@given(n=st.integers(0, 4), ny=st.integers(0, 4), latent_len=st.integers(0, 4),
       ydtype=st.sampled_from([np.int64, np.float32, np.float64, object]))
def test_from_arrays_inputs(n, ny, latent_len, ydtype):
    x = np.zeros((n, *SHAPE))
    try:
        y = np.arange(ny).astype(ydtype) + (0.5 if ydtype is np.float32 else 0)
        ds = jl.data.from_arrays(x, y, latent={"z": np.zeros(latent_len, int)})
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert n == ny == latent_len >= 1
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32


@SETTINGS
@given(n=st.integers(0, 6), zkind=st.sampled_from(["ok", "single", "three", "float", "short", "nan"]),
       permutations=st.integers(-1, 4))
def test_subspace_distance_inputs(task, n, zkind, permutations):
    x = np.random.default_rng(n).random((n, *SHAPE))
    y = np.arange(n) % 3
    z = {"ok": np.arange(n) % 2, "single": np.zeros(n, int), "three": np.arange(n) % 3,
         "float": (np.arange(n) % 2) + 0.5, "short": np.arange(max(n - 1, 0)) % 2,
         "nan": np.where(np.arange(n) % 2, np.nan, 0.0)}[zkind]
    try:
        scores = jl.subspace_distance(task, x, y, z, permutations=permutations, stratify=False)
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert zkind == "ok" and permutations >= 2 and n >= 2
    for s in scores.values():
        assert 0.0 <= s.value <= 1.0 + 1e-6 and np.isfinite(s.extras["excess"])


@SETTINGS
@given(n=st.integers(0, 4), probes=st.integers(-1, 3), method=st.sampled_from(["hutchinson", "exact", "ones", "nope"]),
       poison=st.booleans())
def test_sensitivity_inputs(task, n, probes, method, poison):
    x = np.random.default_rng(n).random((n, *SHAPE))
    if poison and n:
        x[0, 0, 0, 0] = np.inf
    try:
        scores = jl.sensitivity(task, x, np.arange(n) % 3, method=method, probes=probes)
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert n >= 1 and not poison and method != "nope"
    for s in scores.values():
        assert np.isfinite(s.value) and s.value >= 0


@SETTINGS
@given(n=st.integers(0, 30), d=st.integers(0, 3), target=st.sampled_from(["int", "single", "short", "nan", "float"]),
       folds=st.integers(0, 3))
def test_v_information_from_features_inputs(n, d, target, folds):
    rng = np.random.default_rng(n)
    feats = {"a": rng.normal(size=(n, d))}
    t = {"int": np.arange(n) % 2, "single": np.zeros(n, int), "short": np.arange(max(n - 1, 0)) % 2,
         "nan": np.full((n, 2), np.nan), "float": rng.normal(size=(n, 2))}[target]
    try:
        scores = jl.v_information_from_features(feats, t, folds=folds, steps=5, seeds=1, weight_decays=(1e-2,),
                                                n_boot=50)
    except jl.JaxleakError as err:
        assert str(err)
        return
    assert target in ("int", "single", "float") and folds >= 2 and d >= 1
    for s in scores.values():
        assert np.isfinite(s.value)
        assert s.ci is None or all(np.isfinite(c) for c in s.ci)
