"""Per-layer gradient norms: the scale of what each layer shares."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxleak import compilation, grads
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Task


def per_example_norms(task: Task, x, y, *, chunk_size: int | None = None, layers: Sequence[str] | None = None,
                      progress: bool = False) -> dict[str, np.ndarray]:
    """||g_l(x_i, y_i)||_2 per example and layer: ``{layer: (N,)}``.

    Only the norms leave the jitted chunk. Linen Dense/Conv layers' norms come from their factors (inputs
    and back-propagated errors, :func:`_factored_norms_fn`) without forming a per-example gradient; other
    layers' from their per-example gradients.
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    key = ("grad_norms", tuple(layer.name for layer in sel))

    def build():
        fn = _factored_norms_fn(task, sel) or _materialised_norms_fn(task, sel)

        def traced(params, xb, yb):
            grads.TRACE_COUNTS[key] += 1
            return fn(params, xb, yb)

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    fn = task.cached(key, build)
    chunk = chunk_size or grads.default_chunk_size(task, sel, x.shape[0])
    out = grads.map_chunks(fn, [x, y], min(chunk, x.shape[0]), desc="gradient norms", progress=progress,
                           extra=(task.params,))
    grads.check_finite(out)
    return {layer.name: out[layer.name] for layer in sel}


def _materialised_norms_fn(task: Task, layers):
    per_example = grads.per_example_grad_fn(task, layers)

    def fn(params, xb, yb):
        return {k: jnp.linalg.norm(v, axis=1) for k, v in per_example(params, xb, yb).items()}

    return fn


def _factored_norms_fn(task: Task, layers):
    """Norms from factors (the ghost norm): a Linen Dense/Conv layer's per-example gradient is A^T E (A: its
    input rows per output position, E: the back-propagated errors), so ||g||^2 = sum_st (A A^T)_st (E E^T)_st,
    or ||A^T E||_F^2 where forming it is cheaper; no per-example gradient is formed. Other layers' per-example
    gradients are formed for those layers only. None when no layer has a factored form."""
    from jaxleak import subspace
    from jaxleak.sensitivity import _gram_frob2

    split = subspace.factored_split(task, layers)
    if split is None:
        return None
    fast, rest, capture = split
    rest_grads = grads.per_example_grad_fn(task, rest) if rest else None

    def fn(params, xb, yb):
        inputs, errors = capture(params, xb, yb)
        b = xb.shape[0]
        out = {}
        for plan in fast:
            a = subspace.input_rows(plan, inputs[plan.linear.path])
            e = errors[plan.linear.path].reshape(b, plan.positions, -1)
            out[plan.layer.name] = jnp.sqrt(_gram_frob2(a, e))
        if rest:
            out.update({k: jnp.linalg.norm(v, axis=1) for k, v in rest_grads(params, xb, yb).items()})
        return {layer.name: out[layer.name] for layer in layers}

    return fn


def grad_norms(task: Task, x, y, **options) -> LayerScores:
    """Mean per-example gradient norm per layer, with a 95% normal-approximation CI.

    Extras: ``params`` (P_l), ``sd`` (spread over examples), ``rms`` (sqrt of
    the mean squared norm). Not a leakage measure; the scale against which the
    relative sensitivity is normalised.
    """
    norms = per_example_norms(task, x, y, **options)
    sizes = {layer.name: layer.size for layer in task.layers}
    scores = {}
    for name, v in norms.items():
        v = v.astype(np.float64)
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
        half = 1.96 * sd / np.sqrt(v.size)
        scores[name] = Score(mean, (mean - half, mean + half),
                             {"params": sizes[name], "sd": sd, "rms": float(np.sqrt(np.mean(v ** 2)))})
    return LayerScores("grad_norm", scores, unit="L2 norm of the loss gradient", meta={"n": int(len(next(iter(norms.values()))))})
