"""Image metrics for reconstructions, and rank correlation across layers.

Images are arrays ``(..., H, W, C)`` with values in ``[0, data_range]``
(jaxleak's data sets are in [0, 1]); every metric returns one number per
image, shape ``(...)``.

- MSE: mean over pixels and channels of the squared difference.
- PSNR: ``10 log10(data_range^2 / MSE)`` in decibels (infinite when equal).
- SSIM: the structural similarity index of Wang, Bovik, Sheikh and
  Simoncelli (IEEE TIP 2004) with a Gaussian window, K1 = 0.01, K2 = 0.03,
  averaged over the valid window positions and the channels; computed by
  ``dm_pix.ssim``. The standard window is 11 x 11 with sigma 1.5. Images
  smaller than 11 pixels (8 x 8 digits) cannot hold it, so the window shrinks
  to the largest odd size w <= min(H, W) and sigma to 1.5 w / 11 (the same
  window in units of its width); :func:`ssim_window` says which is used.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jaxleak import compilation
from jaxleak.errors import InputError
from jaxleak.scores import LayerScores


def _check_pair(a, b) -> None:
    if np.shape(a) != np.shape(b):
        raise InputError(f"images must have the same shape, got {np.shape(a)} and {np.shape(b)}")
    if np.ndim(a) < 3:
        raise InputError(f"images must be (..., H, W, C), got shape {np.shape(a)}")


# Each metric is one compiled program per image shape (op by op, MSE, PSNR and
# SSIM compiled some thirty small programs); inputs are cast to float32 inside.

@jax.jit
def _mse(a, b) -> jax.Array:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))


@compilation.jit(key="psnr")
def _psnr(a, b, data_range) -> jax.Array:
    return 10.0 * jnp.log10(data_range ** 2 / _mse(a, b))


def mse(a, b) -> jax.Array:
    """Mean squared error per image: (..., H, W, C) x2 -> (...)."""
    _check_pair(a, b)
    return _mse(a, b)


def psnr(a, b, data_range: float = 1.0) -> jax.Array:
    """Peak signal-to-noise ratio per image in dB: 10 log10(data_range^2 / MSE); +inf for identical images."""
    _check_pair(a, b)
    return _psnr(a, b, data_range)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """The Gaussian SSIM window (size, sigma) used for images of this size.

    11 and 1.5 (Wang et al. 2004) when the image holds it; otherwise the
    largest odd size w <= min(height, width) with sigma = 1.5 w / 11.
    """
    side = min(int(height), int(width))
    if side < 1:
        raise InputError(f"images must be at least 1 x 1 pixels, got {height} x {width}")
    size = min(11, side)
    size -= (size + 1) % 2
    return size, 1.5 * size / 11.0


def ssim(a, b, data_range: float = 1.0) -> jax.Array:
    """Structural similarity per image (dimensionless, at most 1): (..., H, W, C) x2 -> (...).

    Gaussian-window SSIM (Wang et al. 2004) with the window of
    :func:`ssim_window`; the SSIM map is averaged over valid positions and
    channels. Agrees with ``skimage.metrics.structural_similarity(...,
    gaussian_weights=True, sigma=sigma, win_size=size,
    use_sample_covariance=False, data_range=data_range)`` per channel.
    """
    _check_pair(a, b)
    size, sigma = ssim_window(np.shape(a)[-3], np.shape(a)[-2])
    return _ssim(a, b, data_range, size, sigma)


@compilation.jit(key="ssim", static_argnames=("size", "sigma"))
def _ssim(a, b, data_range, size: int, sigma: float) -> jax.Array:
    import dm_pix

    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    lead = a.shape[:-3]
    flat = (-1, *a.shape[-3:])
    values = dm_pix.ssim(a.reshape(flat), b.reshape(flat), max_val=data_range, filter_size=size, filter_sigma=sigma)
    return values.reshape(lead)


# ---------------------------------------------------------------- rank correlation across layers

class Correlation(NamedTuple):
    """Spearman rank correlation of two per-layer measures over their common layers.

    ``rho`` and ``pvalue`` are NaN when fewer than three layers are shared or
    one measure is constant across them (no ranking to compare).
    """

    rho: float
    pvalue: float
    n: int
    layers: tuple[str, ...]


def spearman(a: LayerScores, b: LayerScores) -> Correlation:
    """Spearman rank correlation between two :class:`LayerScores` across layers.

    Uses the layers present in both (in ``a``'s order) whose values are
    finite; ``scipy.stats.spearmanr`` gives rho and the two-sided p-value
    (from scipy's t approximation, so over a handful of layers the p-value
    is indicative only).
    """
    if not isinstance(a, LayerScores) or not isinstance(b, LayerScores):
        raise InputError(f"spearman takes two LayerScores, got {type(a).__name__} and {type(b).__name__}")
    layers = tuple(
        name for name in a
        if name in b and math.isfinite(float(a[name].value)) and math.isfinite(float(b[name].value))
    )
    va = np.array([float(a[name].value) for name in layers])
    vb = np.array([float(b[name].value) for name in layers])
    if len(layers) < 3 or np.ptp(va) == 0 or np.ptp(vb) == 0:
        return Correlation(math.nan, math.nan, len(layers), layers)
    result = scipy.stats.spearmanr(va, vb)
    return Correlation(float(result.statistic), float(result.pvalue), len(layers), layers)
