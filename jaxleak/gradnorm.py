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
    and back-propagated errors, the ghost norm) without forming a per-example gradient; other layers' from
    their per-example gradients, formed in the same pass (:func:`jaxleak.grads.per_example_grad_fn`).
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    key = ("grad_norms", tuple(layer.name for layer in sel))

    def build():
        fn = _norms_fn(task, sel)

        def traced(params, xb, yb):
            grads.TRACE_COUNTS[key] += 1
            return fn(params, xb, yb)

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    fn = task.cached(key, build)
    chunk = (min(int(chunk_size), x.shape[0]) if chunk_size
             else grads.factor_chunk_size(norm_floats(grads.layer_shapes(task, sel, x, y)), x.shape[0]))
    out = grads.map_chunks(fn, [x, y], chunk, desc="gradient norms", progress=progress, extra=(task.params,))
    grads.check_finite(out)
    return {layer.name: out[layer.name] for layer in sel}


def norm_floats(shapes: dict[str, grads.LayerShape]) -> int:
    """Floats one example holds while its norms are computed: the factors or formed gradients (twice, for the
    activations beside them) and the largest layer's Gram or formed product."""
    live = sum(s.floats for s in shapes.values())
    transient = 0
    for s in shapes.values():
        if s.factored and s.positions * (s.rows + s.cols) <= s.rows * s.cols:
            transient = max(transient, s.positions * (s.rows + s.positions))
        elif s.factored:
            transient = max(transient, s.rows * s.cols)
    return 2 * live + 2 * transient


def _norms_fn(task: Task, layers):
    """Norms from one pass of the factor engine. A Linen Dense/Conv layer's per-example gradient is A^T E
    (A: its input rows per output position, E: the back-propagated errors), so ||g||^2 = sum_st (A A^T)_st
    (E E^T)_st, or ||A^T E||_F^2 where forming it is cheaper (the ghost norm); no per-example gradient is
    formed for those layers. Other layers' per-example gradients are formed."""
    per_example = grads.per_example_grad_fn(task, layers, factored="all")

    def norm(g):
        if isinstance(g, (grads.OuterFactors, grads.ConvFactors)):
            return jnp.sqrt(jnp.maximum(grads.factored_sq_norms(g), 0.0))
        return jnp.linalg.norm(g, axis=1)

    def fn(params, xb, yb):
        return {name: norm(g) for name, g in per_example(params, xb, yb).items()}

    return fn


def grad_norms(task: Task, x, y, **options) -> LayerScores:
    """Mean per-example gradient norm per layer, with a 95% normal-approximation CI.

    Extras: ``params`` (P_l), ``sd`` (spread over examples), ``rms`` (sqrt of
    the mean squared norm). Not a leakage measure; the scale against which the
    relative sensitivity is normalised. ``meta.gradients`` names the layers
    computed from their factors and those whose per-example gradients were formed.
    """
    norms = per_example_norms(task, x, y, **options)
    sel = task.select(options.get("layers"))
    gradients = grads.factor_report(task, sel, *task.check_inputs(x, y))
    sizes = {layer.name: layer.size for layer in task.layers}
    scores = {}
    for name, v in norms.items():
        v = v.astype(np.float64)
        mean, sd = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
        half = 1.96 * sd / np.sqrt(v.size)
        scores[name] = Score(mean, (mean - half, mean + half),
                             {"params": sizes[name], "sd": sd, "rms": float(np.sqrt(np.mean(v ** 2)))})
    meta = {"n": int(len(next(iter(norms.values())))), "gradients": gradients}
    return LayerScores("grad_norm", scores, unit="L2 norm of the loss gradient", meta=meta)
