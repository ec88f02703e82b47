"""Empirical V-information of each layer's gradient about a private target (METHOD section 2).

Usable information (Xu et al., ICLR 2020) for a predictive family V:

    I_V(G -> T) = H_V(T | 0) - H_V(T | G),   H_V(T | G) = inf_{f in V} E[-log f[G](T)].

Estimated by cross-fitting: for each of k folds an ensemble of attack models
(:mod:`jaxleak.ensemble`: linear and one-hidden-layer MLP, several weight
decays and seeds) trains on the other folds, the member with the lowest
validation loss (validation carved from the training part) is kept, and it
scores the held-out fold. Every example is scored once, by a model that never
saw it. Reported per layer with a 95% percentile bootstrap interval over the
held-out examples; values are raw (they can be slightly negative).

- Classification (integer target, e.g. a latent attribute): softmax
  classifiers; H_V(T|0) is the cross-entropy of held-out labels under the
  training fold's Laplace-smoothed class frequencies. Bits per example. The
  chosen classifier's probabilities are mixed with those frequencies at a
  weight (0.001 to 0.3) chosen on validation, which bounds what one
  confidently wrong prediction can cost (``prior_weight`` per fold).
- Reconstruction (floating target, e.g. the input): Gaussian decoders
  N(t; mu(g), s^2 I) with the best s, whose NLL is (D/2) log(2 pi e MSE / D);
  I_V = (1/2) log2(MSE_0 / MSE_G) bits per target dimension, MSE_0 being the
  error of the training mean. Targets of more than ``target_dim`` (128)
  dimensions are decoded in the span of the training targets' top principal
  directions (a restricted family: a lower bound). Decoder outputs are
  clipped to the training targets' range.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import jax
import numpy as np

from jaxleak import ensemble
from jaxleak.errors import InputError
from jaxleak.grads import apply_sketch, make_sketches
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Layer, Task

LOWER_BOUND_NOTE = (
    "layers wider than sketch_dim were count-sketched; a linear attack on a sketch is a linear attack on the "
    "full gradient, so their values are lower bounds of the full-gradient V-information (for the MLP family, "
    "an attack on a fixed projection)"
)


def _as_features(features: Mapping[str, object]) -> tuple[list[str], list[np.ndarray]]:
    if not isinstance(features, Mapping) or not features:
        raise InputError("features must be a non-empty mapping {layer: (N, d) array}")
    names, arrays, n = [], [], None
    for name, value in features.items():
        a = np.asarray(value)
        if a.ndim < 2:
            raise InputError(f"features of layer {name!r} must be (N, d), got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
            raise InputError(f"features of layer {name!r} must be real numbers, got dtype {a.dtype}")
        if a.shape[0] == 0 or a.size == 0:
            raise InputError(f"features of layer {name!r} are empty (shape {a.shape}); "
                             "at least one example and one feature are needed")
        a = a.reshape(a.shape[0], -1)
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise InputError(f"features of layer {name!r} have {a.shape[0]} rows, the first layer has {n}")
        if a.shape[1] == 0:
            raise InputError(f"features of layer {name!r} have no columns")
        if not np.all(np.isfinite(a)):
            raise InputError(f"features of layer {name!r} contain NaN or infinite values")
        names.append(str(name))
        arrays.append(a)
    return names, arrays


def _sketch(names: list[str], arrays: list[np.ndarray], dim: int, seed: int) -> tuple[list[np.ndarray], dict]:
    """Count-sketch the layers wider than ``dim`` (same sketch family as :func:`jaxleak.grads.sketch_grads`)."""
    stubs = [Layer(name, a.shape[1], (), (), ()) for name, a in zip(names, arrays)]
    sketches = make_sketches(stubs, dim, seed)
    out, sketched = [], {}
    for name, a in zip(names, arrays):
        sk = sketches[name]
        if sk is None:
            out.append(a.astype(np.float32))
            continue
        sketched[name] = int(a.shape[1])
        apply = jax.jit(lambda g, sk=sk: apply_sketch(sk, g))
        rows = max(1, 2 ** 24 // a.shape[1])  # bounded device memory per chunk
        out.append(np.concatenate([np.asarray(apply(np.asarray(a[i:i + rows], np.float32)))
                                   for i in range(0, a.shape[0], rows)]))
    return out, sketched


def _stack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(L, N, W) features, zero-padded to the widest layer, each column globally centred and scaled.

    The global affine map is undone exactly by the per-fold standardisation
    in the ensemble; it only keeps the float32 arithmetic well conditioned.
    Zero padding adds features that are constant, hence ignored: neither the
    linear nor the MLP family changes.
    """
    widths = np.array([a.shape[1] for a in arrays])
    n, width = arrays[0].shape[0], int(widths.max())
    x = np.zeros((len(arrays), n, width), np.float32)
    for i, a in enumerate(arrays):
        a = a.astype(np.float64)
        sd = a.std(axis=0)
        x[i, :, : a.shape[1]] = (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return x, widths


def _target(target, n: int) -> tuple[str, np.ndarray, dict]:
    t = np.asarray(target)
    if t.ndim == 0 or t.shape[0] != n:
        raise InputError(f"target has shape {t.shape}; its first axis must have the {n} examples of the features")
    if np.issubdtype(t.dtype, np.integer) or t.dtype == bool:
        if t.ndim != 1:
            raise InputError(f"an integer (class) target must have shape ({n},), got {t.shape}")
        classes, codes = np.unique(t, return_inverse=True)
        if classes.size < 2:
            raise InputError(f"the target has a single class ({classes[0]!r}); there is nothing to infer")
        return ensemble.CLASSIFICATION, codes.astype(np.int32), {"classes": classes.tolist()}
    if not np.issubdtype(t.dtype, np.floating):
        raise InputError(f"target must be integer classes or floating values, got dtype {t.dtype}")
    if not np.all(np.isfinite(t)):
        raise InputError("target contains NaN or infinite values")
    return ensemble.REGRESSION, t.astype(np.float64), {"shape": list(t.shape[1:])}


def _bootstrap(stat, n: int, n_boot: int, rng: np.random.Generator, *arrays) -> tuple[float, float]:
    """95% percentile interval of ``stat(*resampled arrays)`` over examples."""
    idx = rng.integers(0, n, size=(n_boot, n))
    values = stat(*(a[idx] for a in arrays))
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


IGNORANT = "ignorant predictor (no member beat it on validation)"


def _chosen_members(fit: ensemble.EnsembleFit, layer: int) -> tuple[str, list[str], list[int]]:
    """Most frequent choice over folds, each fold's choice, and the step its parameters come from."""
    names, steps = [], []
    for f, m in enumerate(int(m) for m in fit.chosen[layer]):
        names.append(IGNORANT if m < 0 else fit.members[m].describe())
        steps.append(0 if m < 0 else int(fit.best_step[layer, f, m]))
    best = Counter(names).most_common(1)[0][0]
    return best, names, steps


def _classification_scores(names, fit, y, rng, n_boot) -> dict[str, Score]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    ln2 = math.log(2.0)
    n = y.size
    num_classes = fit.heldout_pred.shape[-1]
    out = {}
    for i, name in enumerate(names):
        diff = (fit.null_loss - fit.heldout_loss[i]) / ln2
        value = float(diff.mean())
        ci = _bootstrap(lambda d: d.mean(axis=1), n, n_boot, rng, diff)
        prob = np.asarray(fit.heldout_pred[i], np.float64)
        pred = prob.argmax(axis=1)
        try:
            if num_classes == 2:
                auc = float(roc_auc_score(y, prob[:, 1]))
            else:
                prob = prob / prob.sum(axis=1, keepdims=True)
                auc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(num_classes)))
        except ValueError:
            auc = float("nan")
        best, per_fold, steps = _chosen_members(fit, i)
        out[name] = Score(value, ci, {
            "h_null": float(fit.null_loss.mean() / ln2),
            "h_cond": float(fit.heldout_loss[i].mean() / ln2),
            "accuracy": float(np.mean(pred == y)),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "roc_auc": auc,
            "best_member": best,
            "members_chosen": per_fold,
            "best_steps": steps,
            "prior_weight": [float(w) for w in fit.mix[i]],
        })
    return out


def _image_metrics(recon: np.ndarray, target: np.ndarray, data_range: float) -> dict:
    from jaxleak import metrics

    images = target if target.ndim == 4 else target[..., None]
    recon = recon.reshape(images.shape)
    return {"psnr": float(np.mean(np.asarray(metrics.psnr(recon, images, data_range)))),
            "ssim": float(np.mean(np.asarray(metrics.ssim(recon, images, data_range))))}


def _reconstruction_scores(names, fit, target, rng, n_boot) -> dict[str, Score]:
    n = target.shape[0]
    dims = int(np.prod(target.shape[1:], dtype=np.int64))
    image = target.ndim in (3, 4)
    data_range = 1.0 if target.min() >= 0.0 and target.max() <= 1.0 else float(np.ptp(target))
    half_log2 = lambda num, den: 0.5 * np.log2(num / den)  # noqa: E731
    mse_null = fit.null_loss.sum() / (n * dims)
    out = {}
    for i, name in enumerate(names):
        se = fit.heldout_loss[i]
        mse = se.sum() / (n * dims)
        value = float(half_log2(fit.null_loss.sum(), se.sum()))
        ci = _bootstrap(lambda a, b: half_log2(a.sum(axis=1), b.sum(axis=1)), n, n_boot, rng, fit.null_loss, se)
        best, per_fold, steps = _chosen_members(fit, i)
        extras = {
            "h_null": float(0.5 * math.log2(2 * math.pi * math.e * mse_null)) if mse_null > 0 else float("-inf"),
            "h_cond": float(0.5 * math.log2(2 * math.pi * math.e * mse)) if mse > 0 else float("-inf"),
            "mse": float(mse),
            "mse_null": float(mse_null),
        }
        if image:
            extras.update(_image_metrics(fit.decode(fit.heldout_pred[i]), target, data_range))
        else:
            extras["psnr"] = float(10 * math.log10(data_range ** 2 / mse)) if mse > 0 else float("inf")
        extras.update({"best_member": best, "members_chosen": per_fold, "best_steps": steps})
        out[name] = Score(value, ci, extras)
    return out


def _estimate(names: list[str], arrays: list[np.ndarray], target, *, sketched: dict, family, weight_decays, seeds,
              folds, sketch_dim, steps, seed, hidden, lr, patience, val_fraction, n_boot, target_dim,
              progress) -> LayerScores:
    kind, t, target_info = _target(target, arrays[0].shape[0])
    members = ensemble.make_members(family, weight_decays, seeds, hidden, seed)
    n = t.shape[0]
    split = ensemble.cross_fit_split(n, folds, val_fraction=val_fraction, seed=seed,
                                     strata=t if kind == ensemble.CLASSIFICATION else None)
    x, widths = _stack(arrays)
    num_classes = int(t.max()) + 1 if kind == ensemble.CLASSIFICATION else None
    fit = ensemble.fit_ensemble(x, t, split, members, kind=kind, num_classes=num_classes, widths=widths,
                                steps=steps, lr=lr, patience=patience, target_dim=target_dim, progress=progress)
    rng = np.random.default_rng(seed)
    if kind == ensemble.CLASSIFICATION:
        scores = _classification_scores(names, fit, t, rng, n_boot)
        unit = "bits"
    else:
        scores = _reconstruction_scores(names, fit, t, rng, n_boot)
        unit = "bits/dim"
    for name, w in zip(names, widths):
        scores[name] = Score(scores[name].value, scores[name].ci,
                             {**scores[name].extras, "features": int(w), "sketched_from": sketched.get(name)})
    meta = {
        "target": kind, **target_info,
        "estimator": f"{folds}-fold cross-fitted held-out NLL of the member with the lowest validation NLL",
        "members": [m.describe() for m in members],
        "folds": int(folds), "val_fraction": float(val_fraction), "steps": int(steps), "steps_run": int(fit.steps_run),
        "lr": float(lr), "patience": patience, "sketch_dim": int(sketch_dim), "seed": int(seed),
        "ci": f"95% percentile bootstrap over held-out examples ({n_boot} resamples)",
        "null": ("Laplace-smoothed training-fold class frequencies" if kind == ensemble.CLASSIFICATION
                 else "training-fold mean (Gaussian with the best variance)"),
        "lower_bound": LOWER_BOUND_NOTE if sketched else None,
        "target_reduced_to": (int(fit.target_basis.shape[2]) if fit.target_basis is not None else None),
        "mix_weights": [float(w) for w in ensemble.MIX_WEIGHTS] if kind == ensemble.CLASSIFICATION else None,
        "sketched_layers": sorted(sketched),
    }
    return LayerScores("v_information", scores, unit=unit, meta=meta)


def _check_options(sketch_dim, folds, n_boot, steps):
    if not isinstance(sketch_dim, (int, np.integer)) or sketch_dim < 1:
        raise InputError(f"sketch_dim must be a positive integer, got {sketch_dim!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")


def v_information_from_features(
    features: Mapping[str, object],
    target,
    *,
    family: Sequence[str] = ("linear", "mlp"),
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    seeds: int = 2,
    folds: int = 5,
    sketch_dim: int = 1024,
    steps: int = 300,
    seed: int = 0,
    hidden: int = 32,
    lr: float = 0.05,
    patience: int | None = 100,
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    target_dim: int | None = 128,
    progress: bool = False,
) -> LayerScores:
    """Empirical V-information I_V(G_l -> T) of each layer's features about ``target``.

    Args:
      features: ``{layer: (N, d_l)}`` per-example observations (per-example
        or sketched gradients, client updates, defended gradients); trailing
        axes beyond the first are flattened. Layers wider than ``sketch_dim``
        are count-sketched (seeded by ``seed``) to ``sketch_dim`` columns;
        narrower ones are zero-padded to the widest, which changes neither
        family. Standardised per fold with training statistics only.
      target: ``(N,)`` integers -> classification, value in **bits**;
        ``(N, ...)`` floats -> reconstruction with Gaussian decoders, value
        in **bits per target dimension**, (1/2) log2(MSE_0 / MSE_G).
      family: attack families, ``'linear'`` and/or ``'mlp'`` (one hidden
        ReLU layer of width ``hidden``).
      weight_decays: L2 penalties lambda (objective: mean NLL + lambda/2 ||W||^2
        on standardised features); ``seeds`` MLP initialisations each.
      folds: cross-fitting folds; ``val_fraction`` of each training part
        validates (early stopping and member selection).
      steps, lr, patience: full-batch Adam budget (cosine-decayed learning
        rate), and early stopping of the whole ensemble once no member has
        improved for ``patience`` steps; each member keeps its best
        validated parameters.
      n_boot: bootstrap resamples for the 95% interval.
      target_dim: a reconstruction target with more dimensions than this
        (e.g. a 32x32x3 image) is decoded in the span of the training
        folds' top ``target_dim`` principal directions; the value is then a
        lower bound (see :func:`jaxleak.ensemble.fit_ensemble`). None: full
        decoders (their size is features x target dimensions per member).
      progress: show a progress bar while the ensemble trains.

    Returns:
      :class:`LayerScores` ``"v_information"``: value I_V and its 95% CI,
      extras ``h_null`` = H_V(T|0) and ``h_cond`` = H_V(T|G) (bits, or bits
      per dimension as differential entropies), the chosen member
      (``best_member``, and per fold ``members_chosen``/``best_steps``),
      plus accuracy, balanced accuracy and ROC-AUC (macro one-vs-rest for
      more than two classes) for classification, or MSE, PSNR (dB) and, for
      image-shaped targets ``(N, H, W[, C])``, SSIM of the held-out
      reconstructions.
    """
    _check_options(sketch_dim, folds, n_boot, steps)
    names, arrays = _as_features(features)
    arrays, sketched = _sketch(names, arrays, int(sketch_dim), seed)
    return _estimate(names, arrays, target, sketched=sketched, family=family, weight_decays=weight_decays,
                     seeds=seeds, folds=folds, sketch_dim=sketch_dim, steps=steps, seed=seed, hidden=hidden, lr=lr,
                     patience=patience, val_fraction=val_fraction, n_boot=n_boot, target_dim=target_dim,
                     progress=progress)


def v_information(
    task: Task,
    x,
    y,
    target,
    *,
    family: Sequence[str] = ("linear", "mlp"),
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    seeds: int = 2,
    folds: int = 5,
    sketch_dim: int = 1024,
    steps: int = 300,
    seed: int = 0,
    hidden: int = 32,
    lr: float = 0.05,
    patience: int | None = 100,
    val_fraction: float = 0.2,
    n_boot: int = 1000,
    target_dim: int | None = 128,
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> LayerScores:
    """Empirical V-information of each layer's per-example gradient about a private target.

    ``target`` is a latent attribute, an integer array ``(N,)`` (latent
    information, bits), or the string ``"input"`` (original information:
    reconstruct x, bits per input dimension). Features are the per-example
    gradients ``grads.sketch_grads(task, x, y, dim=sketch_dim, seed=seed)``;
    the other options are those of :func:`v_information_from_features`.
    """
    _check_options(sketch_dim, folds, n_boot, steps)
    x, y = task.check_inputs(x, y)
    if isinstance(target, str):
        if target != "input":
            raise InputError(f"target must be a latent attribute array or the string 'input', got {target!r}")
        target = x
    else:
        target = np.asarray(target)
        if target.shape != (x.shape[0],) or not (np.issubdtype(target.dtype, np.integer) or target.dtype == bool):
            raise InputError(
                f"a latent target must be an integer array of shape ({x.shape[0]},) to match 'x', "
                f"got {target.dtype} {target.shape}")
    from jaxleak.grads import sketch_grads

    feats = sketch_grads(task, x, y, dim=int(sketch_dim), seed=seed, chunk_size=chunk_size, layers=layers,
                         progress=progress)
    sel = task.select(layers)
    sketched = {layer.name: layer.size for layer in sel if layer.size > sketch_dim}
    names = [layer.name for layer in sel]
    arrays = [np.asarray(feats[name]) for name in names]
    return _estimate(names, arrays, target, sketched=sketched, family=family, weight_decays=weight_decays,
                     seeds=seeds, folds=folds, sketch_dim=sketch_dim, steps=steps, seed=seed, hidden=hidden, lr=lr,
                     patience=patience, val_fraction=val_fraction, n_boot=n_boot, target_dim=target_dim,
                     progress=progress)
