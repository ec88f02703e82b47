"""Reconstruction attacks by gradient matching: DLG and Inverting Gradients.

The attacker observes a shared update ``u`` (per layer, docs/method.md section 1),
knows the model and its parameters, and optimises a dummy batch x' (and
dummy labels when the labels are unknown) until the update it would produce
matches ``u`` (docs/method.md section 6):

- ``"dlg"``, Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019):
  L2 matching, ``sum_l w_l ||u'_l - u_l||^2``; x' unconstrained during the
  optimisation (the result is clipped to [0, 1]).
- ``"ig"``, Inverting Gradients (Geiping, Bauermeister, Droege, Moeller,
  NeurIPS 2020): cosine distance over the matched layers concatenated,
  ``1 - <u', u>_w / (||u'||_w ||u||_w)``, plus ``tv`` times the total
  variation of x'; signed gradients, x' projected onto [0, 1] after every
  step.

Both use Adam with the learning rate divided by 10 at 3/8, 5/8 and 7/8 of
the steps (Geiping et al.'s schedule). ``w_l`` is 1 for the matched layers;
per-layer attacks (:func:`invert_layers`) run one one-hot ``w`` per layer.

Labels: given; recovered from the last layer's bias gradient for B = 1
(iDLG, Zhao, Mopuri, Bilen 2020: for softmax cross-entropy the bias gradient
is ``softmax(logits) - onehot(y)``, whose only negative entry is at y, so
the rule is exact; it stays exact for the mean over K local steps); or
optimised jointly as soft labels (DLG), which is the default for B > 1.

Restarts, victims (and layers for per-layer attacks) run in parallel in one
jitted ``lax.scan`` over steps: the dummy batches of all runs are stacked
and their updates come from one batched per-example gradient computation
(see :func:`_build`). The best restart is the one with the lowest final
matching loss; the ground truth is never consulted. :func:`score` compares reconstructions with originals (MSE,
PSNR, SSIM), matching them by the Hungarian assignment when B > 1.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from jaxleak import compilation
from jaxleak import metrics
from jaxleak.errors import InputError, NonFiniteError
from jaxleak.grads import (TRACE_COUNTS, OuterFactors, canonical_convs, chunk_limits, local_sgd_update,
                           per_example_grad_fn)
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Layer, Task

METHODS = ("ig", "dlg")

# Defaults per method: Adam learning rate, total-variation weight, signed
# gradients, projection onto [0, 1] during the optimisation.
_DEFAULTS = {
    "ig": {"lr": 0.1, "tv": 1e-4, "signed": True, "box": True},
    "dlg": {"lr": 0.1, "tv": 0.0, "signed": False, "box": False},
}
DEFAULT_STEPS = 1000
# Convolutions in the attack, and per-example conv kernel gradients, whose
# patch matrix has at most this many floats run as one matrix product
# (jaxleak.grads.canonical_convs and per_example_grad_fn).
_PATCH_FLOATS = 2 ** 20


class InversionResult(NamedTuple):
    """Reconstructions of V victims' batches.

    Attributes:
      x: (V, B, H, W, C) reconstruction from the best restart, in [0, 1].
      labels: (V, B) integer labels used: given, recovered, or the argmax of
        the optimised soft labels (see ``label_source``).
      label_source: ``"given"``, ``"recovered"`` or ``"optimized"``.
      loss: (V,) gradient-matching loss (without the TV term) of the chosen
        restart at its final x.
      restart_losses: (V, R) final matching loss of every restart.
      best_restart: (V,) index of the chosen restart (lowest matching loss).
      trace: (V, R, steps) matching loss before each step.
      method: ``"ig"`` or ``"dlg"``.
      layers: names of the matched layers.
      config: the settings used (steps, lr, tv, restarts, batch size, ...).
    """

    x: np.ndarray
    labels: np.ndarray
    label_source: str
    loss: np.ndarray
    restart_losses: np.ndarray
    best_restart: np.ndarray
    trace: np.ndarray
    method: str
    layers: tuple[str, ...]
    config: dict


class ReconstructionScores(NamedTuple):
    """Image metrics of reconstructions against originals, per victim and batch member.

    Attributes:
      mse, psnr, ssim: (V, B) per original image (PSNR in dB, data range 1).
      assignment: (V, B) index of the reconstruction matched to original i
        (the Hungarian assignment minimising total MSE; identity for B = 1).
    """

    mse: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    assignment: np.ndarray

    def summary(self) -> dict[str, float]:
        """Means over all images: MSE, PSNR (dB, mean of per-image values) and SSIM."""
        return {"mse": float(np.mean(self.mse)), "psnr": float(np.mean(self.psnr)),
                "ssim": float(np.mean(self.ssim))}


# ---------------------------------------------------------------- inputs

def _as_update_batch(task: Task, target_update: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """{layer: (P_l,) or (V, P_l)} -> ({layer: (V, P_l)} float32, whether it was batched)."""
    if not isinstance(target_update, Mapping) or not target_update:
        raise InputError("target_update must be a non-empty dict {layer name: gradient vector (P_l,) or (V, P_l)}")
    out, batched, victims = {}, None, None
    for name, value in target_update.items():
        layer = task.layer(name)
        a = np.asarray(value, dtype=np.float32)
        if a.ndim not in (1, 2) or a.shape[-1] != layer.size:
            sketched = a.ndim in (1, 2) and a.shape[-1] < layer.size
            hint = " (a sketched update cannot be inverted; pass the full gradient)" if sketched else ""
            raise InputError(
                f"target_update[{name!r}] has shape {a.shape}; layer {name!r} has {layer.size} parameters, "
                f"so expected ({layer.size},) or (V, {layer.size}){hint}"
            )
        is_batched = a.ndim == 2
        if batched is not None and is_batched != batched:
            raise InputError("target_update mixes single updates (P_l,) and batches (V, P_l); use one form")
        batched = is_batched
        a = a if is_batched else a[None]
        if victims is not None and a.shape[0] != victims:
            raise InputError(f"target_update[{name!r}] has {a.shape[0]} rows, other layers have {victims}")
        victims = a.shape[0]
        if victims == 0:
            raise InputError(f"target_update[{name!r}] has no rows")
        if not np.all(np.isfinite(a)):
            raise InputError(f"target_update[{name!r}] contains NaN or infinite values")
        out[name] = a
    return out, bool(batched)


def _matched_layers(task: Task, update: Mapping[str, np.ndarray], layers: Sequence[str] | None) -> list[Layer]:
    if layers is None:
        return [layer for layer in task.layers if layer.name in update]
    if isinstance(layers, str):
        layers = [layers]
    sel = task.select(layers)
    if not sel:
        raise InputError("layers is empty; name at least one layer to match, or pass None for all")
    missing = [layer.name for layer in sel if layer.name not in update]
    if missing:
        raise InputError(f"target_update has no entry for the matched layer(s) {missing}; it has {sorted(update)}")
    return sel


def _output_bias_offset(task: Task) -> int | None:
    """Offset of the output bias inside the last layer's flat gradient, or None when it has none."""
    last = task.layers[-1]
    offset = 0
    for shape, path in zip(last.shapes, last.paths):
        if shape == (task.num_classes,) and path.split("/")[-1] == "bias":
            return offset
        offset += int(np.prod(shape, dtype=np.int64))
    return None


def _bias_offset(task: Task) -> int:
    """Offset of the output bias inside the last layer's flat gradient."""
    offset = _output_bias_offset(task)
    if offset is None:
        raise InputError(
            f"labels cannot be recovered: the last layer {task.layers[-1].name!r} of model {task.name!r} has no "
            f"output bias of shape ({task.num_classes},); pass labels=..."
        )
    return offset


def recover_labels(task: Task, target_update: Mapping[str, Any]) -> np.ndarray:
    """Labels of single-example updates from the last layer's bias gradient (iDLG rule).

    For softmax cross-entropy the bias gradient of one example is
    ``softmax(logits) - onehot(y)``: the only negative entry is at the label,
    so ``argmin`` recovers it exactly (also for the mean over local steps).
    Returns (V,) int32 for an update {layer: (V, P_l)} or (1,) for (P_l,).
    """
    update, _ = _as_update_batch(task, target_update)
    last = task.layers[-1].name
    if last not in update:
        raise InputError(f"labels cannot be recovered: target_update has no entry for the last layer {last!r}")
    offset = _bias_offset(task)
    bias = update[last][:, offset:offset + task.num_classes]
    return np.argmin(bias, axis=1).astype(np.int32)


def _labels_array(labels, victims: int, batch: int, num_classes: int) -> np.ndarray:
    a = np.asarray(labels)
    if not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"labels must be integers, got dtype {a.dtype}")
    if a.shape == (victims, batch):
        out = a
    elif a.ndim == 1 and victims == 1 and a.shape == (batch,):
        out = a[None]
    elif a.ndim == 1 and batch == 1 and a.shape == (victims,):
        out = a[:, None]
    elif a.ndim == 0 and victims == 1 and batch == 1:
        out = a.reshape(1, 1)
    else:
        raise InputError(f"labels has shape {a.shape}; expected ({victims}, {batch}) for {victims} victim(s) "
                         f"with batch_size {batch}")
    if out.min() < 0 or out.max() >= num_classes:
        raise InputError(f"labels lie in [{out.min()}, {out.max()}] but the model has {num_classes} classes")
    return out.astype(np.int32)


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _nonneg_float(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0:
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


# ---------------------------------------------------------------- the compiled attack

def _segment_length(steps: int, progress: bool) -> int:
    """Steps per jitted segment: all of them, or about 1/20 for a progress bar."""
    if not progress:
        return steps
    target = max(1, steps // 20)
    return max(d for d in range(1, target + 1) if steps % d == 0)


def total_variation(x: jax.Array) -> jax.Array:
    """Anisotropic total variation of image batches (..., B, H, W, C) -> (...).

    Mean |vertical difference| + mean |horizontal difference| over each
    batch (Geiping et al.'s TV term); a scalar for a single batch.
    """
    axes = (-4, -3, -2, -1)
    dv = jnp.mean(jnp.abs(x[..., 1:, :, :] - x[..., :-1, :, :]), axis=axes) if x.shape[-3] > 1 else 0.0
    dh = jnp.mean(jnp.abs(x[..., :, 1:, :] - x[..., :, :-1, :]), axis=axes) if x.shape[-2] > 1 else 0.0
    return dv + dh


def _soft_label_task(task: Task) -> Task:
    """The task with loss E_{c ~ q} loss(logits, c) for soft labels q (N, C); equals soft cross-entropy for CE."""
    num_classes = task.num_classes

    def soft_loss(logits, q):
        classes = jnp.arange(num_classes, dtype=jnp.int32)
        per_class = jax.vmap(lambda c: task.loss_fn(logits, jnp.full(logits.shape[:1], c)), out_axes=1)(classes)
        return jnp.sum(q * per_class, axis=1)

    return Task(task.apply_fn, task.params, task.input_shape, loss_fn=soft_loss, name=task.name,
                granularity=task.granularity, train_apply_fn=task.train_apply_fn, _layers=task.layers)


def _update_fn(task: Task, loss_task: Task, sel: Sequence[Layer], *, method: str, batch: int,
               local_steps: int) -> Callable:
    """``run_updates(params, x, y, local_lr)``: each run's dummy update, x (n, B, ...) -> {layer: (n, ...)}."""
    in_shape = task.input_shape
    if local_steps == 1:
        # IG needs only <u, t> and ||u||^2, which Dense layers give from
        # their factors; DLG's ||u - t||^2 is formed from u itself (as
        # ||u||^2 - 2<u, t> + ||t||^2 it would cancel once u is close to t).
        per_example = per_example_grad_fn(loss_task, sel, factored=method == "ig", conv_patch_floats=_PATCH_FLOATS)

        def run_updates(params, x, y, local_lr):
            n = x.shape[0]
            g = per_example(params, x.reshape(n * batch, *in_shape), y.reshape(n * batch, *y.shape[2:]))
            return {name: _run_means(v, n, batch) for name, v in g.items()}

        return run_updates
    grad_loss = jax.grad(loss_task.loss)

    def one_run(params, x, y, local_lr):
        return task.flatten(local_sgd_update(grad_loss, params, x, y, local_lr, local_steps), sel)

    def run_updates(params, x, y, local_lr):
        return jax.vmap(one_run, in_axes=(None, 0, 0, None))(params, x, y, local_lr)

    return run_updates


def _matching_fn(run_updates: Callable, names: tuple[str, ...], *, method: str, batch: int, soft: bool,
                 in_shape: tuple, num_classes: int) -> Callable:
    """``matching(params, z, targets, labels, weights, hyper)``: the matching loss of every run, (M, V, R)."""

    def matching(params, z, targets, labels, weights, hyper):
        runs = z["x"].shape[:3]
        n = int(np.prod(runs))
        x = z["x"].reshape(n, batch, *in_shape)
        if soft:
            y = jax.nn.softmax(z["q"]).reshape(n, batch, num_classes)
        else:
            y = jnp.broadcast_to(labels[None, :, None], (*runs, batch)).reshape(n, batch)
        u = run_updates(params, x, y, hyper["local_lr"])
        total = {"dot": 0.0, "uu": 0.0, "tt": 0.0, "sq": 0.0}
        # Inner products over P_l as contractions (matrix products), not
        # multiply-and-sum: XLA's CPU reductions of a broadcast product are
        # several times slower than a matrix-vector product.
        for i, name in enumerate(names):
            ti = targets[name]
            wi = weights[:, i][:, None, None]
            if method == "ig":
                if isinstance(u[name], OuterFactors):
                    dot, uu = _factored_products(u[name], ti, runs)
                else:
                    ui = u[name].reshape(*runs, -1)
                    dot, uu = jnp.einsum("mvrp,vp->mvr", ui, ti), jnp.einsum("mvrp,mvrp->mvr", ui, ui)
                total["dot"] += wi * dot
                total["uu"] += wi * uu
                total["tt"] += wi * jnp.einsum("vp,vp->v", ti, ti)[None, :, None]
            else:
                diff = u[name].reshape(*runs, -1) - ti[None, :, None, :]
                total["sq"] += wi * jnp.einsum("mvrp,mvrp->mvr", diff, diff)
        if method == "ig":
            return 1.0 - total["dot"] / jnp.maximum(jnp.sqrt(total["uu"]) * jnp.sqrt(total["tt"]), 1e-30)
        return total["sq"]

    return matching


def _stepped_adam(lr, steps: int):
    """Adam with the learning rate divided by 10 at 3/8, 5/8 and 7/8 of the steps (Geiping et al.)."""
    bounds = {int(steps * f): 0.1 for f in (3 / 8, 5 / 8, 7 / 8)}
    bounds = {b: v for b, v in bounds.items() if 0 < b < steps}
    return optax.adam(optax.piecewise_constant_schedule(lr, bounds))


def _build(task: Task, sel: Sequence[Layer], *, method: str, steps: int, seg: int, restarts: int, batch: int,
           soft: bool, signed: bool, box: bool, local_steps: int) -> dict[str, Callable]:
    """Jitted init / advance / final functions of the attack, cached on the task.

    Every attack run (weight row m, victim v, restart r) optimises its own
    dummy batch; the state holds them all, x of shape (M, V, R, B, H, W, C).
    The runs never interact: the objective is the sum of the runs'
    objectives, so its gradient with respect to one run's x is that run's
    gradient, and Adam (element-wise) on the stacked state is independent
    Adam per run. With K = 1 the dummy updates of all runs come from ONE
    batched per-example gradient computation over the M V R B dummy examples
    (:func:`jaxleak.grads.per_example_grad_fn`, whose conv gradients are
    batched matrix products), which is what makes restarts cheap; with
    K > 1 each run's K local steps are vmapped. For IG, Dense layers'
    updates are never formed: <u, t> and ||u||^2 come from their factors
    (:func:`_factored_products`), so their cost is matrix products with the
    shared targets, whose reads 8 restarts share, instead of one
    (1 + I) x O outer product per run.

    Shapes: random starts {"x": (V, R, B, H, W, C)[, "q": (V, R, B, classes)]};
    targets {layer: (V, P_l)}; labels (V, B) int; weights (M, L), one row of
    layer weights per run group.
    """
    names = tuple(layer.name for layer in sel)
    key = ("invert", method, names, steps, seg, restarts, batch, soft, signed, box, local_steps)

    def build():
        loss_task = _soft_label_task(task) if soft else task
        run_updates = _update_fn(task, loss_task, sel, method=method, batch=batch, local_steps=local_steps)
        in_shape, num_classes = task.input_shape, task.num_classes
        matching = _matching_fn(run_updates, names, method=method, batch=batch, soft=soft, in_shape=in_shape,
                                num_classes=num_classes)

        def optimizer(lr):
            return _stepped_adam(lr, steps)

        def init(start, weights):
            TRACE_COUNTS[key + ("init",)] += 1
            m = weights.shape[0]
            # the same initialisations for every weight row (common random numbers across layers)
            z = jax.tree.map(lambda a: jnp.broadcast_to(a, (m, *a.shape)), start)
            return z, optimizer(1.0).init(z)

        def advance(params, state, targets, labels, weights, hyper, last):
            TRACE_COUNTS[key] += 1
            opt = optimizer(hyper["lr"])

            def objective(z):
                match = matching(params, z, targets, labels, weights, hyper)
                return jnp.sum(match + hyper["tv"] * total_variation(z["x"])), match

            # Convolutions inside the scan must be in XLA's fast CPU layout, and small ones
            # are faster as one matrix product over patches (see canonical_convs).
            value_and_grad = canonical_convs(jax.value_and_grad(objective, has_aux=True),
                                             patch_floats=_PATCH_FLOATS)

            def body(carry, _):
                z, opt_state = carry
                (_, match), g = value_and_grad(z)
                if signed:
                    g = jax.tree.map(jnp.sign, g)
                updates, opt_state = opt.update(g, opt_state, z)
                z = optax.apply_updates(z, updates)
                if box:
                    z = dict(z, x=jnp.clip(z["x"], 0.0, 1.0))
                return (z, opt_state), match

            state, trace = jax.lax.scan(body, state, None, length=seg)
            # the matching loss of the state reached, computed in the last segment only (it is the result's
            # loss): part of this program, so that no second program is compiled for it
            end = canonical_convs(lambda z: matching(params, z, targets, labels, weights, hyper),
                                  patch_floats=_PATCH_FLOATS)
            losses = jax.lax.cond(last, end, lambda z: jnp.zeros(trace.shape[1:], trace.dtype), state[0])
            return state, jnp.moveaxis(trace, 0, -1), losses

        return {"init": compilation.jit(init, key=task.program_key(key), fast_compile=task.fast_compile),
                # the optimisation loop's run time dominates its compile time (compilation.jit)
                "advance": compilation.jit(advance, key=task.program_key(key), fast_compile=False)}

    return task.cached(key, build)


def _run_means(g, n: int, batch: int):
    """Per-example gradients of n runs' batches -> each run's update (the batch mean).

    An array (n B, P) becomes (n, P). :class:`OuterFactors` (n B, M, I), (n B,
    M, O) become one run's factors (n, B M, I) / B and (n, B M, O), whose sum
    of outer products is the run's update; when that sum is cheaper to form
    than to keep factored (B M (I + O) > I O), it is formed, (n, I O).
    """
    if not isinstance(g, OuterFactors):
        return g.reshape(n, batch, -1).mean(axis=1)
    rows, i, o = batch * g.a.shape[1], g.a.shape[-1], g.d.shape[-1]
    run = OuterFactors(g.a.reshape(n, rows, i) / batch, g.d.reshape(n, rows, o))
    return run if rows * (i + o) <= i * o else run.materialize()


def _factored_products(u: OuterFactors, t: jax.Array, runs: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """<u, t> and ||u||^2 for every run, u = sum_k outer(a_k, d_k), without forming u.

    u: factors (n, K, I), (n, K, O) with n = prod(runs) = M V R; t: targets
    (V, I O). <u, t> = sum_k a_k^T T d_k (one matrix product with the shared
    T per victim); ||u||^2 = sum_{k,k'} (a_k . a_k')(d_k . d_k').
    """
    m, v, r = runs
    k, i, o = u.a.shape[1], u.a.shape[-1], u.d.shape[-1]
    a = u.a.reshape(m, v, r, k, i)
    d = u.d.reshape(m, v, r, k, o)
    at = jnp.einsum("mvrki,vio->mvrko", a, t.reshape(v, i, o))
    dot = jnp.einsum("mvrko,mvrko->mvr", at, d)
    if k == 1:
        uu = jnp.einsum("mvrki,mvrki->mvr", a, a) * jnp.einsum("mvrko,mvrko->mvr", d, d)
    else:
        uu = jnp.einsum("mvrkl,mvrkl->mvr", jnp.einsum("mvrki,mvrli->mvrkl", a, a),
                        jnp.einsum("mvrko,mvrlo->mvrkl", d, d))
    return dot, uu


def _run(task: Task, target_update, *, weights_for: Callable[[int], np.ndarray], method: str, layers, restarts: int,
         steps: int | None, lr: float | None, tv: float | None, labels, batch_size: int, local_steps: int,
         local_lr: float, seed: int, progress: bool, starts: dict | None = None, deadline: float | None = None):
    """Shared driver of :func:`invert` and :func:`invert_layers`; returns per-weight-row results.

    ``starts`` are the random initialisations of these victims (drawn here from ``seed`` when None).
    ``deadline`` (a ``time.perf_counter()`` value): the steps run in about 20 segments, and after each
    segment but the first (which compiles) the call stops, returning ``(layers, None)``, when the
    remaining segments at that segment's pace would end after the deadline.
    """
    if method not in METHODS:
        raise InputError(f"unknown attack method {method!r}; choose one of {list(METHODS)}")
    defaults = _DEFAULTS[method]
    steps = _positive_int("steps", DEFAULT_STEPS if steps is None else steps)
    restarts = _positive_int("restarts", restarts)
    batch = _positive_int("batch_size", batch_size)
    local_steps = _positive_int("local_steps", local_steps)
    lr = _nonneg_float("lr", defaults["lr"] if lr is None else lr)
    tv = _nonneg_float("tv", defaults["tv"] if tv is None else tv)
    local_lr = _nonneg_float("local_lr", local_lr)
    if lr == 0:
        raise InputError("lr must be > 0")
    update, _ = _as_update_batch(task, target_update)
    sel = _matched_layers(task, update, layers)
    victims = next(iter(update.values())).shape[0]

    if isinstance(labels, str):
        if labels != "optimize":
            raise InputError(f"labels must be an integer array, None or 'optimize', got {labels!r}")
        soft, source, lab = True, "optimized", np.zeros((victims, batch), np.int32)
    elif labels is not None:
        soft, source, lab = False, "given", _labels_array(labels, victims, batch, task.num_classes)
    elif batch == 1 and task.layers[-1].name in update:
        soft, source, lab = False, "recovered", recover_labels(task, update)[:, None]
    else:
        soft, source, lab = True, "optimized", np.zeros((victims, batch), np.int32)

    seg = _segment_length(steps, progress or deadline is not None)
    fns = _build(task, sel, method=method, steps=steps, seg=seg, restarts=restarts, batch=batch, soft=soft,
                 signed=defaults["signed"], box=defaults["box"], local_steps=local_steps)
    weights = jnp.asarray(weights_for(len(sel)), jnp.float32)
    # random starts drawn on the host (seeded; no program to compile): x uniform in [0, 1], soft labels N(0, 1)
    start = _starts(task, victims, restarts, batch, seed) if starts is None else starts
    start = {"x": start["x"], **({"q": start["q"]} if soft else {})}
    targets = {layer.name: jnp.asarray(update[layer.name]) for layer in sel}
    lab = jnp.asarray(lab)
    hyper = {"lr": jnp.float32(lr), "tv": jnp.float32(tv), "local_lr": jnp.float32(local_lr)}

    state = fns["init"](start, weights)
    segments = range(steps // seg)
    if progress:
        from tqdm.auto import tqdm

        segments = tqdm(segments, desc=f"{method} inversion", unit=f"x{seg} steps", leave=False)
    traces = []
    for i in segments:
        t0 = time.perf_counter()
        state, trace, losses = fns["advance"](task.params, state, targets, lab, weights, hyper,
                                              np.bool_(i == steps // seg - 1))
        traces.append(trace)
        if deadline is not None and 0 < i < steps // seg - 1:
            jax.block_until_ready(losses)
            now = time.perf_counter()
            if now + (now - t0) * (steps // seg - 1 - i) > deadline:
                return sel, None
    z = state[0]
    x, losses = np.clip(np.asarray(z["x"]), 0.0, 1.0), np.asarray(losses)
    q = np.argmax(np.asarray(z["q"]), axis=-1) if soft else None
    trace = np.concatenate([np.asarray(t) for t in traces], axis=-1)
    # A diverged restart never wins; only a victim with no finite restart is an error.
    finite = np.where(np.isfinite(losses), losses, np.inf)
    if np.any(np.all(np.isinf(finite), axis=-1)):
        victim = int(np.argwhere(np.all(np.isinf(finite), axis=-1))[0][1])
        raise NonFiniteError(f"the {method} matching loss became NaN or infinite in every restart of victim "
                             f"{victim}; try a smaller lr")
    best = np.argmin(finite, axis=-1)  # (M, V)
    best_x = _pick(x, best)
    labels_out = np.broadcast_to(np.asarray(lab), best.shape + lab.shape[1:]) if not soft else _pick(np.asarray(q), best)
    config = {"method": method, "steps": steps, "restarts": restarts, "batch_size": batch, "lr": lr, "tv": tv,
              "signed": defaults["signed"], "box": defaults["box"], "local_steps": local_steps,
              "local_lr": local_lr, "seed": seed, "labels": source}
    results = []
    for m in range(weights.shape[0]):
        matched = tuple(layer.name for layer, w in zip(sel, np.asarray(weights[m])) if w != 0)
        results.append(InversionResult(
            x=best_x[m], labels=np.array(labels_out[m]), label_source=source,
            loss=_pick(losses, best)[m], restart_losses=losses[m],
            best_restart=best[m], trace=trace[m], method=method, layers=matched, config=dict(config)))
    return sel, results


def _starts(task: Task, victims: int, restarts: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded random starts: x uniform in [0, 1] and soft labels N(0, 1), (V, R, B, ...)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(victims, restarts, batch, *task.input_shape)).astype(np.float32)
    q = rng.standard_normal((victims, restarts, batch, task.num_classes)).astype(np.float32)
    return {"x": x, "q": q}


def _pick(a: np.ndarray, best: np.ndarray) -> np.ndarray:
    """a[m, v, best[m, v], ...] for a of shape (M, V, R, ...) and best (M, V)."""
    index = best.reshape(*best.shape, 1, *([1] * (a.ndim - 3)))
    return np.take_along_axis(a, index, axis=2)[:, :, 0]


def invert(task: Task, target_update: Mapping[str, Any], *, method: str = "ig", layers: Sequence[str] | None = None,
           restarts: int = 8, steps: int | None = None, lr: float | None = None, tv: float | None = None,
           labels=None, batch_size: int = 1, local_steps: int = 1, local_lr: float = 0.1, seed: int = 0,
           progress: bool = False) -> InversionResult:
    """Reconstruct the examples behind shared updates by gradient matching.

    Args:
      task: the model and the parameters the update was computed at.
      target_update: ``{layer: (P_l,)}`` for one victim (a row of
        :func:`jaxleak.grads.layer_grads`, ``task.flatten(grad)``, or a row of
        ``client_updates(...).updates``), or ``{layer: (V, P_l)}`` for V
        victims attacked in parallel.
      method: ``"ig"`` (cosine + TV, signed Adam, box [0, 1]) or ``"dlg"``
        (L2 matching, Adam).
      layers: the layers to match (default: every layer in
        ``target_update``); e.g. ``["Conv_0"]`` attacks the first layer only.
      restarts: random initialisations per victim, run in parallel; the one
        with the lowest final matching loss is returned.
      steps: Adam steps (default 1000). lr, tv: learning rate and TV weight
        (defaults: ig 0.1 and 1e-4; dlg 0.1 and 0).
      labels: integer labels (V, B) (or (B,) / (V,) when the other is 1);
        None recovers them from the last layer's bias gradient when
        batch_size is 1 and the last layer is in ``target_update``, and
        otherwise optimises soft labels jointly (DLG); ``"optimize"``
        forces the joint optimisation.
      batch_size: B, the number of examples behind each update.
      local_steps, local_lr: K and eta of the client (docs/method.md section 1); the
        attacker simulates the same K SGD steps for its dummy batch.
      seed: seeds the random initialisations.
      progress: show a tqdm bar over segments of the optimisation.

    Returns:
      :class:`InversionResult` with x of shape (V, B, H, W, C) (V = 1 for a
      single update).
    """
    _, results = _run(task, target_update, weights_for=lambda n: np.ones((1, n), np.float32), method=method,
                      layers=layers, restarts=restarts, steps=steps, lr=lr, tv=tv, labels=labels,
                      batch_size=batch_size, local_steps=local_steps, local_lr=local_lr, seed=seed,
                      progress=progress)
    return results[0]


def invert_layers(task: Task, target_update: Mapping[str, Any], *, layers: Sequence[str] | None = None,
                  **options) -> dict[str, InversionResult]:
    """One attack per layer, each a function of that layer's update only: ``{layer: InversionResult}``.

    All layers run in one jitted computation (a vmap over one-hot layer
    weights), with the same random initialisations, so the layers differ
    only in what their gradient reveals. Labels obey the same rule: with
    ``labels=None`` and one example per update, the last layer's attack
    recovers the label exactly from its own bias gradient (iDLG), and every
    other layer's attack optimises soft labels jointly from its own
    gradient (never the label read off another layer); each result's
    ``label_source`` says which. Given labels (an array) are used by every
    layer: the conditional attack. ``options`` are those of :func:`invert`,
    and ``max_floats``: the floats one call's per-example gradients may hold
    (default: 2^28 on the CPU, a fraction of the free memory on an
    accelerator); layers and victims are split into calls to stay within it,
    with the same random starts, so the results do not depend on the split;
    and ``budget_s``: the attack's time budget. A layer's calls go on only
    while all of its remaining calls fit, priced at the mean time of the
    calls so far, or before the first call by the optimistic
    :func:`estimated_call_seconds`; a started call stops early when its own
    pace (timed per segment of its steps) says it would end after the
    budget. Layers not attacked on every victim are missing from the
    result.
    """
    options = {"method": "ig", "restarts": 8, "steps": None, "lr": None, "tv": None, "labels": None,
               "batch_size": 1, "local_steps": 1, "local_lr": 0.1, "seed": 0, "progress": False,
               "max_floats": None, "budget_s": None, **options}
    max_floats = options.pop("max_floats")
    budget_s = options.pop("budget_s")
    started, spent = time.perf_counter(), []
    update, _ = _as_update_batch(task, target_update)
    sel = _matched_layers(task, update, layers)
    last = task.layers[-1].name
    groups = [[layer.name for layer in sel]]
    if options["labels"] is None:
        own_label = int(options["batch_size"]) == 1 and _output_bias_offset(task) is not None
        recovered = [name for name in groups[0] if own_label and name == last]
        # forward order: with a time budget the first layers, where inversion usually wins, go first
        groups = [g for g in ([name for name in groups[0] if name not in recovered], recovered) if g]
    victims = next(iter(update.values())).shape[0]
    restarts, batch = _positive_int("restarts", options["restarts"]), _positive_int("batch_size", options["batch_size"])
    starts = _starts(task, victims, restarts, batch, int(options["seed"]))
    budget = chunk_limits(_ATTACK_CPU_FLOATS)[0] if max_floats is None else _positive_int("max_floats", max_floats)
    if options["labels"] is not None and not isinstance(options["labels"], str):
        options["labels"] = _labels_array(options["labels"], victims, batch, task.num_classes)
    out: dict[str, InversionResult] = {}
    for group in groups:
        labels = options["labels"]
        if labels is None and group != [last]:
            labels = "optimize"  # a layer's own gradient holds its label only through the optimisation
        for chunk, rows in _attack_plan(task, group, victims, restarts * batch, budget):
            parts = []
            for j, v in enumerate(rows):
                # a call starts only while this layer's remaining calls, at the mean time of the calls so far,
                # still fit the time budget; a layer whose victims are not all attacked is dropped
                if budget_s is not None:
                    per_call = float(np.mean(spent)) if spent else estimated_call_seconds(
                        task, len(chunk), v.size, restarts * batch,
                        DEFAULT_STEPS if options["steps"] is None else int(options["steps"]),
                        int(options["local_steps"]))
                    if time.perf_counter() - started + (len(rows) - j) * per_call > budget_s:
                        parts = None
                        break
                t0 = time.perf_counter()
                sub = {name: update[name][v] for name in chunk}  # the attacked layers' own gradients only
                picked, results = _run(task, sub, weights_for=lambda n: np.eye(n, dtype=np.float32), layers=chunk,
                                       starts={k: a[v] for k, a in starts.items()},
                                       deadline=None if budget_s is None else started + budget_s,
                                       **{**options, "labels": labels if not isinstance(labels, np.ndarray) else labels[v]})
                if results is None:  # stopped at its pace check: it would not have finished in the budget
                    parts = None
                    break
                parts.append(results)
                spent.append((time.perf_counter() - t0) * rows[0].size / v.size)
            if parts:
                for i, layer in enumerate(picked):
                    out[layer.name] = _concat_victims([p[i] for p in parts])
    return {layer.name: out[layer.name] for layer in sel if layer.name in out}


# float32 values that the per-example gradients of one attack call may hold on the CPU (1 GiB); on an
# accelerator a fraction of its free memory (jaxleak.grads.chunk_limits)
_ATTACK_CPU_FLOATS = 2 ** 28


def _intermediate_floats(jaxpr) -> int:
    """Floats of every intermediate value of a jaxpr, sub-jaxprs included (an upper bound of what is live)."""
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(int(np.prod(v.aval.shape, dtype=np.int64)) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _intermediate_floats(inner)
    return total


def example_activation_floats(task: Task) -> int:
    """Floats that one dummy example of an attack holds besides its gradients, estimated as every intermediate
    of one example's loss gradient in its jaxpr (an upper bound of that gradient's live memory, which XLA's
    fusion keeps well below; the attack differentiates it once more)."""
    def build():
        x = jnp.zeros((1, *task.input_shape), jnp.float32)
        y = jnp.zeros((1,), jnp.int32)
        closed = jax.make_jaxpr(jax.grad(task.loss, argnums=(0, 1)))(task.params, x, y)
        floats = _intermediate_floats(closed.jaxpr)
        return lambda: floats

    return task.cached(("attack_activation_floats",), build)()


# One attack step of one dummy example (forward, backward, and the backward of that backward) in per-example
# costs of a batch-mean gradient of 64 examples. Measured on the 2-core CPU: about 0.4 (LeNet 8x8, 2,560 dummy
# examples in one call), 1.3 (alexnet 32x32x3), 2.2 (LeNet 32x32x3). The estimate before a call takes the
# cheapest, so that no call that might fit is skipped; a started call that will not fit stops at its pace check.
_STEP_GRADIENTS = 0.4


def example_gradient_seconds(task: Task, batch: int = 64, repeats: int = 3) -> float:
    """Seconds per example of one jitted batch-mean loss gradient (median of ``repeats`` runs on ``batch``
    zero inputs, after compiling): the unit in which an attack's cost is estimated before it starts."""
    def build():
        grad = jax.jit(jax.grad(lambda p, x, y: task.loss(p, x, y)))
        x = jnp.zeros((batch, *task.input_shape), jnp.float32)
        y = jnp.zeros((batch,), jnp.int32)
        jax.block_until_ready(grad(task.params, x, y))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(task.params, x, y))
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times)) / batch
        return lambda: seconds

    return task.cached(("example_gradient_seconds", batch), build)()


def estimated_call_seconds(task: Task, layers: int, victims: int, runs_per_victim: int, steps: int,
                           local_steps: int = 1) -> float:
    """Optimistic a-priori seconds of one attack call (compilation excluded): every layer, victim and run takes
    ``steps`` optimisation steps of ``local_steps`` double-backward updates, priced in example gradients at
    the cheapest rate measured (``_STEP_GRADIENTS``)."""
    return (_STEP_GRADIENTS * steps * local_steps * layers * victims * runs_per_victim
            * example_gradient_seconds(task))


def _attack_plan(task: Task, names: Sequence[str], victims: int, runs_per_victim: int, budget: int):
    """Calls of a per-layer attack: (layer group, [victim index arrays]) with bounded memory each.

    One call of ``M`` layers runs M V R B dummy examples, each forming the
    per-example gradients of all M layers and holding the intermediates of
    a double backward pass (:func:`example_activation_floats`); layers are
    grouped while that stays within ``budget`` floats, and a layer too large
    on its own splits its victims into near-equal parts.
    """
    per_example = example_activation_floats(task)
    sizes = {name: task.layer(name).size for name in names}
    plan, group = [], []

    def cost(g):
        return len(g) * victims * runs_per_victim * (sum(sizes[n] for n in g) + per_example)

    for name in names:
        if group and cost(group + [name]) > budget:
            plan.append(group)
            group = []
        group.append(name)
    plan.append(group)
    out = []
    for g in plan:
        parts = max(1, int(math.ceil(cost(g) / budget)))
        out.append((g, [a for a in np.array_split(np.arange(victims), min(parts, victims)) if a.size]))
    return out


def _concat_victims(results: Sequence[InversionResult]) -> InversionResult:
    if len(results) == 1:
        return results[0]
    first = results[0]
    cat = {f: np.concatenate([getattr(r, f) for r in results]) for f in
           ("x", "labels", "loss", "restart_losses", "best_restart", "trace")}
    return first._replace(**cat)


def invert_per_layer(task: Task, target_update: Mapping[str, Any], originals, *,
                     layers: Sequence[str] | None = None, confidence_seed: int = 0, **options) -> LayerScores:
    """Per-layer reconstruction attack scored by PSNR: ``LayerScores("attack_psnr")`` in dB.

    Runs :func:`invert_layers` and scores each layer's reconstructions
    against ``originals`` with :func:`score`. ``value`` is the mean PSNR over
    victims' images (higher = more of x leaks through that layer), ``ci`` a
    95% percentile bootstrap over victims (None for one victim); extras hold
    the mean MSE and SSIM and the per-victim PSNR, and the layer's
    ``label_source`` (see :func:`invert_layers`).
    """
    per_layer = invert_layers(task, target_update, layers=layers, **options)
    out = {}
    for name, result in per_layer.items():
        s = score(result, originals)
        psnr_v = np.mean(s.psnr, axis=1)
        out[name] = Score(float(np.mean(psnr_v)), _bootstrap_ci(psnr_v, confidence_seed),
                          {"mse": float(np.mean(s.mse)), "ssim": float(np.mean(s.ssim)),
                           "psnr_per_victim": psnr_v.tolist(), "matching_loss": float(np.mean(result.loss)),
                           "label_source": result.label_source})
    first = next(iter(per_layer.values()))
    meta = dict(first.config, victims=int(first.x.shape[0]), matched="one layer at a time",
                labels={name: r.label_source for name, r in per_layer.items()},
                label_rule="each layer's attack reads its own gradient only: the label is recovered from the last "
                           "layer's own bias gradient, optimised jointly for every other layer, or given to all",
                note="PSNR of the best-restart reconstruction (chosen by matching loss); higher means more leakage")
    return LayerScores("attack_psnr", out, unit="dB", meta=meta)


def _bootstrap_ci(values: np.ndarray, seed: int, resamples: int = 2000) -> tuple[float, float] | None:
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)):
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# ---------------------------------------------------------------- scoring and pictures

def _originals_like(result_x: np.ndarray, originals) -> np.ndarray:
    o = np.asarray(originals, dtype=np.float32)
    if o.shape == result_x.shape:
        return o
    if o.ndim == result_x.ndim - 1 and o.shape[1:] == result_x.shape[2:] \
            and o.shape[0] == result_x.shape[0] * result_x.shape[1]:
        return o.reshape(result_x.shape)
    raise InputError(f"originals have shape {o.shape}; the reconstructions are {result_x.shape} (V, B, H, W, C), "
                     f"so pass that shape or (V*B, H, W, C) in victim-major order")


def match_batch(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Hungarian assignment of reconstructions to originals by MSE: (B, ...) x2 -> (B,) indices.

    ``reconstructions[assignment[i]]`` is matched to ``originals[i]``; the
    total MSE over pairs is minimal (``scipy.optimize.linear_sum_assignment``).
    """
    a = np.asarray(originals, np.float64).reshape(len(originals), -1)
    b = np.asarray(reconstructions, np.float64).reshape(len(reconstructions), -1)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).mean(axis=-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    assignment = np.empty(len(a), dtype=np.int64)
    assignment[rows] = cols
    return assignment


def score(result: InversionResult | np.ndarray, originals) -> ReconstructionScores:
    """MSE, PSNR and SSIM of reconstructions against the originals.

    ``result`` is an :class:`InversionResult` (or its x, (V, B, H, W, C));
    ``originals`` has the same shape or (V*B, H, W, C). For B > 1 each
    victim's reconstructions are matched to its originals by the Hungarian
    assignment on MSE before scoring (the attacker cannot know the order).
    """
    x = np.asarray(result.x if isinstance(result, InversionResult) else result, np.float32)
    if x.ndim != 5:
        raise InputError(f"reconstructions must be (V, B, H, W, C), got shape {x.shape}")
    o = _originals_like(x, originals)
    assignment = np.stack([match_batch(o[v], x[v]) for v in range(x.shape[0])])
    matched = np.take_along_axis(x, assignment.reshape(*assignment.shape, 1, 1, 1), axis=1)
    return ReconstructionScores(
        mse=np.asarray(metrics.mse(matched, o)), psnr=np.asarray(metrics.psnr(matched, o)),
        ssim=np.asarray(metrics.ssim(matched, o)), assignment=assignment)


def save_grid(originals, reconstructions, path: str | os.PathLike, *, titles: Sequence[str] | None = None,
              dpi: int = 100) -> str:
    """Write a PNG with the originals in the top row and the reconstructions below.

    Both are (N, H, W, C) (or (V, B, H, W, C), flattened victim-major) with
    values in [0, 1]; single-channel images are drawn in grey. ``titles``
    (N strings) label the columns, e.g. PSNR values. The file is written to a
    temporary file in the same directory and moved into place, so a reader
    never sees a partial PNG. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = np.asarray(originals, np.float32)
    bottom = np.asarray(reconstructions, np.float32)
    top = top.reshape(-1, *top.shape[-3:]) if top.ndim == 5 else top
    bottom = bottom.reshape(-1, *bottom.shape[-3:]) if bottom.ndim == 5 else bottom
    if top.ndim != 4 or top.shape != bottom.shape:
        raise InputError(f"originals {top.shape} and reconstructions {bottom.shape} must both be (N, H, W, C)")
    if top.shape[-1] not in (1, 3):
        raise InputError(f"images must have 1 or 3 channels to be drawn, got {top.shape[-1]}")
    n = top.shape[0]
    if titles is not None and len(titles) != n:
        raise InputError(f"titles has {len(titles)} entries for {n} columns")
    fig = Figure(figsize=(1.2 * n + 0.8, 2.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        for i, img in enumerate((top[j], bottom[j])):
            ax = axes[i, j]
            img = np.clip(img, 0.0, 1.0)
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[1, j].set_title(str(titles[j]), fontsize=7)
    axes[0, 0].set_ylabel("original", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=".grid-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
