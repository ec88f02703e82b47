"""Defences against gradient leakage (docs/method.md section 8), as pure functions on per-layer gradients.

Gradients are dicts ``{layer: (N, P_l)}``: rows are per-example gradients
(:func:`jaxleak.grads.layer_grads`) or shared updates
(``client_updates(...).updates``). Every transform is a pure ``jax.numpy``
function, usable under ``jit``/``vmap`` and inside training steps:

- :func:`clip_rows`: per-row clipping to L2 norm C, over all layers
  together (DP-SGD, Abadi et al. 2016) or per layer at C / sqrt(L) (the
  total norm is then also at most C);
- :func:`add_noise`: Gaussian noise; :func:`dp_aggregate`: clip, sum, add
  N(0, (sigma C)^2) per coordinate, divide by the batch size;
- :func:`prune`: keep exactly the k = max(1, round(p P_l)) largest
  magnitudes of each row of each layer (gradient pruning, Zhu et al. 2019);
- :func:`sign`: signSGD; :func:`quantize`: k-bit symmetric uniform
  quantisation (QSGD-style, 2^k - 1 levels per row and layer, scale = the
  row's max magnitude), deterministic or unbiased stochastic rounding.

A defence *configuration* is one of the frozen dataclasses :class:`DP`,
:class:`Prune`, :class:`Sign`, :class:`Quantize`, :class:`Dropout` (a model
option: ``models.get(..., dropout=p)``; gradients are unchanged). Helpers
apply one to rows (:func:`defended_updates`), to client updates with B
examples and K local steps (:func:`defended_client_updates`, DP-SGD inside
each local step) and to a training batch (:func:`batch_gradient_fn`). When
noise is added they report its standard deviation per layer, which the
noise-normalised sensitivity (docs/method.md section 4) divides by.

:func:`dp_epsilon` gives the (epsilon, delta) guarantee of a DP-SGD
configuration with Google's ``dp_accounting`` (RDP or PLD accountant).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Mapping, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.errors import InputError, UnknownNameError
from jaxleak.grads import (TRACE_COUNTS, check_finite, client_batches, map_chunks, mean_loss_grad,
                           per_example_grad_fn)
from jaxleak.task import Layer, Task

Grads = Mapping[str, jax.Array]


# ---------------------------------------------------------------- pure transforms

def row_norms(grads: Grads) -> jax.Array:
    """L2 norm of each row over all layers together: {layer: (N, P_l)} -> (N,)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g), axis=-1) for g in grads.values()))


def clip_rows(grads: Grads, clip_norm: float, *, per_layer: bool = False) -> dict[str, jax.Array]:
    """Scale each row to L2 norm at most ``clip_norm`` (rows below it are unchanged).

    ``per_layer=False``: g_i <- g_i min(1, C / ||g_i||) with the norm over all
    layers (DP-SGD). ``per_layer=True``: each layer's row is clipped to
    C / sqrt(L) on its own, so the norm over all L layers is still <= C.
    """
    if per_layer:
        c = clip_norm / math.sqrt(len(grads))
        return {name: g * jnp.minimum(1.0, c / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-30))
                for name, g in grads.items()}
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(row_norms(grads), 1e-30))[..., None]
    return {name: g * factor for name, g in grads.items()}


def add_noise(grads: Grads, std: float, key: jax.Array) -> dict[str, jax.Array]:
    """Add independent N(0, std^2) to every coordinate (one key per layer, folded from ``key``)."""
    return {name: g + std * jax.random.normal(jax.random.fold_in(key, i), g.shape, g.dtype)
            for i, (name, g) in enumerate(grads.items())}


def dp_aggregate(grads: Grads, key: jax.Array, *, clip_norm: float, noise_multiplier: float,
                 per_layer: bool = False, mean: bool = True) -> dict[str, jax.Array]:
    """DP-SGD aggregate of a batch: (sum_i clip(g_i) + N(0, (sigma C)^2 I)) / N.

    ``grads`` {layer: (N, P_l)} holds the N per-example gradients of one
    batch; returns {layer: (P_l,)}. With ``mean=False`` the noisy sum is
    returned. The noise std on the mean is sigma C / N per coordinate.
    """
    n = next(iter(grads.values())).shape[0]
    total = {name: jnp.sum(g, axis=0) for name, g in clip_rows(grads, clip_norm, per_layer=per_layer).items()}
    noisy = add_noise(total, noise_multiplier * clip_norm, key)
    return {name: v / n for name, v in noisy.items()} if mean else noisy


def keep_count(size: int, fraction: float) -> int:
    """Entries kept by :func:`prune` in a layer of ``size``: max(1, round(fraction * size))."""
    return max(1, min(int(size), int(round(fraction * size))))


def prune(grads: Grads, fraction: float) -> dict[str, jax.Array]:
    """Keep the ``fraction`` largest-magnitude entries of each row of each layer, zero the rest.

    Exactly :func:`keep_count` entries survive per row and layer (ties are
    broken towards the lower index, as ``jax.lax.top_k`` does).
    """
    out = {}
    for name, g in grads.items():
        k = keep_count(g.shape[-1], fraction)
        _, idx = jax.lax.top_k(jnp.abs(g), k)
        mask = jnp.zeros(g.shape, bool)
        mask = jnp.put_along_axis(mask, idx, True, axis=-1, inplace=False)
        out[name] = jnp.where(mask, g, 0.0)
    return out


def sign(grads: Grads) -> dict[str, jax.Array]:
    """Element-wise sign (signSGD): values in {-1, 0, 1}."""
    return {name: jnp.sign(g) for name, g in grads.items()}


def quantize(grads: Grads, bits: int, key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Symmetric uniform quantisation to ``bits`` bits per entry, per row and layer.

    With L = 2^(bits-1) - 1 and m the row's max |g|, every entry becomes
    m * j / L for an integer j in [-L, L] (2^bits - 1 levels, zero exact).
    Deterministic rounding to the nearest level when ``key`` is None (error
    at most m / (2L)); otherwise stochastic rounding, which is unbiased:
    E[q(g)] = g.
    """
    levels = 2 ** (bits - 1) - 1
    out = {}
    for i, (name, g) in enumerate(grads.items()):
        m = jnp.max(jnp.abs(g), axis=-1, keepdims=True)
        scaled = jnp.abs(g) / jnp.maximum(m, 1e-30) * levels
        if key is None:
            j = jnp.round(scaled)
        else:
            j = jnp.floor(scaled + jax.random.uniform(jax.random.fold_in(key, i), g.shape, g.dtype))
        out[name] = jnp.sign(g) * jnp.minimum(j, levels) * m / levels
    return out


# ---------------------------------------------------------------- configurations

def _check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise InputError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DP:
    """Per-example clipping at ``clip_norm`` plus Gaussian noise of std ``noise_multiplier * clip_norm``."""

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    per_layer: bool = False
    name = "dp"

    def __post_init__(self):
        _check_positive("clip_norm", self.clip_norm)
        _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)

    def noise_std(self, batch_size: int = 1, local_steps: int = 1) -> float:
        """Std of the noise per coordinate of a shared update: sigma C / (B sqrt(K))."""
        return self.noise_multiplier * self.clip_norm / (batch_size * math.sqrt(local_steps))


@dataclasses.dataclass(frozen=True)
class Prune:
    """Keep the top ``fraction`` of magnitudes of each layer (0 < fraction <= 1)."""

    fraction: float = 0.1
    name = "prune"

    def __post_init__(self):
        _check_positive("fraction", self.fraction)
        if self.fraction > 1:
            raise InputError(f"prune fraction must be in (0, 1], got {self.fraction}")


@dataclasses.dataclass(frozen=True)
class Sign:
    """Share only the signs of the update."""

    name = "sign"


@dataclasses.dataclass(frozen=True)
class Quantize:
    """``bits``-bit symmetric quantisation (bits >= 2), stochastic rounding if ``stochastic``."""

    bits: int = 4
    stochastic: bool = False
    name = "quantize"

    def __post_init__(self):
        if not isinstance(self.bits, (int, np.integer)) or isinstance(self.bits, bool) or not 2 <= self.bits <= 32:
            raise InputError(f"quantize bits must be an integer in [2, 32] (use Sign for 1 bit), got {self.bits!r}")


@dataclasses.dataclass(frozen=True)
class Dropout:
    """Dropout at ``rate`` in the model (a model option; gradients are not transformed)."""

    rate: float = 0.5
    name = "dropout"

    def __post_init__(self):
        _check_positive("rate", self.rate, allow_zero=True)
        if self.rate >= 1:
            raise InputError(f"dropout rate must be in [0, 1), got {self.rate}")


Defense = Union[DP, Prune, Sign, Quantize, Dropout]
_KINDS = {"dp": DP, "prune": Prune, "sign": Sign, "quantize": Quantize, "dropout": Dropout}


def names() -> list[str]:
    """Names accepted by :func:`make`."""
    return list(_KINDS)


def make(name: str, **params) -> Defense:
    """A defence by name: ``make("dp", clip_norm=1.0, noise_multiplier=0.5)``, ``make("prune", fraction=0.1)``."""
    if name not in _KINDS:
        raise UnknownNameError(f"unknown defence {name!r}; choose one of {names()}")
    fields = {f.name for f in dataclasses.fields(_KINDS[name])}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise InputError(f"defence {name!r} has no option(s) {unknown}; its options are {sorted(fields)}")
    return _KINDS[name](**params)


def to_dict(defense: Defense | None) -> dict:
    """``{"name": ..., options...}`` for results.json; ``{"name": "none"}`` for None."""
    if defense is None:
        return {"name": "none"}
    return {"name": defense.name, **dataclasses.asdict(defense)}


def model_options(defense: Defense | None) -> dict:
    """Options for ``models.get`` / ``Task.init`` that the defence needs (dropout only)."""
    return {"dropout": defense.rate} if isinstance(defense, Dropout) else {}


def _check_defense(defense) -> None:
    if defense is not None and not isinstance(defense, (DP, Prune, Sign, Quantize, Dropout)):
        raise InputError(f"defense must be None or one of DP, Prune, Sign, Quantize, Dropout; got {defense!r}")


def apply(defense: Defense | None, grads: Grads, key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Apply a defence to each row of ``grads`` {layer: (N, P_l)} as one shared update.

    DP clips each row at C and adds N(0, (sigma C)^2) (a row is a batch of
    one: per-example DP for per-example gradients, per-client DP for client
    updates); ``key`` is required for DP and stochastic quantisation.
    Dropout and None return the rows unchanged. Pure; jit it with the
    defence static.
    """
    _check_defense(defense)
    if defense is None or isinstance(defense, Dropout):
        return dict(grads)
    if isinstance(defense, DP):
        if key is None:
            raise InputError("the DP defence adds noise and needs a key")
        return add_noise(clip_rows(grads, defense.clip_norm, per_layer=defense.per_layer),
                         defense.noise_multiplier * defense.clip_norm, key)
    if isinstance(defense, Prune):
        return prune(grads, defense.fraction)
    if isinstance(defense, Sign):
        return sign(grads)
    if defense.stochastic and key is None:
        raise InputError("stochastic quantisation needs a key")
    return quantize(grads, defense.bits, key if defense.stochastic else None)


# ---------------------------------------------------------------- host-level helpers

class DefendedUpdates(NamedTuple):
    """Defended updates ``{layer: (N, P_l)}`` and the noise std per layer (None without noise)."""

    updates: dict[str, np.ndarray]
    noise_std: dict[str, float] | None


_ROW_FNS: dict = {}


def _row_fn(defense: Defense | None) -> Callable:
    if defense not in _ROW_FNS:
        def fn(key, index, names, *rows):
            TRACE_COUNTS[("defended_updates", defense)] += 1
            grads = dict(zip(names, rows))
            # one key per row, so the noise does not depend on the chunking
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
            one = lambda k, g: apply(defense, {n: v[None] for n, v in g.items()}, k)
            out = jax.vmap(one)(keys, grads)
            return {n: v[:, 0] for n, v in out.items()}

        _ROW_FNS[defense] = jax.jit(fn, static_argnums=2)
    return _ROW_FNS[defense]


def defended_updates(updates: Mapping[str, np.ndarray], defense: Defense | None, *, seed: int = 0,
                     chunk_size: int = 256) -> DefendedUpdates:
    """Apply ``defense`` to every row of ``updates`` {layer: (N, P_l)} (see :func:`apply`).

    Rows are processed ``chunk_size`` at a time in one compiled function;
    the noise of row i depends only on ``seed`` and i. For DP pass every
    layer of the model, since the clipping norm is taken over the layers
    given. Returns the defended rows and, for DP, the per-layer noise std
    sigma C (None otherwise).
    """
    _check_defense(defense)
    if not isinstance(updates, Mapping) or not updates:
        raise InputError("updates must be a non-empty dict {layer: (N, P_l) array}")
    names = tuple(updates)
    arrays = [np.asarray(updates[n], np.float32) for n in names]
    n = arrays[0].shape[0]
    for name, a in zip(names, arrays):
        if a.ndim != 2 or a.shape[0] != n:
            raise InputError(f"updates[{name!r}] has shape {a.shape}; expected ({n}, P_l) like the other layers")
    check_finite(dict(zip(names, arrays)), "update")
    fn = _row_fn(defense)
    key = jax.random.key(seed)
    chunk = int(max(1, min(chunk_size, n)))
    out = map_chunks(lambda index, *rows: fn(key, index, names, *rows), [np.arange(n, dtype=np.int32), *arrays],
                     chunk)
    std = {name: defense.noise_std() for name in names} if isinstance(defense, DP) else None
    return DefendedUpdates({name: out[name] for name in names}, std)


def _unflatten(task: Task, flat: Mapping[str, jax.Array], template) -> object:
    """Inverse of ``task.flatten`` for all layers: {layer: (P_l,)} -> parameter tree."""
    leaves = list(jax.tree.leaves(template))
    for layer in task.layers:
        offset = 0
        for i, shape in zip(layer.leaves, layer.shapes):
            size = int(np.prod(shape, dtype=np.int64))
            leaves[i] = flat[layer.name][offset:offset + size].reshape(shape)
            offset += size
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def batch_gradient_fn(task: Task, defense: Defense | None) -> Callable:
    """Pure ``(params, x (B, ...), y (B,), key) -> gradient tree`` of one defended training step.

    No defence / Dropout: the mean gradient. DP: :func:`dp_aggregate` over
    the per-example gradients (DP-SGD). Prune / Sign / Quantize: the mean
    gradient transformed per layer (what a client would share). Dropout
    itself lives in the model; the caller decides whether to use
    ``task.train_apply_fn``.
    """
    _check_defense(defense)
    grad_mean = mean_loss_grad(task.loss)
    per_example_grads = per_example_grad_fn(task, task.layers)

    def fn(params, x, y, key):
        if defense is None or isinstance(defense, Dropout):
            return grad_mean(params, x, y)
        if isinstance(defense, DP):
            flat = dp_aggregate(per_example_grads(params, x, y), key, clip_norm=defense.clip_norm,
                                noise_multiplier=defense.noise_multiplier, per_layer=defense.per_layer)
        else:
            mean = {n: v[None] for n, v in task.flatten(grad_mean(params, x, y)).items()}
            flat = {n: v[0] for n, v in apply(defense, mean, key).items()}
        return _unflatten(task, flat, params)

    return fn


def _compiled_client_updates(task: Task, layers: Sequence[Layer], defense: Defense | None,
                             local_steps: int) -> Callable:
    key = ("defended_client_updates", tuple(layer.name for layer in layers), defense, local_steps)

    def build():
        step_grad = batch_gradient_fn(task, defense if isinstance(defense, DP) else None)

        def one_update(params, lr, rng, xb, yb):
            def step(carry, k):
                p, acc = carry
                g = step_grad(p, xb, yb, jax.random.fold_in(rng, k))
                p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
                return (p, jax.tree.map(jnp.add, acc, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (_, total), _ = jax.lax.scan(step, (params, zeros), jnp.arange(local_steps))
            u = task.flatten(jax.tree.map(lambda t: t / local_steps, total))
            if not isinstance(defense, DP):
                u = {n: v[0] for n, v in apply(defense, {n: v[None] for n, v in u.items()},
                                              jax.random.fold_in(rng, local_steps)).items()}
            return {layer.name: u[layer.name] for layer in layers}

        def traced(params, lr, keys, xb, yb):
            TRACE_COUNTS[key] += 1
            return jax.vmap(one_update, in_axes=(None, None, 0, 0, 0))(params, lr, keys, xb, yb)

        return jax.jit(traced)

    return task.cached(key, build)


def defended_client_updates(task: Task, x, y, defense: Defense | None, *, batch_size: int, local_steps: int = 1,
                            lr: float = 0.1, num_updates: int, seed: int = 0, chunk_size: int | None = None,
                            layers: Sequence[str] | None = None) -> tuple[object, dict[str, float] | None]:
    """Client updates u(S) = (W0 - W_K) / (K lr) under a defence: ``(ClientUpdates, noise_std)``.

    Batches are those of :func:`jaxleak.grads.client_batches` (victim at
    index 0), so without a defence the result equals
    :func:`jaxleak.grads.client_updates`. DP runs DP-SGD in each local step
    (per-example clipping over all layers, noise sigma C on the sum, divided
    by B); the noise std per coordinate of u from the K independent noise
    draws is sigma C / (B sqrt(K)), returned per layer. Prune / Sign /
    Quantize transform the final shared update; Dropout and None return
    plain updates (dropout lives in the model). ``noise_std`` is None
    without noise.
    """
    from jaxleak.grads import ClientUpdates, check_local_sgd

    _check_defense(defense)
    x, y = task.check_inputs(x, y)
    check_local_sgd(local_steps, lr)
    sel = task.select(layers)
    batches = client_batches(x.shape[0], batch_size=batch_size, num_updates=num_updates, seed=seed)
    chunk = int(chunk_size) if chunk_size else int(max(1, min(num_updates, 64)))
    fn = _compiled_client_updates(task, sel, defense, int(local_steps))
    keys = jax.random.split(jax.random.key(seed + 1), num_updates)
    index = np.arange(num_updates)
    lr32 = jnp.float32(lr)
    out = map_chunks(lambda i, xb, yb: fn(task.params, lr32, keys[i], xb, yb), [index, x[batches], y[batches]],
                     chunk)
    check_finite(out, "client update")
    std = None
    if isinstance(defense, DP):
        std = {layer.name: defense.noise_std(batch_size, local_steps) for layer in sel}
    return ClientUpdates({layer.name: out[layer.name] for layer in sel}, batches[:, 0].copy()), std


# ---------------------------------------------------------------- accounting

def dp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
               accountant: str = "rdp") -> float:
    """Epsilon of DP-SGD with Poisson sampling at ``sampling_rate`` for ``steps`` steps, at ``delta``.

    Composes ``steps`` Poisson-subsampled Gaussian mechanisms with noise
    multiplier sigma (add-or-remove-one neighbouring relation) in
    ``dp_accounting``'s RDP accountant (default) or PLD accountant
    (``accountant="pld"``, tighter). Training with shuffled fixed-size
    batches is commonly reported with sampling_rate = B / N, as here.
    Returns +inf for sigma = 0 and 0 for zero steps.
    """
    from dp_accounting import dp_event, pld, rdp

    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    if not (isinstance(sampling_rate, (int, float, np.floating)) and 0 < sampling_rate <= 1):
        raise InputError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InputError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(delta, (int, float, np.floating)) and 0 < delta < 1):
        raise InputError(f"delta must be in (0, 1), got {delta!r}")
    if accountant not in ("rdp", "pld"):
        raise InputError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    event = dp_event.PoissonSampledDpEvent(float(sampling_rate), dp_event.GaussianDpEvent(float(noise_multiplier)))
    # The RDP accountant warns (through absl) for each order whose series does not converge and leaves that
    # order out of the minimum over orders: expected for small noise multipliers, not the user's concern.
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        acc.compose(event, int(steps))
        return float(acc.get_epsilon(float(delta)))
    finally:
        log.setLevel(level)
