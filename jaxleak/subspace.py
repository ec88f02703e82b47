"""Subspace distance between the gradients of two latent groups (docs/method.md section 5).

For layer l, G_0 and G_1 (n x P_l) stack the per-example gradients of the
examples with z = 0 and z = 1 (balanced by subsampling). With V_g the top-k
right singular vectors of G_g and theta_1..theta_k the principal angles
between span(V_0) and span(V_1):

    D_l = sqrt( mean_i sin^2 theta_i )        in [0, 1]

Everything comes from the n x n Gram matrices K_gh = G_g G_h^T: with
K_gg = U_g diag(lambda_g) U_g^T, V_g = G_g^T U_g lambda_g^(-1/2), so the
cosines of the principal angles are the singular values of

    M = lambda_0^(-1/2) U_0^T K_01 U_1 lambda_1^(-1/2)          (k x k)

and mean_i cos^2 theta_i = ||M||_F^2 / k. No P_l-dimensional basis is formed.

A permutation null (z shuffled among the pooled examples, same k) gives the
null mean and sd, the excess D_l - null mean (the latent leakage signal) and a
permutation p-value.

Grams of large layers are formed without per-example gradients where the
layer is a Linen ``Dense`` or ``Conv``: the per-example gradient of such a
layer is sum_t a_t delta_t^T over output positions t (a_t: input patch, plus
a constant 1 for the bias; delta_t: back-propagated error), so

    <g_i, g_j> = sum_{s,t} (a_is . a_jt) (delta_is . delta_jt),

which is computed either from the T x T position Grams ("factored", cheap
when T^2 (|a| + |delta|) <= P_l) or from a ⊗ delta formed for a block of
channels at a time (bounded memory). Other layers use the per-example
gradients when they fit in memory, else count-sketches (``gram_source``
says which).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jaxleak import compilation, defaults
from jaxleak import grads as _grads
from jaxleak.errors import InputError
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Layer, Task

# Host floats of per-example features kept at once while forming Grams (512 MiB).
_HOST_FLOATS = 2 ** 27
# Count-sketch width for layers with neither factored Grams nor room for their gradients.
_SKETCH_DIM = 4096
# An outer-product layer whose gradients for all examples exceed this many floats (2 GiB) is
# sketched instead: forming its Gram exactly would take n * P / _HOST_FLOATS forward-backward
# passes over all examples and n^2 P multiply-adds (hours for vgg16 at n = 2048 on a CPU).
_OUTER_FLOATS = 2 ** 29
# Eigenvalues below this fraction of the largest are treated as zero (Grams are float32).
_RANK_RTOL = 1e-5


# ---------------------------------------------------------------- principal angles from Grams

def _eig_desc(k: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric (n, n) matrix.

    With ``top``, only the ``top`` largest pairs are computed (faster for the permutation null).
    """
    n = k.shape[0]
    if top is not None and top < n:
        lam, u = scipy.linalg.eigh(k, subset_by_index=[n - top, n - 1])
    else:
        lam, u = np.linalg.eigh(k)
    return np.clip(lam[::-1], 0.0, None), u[:, ::-1]


def energy_rank(eigvals: np.ndarray, energy: float) -> int:
    """Smallest k whose top-k eigenvalues (descending) hold ``energy`` of the total."""
    total = float(np.sum(eigvals))
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(eigvals) / total, energy - 1e-12) + 1)


def numerical_rank(eigvals: np.ndarray) -> int:
    """Number of eigenvalues above ``_RANK_RTOL`` times the largest."""
    top = float(np.max(eigvals, initial=0.0))
    return int(np.sum(eigvals > _RANK_RTOL * top)) if top > 0 else 0


def _distance_from_eig(lam0, u0, lam1, u1, k01, k: int) -> np.ndarray:
    """D for (batches of) eigendecompositions: lam (..., n), u (..., n, n), k01 (..., n, n)."""
    a = u0[..., :k] / np.sqrt(lam0[..., None, :k])
    b = u1[..., :k] / np.sqrt(lam1[..., None, :k])
    m = np.swapaxes(a, -1, -2) @ k01 @ b
    cos2 = np.sum(m * m, axis=(-2, -1)) / k
    return np.sqrt(np.clip(1.0 - cos2, 0.0, 1.0))


def principal_angle_distance(k00, k11, k01, k: int) -> float:
    """D = sqrt(mean_i sin^2 theta_i) between the top-``k`` row spaces of G_0 and G_1.

    Args:
      k00: G_0 G_0^T (n0, n0); k11: G_1 G_1^T (n1, n1); k01: G_0 G_1^T (n0, n1).
      k: subspace dimension; at most the numerical rank of either Gram.
    """
    k00, k11, k01 = (np.asarray(a, np.float64) for a in (k00, k11, k01))
    lam0, u0 = _eig_desc(k00)
    lam1, u1 = _eig_desc(k11)
    limit = min(numerical_rank(lam0), numerical_rank(lam1))
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= limit:
        raise InputError(f"k must be an integer in [1, {limit}] (the smaller numerical rank), got {k!r}")
    return float(_distance_from_eig(lam0, u0, lam1, u1, k01, int(k)))


def _split(gram: np.ndarray, idx0: np.ndarray, idx1: np.ndarray):
    return gram[np.ix_(idx0, idx0)], gram[np.ix_(idx1, idx1)], gram[np.ix_(idx0, idx1)]


def choose_rank(lam0: np.ndarray, lam1: np.ndarray, n: int, *, energy: float, rank: int | None) -> int:
    """k: ``rank`` if given, else the smallest rank keeping ``energy`` of each group's eigenvalue mass;
    capped at n // 2 and at both numerical ranks."""
    limit = min(n // 2, numerical_rank(lam0), numerical_rank(lam1))
    if limit < 1:
        return 0
    if rank is not None:
        return int(min(rank, limit))
    return int(min(max(energy_rank(lam0, energy), energy_rank(lam1, energy)), limit))


def _shuffle(z: np.ndarray, strata: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """z permuted among the examples (within each stratum when ``strata`` is given)."""
    if strata is None:
        return z[rng.permutation(z.shape[0])]
    out = z.copy()
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        out[idx] = z[idx[rng.permutation(idx.size)]]
    return out


def subspace_distance_from_grams(gram, z, *, energy: float = 0.9, rank: int | None = None,
                                 permutations: int = defaults.PERMUTATIONS, seed: int = 0, strata=None) -> dict:
    """D, its permutation null and p-value from one pooled Gram matrix.

    Args:
      gram: (N, N) Gram matrix <g_i, g_j> of the pooled examples.
      z: (N,) group of each example, 0 or 1, with N/2 of each.
      energy, rank: choice of k (see :func:`choose_rank`); the same k is used
        for the observed split and every permutation.
      permutations: R, number of shuffles of z for the null.
      seed: seeds the shuffles.
      strata: optional (N,) labels; z is then shuffled within each stratum,
        so every permuted split keeps the observed groups' composition
        (e.g. the same task labels).

    Returns:
      dict with ``value`` (D), ``null_mean``, ``null_sd``, ``excess``,
      ``p_value`` = (1 + #{null >= D}) / (R + 1), ``k``, ``n_per_group`` and
      ``null`` (the R null distances).
    """
    gram = np.asarray(gram, np.float64)
    z = np.asarray(z)
    n_total = z.shape[0]
    if gram.shape != (n_total, n_total):
        raise InputError(f"gram must be ({n_total}, {n_total}) to match z, got {gram.shape}")
    idx0, idx1 = np.flatnonzero(z == 0), np.flatnonzero(z == 1)
    if idx0.size != idx1.size or idx0.size + idx1.size != n_total:
        raise InputError("z must hold 0 and 1 only, as many of each (balance the groups first)")
    if strata is not None:
        strata = np.asarray(strata)
        if strata.shape != z.shape:
            raise InputError(f"strata must have shape {z.shape} to match z, got {strata.shape}")
    n = idx0.size
    k00, k11, k01 = _split(gram, idx0, idx1)
    lam0, u0 = _eig_desc(k00)
    lam1, u1 = _eig_desc(k11)
    k = choose_rank(lam0, lam1, n, energy=energy, rank=rank)
    out = {"k": k, "n_per_group": int(n)}
    if k == 0:
        return dict(out, value=math.nan, null_mean=math.nan, null_sd=math.nan, excess=math.nan,
                    p_value=math.nan, null=[])
    d = float(_distance_from_eig(lam0, u0, lam1, u1, k01, k))
    rng = np.random.default_rng(seed)
    null = np.empty(permutations)
    for r in range(permutations):
        zr = _shuffle(z, strata, rng)
        a, b, c = _split(gram, np.flatnonzero(zr == 0), np.flatnonzero(zr == 1))
        la, ua = _eig_desc(a, k)
        lb, ub = _eig_desc(b, k)
        kr = min(k, numerical_rank(la), numerical_rank(lb))
        null[r] = _distance_from_eig(la, ua, lb, ub, c, kr) if kr > 0 else math.nan
    null_mean = float(np.mean(null)) if permutations else math.nan
    null_sd = float(np.std(null, ddof=1)) if permutations > 1 else math.nan
    p = float((1 + np.sum(null >= d)) / (permutations + 1)) if permutations else math.nan
    return dict(out, value=d, null_mean=null_mean, null_sd=null_sd, excess=d - null_mean, p_value=p,
                null=null.tolist())


# ---------------------------------------------------------------- Grams from the factor engine

@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one layer's Gram is formed."""

    layer: Layer
    source: str                    # "activations/errors", "exact" or "sketch"
    route: str = ""                # "factored" or "outer" for activations/errors
    positions: int = 1             # T
    a_dim: int = 0                 # |a| (patch size, + 1 with bias)
    d_dim: int = 0                 # |delta| (output channels)


def linear_plans(task: Task, layers: Sequence[Layer], x, y) -> list[_Plan | None]:
    """Per layer, the plan of its Gram from factors (inputs and back-propagated errors, from the factor engine
    :func:`jaxleak.grads.per_example_grad_fn`), or None for a layer with no factored form. ``factored``: the
    T x T products of rows and errors; ``outer``: the summed outer products (a x d per example)."""
    shapes = _grads.layer_shapes(task, layers, x, y)
    plans = []
    for layer in layers:
        s = shapes[layer.name]
        if not s.factored:
            plans.append(None)
            continue
        t, a, d = s.positions, s.rows, s.cols
        route = "factored" if t * t * (a + d) <= a * d else "outer"
        plans.append(_Plan(layer, "activations/errors", route, t, a, d))
    return plans


def _features_fn(task: Task, items: Sequence[tuple[_Plan, int, int]]) -> Callable:
    """Jitted ``(params, x, y) -> {key: features}`` for one pass.

    Each item (plan, lo, hi) asks for output channels [lo, hi) of a layer:
    ``outer`` gives (B, |a| (hi - lo)) = a ⊗ delta summed over positions;
    ``factored`` gives rows (B, T, |a|) and errors (B, T, |delta|).
    """
    key = ("subspace_features", tuple((plan.layer.name, lo, hi) for plan, lo, hi in items))

    def build():
        layers = list({plan.layer.name: plan.layer for plan, _, _ in items}.values())
        per_example = _grads.per_example_grad_fn(task, layers, factored="all")

        def traced(params, x, y):
            _grads.TRACE_COUNTS[key] += 1
            factors = per_example(params, x, y)
            out = {}
            for plan, lo, hi in items:
                name = plan.layer.name
                a, d = factors[name].rows(), factors[name].errors()[..., lo:hi]
                if plan.route == "factored":
                    out[f"a/{name}"], out[f"d/{name}"] = a, d
                else:
                    out[f"g/{name}/{lo}"] = jnp.einsum("bta,btd->bad", a, d).reshape(x.shape[0], -1)
            return out

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


def _factored_gram_fn(task: Task) -> Callable:
    """Jitted ``(a_all, d_all, *a_rows, *d_rows) -> {str(l): K_l rows}`` for the factored layers l of one pass.

    K_l[i, j] = sum_{s,t} <a_is, a_jt> <d_is, d_jt> (rows i of the block
    against all j): one program for all the pass's layers.
    """
    def build():
        def traced(a_all, d_all, *rows):
            _grads.TRACE_COUNTS[("factored_gram",)] += 1
            out = {}
            for i, (a, d) in enumerate(zip(rows[:len(a_all)], rows[len(a_all):])):
                pa = jnp.einsum("isa,jta->ijst", a, a_all[i])
                pd = jnp.einsum("isd,jtd->ijst", d, d_all[i])
                out[str(i)] = jnp.sum(pa * pd, axis=(2, 3))
            return out

        return compilation.jit(traced, key=("factored_gram",))

    return task.cached(("factored_gram",), build)


def _factored_grams(task: Task, plans: Sequence[_Plan], a: list[np.ndarray], d: list[np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """Gram of each factored layer from its rows a (N, T, |a|) and errors d (N, T, |delta|), float64.

    Row blocks keep the (block, N, T, T) products of all layers together within one chunk's
    budget (:func:`jaxleak.grads.chunk_limits`).
    """
    n = a[0].shape[0]
    floats, _ = _grads.chunk_limits(_grads._CHUNK_FLOATS)
    block = int(max(1, min(n, floats // max(1, n * sum(p.positions ** 2 for p in plans)))))
    k = _grads.map_chunks(_factored_gram_fn(task), [*a, *d], block, extra=jax.device_put((tuple(a), tuple(d))))
    return {p.layer.name: k[str(i)].astype(np.float64) for i, p in enumerate(plans)}


def _gram_np(f: np.ndarray) -> np.ndarray:
    return (f @ f.T).astype(np.float64)


def _passes(plans: Sequence[_Plan], n: int) -> list[list[tuple[_Plan, int, int]]]:
    """Group (layer, channel block) items into passes that keep at most _HOST_FLOATS on the host.

    Factored layers go whole; outer-product layers are cut into blocks of
    output channels that fill each pass up to the budget, so the number of
    passes (each a forward and backward over all examples) stays near the
    total size over the budget.
    """
    passes, current, used = [], [], 0

    def flush():
        nonlocal current, used
        if current:
            passes.append(current)
        current, used = [], 0

    for plan in plans:
        if plan.route == "factored":
            size = n * plan.positions * (plan.a_dim + plan.d_dim)
            if current and used + size > _HOST_FLOATS:
                flush()
            current.append((plan, 0, plan.d_dim))
            used += size
            continue
        per_channel = n * plan.a_dim
        lo = 0
        while lo < plan.d_dim:
            width = min(plan.d_dim - lo, (_HOST_FLOATS - used) // per_channel)
            if width < 1:
                if current:
                    flush()
                    continue
                width = 1  # one channel over the budget: it has to go alone
            current.append((plan, lo, lo + width))
            used += per_channel * width
            lo += width
    flush()
    return passes


def _pass_chunk(items, acts: int, n: int) -> int:
    """Examples per compiled call: a pass's features and intermediates, and the model's activations
    (``acts`` floats per example, the factored layers' inputs and outputs), near 2^25 floats."""
    per_example = 0
    for plan, lo, hi in items:
        per_example += plan.positions * (plan.a_dim + plan.d_dim) + plan.a_dim * (hi - lo)
    return _grads.factor_chunk_size(per_example + 3 * acts, n)


def _fill_chunks(fn: Callable, params, x: np.ndarray, y: np.ndarray, chunk: int,
                 progress: bool) -> dict[str, np.ndarray]:
    """Like :func:`grads.map_chunks`, but writes each chunk into preallocated host arrays,
    so a pass never holds its features twice (the budget is the features themselves)."""
    n = x.shape[0]
    out: dict[str, np.ndarray] = {}
    starts = range(0, n, chunk)
    if progress and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="activations and errors", unit="chunk", leave=False)
    for start in starts:
        stop = min(start + chunk, n)
        xb, yb = x[start:stop], y[start:stop]
        if stop - start < chunk:
            pad = chunk - (stop - start)
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, axis=0)])
        for key, value in fn(params, xb, yb).items():
            if key not in out:
                out[key] = np.empty((n, *value.shape[1:]), np.float32)
            out[key][start:stop] = np.asarray(value)[: stop - start]
    return out


def layer_grams(task: Task, x, y, *, layers: Sequence[str] | None = None, chunk_size: int | None = None,
                progress: bool = False) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Gram matrices of per-example gradients, ``{layer: (N, N) float64}``, and how each was formed.

    K_ij = <g_l(x_i, y_i), g_l(x_j, y_j)>. Sources: ``"activations/errors"``
    (Linen Dense/Conv, exact up to float32 rounding, no per-example gradient
    formed), ``"exact"`` (per-example gradients, layers that fit in memory),
    ``"sketch"`` (count-sketched gradients, width 4096; unbiased but noisy), used for
    layers with no factored Gram whose gradients for all N examples would exceed
    2^29 floats (e.g. the 512-channel convolutions of vgg16 at N >= 512).
    """
    x, y = task.check_inputs(x, y)
    n = x.shape[0]
    sel = task.select(layers)
    plans = []
    for layer, plan in zip(sel, linear_plans(task, sel, x, y)):
        if plan is not None and plan.route == "outer" and n * layer.size > _OUTER_FLOATS:
            plan = _Plan(layer, "sketch")
        if plan is None:
            plan = _Plan(layer, "exact" if n * layer.size <= _HOST_FLOATS else "sketch")
        plans.append(plan)
    grams: dict[str, np.ndarray] = {}
    factored_plans = [p for p in plans if p.source == "activations/errors"]
    if factored_plans:
        acts = sum(s.floats for s in _grads.layer_shapes(task, task.layers, x, y).values() if s.factored)
    for items in _passes(factored_plans, n):
        fn = _features_fn(task, items)
        chunk = _grads._check_chunk(chunk_size, n) if chunk_size else _pass_chunk(items, acts, n)
        feats = _fill_chunks(fn, task.params, x, y, chunk, progress)
        _grads.check_finite(feats, "activation or error")
        factored = [plan for plan, _, _ in items if plan.route == "factored"]  # whole layers, one pass each
        if factored:
            grams.update(_factored_grams(task, factored, [feats.pop(f"a/{p.layer.name}") for p in factored],
                                         [feats.pop(f"d/{p.layer.name}") for p in factored]))
        for plan, lo, _ in items:
            if plan.route == "outer":
                name = plan.layer.name
                k = _gram_np(feats.pop(f"g/{name}/{lo}"))
                grams[name] = grams[name] + k if name in grams else k
    exact = [p.layer.name for p in plans if p.source == "exact"]
    if exact:
        g = _grads.layer_grads(task, x, y, layers=exact, chunk_size=chunk_size, progress=progress)
        for name in exact:
            grams[name] = _gram_np(g.pop(name))
    sketched = [p.layer.name for p in plans if p.source == "sketch"]
    if sketched:
        g = _grads.sketch_grads(task, x, y, dim=_SKETCH_DIM, layers=sketched, chunk_size=chunk_size,
                                progress=progress)
        for name in sketched:
            grams[name] = _gram_np(g.pop(name))
    return {p.layer.name: grams[p.layer.name] for p in plans}, {p.layer.name: p.source for p in plans}


# ---------------------------------------------------------------- the measure

def balanced_groups(z, *, seed: int = 0, max_per_group: int | None = None,
                    strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a balanced subsample: ``(index (2n,), group (2n,))``, n examples of each z value.

    z must take exactly two values; the smaller value is group 0. Examples are
    paired at random across the groups (within each stratum when ``strata``
    is given, so both groups get the same strata counts); n is the number of
    pairs, at most ``max_per_group`` (a seeded random subset of the pairs).
    """
    z = np.asarray(z)
    if z.ndim != 1:
        raise InputError(f"latent attribute z must be one value per example (N,), got shape {z.shape}")
    if not (np.issubdtype(z.dtype, np.integer) or z.dtype == bool):
        raise InputError(f"latent attribute z must hold integer classes, got dtype {z.dtype}")
    values = np.unique(z)
    if values.size != 2:
        raise InputError(
            f"subspace distance compares two groups, but z takes {values.size} value(s) "
            f"({values[:10].tolist()}); pass a binary latent attribute"
        )
    if max_per_group is not None and (not isinstance(max_per_group, (int, np.integer)) or max_per_group < 2):
        raise InputError(f"max_per_group must be an integer >= 2, got {max_per_group!r}")
    strata = np.zeros(z.shape, np.int64) if strata is None else np.asarray(strata)
    rng = np.random.default_rng(seed)
    pairs = []
    for s in np.unique(strata):
        m0 = rng.permutation(np.flatnonzero((strata == s) & (z == values[0])))
        m1 = rng.permutation(np.flatnonzero((strata == s) & (z == values[1])))
        c = min(m0.size, m1.size)
        pairs.append(np.stack([m0[:c], m1[:c]], axis=1))
    pairs = np.concatenate(pairs)
    if max_per_group is not None and pairs.shape[0] > max_per_group:
        pairs = pairs[np.sort(rng.choice(pairs.shape[0], int(max_per_group), replace=False))]
    n = pairs.shape[0]
    if n < 2:
        raise InputError(
            f"each group of z needs at least 2 examples (matched within task labels when stratified); got {n}"
        )
    return np.concatenate([np.sort(pairs[:, 0]), np.sort(pairs[:, 1])]), np.repeat(np.array([0, 1]), n)


def with_verdicts(scores: dict[str, Score], nulls: dict[str, np.ndarray], alpha: float = 0.05) -> dict[str, Score]:
    """Family-wise verdicts over layers by the Westfall-Young single-step max-T permutation procedure.

    ``nulls[l]`` holds layer l's null distances under the SAME R shuffles of
    z for every layer; :func:`jaxleak.scores.max_t` standardises each layer
    over its R + 1 distances and gives

        p_adjusted_l = (1 + #{r: M_r >= t_l}) / (R + 1),

    which controls the family-wise error rate over the layers at any number
    of layers for a fixed R (the smallest p is 1 / (R + 1) whatever L is).
    ``detected``: p_adjusted < alpha. ``detectable``: the excess with 80%
    power, (c + z_0.8) sd_l, where c is the permutation critical value of
    max-T (None when R is too small for any rejection). Ties: a detected
    layer is tied with the top layer (the detected layer with the largest
    excess) when their excess difference lies inside the 95% range of the
    same permutations' centred differences.
    """
    from scipy.stats import norm

    from jaxleak.scores import max_t

    names = list(scores)
    mean = {n: scores[n].extras.get("null_mean", math.nan) for n in names}
    sd = {n: scores[n].extras.get("null_sd", math.nan) for n in names}
    ok = [n for n in names if math.isfinite(scores[n].extras.get("excess", math.nan)) and sd[n] > 0]
    p_adjusted, critical = max_t({n: scores[n].extras["excess"] + mean[n] for n in ok}, nulls, alpha)
    z_power = float(norm.isf(0.2))
    out = {}
    for name in names:
        s = scores[name]
        extras = {**s.extras, "p_adjusted": None, "detected": False, "detectable": None}
        if name in p_adjusted:
            extras.update(p_adjusted=p_adjusted[name], detected=bool(p_adjusted[name] < alpha),
                          detectable=(critical + z_power) * sd[name] if math.isfinite(critical) else None)
        out[name] = Score(s.value, s.ci, extras)
    detected = [n for n in names if out[n].extras["detected"]]
    top = max(detected, key=lambda n: out[n].extras["excess"]) if detected else None
    for name in names:
        extras = dict(out[name].extras)
        if top is None or name == top or not extras["detected"]:
            extras["vs_top"], extras["tied_with_top"] = None, (None if top is None or name == top else False)
        else:
            centred = ((np.asarray(nulls[top], np.float64) - mean[top])
                       - (np.asarray(nulls[name], np.float64) - mean[name]))
            centred = centred[np.isfinite(centred)]
            low, high = np.quantile(centred, [0.025, 0.975])
            diff = out[top].extras["excess"] - extras["excess"]
            extras["vs_top"] = {"top": top, "difference": float(diff), "null_range": [float(low), float(high)]}
            extras["tied_with_top"] = bool(diff <= high)
        out[name] = Score(out[name].value, out[name].ci, extras)
    return out


def cannot_reject(permutations: int, alpha: float = 0.05) -> str | None:
    """Why the permutation test cannot reject for any layer, or None."""
    if (permutations + 1) * alpha > 1:
        return None
    return (f"with {permutations} permutations no p-value is below {1 / (permutations + 1):.3g}, so no layer can "
            f"reach {alpha}; use at least {int(math.ceil(1 / alpha))} permutations")


def verdict_meta(permutations: int) -> dict:
    """The subspace test's description in a measure's meta."""
    return {
        "signal": "excess = D_l - permutation null mean",
        "permutations": int(permutations),
        "p_value": "(1 + #{null >= D_l}) / (R + 1), per layer, unadjusted",
        "p_adjusted": "Westfall-Young single-step max-T over layers with the same R shuffles of z for every layer",
        "detected": "p_adjusted below 0.05: family-wise error rate 0.05 over the layers",
        "detectable_what": "an excess distance",
        "ties": "a detected layer is tied with the top layer when their excess difference lies inside the 95% range "
                "of the permutations' centred differences",
        "cannot_reject": cannot_reject(int(permutations)),
    }


def subspace_distance(task: Task, x, y, z, *, energy: float = 0.9, rank: int | None = None,
                      permutations: int = defaults.PERMUTATIONS, seed: int = 0,
                      layers: Sequence[str] | None = None,
                      progress: bool = False, max_per_group: int | None = None,
                      stratify: bool = True) -> LayerScores:
    """Per-layer subspace distance between the gradients of z = 0 and z = 1 (latent information).

    Args:
      task: the model.
      x, y: examples (N, H, W, C) and task labels (N,).
      z: binary latent attribute (N,).
      energy: default k is the smallest rank keeping this fraction of each
        group's gradient energy (capped at n // 2).
      rank: a fixed k instead (capped at n // 2 and the Grams' ranks).
      permutations: R, shuffles of z for the null.
      seed: seeds the balanced subsample and the shuffles.
      max_per_group: at most this many examples per group.
      stratify: match the groups within each task label y (same class counts
        in both) and shuffle z within each label for the null. The null then
        has exactly the observed groups' composition, and the excess is what
        the gradients tell about z beyond y. Needs both z values within
        labels; ``False`` balances and shuffles over all examples.

    Returns:
      :class:`LayerScores` ``'subspace_distance'``: ``value`` = D_l in [0, 1];
      extras ``null_mean``, ``null_sd``, ``excess`` (D_l - null mean: the
      leakage signal), ``p_value``, ``p_adjusted`` (max-T over layers),
      ``detected`` (p_adjusted < 0.05), ``detectable``, ``tied_with_top``
      (see :func:`with_verdicts`), ``k``, ``n_per_group`` and ``gram_source``.
    """
    if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise InputError(f"energy must be in (0, 1], got {energy!r}")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank < 1):
        raise InputError(f"rank must be a positive integer, got {rank!r}")
    if not isinstance(permutations, (int, np.integer)) or permutations < 2:
        raise InputError(f"permutations must be an integer >= 2 (the null needs a mean and a spread), "
                         f"got {permutations!r}")
    x, y = task.check_inputs(x, y)
    z = np.asarray(z)
    if z.shape != (x.shape[0],):
        raise InputError(f"latent attribute z has shape {z.shape}; expected ({x.shape[0]},) to match 'x'")
    index, group = balanced_groups(z, seed=seed, max_per_group=max_per_group, strata=y if stratify else None)
    grams, sources = layer_grams(task, x[index], y[index], layers=layers, progress=progress)
    scores, nulls = {}, {}
    for name, gram in grams.items():
        # the same shuffles for every layer (the max-T procedure compares layers permutation by permutation)
        res = subspace_distance_from_grams(gram, group, energy=energy, rank=rank, permutations=permutations,
                                           seed=seed * 1000003, strata=y[index] if stratify else None)
        value = res.pop("value")
        nulls[name] = np.asarray(res.pop("null"), np.float64)
        res["gram_source"] = sources[name]
        scores[name] = Score(value, None, res)
    meta = {
        "definition": "D_l = sqrt(mean_i sin^2 theta_i), principal angles between the top-k gradient subspaces",
        "energy": energy if rank is None else None,
        "rank": rank,
        "permutations": int(permutations),
        "stratified_by_label": bool(stratify),
        "seed": int(seed),
        **verdict_meta(int(permutations)),
    }
    return LayerScores("subspace_distance", with_verdicts(scores, nulls), unit="dimensionless", meta=meta,
                       rank_by="excess")
