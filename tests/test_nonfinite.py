"""No NaN, ever silent: degenerate features give finite V-information without RuntimeWarnings, and a
non-finite estimate raises NonFiniteError naming the layer.

Planted data: N victims and N_AUX attacker rows; layer "signal" carries a binary z (or, for a regression
target, three of the four target columns) linearly; the other layers are degenerate versions of it.
"""

import warnings

import numpy as np
import pytest

from jaxleak import ensemble
from jaxleak.errors import NonFiniteError
from jaxleak.vinfo import _stack, v_information_from_features

N, N_AUX, WIDTH = 120, 240, 20
FAST = dict(steps=40, folds=2, n_boot=200)


def _layers(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Layers (rows: victims then aux), a binary target z and a (rows, 4) float target."""
    rng = np.random.default_rng(seed)
    rows = N + N_AUX
    z = rng.integers(0, 2, rows)
    signal = rng.normal(size=(rows, WIDTH))
    signal[:, 0] += 1.5 * (2 * z - 1)
    near = rng.normal(size=(rows, WIDTH))
    near[:, 3] = 1.0 + 1e-12 * rng.normal(size=rows)  # mean 1, sd 1e-12
    near[:, 7] = 1e3 + 1e-4 * rng.normal(size=rows)  # a spread of a couple of float32 ulps around 1000
    layers = {
        "signal": signal,
        "constant": np.full((rows, WIDTH), 3.0),
        "tiny": signal * 1e-20,
        "huge": signal * 1e20,
        "near_constant": near,
        # The GroupNorm case: rank 20 < the columns the MLP projects onto, and wider than the
        # attacker's rows, so the principal directions come from the rows' Gram matrix.
        "low_rank": signal @ rng.normal(size=(WIDTH, N_AUX + 20)),
    }
    t = np.stack([signal[:, 0], signal[:, 1], 0.5 * signal[:, 2], rng.normal(size=rows)], axis=1)
    return layers, z, t


def _measure(layers: dict, target: np.ndarray):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return v_information_from_features({k: v[:N] for k, v in layers.items()}, target[:N],
                                           aux_features={k: v[N:] for k, v in layers.items()},
                                           aux_target=target[N:], **FAST)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_degenerate_layers_give_finite_scale_invariant_values(kind):
    """Constant, near-constant and rank-deficient layers give finite values without RuntimeWarnings, and the
    signal layer scaled by 1e-20 or 1e20 gives the unscaled value. (The scaled copies take the signal's place
    as layer 0: an MLP member's initialisation differs from layer to layer.)"""
    layers, z, t = _layers()
    target = z if kind == "classification" else t
    rest = {k: layers[k] for k in ("constant", "near_constant", "low_rank")}
    scores = {first: _measure({first: layers[first], **rest}, target) for first in ("signal", "tiny", "huge")}
    for first, by_layer in scores.items():
        for name, score in by_layer.items():
            assert np.isfinite(score.value) and np.all(np.isfinite(score.ci)), (first, name, score.value, score.ci)
    ref = scores["signal"]
    assert ref["signal"].ci[0] > 0.1, ref["signal"].ci  # the planted information is found
    # constant features: nothing to read, a value near 0 whose interval covers 0
    assert abs(ref["constant"].value) < 0.02 and ref["constant"].ci[0] <= 0.0, ref["constant"].ci
    # a rank-deficient layer (a linear map of the signal) carries the signal's information
    assert ref["low_rank"].ci[0] > 0.1, ref["low_rank"].ci
    # scaling a whole layer by 1e-20 or 1e20 changes nothing (up to float32 rounding of the input)
    for first in ("tiny", "huge"):
        assert scores[first][first].value == pytest.approx(ref["signal"].value, rel=1e-4, abs=1e-5), first
        assert scores[first][first].ci == pytest.approx(ref["signal"].ci, rel=1e-4, abs=1e-5), first
        for name in rest:
            assert scores[first][name].value == pytest.approx(ref[name].value, rel=1e-4, abs=1e-5), (first, name)


def test_constant_columns_are_counted_and_scale_invariant():
    """Constant columns (all of 'constant', the two near-constant ones) get 1 / sd = 0 and are counted in
    the fit; the standardisation of a layer scaled by 1e-20 or 1e20 is that of the unscaled layer."""
    layers, z, _ = _layers()
    names = ["signal", "constant", "tiny", "huge", "near_constant"]
    x, widths = _stack([layers[k].astype(np.float32) for k in names])
    split = ensemble.attacker_split(N, N_AUX, 2, seed=0, strata=z[N:])
    keep = split.train | split.val
    mu, inv_sd = ensemble._fold_standardisation(x, keep)
    for i in (2, 3):
        np.testing.assert_allclose(inv_sd[i], inv_sd[0], rtol=1e-5)
        np.testing.assert_allclose(mu[i], mu[0], atol=1e-5)
    fit = ensemble.fit_ensemble(x, z, split, ensemble.make_members(("linear",), (1e-2,)), kind="classification",
                                num_classes=2, widths=widths, steps=10)
    assert fit.constant_columns.shape == (len(names), 2)
    assert fit.constant_columns.tolist() == [[0, 0], [WIDTH, WIDTH], [0, 0], [0, 0], [2, 2]]


def test_non_finite_estimate_raises_naming_the_layer(monkeypatch):
    """Whatever makes a layer's held-out loss NaN, the fit raises instead of storing NaN."""
    layers, z, _ = _layers()
    x, widths = _stack([layers[k].astype(np.float32) for k in ("signal", "constant", "tiny")])
    split = ensemble.attacker_split(N, N_AUX, 2, seed=0, strata=z[N:])
    original = ensemble._fold_standardisation

    def poisoned(x_, keep_):
        mu, inv_sd = original(x_, keep_)
        inv_sd[2, :, 0] = np.nan
        return mu, inv_sd

    monkeypatch.setattr(ensemble, "_fold_standardisation", poisoned)
    with pytest.raises(NonFiniteError, match=r"layer 2: held-out loss"):
        ensemble.fit_ensemble(x, z, split, ensemble.make_members(("linear",), (1e-2,)), kind="classification",
                              num_classes=2, widths=widths, steps=10)
