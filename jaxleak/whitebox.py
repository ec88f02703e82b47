"""The white-box attack family of V-information: per-layer gradient inversion (METHOD section 2).

An attacker who knows the weights can invert a gradient by optimisation.
Such a predictor is a function of the observed gradient (the weights fixed),
so it belongs in the predictive family V:

- original information: the decoder mean is ``m + a (r_l - m)``, where r_l is
  the Inverting Gradients reconstruction that matches layer l's gradient
  alone (:func:`jaxleak.attacks.invert_layers`), m the auxiliary examples'
  mean and a in (0, 1] a shrinkage factor fitted by least squares on
  auxiliary examples (a raw reconstruction that is worse than the mean
  still carries information that the shrinkage keeps);
- latent information: an attribute classifier (scikit-learn logistic
  regression, its regularisation chosen by cross-validation) trained on the
  auxiliary inputs reads r_l; its probabilities are mixed with the
  auxiliary prior at the weight that is best on auxiliary rows.

The family competes with the learned members on the same auxiliary
validation rows (``inversion_n`` of them); where it wins, a seeded
subsample of ``inversion_n`` victims is scored with it. A layer whose fitted
shrinkage is not positive (its reconstructions point away from the truth)
is not a member for that layer: scoring it would be scoring the mean.
"""

from __future__ import annotations

import numpy as np

from jaxleak import ensemble
from jaxleak.task import Task


def _reconstruct(task: Task, names, x, y, *, steps: int, restarts: int, seed: int, progress: bool):
    """(k, D) Inverting Gradients reconstruction of each example per layer, from that layer's gradient alone."""
    from jaxleak.attacks import invert_layers
    from jaxleak.grads import layer_grads

    g = layer_grads(task, x, y)
    results = invert_layers(task, g, layers=list(names), restarts=restarts, steps=steps, seed=seed,
                            progress=progress)
    recon = {name: np.asarray(r.x, np.float64).reshape(x.shape[0], -1) for name, r in results.items()}
    return recon, next(iter(results.values())).label_source


def _input_member(recon_a, recon_v, xa, xv, mean):
    """Shrinkage fitted on the aux rows; per-example squared errors on aux and victims, or None if a <= 0."""
    da, ta = recon_a - mean, xa - mean
    a = float(np.sum(da * ta) / max(np.sum(da * da), 1e-300))
    if not a > 0:
        return None
    a = min(a, 1.0)
    mu_a, mu_v = mean + a * da, mean + a * (recon_v - mean)
    return a, np.sum(np.square(mu_a - xa), axis=1), np.sum(np.square(mu_v - xv), axis=1), mu_v


def _attribute_classifier(xa_train, za_train, seed: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegressionCV(Cs=6, cv=3, scoring="neg_log_loss", max_iter=500, random_state=seed).fit(xa_train, za_train)


def _class_probs(clf, x, num_classes: int) -> np.ndarray:
    p = np.zeros((x.shape[0], num_classes))
    p[:, clf.classes_] = clf.predict_proba(x)
    return p


def _mixed_loss(p, codes, prior, weight):
    return -np.log((1.0 - weight) * p[np.arange(codes.size), codes] + weight * prior[codes])


def inversion_family(task: Task, names, fitted, x, y, aux, *, n_victims: int, inversion_n: int, steps: int,
                     restarts: int, seed: int, progress: bool = False):
    """Per layer, the white-box member where it beats the learned ones on auxiliary validation rows.

    ``fitted`` is the learned families' fit on the attacker split (victims
    first, then the auxiliary rows); ``aux`` is ``(x_aux, y_aux, target_aux)``.
    Returns ``({layer: scored fields}, info)``: the fields of the layers where
    the white-box member was selected, and what was compared for every layer.
    """
    fit, split, t = fitted.fit, fitted.split, fitted.t
    xa, ya = aux[0], aux[1]
    rng = np.random.default_rng(seed + 1)
    vi = np.sort(rng.choice(n_victims, size=min(int(inversion_n), n_victims), replace=False))
    val_rows = np.flatnonzero(split.val.any(axis=0))
    av_rows = np.sort(rng.choice(val_rows, size=min(int(inversion_n), val_rows.size), replace=False))
    av = av_rows - n_victims
    xs = np.concatenate([x[vi], xa[av]])
    recon, label_source = _reconstruct(task, names, xs, np.concatenate([y[vi], ya[av]]), steps=steps,
                                       restarts=restarts, seed=seed, progress=progress)
    k = vi.size
    victim_pos = np.searchsorted(fit.rows, vi)  # victims' positions among the scored rows
    latent = fitted.kind == ensemble.CLASSIFICATION
    if latent:
        train_aux = np.setdiff1d(np.arange(xa.shape[0]), av)
        clf = _attribute_classifier(xa[train_aux].reshape(train_aux.size, -1), t[n_victims + train_aux], seed)
        num_classes = fit.null_pred.shape[-1]
        prior = fit.null_pred[0]
    else:
        mean = fit.target_mean[0]
        xv_flat, xa_flat = x[vi].reshape(k, -1), xa[av].reshape(av.size, -1)
    chosen, layers = {}, {}
    for i, name in enumerate(names):
        learned_aux = float(fit.val_row_loss[i, av_rows].mean())
        r_v, r_a = recon[name][:k], recon[name][k:]
        entry = {"aux_loss_learned": learned_aux}
        if latent:
            p_a, p_v = _class_probs(clf, r_a, num_classes), _class_probs(clf, r_v, num_classes)
            za, zv = t[av_rows], t[vi]
            losses = [float(_mixed_loss(p_a, za, prior, w).mean()) for w in ensemble.MIX_WEIGHTS]
            w = ensemble.MIX_WEIGHTS[int(np.argmin(losses))]
            entry.update(aux_loss_inversion=min(losses), prior_weight=w)
            if min(losses) < learned_aux:
                chosen[name] = dict(rows=vi, loss=_mixed_loss(p_v, zv, prior, w), null_loss=fit.null_loss[victim_pos],
                                    pred=(1.0 - w) * p_v + w * prior[None],
                                    member="inversion: Inverting Gradients on this layer, attribute classifier",
                                    extras={"prior_weight": [w]})
        else:
            member = _input_member(r_a, r_v, xa_flat, xv_flat, mean)
            entry["shrink"] = None if member is None else member[0]
            entry["aux_loss_inversion"] = None if member is None else float(member[1].mean())
            if member is not None and member[1].mean() < learned_aux:
                a, _, se_v, mu_v = member
                chosen[name] = dict(rows=vi, loss=se_v, null_loss=fit.null_loss[victim_pos],
                                    pred=mu_v.reshape((k,) + x.shape[1:]),
                                    member=f"inversion: Inverting Gradients on this layer, shrink {a:.3g}",
                                    extras={"shrink": a})
        entry["selected"] = name in chosen
        layers[name] = entry
    info = {"victims": int(k), "aux_rows": int(av.size), "steps": int(steps), "restarts": int(restarts),
            "labels": label_source, "aux_loss": "mean per-example loss on the auxiliary rows "
            + ("(nats)" if latent else "(squared error summed over the input)"), "layers": layers}
    return chosen, info
