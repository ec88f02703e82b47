"""Jacobian sensitivity of layer gradients to the input (docs/method.md section 4).

For an example (x, y) and layer l, J_l(x) = d g_l(x, y) / d x is the P_l x D
Jacobian of the layer's per-example gradient with respect to the input.

    S_l = sqrt( mean_x ||J_l(x)||_F^2 )                  raw sensitivity
    R_l = S_l / sqrt( mean_x ||g_l(x)||^2 )              relative (headline)

Methods:

- ``hutchinson`` (default): ||J||_F^2 = E_v ||J v||^2 over Rademacher probes
  v in R^D. J v comes from forward-over-reverse: ``jax.linearize`` in x (one
  primal pass) and the linear map vmapped over the probes; one jvp serves
  every layer at once. For Linen Dense/Conv layers the linearised function
  is (layer inputs, back-propagated errors), from which ||J_l v||^2 follows
  without forming per-example weight gradients; other layers linearise the
  per-example gradient itself.
- ``exact``: the full Jacobian by ``jax.jacfwd`` (D jvps per example); a
  reference for small models.
- ``ones``: GradDefense's surrogate ||J_l^T 1|| (one vjp per layer with an
  all-ones cotangent). It is *not* the measure: for softmax cross-entropy it is
  identically zero on the last layer. Offered for comparison only.

Heavy work is one jitted function per (task family, method, layers, probes,
chunk shape); statistics are computed on the host.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import compilation, defaults
from jaxleak import grads as _grads
from jaxleak.errors import InputError
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Layer, Task

METHODS = ("hutchinson", "exact", "ones")

_Z95 = 1.959963984540054


# ---------------------------------------------------------------- device side

def layer_jacobians_fn(task: Task, layers: Sequence[Layer]) -> Callable:
    """Pure ``(params, x (B, H, W, C), y (B,)) -> {layer: (B, P_l, H, W, C)}``: J_l(x) per example by jacfwd."""
    grad_one = jax.grad(task.example_loss)

    def one(params, xi, yi):
        return task.flatten(grad_one(params, xi, yi), layers)

    return jax.vmap(jax.jacfwd(one, argnums=1), in_axes=(None, 0, 0))


def rademacher_probes(key: jax.Array, index: jax.Array, probes: int, shape: Sequence[int], dtype) -> jax.Array:
    """Probes (probes, B, *shape) in {-1, +1}; example ``index[b]`` always gets the same ones.

    Keys are folded from the example's global index, so the estimate does not
    depend on the chunk size.
    """
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
    v = jax.vmap(lambda k: jax.random.rademacher(k, (probes, *shape), dtype=dtype))(keys)
    return jnp.moveaxis(v, 1, 0)


def _sq(a: jax.Array, start: int) -> jax.Array:
    return jnp.sum(jnp.square(a), axis=tuple(range(start, a.ndim)))


def _jv_frob2(a, e, da, de) -> jax.Array:
    """||dA^T E + A^T dE||_F^2 (B, K) for A (B, T, a), E (B, T, d) and tangents dA (K, B, T, a), dE (K, B, T, d).

    Dense layers (T = 1) expand into dot products; otherwise the smaller of
    the T x T Gram route and forming the a x d matrix, with the probe axis
    kept inside the matrix products (batched over examples only).
    """
    t, na, nd = a.shape[-2], a.shape[-1], e.shape[-1]
    if t == 1:
        a, e, da, de = a[:, 0], e[:, 0], da[:, :, 0], de[:, :, 0]
        aa, ee = jnp.sum(a * a, -1), jnp.sum(e * e, -1)
        return (jnp.sum(da * da, -1) * ee + aa * jnp.sum(de * de, -1)
                + 2 * jnp.sum(da * a, -1) * jnp.sum(de * e, -1)).T
    if 2 * t * (na + nd) <= na * nd:
        gaa, gee = jnp.einsum("bsa,bta->bst", a, a), jnp.einsum("bsd,btd->bst", e, e)
        g11 = jnp.einsum("kbsa,kbta->kbst", da, da) * gee
        g22 = gaa * jnp.einsum("kbsd,kbtd->kbst", de, de)
        g12 = jnp.einsum("kbsa,bta->kbst", da, a) * jnp.einsum("bsd,kbtd->kbst", e, de)
        return jnp.sum(g11 + g22 + 2 * g12, axis=(2, 3)).T
    jv = jnp.einsum("kbta,btd->bkad", da, e) + jnp.einsum("bta,kbtd->bkad", a, de)
    return _sq(jv, 2)


def _hutchinson_fn(task: Task, layers: Sequence[Layer], probes: int) -> Callable:
    """Hutchinson through the factor engine (:func:`jaxleak.grads.per_example_grad_fn` with ``factored='all'``).

    The per-example gradient of a Linen Dense/Conv layer is g = A^T Delta (A: input rows per output position,
    Delta: back-propagated errors), so

        J v = dA^T Delta + A^T dDelta,

    where (dA, dDelta) is the jvp of (A, Delta) along v (see :func:`_jv_frob2` for ||J v||^2); no per-example
    weight gradient (or its tangent) is formed. Other layers (normalisation layers, parameters outside a leaf
    module) linearise their per-example gradient, formed in the same pass: one linearised pass for all layers.
    """
    per_example = _grads.per_example_grad_fn(task, layers, factored="all")
    factors = (_grads.OuterFactors, _grads.ConvFactors)

    def fn(params, key, x, y, index):
        g, jvp = jax.linearize(lambda xx: per_example(params, xx, y), x)
        v = rademacher_probes(key, index, probes, x.shape[1:], x.dtype)
        dg = jax.vmap(jvp)(v)
        out = {}
        for name, gl in g.items():
            if isinstance(gl, factors):
                a, e = gl.rows(), gl.errors()                                     # (B, T, a), (B, T, d)
                da = jax.vmap(lambda t: t.rows(0.0))(dg[name])                    # (K, B, T, a)
                de = jax.vmap(lambda t: t.errors())(dg[name])                     # (K, B, T, d)
                out[f"sq/{name}"] = _jv_frob2(a, e, da, de)
                out[f"g2/{name}"] = _grads.factored_sq_norms(gl)
            else:
                out[f"sq/{name}"] = _sq(dg[name], 2).T
                out[f"g2/{name}"] = _sq(gl, 1)
        return out

    return fn


def _exact_fn(task: Task, layers: Sequence[Layer]) -> Callable:
    jac = layer_jacobians_fn(task, layers)
    grads = _grads.per_example_grad_fn(task, layers)

    def fn(params, key, x, y, index):
        del key, index
        j = jac(params, x, y)
        g = grads(params, x, y)
        out = {}
        for name in g:
            out[f"sq/{name}"] = _sq(j[name], 1)[:, None]
            out[f"g2/{name}"] = _sq(g[name], 1)
        return out

    return fn


def _ones_fn(task: Task, layers: Sequence[Layer]) -> Callable:
    grads = _grads.per_example_grad_fn(task, layers)

    def fn(params, key, x, y, index):
        del key, index
        # Examples do not interact, so the vjp of the batch of per-example
        # gradients with an all-ones cotangent on layer l is J_l(x_i)^T 1 for every i.
        g, vjp = jax.vjp(lambda xx: grads(params, xx, y), x)
        out = {}
        for name in g:
            cot = {m: (jnp.ones_like(t) if m == name else jnp.zeros_like(t)) for m, t in g.items()}
            (jt1,) = vjp(cot)
            out[f"sq/{name}"] = _sq(jt1, 1)[:, None]
            out[f"g2/{name}"] = _sq(g[name], 1)
        return out

    return fn


def _compiled(task: Task, method: str, layers: Sequence[Layer], probes: int) -> Callable:
    key = ("sensitivity", method, tuple(layer.name for layer in layers), probes)

    def build():
        if method == "hutchinson":
            inner = _hutchinson_fn(task, layers, probes)
        elif method == "exact":
            inner = _exact_fn(task, layers)
        else:
            inner = _ones_fn(task, layers)

        def traced(params, k, x, y, index):
            _grads.TRACE_COUNTS[key] += 1
            return inner(params, k, x, y, index)

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


def _default_chunk(task: Task, method: str, layers: Sequence[Layer], x, y, probes: int) -> int:
    """Examples per chunk: Hutchinson holds the factors (or formed gradients) and their K tangents, with the
    largest layer's T x T Grams or formed a x d products per probe; the exact Jacobian and the all-ones
    surrogate hold every layer's gradient per input dimension or per layer."""
    n, d = x.shape[0], int(np.prod(x.shape[1:]))
    if method == "hutchinson":
        shapes = _grads.layer_shapes(task, layers, x, y)
        live = sum(s.floats for s in shapes.values())
        transient = max([s.positions * (s.rows + s.positions) if 2 * s.positions * (s.rows + s.cols) <= s.rows * s.cols
                         else s.rows * s.cols for s in shapes.values() if s.factored], default=0)
        return _grads.factor_chunk_size((probes + 2) * (live + transient), n)
    size = max(1, sum(layer.size for layer in layers))
    per_example = size * (d + 1) if method == "exact" else size * (len(layers) + 1)
    return _grads.factor_chunk_size(per_example, n)


def per_example_terms(task: Task, x, y, *, method: str = "hutchinson", probes: int = 16, seed: int = 0,
                      chunk_size: int | None = None, layers: Sequence[str] | None = None,
                      progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The per-example samples behind :func:`sensitivity`.

    Returns ``(sq, g2)``: ``sq[layer]`` is (N, probes) with ||J_l(x_i) v_ij||^2
    for ``hutchinson``, (N, 1) with ||J_l(x_i)||_F^2 for ``exact`` and
    ||J_l(x_i)^T 1||^2 for ``ones``; ``g2[layer]`` is (N,) with ||g_l(x_i)||^2.
    """
    if method not in METHODS:
        raise InputError(f"unknown sensitivity method {method!r}; choose one of {list(METHODS)}")
    if not isinstance(probes, (int, np.integer)) or probes < 1:
        raise InputError(f"probes must be a positive integer, got {probes!r}")
    if method == "hutchinson" and probes < 2:
        raise InputError("hutchinson needs probes >= 2 to estimate its own error")
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    n = x.shape[0]
    k = int(probes) if method == "hutchinson" else 1
    chunk = _grads._check_chunk(chunk_size, n) if chunk_size else _default_chunk(task, method, sel, x, y, k)
    fn = _compiled(task, method, sel, k)
    index = np.arange(n, dtype=np.int32)
    out = _grads.map_chunks(fn, [x, y, index], chunk, desc=f"sensitivity ({method})", progress=progress,
                            extra=(task.params, jax.random.key(int(seed))))
    sq = {layer.name: out[f"sq/{layer.name}"].astype(np.float64) for layer in sel}
    g2 = {layer.name: out[f"g2/{layer.name}"].astype(np.float64) for layer in sel}
    _grads.check_finite(sq, "sensitivity term")
    _grads.check_finite(g2)
    return sq, g2


# ---------------------------------------------------------------- host-side statistics

def _log_ci(center: float, sd_log: float) -> tuple[float, float]:
    if not math.isfinite(center) or not math.isfinite(sd_log):
        return (math.nan, math.nan)
    return (center * math.exp(-_Z95 * sd_log), center * math.exp(_Z95 * sd_log))


def layer_statistics(sq: np.ndarray, g2: np.ndarray, noise_std: float | None = None) -> dict:
    """S_l, R_l and their 95% confidence intervals from per-example, per-probe samples.

    ``sq`` (N, K): samples of ||J_l(x_i)||_F^2 (K probes, or K = 1 exact);
    ``g2`` (N,): ||g_l(x_i)||^2. With m_i = mean_j sq_ij and M = mean_i m_i,
    Q = mean_i g2_i: S = sqrt(M), R = sqrt(M / Q).

    Two intervals, both by the delta method on the log scale (so they stay
    positive):

    - ``ci`` / ``raw_ci``: examples are a sample of the data, so the
      interval covers the mean over the data distribution; the variance of
      m_i across examples already contains the probe noise.
    - ``probe_ci``: the Monte-Carlo error of the probes alone, conditional on
      these examples (what separates the estimate from ``method='exact'`` on
      the same x), from the within-example variance of the probes.
    """
    n, k = sq.shape
    m_i = sq.mean(axis=1)
    big_m, big_q = float(m_i.mean()), float(g2.mean())
    raw = math.sqrt(big_m)
    rel = raw / math.sqrt(big_q) if big_q > 0 else math.nan
    if n > 1 and big_m > 0:
        var_m = float(np.var(m_i, ddof=1)) / n
        sd_log_raw = 0.5 * math.sqrt(var_m) / big_m
        if big_q > 0:
            var_q = float(np.var(g2, ddof=1)) / n
            cov = float(np.cov(m_i, g2, ddof=1)[0, 1]) / n
            var_log = var_m / big_m ** 2 + var_q / big_q ** 2 - 2 * cov / (big_m * big_q)
            sd_log_rel = 0.5 * math.sqrt(max(var_log, 0.0))
        else:
            sd_log_rel = math.nan
    else:
        sd_log_raw = sd_log_rel = 0.0 if big_m == 0 else math.nan
    stats = {
        "raw": raw,
        "raw_ci": _log_ci(raw, sd_log_raw),
        "value": rel,
        "ci": _log_ci(rel, sd_log_rel),
        "grad_norm": math.sqrt(big_q),
        "n": n,
    }
    if k > 1:
        var_probe = float(np.var(sq, axis=1, ddof=1).sum()) / (k * n * n)
        sd = 0.5 * math.sqrt(var_probe) / big_m if big_m > 0 else 0.0
        stats["probe_ci"] = _log_ci(rel, sd)
        stats["raw_probe_ci"] = _log_ci(raw, sd)
    if noise_std is not None:
        s2 = noise_std ** 2
        stats["fisher"] = big_m / s2
        lo, hi = stats["raw_ci"]
        stats["fisher_ci"] = (lo * lo / s2, hi * hi / s2)
    return stats


def _noise_levels(noise_std, names: Sequence[str]) -> dict[str, float | None]:
    if noise_std is None:
        return {name: None for name in names}
    if isinstance(noise_std, Mapping):
        unknown = sorted(set(noise_std) - set(names))
        if unknown:
            raise InputError(f"noise_std names unknown layers {unknown}; layers are {list(names)}")
        levels = {name: noise_std.get(name) for name in names}
    else:
        levels = {name: noise_std for name in names}
    for name, s in levels.items():
        if s is not None and (not isinstance(s, (int, float, np.floating, np.integer)) or not s > 0
                              or not math.isfinite(s)):
            raise InputError(f"noise_std for layer {name!r} must be a positive number, got {s!r}")
    return {name: (float(s) if s is not None else None) for name, s in levels.items()}


def sensitivity(task: Task, x, y, *, method: str = "hutchinson", probes: int = defaults.PROBES, seed: int = 0,
                chunk_size: int | None = None, noise_std=None, layers: Sequence[str] | None = None,
                progress: bool = False) -> LayerScores:
    """Per-layer Jacobian sensitivity (original information), docs/method.md section 4.

    Args:
      task: the model.
      x, y: examples (N, H, W, C) and labels (N,).
      method: ``'hutchinson'`` (default, ``probes`` Rademacher probes),
        ``'exact'`` (full Jacobian, small models) or ``'ones'`` (GradDefense's
        surrogate ||J_l^T 1||, not the measure).
      probes: Hutchinson probes per example.
      seed: seeds the probes (example i's probes do not depend on chunking).
      chunk_size: examples per compiled call (default: bounded memory).
      noise_std: std sigma of an additive Gaussian noise defence, one float or
        ``{layer: float}``; adds ``fisher`` = mean ||J_l||_F^2 / sigma_l^2, the
        trace of the Fisher information the noisy gradient carries about x.
      layers: a subset of layer names (default: all).

    Returns:
      :class:`LayerScores` ``'sensitivity'``: ``value`` = R_l (1 / input unit)
      with a 95% ``ci`` over examples (probe noise included); extras ``raw``
      (S_l, gradient units per input unit) and ``raw_ci``, ``grad_norm``
      (sqrt mean ||g_l||^2), for Hutchinson ``probe_ci``/``raw_probe_ci`` (the
      probes' error alone, given these examples), ``fisher``/``fisher_ci``
      when ``noise_std`` is given, and ``n``. For ``method='ones'`` the same
      fields hold the surrogate in place of ||J_l||_F.
    """
    sq, g2 = per_example_terms(task, x, y, method=method, probes=probes, seed=seed, chunk_size=chunk_size,
                               layers=layers, progress=progress)
    noise = _noise_levels(noise_std, list(sq))
    scores = {}
    for name in sq:
        st = layer_statistics(sq[name], g2[name], noise[name])
        value, ci = st.pop("value"), st.pop("ci")
        if noise[name] is not None:
            st["noise_std"] = noise[name]
        scores[name] = Score(value, ci, st)
    meta = {
        "method": method,
        "probes": int(probes) if method == "hutchinson" else None,
        "probe_distribution": "rademacher" if method == "hutchinson" else None,
        "seed": int(seed),
        "definition": "R_l = sqrt(mean_x ||J_l||_F^2) / sqrt(mean_x ||g_l||^2), J_l = d g_l / d x",
        "ci": "95%, delta method over examples (probe noise included); probe_ci: probes only, given the examples",
        "surrogate": method == "ones",
    }
    if method == "hutchinson":
        meta["gradients"] = _grads.factor_report(task, task.select(layers), *task.check_inputs(x, y))
    if method == "ones":
        meta["note"] = ("GradDefense surrogate ||J_l^T 1||, not the sensitivity measure; "
                        "identically zero on the last layer under softmax cross-entropy")
    if noise_std is not None:
        meta["fisher"] = "mean_x ||J_l||_F^2 / sigma_l^2: trace of the Fisher information about x (noise-normalised)"
    return LayerScores("sensitivity", scores, unit="1/input unit", meta=meta)
