"""Image metrics against closed forms and scikit-image; Spearman against scipy on plain arrays."""

import math

import numpy as np
import pytest
import scipy.stats

from jaxleak import metrics
from jaxleak.errors import InputError
from jaxleak.scores import LayerScores, Score

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(shape, seed=0, noise=0.1):
    rng = np.random.default_rng(seed)
    a = rng.random(shape).astype(np.float32)
    b = np.clip(a + noise * rng.standard_normal(shape), 0, 1).astype(np.float32)
    return a, b


def test_mse_and_psnr_closed_form():
    a = np.zeros((2, 4, 4, 1), np.float32)
    b = np.full((2, 4, 4, 1), 0.1, np.float32)
    b[1] = 0.5
    np.testing.assert_allclose(metrics.mse(a, b), [0.01, 0.25], rtol=1e-6)
    np.testing.assert_allclose(metrics.psnr(a, b), [20.0, 10 * math.log10(4)], rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(a, b, data_range=255.0), 10 * np.log10(255.0 ** 2 / np.array([0.01, 0.25])),
                               rtol=1e-5)
    assert np.isinf(metrics.psnr(a, a)).all()


def test_ssim_window_sizes():
    assert metrics.ssim_window(32, 32) == (11, 1.5)
    assert metrics.ssim_window(11, 40) == (11, 1.5)
    size, sigma = metrics.ssim_window(8, 8)
    assert size == 7 and sigma == pytest.approx(1.5 * 7 / 11)
    assert metrics.ssim_window(10, 12)[0] == 9


@pytest.mark.parametrize("shape", [(8, 8, 1), (16, 16, 1), (32, 24, 3)])
def test_ssim_matches_scikit_image(shape):
    a, b = _pair(shape, seed=shape[0])
    size, sigma = metrics.ssim_window(*shape[:2])
    expected = np.mean([
        skimage_metrics.structural_similarity(
            a[..., c].astype(np.float64), b[..., c].astype(np.float64), data_range=1.0, gaussian_weights=True,
            sigma=sigma, win_size=size, use_sample_covariance=False)
        for c in range(shape[-1])
    ])
    got = float(metrics.ssim(a, b))
    assert got == pytest.approx(expected, abs=2e-5)


def test_ssim_batches_and_bounds():
    a, b = _pair((3, 2, 8, 8, 1))
    batched = np.asarray(metrics.ssim(a, b))
    assert batched.shape == (3, 2)
    np.testing.assert_allclose(batched[1, 0], metrics.ssim(a[1, 0], b[1, 0]), rtol=1e-6)
    np.testing.assert_allclose(metrics.ssim(a, a), 1.0, rtol=1e-6)
    assert np.all(batched < 1.0)


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(InputError, match="same shape"):
        metrics.mse(np.zeros((2, 4, 4, 1)), np.zeros((2, 4, 4, 3)))
    with pytest.raises(InputError, match="H, W, C"):
        metrics.ssim(np.zeros((4, 4)), np.zeros((4, 4)))


def _scores(values, measure="m"):
    return LayerScores(measure, {name: Score(v) for name, v in values.items()})


def test_spearman_against_scipy():
    a = _scores({"c0": 3.0, "c1": 1.0, "d0": 2.0, "d1": 5.0, "d2": 4.0})
    b = _scores({"d2": 0.4, "d1": 0.9, "c0": 0.1, "c1": 0.3, "d0": 0.2, "extra": 7.0})
    corr = metrics.spearman(a, b)
    ref = scipy.stats.spearmanr([3, 1, 2, 5, 4], [0.1, 0.3, 0.2, 0.9, 0.4])
    assert corr.layers == ("c0", "c1", "d0", "d1", "d2")
    assert corr.n == 5
    assert corr.rho == pytest.approx(ref.statistic)
    assert corr.pvalue == pytest.approx(ref.pvalue)


def test_spearman_undefined_cases_are_nan():
    two = metrics.spearman(_scores({"a": 1.0, "b": 2.0}), _scores({"a": 1.0, "b": 3.0}))
    assert math.isnan(two.rho) and two.n == 2
    flat = metrics.spearman(_scores({"a": 1.0, "b": 1.0, "c": 1.0}), _scores({"a": 1.0, "b": 2.0, "c": 3.0}))
    assert math.isnan(flat.rho)
    with_nan = metrics.spearman(_scores({"a": 1.0, "b": float("nan"), "c": 2.0, "d": 3.0}),
                                _scores({"a": 3.0, "b": 2.0, "c": 2.0, "d": 1.0}))
    assert with_nan.layers == ("a", "c", "d") and with_nan.rho == pytest.approx(-1.0)
    with pytest.raises(InputError):
        metrics.spearman({"a": 1.0}, _scores({"a": 1.0}))
