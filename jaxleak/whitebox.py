"""The white-box attack family of V-information: per-layer gradient inversion (docs/method.md section 3).

An attacker who knows the weights can invert a gradient by optimisation.
Such a predictor is a function of the observed gradient of ONE layer (the
weights fixed), so it belongs in that layer's predictive family V:

- original information: the decoder mean is ``m + a (r_l - m)``, where r_l is
  the Inverting Gradients reconstruction that matches layer l's gradient
  alone (:func:`jaxleak.attacks.invert_layers`; the label too comes from
  g_l, optimised jointly with the input; a first Dense layer gives its
  input in closed form), m the auxiliary examples' mean and a in [0, 1] a shrinkage
  factor fitted by least squares on auxiliary examples (a raw
  reconstruction that is worse than the mean still carries information
  that the shrinkage keeps);
- latent information: an attribute classifier (scikit-learn logistic
  regression, its regularisation chosen by cross-validation) trained on the
  auxiliary inputs reads r_l; its probabilities are mixed with the
  auxiliary prior at the weight that is best on auxiliary rows.

Selection never reads a victim's target. The family is compared with the
learned members on ``inversion_n`` auxiliary validation rows, with the
shrinkage (or mixing weight) cross-fitted over two halves of those rows, so
no row is scored by a factor fitted on it. The white-box member is selected
for a layer only when a paired bootstrap over those rows puts its loss
below the learned member's (the 95% interval of the per-row differences
above 0). A selected layer is then scored on ALL victims by the composite
attack: the white-box member on a seeded subsample of ``inversion_n``
victims (its shrinkage fitted on all comparison rows), the learned member
on the others, so every layer is scored on the same victims.
"""

from __future__ import annotations

import numpy as np

from jaxleak import ensemble
from jaxleak.errors import InputError
from jaxleak.task import Task


def closed_form_layer(task: Task) -> str | None:
    """The first layer when its gradient reveals the input in closed form, else None.

    A first Dense layer with a bias, reading the flattened input: for one
    example its kernel gradient is outer(x, delta) and its bias gradient
    delta, so every column j with delta_j != 0 gives x = grad_kernel[:, j] /
    delta_j exactly (no optimisation, no label needed).
    """
    first = task.layers[0]
    d = int(np.prod(task.input_shape))
    names = [path.split("/")[-1] for path in first.paths]
    if sorted(names) != ["bias", "kernel"]:
        return None
    kernel, bias = first.shapes[names.index("kernel")], first.shapes[names.index("bias")]
    if len(kernel) != 2 or kernel[0] != d or bias != (kernel[1],):
        return None
    return first.name


def _closed_form(task: Task, g: np.ndarray) -> np.ndarray:
    """(k, D) inputs of the first Dense layer from its per-example gradients (k, P) (see closed_form_layer)."""
    first = task.layers[0]
    names = [path.split("/")[-1] for path in first.paths]
    offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in first.shapes])
    parts = {name: g[:, offsets[i]:offsets[i + 1]] for i, name in enumerate(names)}
    kernel = parts["kernel"].reshape(g.shape[0], *first.shapes[names.index("kernel")])
    bias = parts["bias"]
    j = np.argmax(np.abs(bias), axis=1)
    delta = bias[np.arange(g.shape[0]), j]
    column = kernel[np.arange(g.shape[0]), :, j]
    safe = np.where(np.abs(delta) > 0, delta, 1.0)
    return np.where(np.abs(delta)[:, None] > 0, column / safe[:, None], 0.0).astype(np.float64)


def _closed_form_all(task: Task, x, y, name: str) -> np.ndarray:
    """(n, D) closed-form inputs of every example from the first Dense layer's gradients, formed in groups of
    at most ``_GRADIENT_FLOATS`` gradient floats."""
    from jaxleak.grads import layer_grads

    n = x.shape[0]
    step = max(1, _GRADIENT_FLOATS // max(task.layer(name).size, 1))
    return np.concatenate([_closed_form(task, np.asarray(layer_grads(task, x[i:i + step], y[i:i + step],
                                                                     layers=[name])[name], np.float64))
                           for i in range(0, n, step)])


# Floats of per-example gradients the white-box family holds at once (256 MiB), beyond one layer's own.
_GRADIENT_FLOATS = 2 ** 26


def _reconstruct(task: Task, names, x, y, *, steps: int, restarts: int, seed: int, progress: bool,
                 budget_s: float | None = None, gradients=None):
    """Per layer, (k, D) reconstruction of each example from that layer's gradient alone, and how it was made.

    The first Dense layer's input comes in closed form; the other layers run Inverting Gradients (one
    jitted computation per group of layers, within ``budget_s`` seconds: layers of groups not started for
    the budget are absent from the result). The examples' per-example gradients, k x P floats for all
    layers, are formed for a few layers at a time (at most ``_GRADIENT_FLOATS`` floats, or one layer)
    and freed after that group's attack, so memory does not grow with the model's size. ``gradients``:
    ``(x, y, names) -> {name: (k, P)}``, the exact per-example gradients of those layers (default
    :func:`jaxleak.grads.layer_grads`), e.g. from a program the caller has compiled already.
    """
    import time

    from jaxleak.attacks import invert_layers
    from jaxleak.grads import layer_grads

    if gradients is None:
        def gradients(xs, ys, layers):
            return layer_grads(task, xs, ys, layers=layers)

    started = time.perf_counter()
    recon, how = {}, {}
    closed = closed_form_layer(task)
    if closed in names:
        g = gradients(x, y, [closed])[closed]
        recon[closed] = _closed_form(task, np.asarray(g, np.float64))
        how[closed] = "closed form"
    chunks, chunk, floats = [], [], 0
    for name in (name for name in names if name not in recon):
        size = task.layer(name).size * x.shape[0]
        if chunk and floats + size > _GRADIENT_FLOATS:
            chunks.append(chunk)
            chunk, floats = [], 0
        chunk.append(name)
        floats += size
    if chunk:
        chunks.append(chunk)
    for chunk in chunks:
        left = None if budget_s is None else budget_s - (time.perf_counter() - started)
        if left is not None and left <= 0:
            break
        g = gradients(x, y, chunk)
        # labels optimised jointly in every layer: one compiled program for all layers (the last layer's exact
        # recovery from its own bias gradient would be a second one)
        results = invert_layers(task, g, layers=chunk, restarts=restarts, steps=steps, seed=seed,
                                progress=progress, budget_s=left, labels="optimize")
        del g
        for name, r in results.items():
            recon[name] = np.asarray(r.x, np.float64).reshape(x.shape[0], -1)
            how[name] = r.label_source
    return recon, how


def _shrink(recon, target, mean) -> float:
    """Least-squares factor a in [0, 1] of mean + a (recon - mean) against target (0: the mean itself)."""
    d, t = recon - mean, target - mean
    return float(np.clip(np.sum(d * t) / max(np.sum(d * d), 1e-300), 0.0, 1.0))


def _halves(m: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(m)
    return [np.sort(order[: m // 2]), np.sort(order[m // 2:])]


def _cross_fitted(fit_rule, loss_rule, m: int, seed: int) -> np.ndarray:
    """Per-row loss where each half of the m comparison rows is scored with the setting fitted on the other."""
    out = np.empty(m)
    a, b = _halves(m, seed)
    for fit_rows, score_rows in ((a, b), (b, a)):
        out[score_rows] = loss_rule(fit_rule(fit_rows), score_rows)
    return out


def paired_gain(learned: np.ndarray, inversion: np.ndarray, seed: int, resamples: int = 2000):
    """Mean per-row loss difference learned - inversion and its 95% paired percentile bootstrap interval."""
    diff = np.asarray(learned, np.float64) - np.asarray(inversion, np.float64)
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    low, high = np.quantile(diff[idx].mean(axis=1), [0.025, 0.975])
    return float(diff.mean()), (float(low), float(high))


def _attribute_classifier(xa_train, za_train, seed: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return LogisticRegressionCV(Cs=6, cv=3, scoring="neg_log_loss", max_iter=500, random_state=seed).fit(xa_train, za_train)


def _class_probs(clf, x, num_classes: int) -> np.ndarray:
    p = np.zeros((x.shape[0], num_classes))
    p[:, clf.classes_] = clf.predict_proba(x)
    return p


def _mixed_loss(p, codes, prior, weight):
    return -np.log((1.0 - weight) * p[np.arange(codes.size), codes] + weight * prior[codes])


def inversion_family(task: Task, names, fitted, x, y, aux, *, n_victims: int, inversion_n: int, steps: int,
                     restarts: int, seed: int, progress: bool = False, budget_s: float | None = None,
                     gradients=None):
    """Per layer, the white-box member where it beats the learned ones on auxiliary validation rows.

    ``fitted`` is the learned families' fit on the attacker split (victims
    first, then the auxiliary rows); ``aux`` is ``(x_aux, y_aux, target_aux)``.
    Returns ``({layer: white-box fields on its victim subsample}, info)``: the
    fields of the layers where the white-box member was selected (rows,
    per-row loss and prediction), and what was compared for every layer.
    ``gradients``: see :func:`_reconstruct`.
    """
    fit, split, t = fitted.fit, fitted.split, fitted.t
    xa = aux[0]
    rng = np.random.default_rng(seed + 1)
    vi = np.sort(rng.choice(n_victims, size=min(int(inversion_n), n_victims), replace=False))
    val_rows = np.flatnonzero(split.val.any(axis=0))
    av_rows = np.sort(rng.choice(val_rows, size=min(int(inversion_n), val_rows.size), replace=False))
    av = av_rows - n_victims
    m = av.size
    if m < 4:
        raise InputError(f"the white-box family needs at least 4 auxiliary comparison rows, got {m}; "
                         f"raise inversion_n or the auxiliary examples")
    import time

    t0 = time.perf_counter()
    # First the auxiliary comparison rows alone: the selection reads nothing else. The victims' subsample is
    # inverted afterwards, and only when some layer's white-box member is selected (its reconstructions are
    # read for selected layers only).
    recon_a, label_source = _reconstruct(task, names, xa[av], aux[1][av], steps=steps, restarts=restarts,
                                         seed=seed, progress=progress, budget_s=budget_s, gradients=gradients)
    k = vi.size
    latent = fitted.kind == ensemble.CLASSIFICATION
    if latent:
        train_aux = np.setdiff1d(np.arange(xa.shape[0]), av)
        clf = _attribute_classifier(xa[train_aux].reshape(train_aux.size, -1), t[n_victims + train_aux], seed)
        num_classes = fit.null_pred.shape[-1]
        prior = fit.null_pred[0]
        za = t[av_rows]
    else:
        mean = fit.target_mean[0]
        xa_flat = xa[av].reshape(m, -1)
    layers, fitted_rule = {}, {}
    skipped = [name for name in names if name not in recon_a]
    for i, name in enumerate(names):
        learned_rows = np.asarray(fit.val_row_loss[i, av_rows], np.float64)
        if name in skipped:
            layers[name] = {"aux_loss_learned": float(learned_rows.mean()), "selected": False,
                            "skipped": "not inverted: the white-box time budget was spent"}
            continue
        r_a = recon_a[name]
        entry = {"aux_loss_learned": float(learned_rows.mean()), "label_source": label_source[name]}
        if latent:
            p_a = _class_probs(clf, r_a, num_classes)

            def best_weight(rows, p_a=p_a):
                losses = [_mixed_loss(p_a[rows], za[rows], prior, w).mean() for w in ensemble.MIX_WEIGHTS]
                return ensemble.MIX_WEIGHTS[int(np.argmin(losses))]

            inv_rows = _cross_fitted(best_weight, lambda w, rows, p_a=p_a: _mixed_loss(p_a[rows], za[rows], prior, w),
                                     m, seed)
            fitted_rule[name] = w = best_weight(np.arange(m))
            entry["prior_weight"] = float(w)
        else:
            inv_rows = _cross_fitted(lambda rows, r_a=r_a: _shrink(r_a[rows], xa_flat[rows], mean),
                                     lambda a, rows, r_a=r_a: np.sum(np.square(mean + a * (r_a[rows] - mean)
                                                                              - xa_flat[rows]), axis=1),
                                     m, seed)
            fitted_rule[name] = a = _shrink(r_a, xa_flat, mean)
            entry["shrink"] = a
        gain, ci = paired_gain(learned_rows, inv_rows, seed + 7 * i)
        entry.update(aux_loss_inversion=float(inv_rows.mean()), aux_gain=gain, aux_gain_ci=list(ci),
                     selected=bool(ci[0] > 0.0), victims=0)
        layers[name] = entry
    selected = [name for name in names if layers[name]["selected"]]
    recon_v = {}
    if any(label_source[name] != "closed form" for name in selected):
        # every layer inverted above (the same program as the comparison rows'); the victims' own random starts
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        if left is None or left > 0:
            inverted = [name for name in names if name in recon_a and label_source[name] != "closed form"]
            recon_v, _ = _reconstruct(task, inverted, x[vi], y[vi], steps=steps, restarts=restarts, seed=seed + 1,
                                      progress=progress, budget_s=left, gradients=gradients)
    spent = time.perf_counter() - t0
    chosen = {}
    for name in selected:
        entry = layers[name]
        rows_v = vi
        if label_source[name] == "closed form":
            # free: the closed form reads every victim (in groups of bounded memory), not only the subsample
            rows_v = np.arange(n_victims)
            r_v = _closed_form_all(task, x[:n_victims], y[:n_victims], name)
        elif name in recon_v:
            r_v = recon_v[name]
        else:
            entry.update(selected=False, skipped="victims not inverted: the white-box time budget was spent")
            skipped.append(name)
            continue
        if latent:
            w = fitted_rule[name]
            p_v = _class_probs(clf, r_v, num_classes)
            victim = dict(loss=_mixed_loss(p_v, t[rows_v], prior, w), pred=(1.0 - w) * p_v + w * prior[None],
                          member="inversion: this layer's reconstruction read by an attribute classifier",
                          extras={"prior_weight_inversion": float(w)})
        else:
            a = fitted_rule[name]
            mu_v = mean + a * (r_v - mean)
            target_v = x[rows_v].reshape(rows_v.size, -1)
            victim = dict(loss=np.sum(np.square(mu_v - target_v), axis=1),
                          pred=mu_v.reshape((rows_v.size,) + x.shape[1:]),
                          member=(f"inversion: the layer's input in closed form, shrink {a:.3g}"
                                  if label_source[name] == "closed form" else
                                  f"inversion: Inverting Gradients on this layer, shrink {a:.3g}"),
                          extras={"shrink": a})
        entry["victims"] = int(rows_v.size)
        chosen[name] = dict(rows=rows_v, **victim)
    info = {"victims": int(k), "aux_rows": int(m), "steps": int(steps), "restarts": int(restarts),
            "labels": dict(label_source), "budget_s": budget_s, "seconds": spent, "skipped": skipped,
            "label_rule": "each layer's reconstruction reads its own gradient only: a first Dense layer gives its "
                          "input in closed form; every other layer's Inverting Gradients optimises the label "
                          "jointly with the input",
            "selection": "selected where the 95% paired bootstrap interval over the auxiliary comparison rows of "
                         "(learned loss - white-box loss) lies above 0; the white-box loss of each half of the "
                         "rows uses the shrinkage or prior weight fitted on the other half",
            "scoring": "a selected layer is scored on every victim: the white-box member on the victims listed in "
                       "'victim_rows' (on every victim for a closed-form layer: layers[l].victims), the learned "
                       "member on the others; the victims are inverted only when some layer is selected",
            "victim_rows": vi.tolist(), "victims_inverted": bool(recon_v),
            "aux_loss": "mean per-example loss on the auxiliary rows "
            + ("(nats)" if latent else "(squared error summed over the input)"), "layers": layers}
    return chosen, info
