"""Empirical V-information of each layer's gradient about a private target (docs/method.md section 3).

Usable information (Xu et al., ICLR 2020) for a predictive family V:

    I_V(G -> T) = H_V(T | 0) - H_V(T | G),   H_V(T | G) = inf_{f in V} E[-log f[G](T)].

**The attacker's own data.** With auxiliary data (``aux``), every attack model
is trained and selected on the gradients of the auxiliary examples only (a
validation split inside them chooses the member, its early-stopping step and
any mixing with the prior) and scored once on the victims' gradients: the
threat of an attacker who knows the weights and simulates gradients of data
of its own. Without auxiliary data the estimate is cross-fitted over the
measured examples (each scored once by a model that never saw it).

**Honest estimates.** The estimate is the held-out gain of the selected attack
model over the null, raw, with a 95% percentile bootstrap interval over the
scored examples (the same resamples for every layer: paired); it can be
negative, and a weak attack is never replaced by the null (an exact 0 would
be a false all-clear). ``detected`` controls the family-wise error rate
over the layers at 5% by a permutation test of the pairing of the attack's
victim predictions with their targets (Westfall-Young max-T over the
layers, the same permutations for every layer, ``p_adjusted``): the
victims' mean log-likelihood (or squared error) under their own targets
against shuffled ones. That statistic is first order in a weak signal,
where the gain over the prior is second order, so it detects what an
accuracy test detects and more; the gain and its interval stay the
reported value. Where nothing is detected, ``detectable`` (the gain the
bootstrap test would detect with 80% power at a Bonferroni threshold: a
conservative size) says how large an effect this run could have
detected. A detected layer is tied with the top layer when the paired
bootstrap interval of their difference contains 0.

- Classification (integer target, e.g. a latent attribute): softmax
  classifiers; H_V(T|0) is the cross-entropy of the scored labels under the
  attacker's Laplace-smoothed class frequencies. Bits per example. The
  chosen classifier's probabilities are mixed with those frequencies at a
  weight (0.001 to 0.9, ``ensemble.MIX_WEIGHTS``) chosen on validation, which bounds what one
  confidently wrong prediction can cost (``prior_weight``).
- Reconstruction (floating target, e.g. the input): Gaussian decoders
  N(t; mu(g), s^2 I) with the best s, whose NLL is (D/2) log(2 pi e MSE / D);
  I_V = (1/2) log2(MSE_0 / MSE_G) bits per target dimension, MSE_0 being the
  error of the attacker's mean. Targets of more than ``target_dim`` (128)
  dimensions are decoded in the span of the training targets' top principal
  directions (a restricted family: a lower bound). Decoder outputs are
  clipped to the training targets' range. Linear decoders are ridge
  regressions solved in closed form for each weight decay.
- MLP members read the top ``mlp_features`` (256) principal components of
  each fold's standardised features (computed on the rows the fold may
  read), which makes them four times cheaper on 1024-wide sketches; linear
  members read every column.
- White box (``family`` ``"inversion"``, needs a model and auxiliary data):
  the decoder mean is the Inverting Gradients reconstruction that matches
  layer l's gradient alone, shrunk towards the auxiliary mean by a factor
  fitted on auxiliary examples; for a latent target, an attribute classifier
  trained on the auxiliary inputs reads the reconstruction. It is selected
  over the learned members on auxiliary validation rows only (a paired
  bootstrap margin, shrinkage cross-fitted), and a selected layer is scored
  on every victim by the composite attack (white box on a subsample,
  learned elsewhere): see :mod:`jaxleak.whitebox`.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np
import scipy.linalg

from jaxleak import defaults, ensemble
from jaxleak.errors import InputError, NonFiniteError
from jaxleak.scores import LayerScores, Score
from jaxleak.task import Task

LOWER_BOUND_NOTE = (
    "layers wider than sketch_dim were reduced to their top principal components over all rows (see "
    "reduced_layers; those wider than the feature budget count-sketched first, see sketched_layers); an attack "
    "on a projection is an attack on the full gradient, so where directions were dropped the values are lower "
    "bounds of the full-gradient V-information"
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


def feature_width(sizes: Sequence[int], rows: int, dim: int, floats: int | None = None) -> int:
    """The width to which :func:`v_information` count-sketches each layer's per-example gradients on the device.

    The largest w >= ``dim`` with rows x sum_l min(P_l, w) <= ``floats`` (default
    ``defaults.FEATURE_FLOATS``): layers up to w wide come back whole
    (exact), wider ones as a count sketch of width w, and :func:`_reduce` then takes their principal
    components on the host. A sketch far wider than ``dim`` keeps weak directions that a sketch of width
    ``dim`` folds into noise.
    """
    sizes = sorted(int(p) for p in sizes)
    budget = (defaults.FEATURE_FLOATS if floats is None else int(floats)) // max(int(rows), 1)
    if sum(sizes) <= budget:
        return max(int(dim), sizes[-1] if sizes else int(dim))
    used = 0
    for i, p in enumerate(sizes):  # water-filling: layers narrower than w whole, the rest at w
        w = (budget - used) // (len(sizes) - i)
        if w < p:
            return max(int(dim), int(w))
        used += p
    return max(int(dim), sizes[-1])


def _reduce(names: list[str], arrays: list[np.ndarray], dim: int, seed: int,
            sizes: Mapping[str, int] | None = None) -> tuple[list[np.ndarray], dict]:
    """Layers wider than ``dim``: their top ``dim`` principal components over all rows, in a random basis.

    Unsupervised (no target is read), over the victims' and the attacker's rows together: the attacker
    holds both sets of observations. Columns are standardised first (over all rows; constant columns, by
    :func:`ensemble.constant_floor`, become 0), then the rows are projected on the top ``dim`` principal
    directions and rotated by a seeded random orthogonal matrix, so that every column mixes the kept
    directions with about the same spread and the attack's per-column standardisation keeps the geometry
    of the standardised layer (an L2-penalised linear attack on the result is one on the layer, restricted
    to the kept directions). When the rows span at most ``dim`` directions (N <= dim) nothing is lost: the
    inner products of the rows are those of the standardised layer. Returns the features and, per reduced
    layer, its size, the width it was count-sketched to on the device (``sizes``: the layers' sizes, where
    the arrays are sketches), the directions kept, whether they are all the rows' directions, and the share
    of the standardised variance they carry.
    """
    out, reduced = [], {}
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5ED]))
    for name, a in zip(names, arrays):
        n, width = a.shape
        if width <= dim:
            out.append(a.astype(np.float32))
            continue
        mean = a.mean(axis=0, dtype=np.float64)
        sd = a.std(axis=0, dtype=np.float64)
        live = sd > ensemble.constant_floor(mean, sd)
        xs = np.zeros((n, int(live.sum())), np.float32)
        xs[:] = (a[:, live] - mean[live]) / sd[live]
        gram = xs.T @ xs if xs.shape[1] <= n else xs @ xs.T  # (W, W) covariance route or (N, N) Gram route
        m = gram.shape[0]
        k = min(int(dim), m)
        if m:  # float64 where it is cheap; the top k alone where they are a small part of the spectrum
            if m <= 4096:
                gram = gram.astype(np.float64)
            # divide and conquer on the whole spectrum is several times faster than the subset driver unless
            # k is a small fraction of m (1078 rows, top 1024: 0.19 s against 0.38 s)
            subset = 2 * k < m
            lam, vec = scipy.linalg.eigh(gram, subset_by_index=[m - k, m - 1] if subset else None,
                                         driver="evr" if subset else "evd")
            lam, vec = lam[::-1][:k].astype(np.float64), ensemble._fix_signs(vec[:, ::-1][:, :k])  # driver-free signs
        else:
            lam, vec = np.zeros(0), np.zeros((0, 0), np.float32)
        total = float(np.trace(gram, dtype=np.float64))
        k = int(np.sum(lam > max(total, 0.0) * 1e-6))  # directions above float32's resolution of the Gram
        rest = total - float(np.sum(lam[:k]))
        if xs.shape[1] <= n:
            z = (xs @ vec[:, :k]).astype(np.float64)
        else:
            z = vec[:, :k].astype(np.float64) * np.sqrt(lam[:k])
        if k:
            q, r = np.linalg.qr(rng.standard_normal((k, k)))
            z = z @ (q * np.sign(np.diag(r)))
        else:
            z = np.zeros((n, 1))
        exact = bool(k < min(int(dim), m) or rest <= 1e-5 * max(total, 0.0) or k == m)
        out.append(z.astype(np.float32))
        size = int((sizes or {}).get(name, width))
        reduced[name] = {"size": size, "sketch": int(width) if size > width else None, "kept": int(k),
                         "variance_kept": float(np.sum(lam[:k]) / total) if total > 0 else 1.0, "exact": exact}
    return out, reduced


def _stack(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(L, N, W) features, zero-padded to the widest layer, each column globally centred and scaled.

    The global affine map is undone exactly by the per-fold standardisation
    in the ensemble; it only keeps the float32 arithmetic well conditioned
    (every value lies within sqrt(N) of 0, whatever the input's scale).
    Zero padding adds features that are constant, hence ignored: neither the
    linear nor the MLP family changes. Statistics are computed in float64. A
    column whose spread is at most :func:`ensemble.constant_floor` of its
    mean (1e-6 |mean|: a few float32 ulps, rounding rather than signal), or
    below float32's smallest normal number, is constant and becomes zeros,
    like padding; the rule is scale invariant, so a layer scaled by any
    factor that float32 represents gives the same features.
    """
    widths = np.array([a.shape[1] for a in arrays])
    n, width = arrays[0].shape[0], int(widths.max())
    x = np.zeros((len(arrays), n, width), np.float32)
    for i, a in enumerate(arrays):
        a = a.astype(np.float64)
        mean = a.mean(axis=0)
        sd = a.std(axis=0)
        varies = (sd > ensemble.constant_floor(mean, 0.0)) & (sd >= np.finfo(np.float32).tiny)
        x[i, :, : a.shape[1]] = np.where(varies, (a - mean) / np.where(varies, sd, 1.0), 0.0)
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




def _aux_target(target, aux_target, n_aux: int) -> np.ndarray:
    """Victims' and attacker's targets, one array (victims first), with the aux part checked on its own."""
    t, ta = np.asarray(target), np.asarray(aux_target)
    if ta.ndim == 0 or ta.shape[0] != n_aux:
        raise InputError(f"aux target has shape {ta.shape}; its first axis must have the {n_aux} auxiliary "
                         f"examples of the aux features")
    if ta.shape[1:] != t.shape[1:]:
        raise InputError(f"aux target has per-example shape {ta.shape[1:]}, the victims' target {t.shape[1:]}")
    if (np.issubdtype(t.dtype, np.floating)) != (np.issubdtype(ta.dtype, np.floating)):
        raise InputError(f"aux target ({ta.dtype}) and target ({t.dtype}) must both be classes or both floats")
    return np.concatenate([t, ta.astype(t.dtype)])


# Family-wise error rate of "detected" over the layers of one measure (max-T), and the power that
# ``detectable`` is stated for.
ALPHA = 0.05
POWER = 0.8


def bootstrap_resamples(n_boot: int, layers: int, alpha: float = ALPHA) -> int:
    """Resamples for the layers' bootstrap intervals and p-values: enough that the smallest p-value,
    1 / (B + 1), is 20 times below the Bonferroni threshold alpha / L that ``detectable`` is stated at."""
    return int(max(n_boot, math.ceil(20 * layers / alpha)))


def _boot(stat, idx: np.ndarray, *arrays) -> np.ndarray:
    """The statistic on every resample of the scored examples (idx: (B, n), shared by all layers: paired)."""
    return np.asarray(stat(*(a[idx] for a in arrays)), np.float64)


def _test(value: float, boots: np.ndarray) -> dict:
    """95% percentile interval, bootstrap standard error and one-sided p-value of 'value > 0'."""
    low, high = np.quantile(boots, [0.025, 0.975])
    return {"ci": (float(low), float(high)), "se": float(np.std(boots, ddof=1)),
            "p_value": float((1 + np.sum(boots <= 0.0)) / (boots.size + 1))}


def _chosen_members(fit: ensemble.EnsembleFit, layer: int) -> tuple[str, list[str], list[int]]:
    """Most frequent choice over folds, each fold's choice, and the step its parameters come from."""
    names, steps = [], []
    for f, m in enumerate(int(m) for m in fit.chosen[layer]):
        if m == len(fit.members):
            names.append(f"average of the {m} members")
            steps.append(None)
        else:
            step = int(fit.best_step[layer, f, m])
            prefix = {ensemble.CLOSED_FORM: "ridge (closed form) ", ensemble.SOLVED: "logistic (solved) "}
            names.append(prefix.get(step, "") + fit.members[m].describe())
            steps.append(None if step in prefix else step)
    best = Counter(names).most_common(1)[0][0]
    return best, names, steps


class _Scored:
    """One layer's selected attack on its scored examples: per-example losses, null losses, predictions."""

    def __init__(self, rows, loss, null_loss, pred, member: str, extras: dict):
        self.rows, self.loss, self.null_loss, self.pred = rows, loss, null_loss, pred
        self.member, self.extras = member, extras


def _learned(fit: ensemble.EnsembleFit, layer: int) -> _Scored:
    best, per_fold, steps = _chosen_members(fit, layer)
    extras = {"members_chosen": per_fold, "best_steps": steps}
    if fit.mix is not None:
        extras["prior_weight"] = [float(w) for w in fit.mix[layer]]
    pred = fit.heldout_pred[layer]
    return _Scored(fit.rows, fit.heldout_loss[layer], fit.null_loss, fit.decode(pred) if fit.mix is None else pred,
                   best, extras)


def _classification_score(scored: _Scored, y: np.ndarray, idx: np.ndarray) -> tuple[Score, np.ndarray]:
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    ln2 = math.log(2.0)
    y = y[scored.rows]
    diff = (scored.null_loss - scored.loss) / ln2
    boots = _boot(lambda d: d.mean(axis=-1), idx, diff)
    verdict = _test(float(diff.mean()), boots)
    prob = np.asarray(scored.pred, np.float64)
    num_classes = prob.shape[-1]
    pred = prob.argmax(axis=1)
    try:
        if num_classes == 2:
            auc = float(roc_auc_score(y, prob[:, 1]))
        else:
            prob = prob / prob.sum(axis=1, keepdims=True)
            auc = float(roc_auc_score(y, prob, multi_class="ovr", average="macro", labels=np.arange(num_classes)))
    except ValueError:
        auc = float("nan")
    return Score(float(diff.mean()), verdict.pop("ci"), {
        **verdict,
        "h_null": float(scored.null_loss.mean() / ln2),
        "h_cond": float(scored.loss.mean() / ln2),
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "roc_auc": auc,
        "scored": int(y.size),
        "best_member": scored.member,
        **scored.extras,
    }), boots


def _image_metrics(recon: np.ndarray, target: np.ndarray, data_range: float) -> dict:
    from jaxleak import metrics

    images = target if target.ndim == 4 else target[..., None]
    recon = recon.reshape(images.shape)
    return {"psnr": float(np.mean(np.asarray(metrics.psnr(recon, images, data_range)))),
            "ssim": float(np.mean(np.asarray(metrics.ssim(recon, images, data_range))))}


def _reconstruction_score(scored: _Scored, target: np.ndarray, data_range: float,
                          idx: np.ndarray) -> tuple[Score, np.ndarray]:
    target = target[scored.rows]
    n = target.shape[0]
    dims = int(np.prod(target.shape[1:], dtype=np.int64))
    half_log2 = lambda num, den: 0.5 * np.log2(num / den)  # noqa: E731
    se, null = scored.loss, scored.null_loss
    mse, mse_null = se.sum() / (n * dims), null.sum() / (n * dims)
    boots = _boot(lambda a, b: half_log2(a.sum(axis=-1), b.sum(axis=-1)), idx, null, se)
    verdict = _test(float(half_log2(null.sum(), se.sum())), boots)
    extras = {
        **verdict,
        "h_null": float(0.5 * math.log2(2 * math.pi * math.e * mse_null)) if mse_null > 0 else float("-inf"),
        "h_cond": float(0.5 * math.log2(2 * math.pi * math.e * mse)) if mse > 0 else float("-inf"),
        "mse": float(mse),
        "mse_null": float(mse_null),
        "scored": int(n),
    }
    if target.ndim in (3, 4):
        extras.update(_image_metrics(np.asarray(scored.pred), target, data_range))
    else:
        extras["psnr"] = float(10 * math.log10(data_range ** 2 / mse)) if mse > 0 else float("inf")
    extras.update({"best_member": scored.member, **scored.extras})
    return Score(float(half_log2(null.sum(), se.sum())), extras.pop("ci"), extras), boots


def _data_range(t: np.ndarray) -> float:
    return 1.0 if t.min() >= 0.0 and t.max() <= 1.0 else float(np.ptp(t))


class _Fitted:
    """The learned families' ensemble fit, with what scoring and the white-box family need."""

    def __init__(self, kind, t, target_info, fit, split, members, widths, mlp_features):
        self.kind, self.t, self.target_info, self.fit = kind, t, target_info, fit
        self.split, self.members, self.widths, self.mlp_features = split, members, widths, mlp_features


def _named_layers(message: str, names: Sequence[str]) -> str:
    """'layer 3' in an ensemble message -> "layer 3 ('Conv_1')"."""
    import re

    return re.sub(r"layer (\d+)", lambda m: (f"layer {m.group(1)} ({names[int(m.group(1))]!r})"
                                             if int(m.group(1)) < len(names) else m.group(0)), message)


def _fit(arrays: list[np.ndarray], target, *, names: Sequence[str] = (), n_aux: int, aux_target, family, weight_decays, seeds, folds,
         steps, seed, hidden, lr, patience, val_fraction, target_dim, mlp_features, progress) -> _Fitted:
    n = arrays[0].shape[0] - n_aux
    t_all = _aux_target(target, aux_target, n_aux) if n_aux else target
    kind, t, target_info = _target(t_all, n + n_aux)
    strata = t if kind == ensemble.CLASSIFICATION else None
    if n_aux:
        split = ensemble.attacker_split(n, n_aux, folds, seed=seed, strata=None if strata is None else strata[n:])
    else:
        split = ensemble.cross_fit_split(n, folds, val_fraction=val_fraction, seed=seed, strata=strata)
    members = ensemble.make_members(family, weight_decays, seeds, hidden, seed)
    x, widths = _stack(arrays)
    num_classes = int(t.max()) + 1 if kind == ensemble.CLASSIFICATION else None
    try:
        fit = ensemble.fit_ensemble(x, t, split, members, kind=kind, num_classes=num_classes, widths=widths,
                                    steps=steps, lr=lr, patience=patience, target_dim=target_dim,
                                    mlp_features=mlp_features, progress=progress)
    except NonFiniteError as err:
        raise NonFiniteError(f"V-information: {_named_layers(str(err), names)}") from err
    return _Fitted(kind, t, target_info, fit, split, members, widths,
                   ensemble.mlp_input_width(mlp_features, x.shape[2]))


def _learned_families(family) -> tuple[str, ...]:
    family = (family,) if isinstance(family, str) else tuple(family)
    for name in family:
        if name not in ensemble.FAMILIES + ("inversion",):
            raise InputError(f"unknown attack family {name!r}; known families are "
                             f"{list(ensemble.FAMILIES) + ['inversion']}")
    return tuple(f for f in family if f != "inversion")


def _composite(learned: _Scored, white: Mapping) -> _Scored:
    """The learned attack on every scored row, with the white-box member's losses and predictions on its rows."""
    pos = np.searchsorted(learned.rows, white["rows"])
    if not np.array_equal(learned.rows[np.minimum(pos, learned.rows.size - 1)], white["rows"]):
        raise AssertionError("white-box rows are not among the scored rows")
    loss, pred = np.array(learned.loss, np.float64), np.array(learned.pred, np.float64)
    loss[pos] = white["loss"]
    pred[pos] = np.asarray(white["pred"], np.float64).reshape(pred[pos].shape)
    member = f"{white['member']} on {pos.size} victims; {learned.member} on the others"
    return _Scored(learned.rows, loss, learned.null_loss, pred, member,
                   {**learned.extras, **white["extras"], "white_box_victims": int(pos.size)})


def permutations(n: int, count: int, seed: int) -> np.ndarray:
    """(count, n) permutations of the scored rows, the same for every layer of a run."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7340033]))
    return np.argsort(rng.random((count, n)), axis=1)


def pairing(scored: _Scored, t: np.ndarray, kind: str, perms: np.ndarray) -> tuple[float, np.ndarray]:
    """The attack's victim predictions paired with their own targets against shuffled ones.

    Classification: the mean log-likelihood of the scored rows' labels,
    mean_i log p_i(y_i), and the same with the labels permuted. Regression:
    the mean inner product of each prediction with its target, mean_i
    <t_i, pred_i>, and permuted (the squared error sum_i ||t_pi(i) - pred_i||^2
    differs from minus twice that only by terms no permutation changes).
    Returns (observed, (R,) permuted); larger is more evidence of leakage.
    Under the null (the layer's gradient independent of the target) the
    victims' targets are exchangeable given their gradients, so the
    permutation distribution is exact whatever the attack.
    """
    rows = np.arange(scored.rows.size)
    target = np.asarray(t)[scored.rows]
    if kind == ensemble.CLASSIFICATION:
        logp = np.log(np.maximum(np.asarray(scored.pred, np.float64), 1e-300))
        y = target.astype(np.int64)
        return float(logp[rows, y].mean()), logp[rows[None, :], y[perms]].mean(axis=1)
    pred = np.asarray(scored.pred, np.float64).reshape(rows.size, -1)
    target = target.reshape(rows.size, -1).astype(np.float64)
    inner = pred @ target.T  # (n, n): prediction i against target j
    return float(np.trace(inner) / rows.size), inner[rows[None, :], perms].mean(axis=1)


def _member_pairings(fit: ensemble.EnsembleFit, layer: int, t: np.ndarray, kind: str,
                     perms: np.ndarray) -> list[tuple[str, tuple[float, np.ndarray]]]:
    """The :func:`pairing` statistic of every member's victim predictions (``fit.member_pred``) on one layer."""
    if fit.member_pred is None:
        return []
    names = [m.describe() for m in fit.members] + [f"average of the {len(fit.members)} members"]
    out = []
    for j, name in enumerate(names):
        pred = fit.member_pred[layer, j]
        scored = _Scored(fit.rows, None, None, pred if fit.mix is not None else fit.decode(pred), name, {})
        out.append((name, pairing(scored, t, kind, perms)))
    return out


def family_wise(scores: dict[str, Score], boots: dict[str, np.ndarray],
                pairings: dict[str, tuple[float, np.ndarray]], alpha: float = ALPHA,
                member_pairings: Mapping[str, Sequence[tuple[str, tuple[float, np.ndarray]]]] | None = None
                ) -> dict[str, Score]:
    """Detection by the pairing test with max-T over the layers, the detectable gain, and ties.

    ``detected``: ``p_adjusted`` below alpha, where ``p_adjusted`` is the
    Westfall-Young max-T p-value of the layer's :func:`pairing` statistic
    over the same permutations for every layer (:func:`jaxleak.scores.max_t`),
    so "detected in k of L layers" has a family-wise error rate of alpha at
    any L; ``p_pairing`` is the layer's own permutation p-value (of the
    selected attack, ``pairings``).

    ``member_pairings``: optionally, per layer, the pairing statistics of
    every member of the family ((member name, statistic) pairs). The max-T
    then runs over every (layer, statistic) pair, the selected attack's
    included, and a layer's ``p_adjusted`` is the smallest of its own:
    still a family-wise error rate of alpha over the layers (a layer whose
    gradient is independent of the target makes every one of its statistics
    a null one), and a member that ranks the victims well but lost the
    selection on auxiliary log loss (an accurate but overconfident
    classifier, or an auxiliary set on which the signal is weaker than on
    the victims) can still show that the layer leaks. ``detected_by`` names
    the statistic with the smallest adjusted p-value.
    ``detectable``: the gain that the bootstrap test would detect with 80%
    power at the Bonferroni threshold, (z_{1 - alpha/L} + z_{0.8}) bootstrap
    standard errors (conservative: the pairing test is the more powerful).
    Ties: the top layer is the detected layer with the largest value;
    another detected layer is tied with it when the 95% paired bootstrap
    interval of (top - layer) over the same resampled victims contains 0.
    """
    from scipy.stats import norm

    from jaxleak.scores import max_t

    names = list(scores)
    stats = {}  # (layer, statistic's name) -> (observed, null)
    for n in names:
        if n in pairings:
            stats[(n, "selected attack")] = pairings[n]
        for member, stat in (member_pairings or {}).get(n, ()):
            stats[(n, member)] = stat
    ok = [k for k, (observed, _) in stats.items() if math.isfinite(observed)]
    p_all, _ = max_t({k: stats[k][0] for k in ok}, {k: stats[k][1] for k in ok}, alpha)
    p_adjusted, detected_by = {}, {}
    for (n, member), p in p_all.items():
        if n not in p_adjusted or p < p_adjusted[n]:
            p_adjusted[n], detected_by[n] = p, member
    z = float(norm.isf(alpha / max(len(p_adjusted), 1)) + norm.isf(1.0 - POWER))
    out = {}
    for name in names:
        s, p_adj = scores[name], p_adjusted.get(name)
        se = s.extras.get("se", math.nan)
        p_pair = None
        if name in pairings and math.isfinite(pairings[name][0]):
            observed, null = pairings[name]
            p_pair = float((1 + np.sum(np.asarray(null) >= observed)) / (np.asarray(null).size + 1))
        detected = bool(p_adj is not None and p_adj < alpha)
        out[name] = Score(s.value, s.ci, {**s.extras, "p_pairing": p_pair, "p_adjusted": p_adj,
                                          "detected": detected, "detected_by": detected_by[name] if detected else None,
                                          "detectable": z * se if math.isfinite(se) else None})
    detected = [n for n in names if out[n].extras["detected"]]
    top = max(detected, key=lambda n: out[n].value) if detected else None
    for name in names:
        extras = dict(out[name].extras)
        if top is None or name == top or not extras["detected"]:
            extras["vs_top"] = None
            extras["tied_with_top"] = None if top is None or name == top else False
        else:
            low, high = np.quantile(boots[top] - boots[name], [0.025, 0.975])
            extras["vs_top"] = {"top": top, "difference": float(out[top].value - out[name].value),
                                "ci": [float(low), float(high)]}
            extras["tied_with_top"] = bool(low <= 0.0)
        out[name] = Score(out[name].value, out[name].ci, extras)
    return out


def _scores(names: list[str], fitted: _Fitted, *, seed: int, n_boot: int, reduced: dict, sketch_dim: int,
            n_aux: int, folds: int, val_fraction: float, steps: int, lr: float, patience, white_box=None
            ) -> LayerScores:
    """Score each layer's selected attack on every victim (learned, or the composite where the white-box
    member won on auxiliary rows), with one set of bootstrap resamples shared by all layers."""
    kind, t, fit = fitted.kind, fitted.t, fitted.fit
    resamples = bootstrap_resamples(n_boot, len(names))
    idx = np.random.default_rng(seed).integers(0, fit.rows.size, size=(resamples, fit.rows.size))
    perms = permutations(fit.rows.size, defaults.VINFO_PERMUTATIONS, seed)
    scores, boots, pairings, member_pairings = {}, {}, {}, {}
    for i, name in enumerate(names):
        scored = _learned(fit, i)
        member_pairings[name] = _member_pairings(fit, i, t, kind, perms)
        if white_box and name in white_box:
            learned_only = scored
            scored = _composite(scored, white_box[name])
        if kind == ensemble.CLASSIFICATION:
            score, boots[name] = _classification_score(scored, t, idx)
        else:
            score, boots[name] = _reconstruction_score(scored, t, _data_range(t), idx)
        pairings[name] = pairing(scored, t, kind, perms)
        extras = {**score.extras, "features": int(fitted.widths[i]), "reduced": reduced.get(name)}
        if fit.constant_columns is not None:
            extras["constant_columns"] = int(np.max(fit.constant_columns[i]))
        if white_box and name in white_box:
            if kind == ensemble.CLASSIFICATION:
                learned_score, _ = _classification_score(learned_only, t, idx)
            else:
                learned_score, _ = _reconstruction_score(learned_only, t, _data_range(t), idx)
            extras["learned_alone"] = {"value": learned_score.value, "ci": list(learned_score.ci),
                                       "p_value": learned_score.extras["p_value"]}
        scores[name] = Score(score.value, score.ci, extras)
    scores = family_wise(scores, boots, pairings, member_pairings=member_pairings)
    estimator = (f"attack models trained and selected on the auxiliary examples' gradients ({folds}-fold "
                 f"cross-validation inside them: one member chosen by its pooled out-of-fold NLL), each victim "
                 f"scored once by the average of the {folds} fold models" if n_aux else
                 f"{folds}-fold cross-fitted held-out NLL of the member with the lowest validation NLL")
    meta = {
        "target": kind, **fitted.target_info,
        "estimator": estimator,
        "aux_examples": int(n_aux),
        "victims": int(fit.rows.size),
        "members": [m.describe() for m in fitted.members] + (["inversion"] if white_box is not None else []),
        "folds": int(folds), "val_fraction": None if n_aux else float(val_fraction), "steps": int(steps),
        "steps_run": int(fit.steps_run), "lr": float(lr), "mlp_features": fitted.mlp_features, "patience": patience,
        "sketch_dim": int(sketch_dim),
        "seed": int(seed),
        **({"solver_iterations": {name: int(fit.solver_iterations[i].max()) for i, name in enumerate(names)},
            "solver": f"linear classifiers: L-BFGS with an exact line search to max |gradient| <= "
                      f"{ensemble.SOLVER_TOL:g} (solver_iterations: the most any member of a layer took, "
                      f"at most {ensemble.SOLVER_MAX_ITER})"}
           if fit.solver_iterations is not None else {}),
        "ci": f"95% percentile bootstrap over the scored examples ({resamples} resamples, the same for every "
              f"layer)",
        "p_value": "one-sided bootstrap p-value of a positive gain, (1 + #{resampled gain <= 0}) / (B + 1)",
        "p_pairing": "permutation p-value of the pairing of the attack's victim predictions with their targets "
                     "(mean log-likelihood, or mean inner product of prediction and target, against shuffled "
                     f"targets; {defaults.VINFO_PERMUTATIONS} permutations, the same for every layer)",
        "p_adjusted": "Westfall-Young single-step max-T over the layers of the pairing statistics of the selected "
                      "attack and of every member of the family (a layer's smallest; detected_by names it)",
        "detected": f"p_adjusted below {ALPHA}: family-wise error rate {ALPHA} over the {len(names)} layers",
        "detectable": f"the attack gain the bootstrap test would detect with {POWER:.0%} power at the Bonferroni "
                      f"threshold, (z_(1 - {ALPHA}/L) + z_{POWER}) bootstrap standard errors (conservative: the "
                      f"pairing test is more powerful)",
        "detectable_what": "an attack gain",
        "ties": "a detected layer is tied with the top layer when the 95% paired bootstrap interval of their "
                "difference contains 0",
        "null": (("Laplace-smoothed class frequencies" if kind == ensemble.CLASSIFICATION
                  else "mean (Gaussian with the best variance)")
                 + (" of the auxiliary examples" if n_aux else " of the training folds")),
        "lower_bound": (LOWER_BOUND_NOTE if any(r["sketch"] or not r["exact"] for r in reduced.values())
                        else None),
        "target_reduced_to": (int(fit.target_basis.shape[2]) if fit.target_basis is not None else None),
        "mix_weights": [float(w) for w in ensemble.MIX_WEIGHTS] if kind == ensemble.CLASSIFICATION else None,
        "reduced_layers": sorted(reduced),
        "sketched_layers": sorted(name for name, r in reduced.items() if r["sketch"]),
        "reduced": ("a layer wider than sketch_dim: its top sketch_dim principal components over the victims' "
                    "and the attacker's rows, standardised columns, in a seeded random basis; per layer "
                    "'reduced': its size, the count-sketch width on the device (null: exact gradients), the "
                    "directions kept, 'exact' (every direction of the rows kept) and the share of variance kept"),
        "constant_columns": "columns of the layer's features whose spread on a fold's training rows is at most "
                            f"{ensemble.CONSTANT_RTOL:g} of their scale: ignored (the most over folds)",
    }
    unit = "bits" if kind == ensemble.CLASSIFICATION else "bits/dim"
    return LayerScores("v_information", scores, unit=unit, meta=meta)


def _check_options(sketch_dim, folds, n_boot, steps):
    if not isinstance(sketch_dim, (int, np.integer)) or sketch_dim < 1:
        raise InputError(f"sketch_dim must be a positive integer, got {sketch_dim!r}")
    if not isinstance(n_boot, (int, np.integer)) or n_boot < 2:
        raise InputError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 2:
        raise InputError(f"steps must be an integer >= 2, got {steps!r}")


def _with_aux(names, arrays, aux_features) -> tuple[list[np.ndarray], int]:
    """Victims' rows followed by the attacker's, layer by layer (same layers, same widths)."""
    if aux_features is None:
        return arrays, 0
    aux_names, aux_arrays = _as_features(aux_features)
    if aux_names != names:
        raise InputError(f"aux_features has layers {aux_names}; they must be the features' layers {names}, "
                         f"in the same order")
    for name, a, b in zip(names, arrays, aux_arrays):
        if a.shape[1] != b.shape[1]:
            raise InputError(f"aux_features of layer {name!r} have {b.shape[1]} columns, the features {a.shape[1]}")
    return [np.concatenate([a, b]) for a, b in zip(arrays, aux_arrays)], aux_arrays[0].shape[0]


def v_information_from_features(
    features: Mapping[str, object],
    target,
    *,
    aux_features: Mapping[str, object] | None = None,
    aux_target=None,
    family: Sequence[str] = ("linear", "mlp"),
    weight_decays: Sequence[float] = defaults.VINFO_WEIGHT_DECAYS,
    seeds: int = 2,
    folds: int = defaults.VINFO_FOLDS,
    sketch_dim: int = defaults.SKETCH_DIM,
    steps: int = defaults.VINFO_STEPS,
    seed: int = 0,
    hidden: int = 32,
    lr: float = 0.05,
    patience: int | None = defaults.VINFO_PATIENCE,
    val_fraction: float = 0.2,
    n_boot: int = defaults.VINFO_BOOT,
    target_dim: int | None = 128,
    mlp_features: int | None = 256,
    progress: bool = False,
) -> LayerScores:
    """Empirical V-information I_V(G_l -> T) of each layer's features about ``target``.

    Args:
      features: ``{layer: (N, d_l)}`` the victims' observations (per-example
        or sketched gradients, client updates, defended gradients); trailing
        axes beyond the first are flattened. Layers wider than ``sketch_dim``
        are reduced to their top ``sketch_dim`` principal components over
        all rows (victims and auxiliary; no target is read), exactly when
        the rows span at most ``sketch_dim`` directions (see
        ``meta["reduced_layers"]``); narrower ones are zero-padded to the
        widest, which changes neither family. Standardised with the
        training rows' statistics only.
      target: ``(N,)`` integers -> classification, value in **bits**;
        ``(N, ...)`` floats -> reconstruction with Gaussian decoders, value
        in **bits per target dimension**, (1/2) log2(MSE_0 / MSE_G).
      aux_features, aux_target: the attacker's own examples, ``{layer:
        (N_aux, d_l)}`` (same layers and widths) and their targets. Given,
        every attack model trains and is selected on them alone (``folds``-fold
        cross-validation inside them: the member with the lowest pooled
        out-of-fold loss is chosen), the null is their class frequencies or
        mean, and each victim is scored once, by the average of the fold
        models' predictions. None: ``folds``-fold cross-fitting over the
        victims, ``val_fraction`` of each training part validating.
      family: attack families, ``'linear'`` and/or ``'mlp'`` (one hidden
        ReLU layer of width ``hidden``, reading each fold's top
        ``mlp_features`` principal components of the features; None: every
        column). Linear decoders of a reconstruction target are ridge
        regressions solved in closed form. (The white-box ``'inversion'``
        family needs a model: :func:`v_information`.)
      weight_decays: L2 penalties lambda (objective: mean NLL + lambda/2 ||W||^2
        on standardised features); ``seeds`` MLP initialisations each.
      steps, lr, patience: the MLP members' full-batch Adam budget
        (cosine-decayed learning rate), and early stopping of a layer once
        none of its members has improved for ``patience`` steps; each member
        keeps its best validated parameters after at least one update.
        (Linear members are solved, not trained: ridge in closed form,
        classifiers by L-BFGS.)
      n_boot: bootstrap resamples for the 95% interval.
      target_dim: a reconstruction target with more dimensions than this
        (e.g. a 32x32x3 image) is decoded in the span of the training
        rows' top ``target_dim`` principal directions; the value is then a
        lower bound (see :func:`jaxleak.ensemble.fit_ensemble`). None: full
        decoders (their size is features x target dimensions per member).
      progress: show a progress bar while the ensemble trains.

    Returns:
      :class:`LayerScores` ``"v_information"``: value I_V (raw, possibly
      negative) and its 95% CI, ``detected`` (CI above 0), ``se`` and
      ``detectable`` (the smallest effect this run detects with 80% power),
      ``h_null`` = H_V(T|0) and ``h_cond`` = H_V(T|G) (bits, or bits per
      dimension as differential entropies), the chosen member
      (``best_member``, and per fold ``members_chosen``/``best_steps``),
      plus accuracy, balanced accuracy and ROC-AUC (macro one-vs-rest for
      more than two classes) for classification, or MSE, PSNR (dB) and, for
      image-shaped targets ``(N, H, W[, C])``, SSIM of the reconstructions.
    """
    _check_options(sketch_dim, folds, n_boot, steps)
    learned = _learned_families(family)
    if "inversion" in ((family,) if isinstance(family, str) else tuple(family)):
        raise InputError("the 'inversion' family inverts gradients through a model; use v_information(task, ...) "
                         "with aux=(...) for it")
    if (aux_features is None) != (aux_target is None):
        raise InputError("give aux_features and aux_target together (the attacker's observations and targets)")
    names, arrays = _as_features(features)
    arrays, n_aux = _with_aux(names, arrays, aux_features)
    arrays, reduced = _reduce(names, arrays, int(sketch_dim), seed)
    fitted = _fit(arrays, target, names=names, n_aux=n_aux, aux_target=aux_target, family=learned,
                  weight_decays=weight_decays,
                  seeds=seeds, folds=folds, steps=steps, seed=seed, hidden=hidden, lr=lr, patience=patience,
                  val_fraction=val_fraction, target_dim=target_dim, mlp_features=mlp_features, progress=progress)
    return _scores(names, fitted, seed=seed, n_boot=n_boot, reduced=reduced, sketch_dim=sketch_dim, n_aux=n_aux,
                   folds=folds, val_fraction=val_fraction, steps=steps, lr=lr, patience=patience)


def _check_aux(task: Task, aux, latent: bool):
    if aux is None:
        return None
    if not isinstance(aux, (tuple, list)) or len(aux) != (3 if latent else 2):
        what = "(x_aux, y_aux, z_aux)" if latent else "(x_aux, y_aux)"
        raise InputError(f"aux must be the attacker's examples {what} for a "
                         f"{'latent' if latent else 'input'} target")
    xa, ya = task.check_inputs(aux[0], aux[1])
    if latent:
        za = np.asarray(aux[2])
        if za.shape != (xa.shape[0],) or not (np.issubdtype(za.dtype, np.integer) or za.dtype == bool):
            raise InputError(f"aux latent z_aux must be an integer array of shape ({xa.shape[0]},) to match "
                             f"x_aux, got {za.dtype} {za.shape}")
        return xa, ya, za
    return xa, ya, xa


# The most recent features of v_information (one data set), keyed by a fingerprint of what decides them.
_LAST_FEATURES: dict = {}


def _fingerprint(task: Task, parts, dim, seed: int, names: tuple) -> tuple:
    """A digest of the parameters, the examples and the widths: equal digests give equal features."""
    from jaxleak.compilation import array_digest

    return (array_digest(task.params, list(parts)), id(task.apply_fn), id(task.loss_fn), dim, int(seed), names)


def _exact_gradients(task: Task, layers, width: int, seed: int, chunk: int):
    """``(x, y, names) -> {name: (k, P)}`` exact per-example gradients for the white-box family.

    Layers that the features hold whole (at most ``width`` parameters) come from the features' own compiled
    program: the rows are padded to the features' ``chunk``, so no program is compiled for them (on the
    default run that saves the compilation of a gradient program); wider layers from :func:`grads.layer_grads`.
    """
    from jaxleak.grads import layer_grads, sketch_grads

    def gradients(xs, ys, names):
        whole = [name for name in names if task.layer(name).size <= width]
        out = {}
        if whole:
            k = xs.shape[0]
            pad = max(chunk - k, 0)
            xp = np.concatenate([xs, np.repeat(xs[:1], pad, axis=0)]) if pad else xs
            yp = np.concatenate([ys, np.repeat(ys[:1], pad, axis=0)]) if pad else ys
            g = sketch_grads(task, xp, yp, dim=width, seed=seed, chunk_size=chunk, layers=layers)
            out.update({name: g[name][:k] for name in whole})
        rest = [name for name in names if name not in out]
        if rest:
            out.update(layer_grads(task, xs, ys, layers=rest))
        return {name: out[name] for name in names}

    return gradients


def v_information(
    task: Task,
    x,
    y,
    target,
    *,
    aux=None,
    family: Sequence[str] | None = None,
    weight_decays: Sequence[float] = defaults.VINFO_WEIGHT_DECAYS,
    seeds: int = 2,
    folds: int = defaults.VINFO_FOLDS,
    sketch_dim: int = defaults.SKETCH_DIM,
    steps: int = defaults.VINFO_STEPS,
    seed: int = 0,
    hidden: int = 32,
    lr: float = 0.05,
    patience: int | None = defaults.VINFO_PATIENCE,
    val_fraction: float = 0.2,
    n_boot: int = defaults.VINFO_BOOT,
    target_dim: int | None = 128,
    mlp_features: int | None = 256,
    inversion_n: int = defaults.INVERSION_N,
    inversion_steps: int = defaults.INVERSION_STEPS,
    inversion_restarts: int = 1,
    inversion_budget_s: float | str | None = "auto",
    chunk_size: int | None = None,
    layers: Sequence[str] | None = None,
    progress: bool = False,
) -> LayerScores:
    """Empirical V-information of each layer's per-example gradient about a private target.

    ``target`` is a latent attribute, an integer array ``(N,)`` (latent
    information, bits), or the string ``"input"`` (original information:
    reconstruct x, bits per input dimension). Features are the per-example
    gradients ``grads.sketch_grads(task, x, y, dim=w, seed=seed)`` of the
    victims and the auxiliary examples, w = :func:`feature_width` (layers
    that fit ``defaults.FEATURE_FLOATS`` come back whole, wider ones as a
    count sketch of width w), each layer wider than ``sketch_dim`` then
    reduced to its top ``sketch_dim`` principal components over those rows
    (as in :func:`v_information_from_features`).

    ``aux`` is the attacker's own data, ``(x_aux, y_aux, z_aux)`` for a latent
    target or ``(x_aux, y_aux)`` for ``"input"``: examples disjoint from the
    victims (and, to model an outside attacker, from the model's training
    data). Their gradients at the same parameters train and select every
    attack model; the victims are scored once. Without ``aux`` the estimate
    is cross-fitted over the victims.

    ``family`` (default: ``("linear", "mlp")``, plus ``"inversion"`` for
    ``"input"`` when ``aux`` is given) may include the white-box
    ``"inversion"`` family (needs ``aux``): per layer, the Inverting
    Gradients reconstruction that matches that layer's gradient alone
    (``inversion_restarts`` restarts of ``inversion_steps`` steps, labels
    recovered from the gradient where possible), shrunk towards the
    auxiliary mean by a factor fitted on auxiliary examples, is the decoder
    mean; for a latent target a logistic-regression attribute classifier
    trained on the auxiliary inputs reads it. Per layer it competes with the
    learned members on ``inversion_n`` auxiliary validation rows; where it
    wins, ``inversion_n`` victims (a seeded subsample) are scored with it
    (``meta["inversion"]`` says which). ``inversion_budget_s`` bounds the
    white-box family's time: layers are inverted in forward order (a first
    Dense layer in closed form, at no cost) and no further group of layers
    starts once the budget would be overrun; ``"auto"`` is the larger of
    30 s and twice the time this call spent before the inversion, None no
    limit. ``meta["inversion"]["skipped"]`` lists the layers not inverted
    and the verdict says the white-box family was cut short. The other
    options are those of :func:`v_information_from_features`.
    """
    import time

    started = time.perf_counter()
    _check_options(sketch_dim, folds, n_boot, steps)
    x, y = task.check_inputs(x, y)
    latent = not isinstance(target, str)
    if not latent:
        if target != "input":
            raise InputError(f"target must be a latent attribute array or the string 'input', got {target!r}")
        target = x
    else:
        target = np.asarray(target)
        if target.shape != (x.shape[0],) or not (np.issubdtype(target.dtype, np.integer) or target.dtype == bool):
            raise InputError(
                f"a latent target must be an integer array of shape ({x.shape[0]},) to match 'x', "
                f"got {target.dtype} {target.shape}")
    aux = _check_aux(task, aux, latent)
    if family is None:
        family = ("linear", "mlp") + (("inversion",) if aux is not None and not latent else ())
    learned = _learned_families(family)
    white_box = "inversion" in ((family,) if isinstance(family, str) else tuple(family))
    if white_box and aux is None:
        raise InputError("the 'inversion' family needs the attacker's auxiliary data: pass aux=(...)")
    if white_box and not learned:
        raise InputError("the 'inversion' family competes with learned members; add 'linear' and/or 'mlp'")
    from jaxleak.grads import factor_report, sketch_chunk_size, sketch_grads

    sel = task.select(layers)
    names = [layer.name for layer in sel]
    sizes = {layer.name: layer.size for layer in sel}

    def features(parts):
        rows = sum(int(xs.shape[0]) for xs, _ in parts)
        width = feature_width(sizes.values(), rows, int(sketch_dim))
        used["width"] = width
        # one chunk size for every part (sized for the largest): one compiled program
        used["chunk"] = int(chunk_size) if chunk_size else sketch_chunk_size(
            task, sel, width, parts[0][0], parts[0][1], max(int(xs.shape[0]) for xs, _ in parts))
        key = _fingerprint(task, parts, (width, int(sketch_dim)), seed, tuple(names))
        if _LAST_FEATURES.get("key") != key:  # one slot: a run's latent and input measures share the features
            _LAST_FEATURES.clear()
            per_part = [sketch_grads(task, xs, ys, dim=width, seed=seed, chunk_size=used["chunk"],
                                     layers=layers, progress=progress) for xs, ys in parts]
            # one layer's parts at a time are held twice (popped as they are joined)
            arrays = [np.concatenate([np.asarray(f.pop(name)) for f in per_part]) for name in names]
            del per_part
            _LAST_FEATURES.update(key=key, arrays=_reduce(names, arrays, int(sketch_dim), seed, sizes))
        return _LAST_FEATURES["arrays"]

    used: dict = {}
    n_aux, aux_target = 0, None
    arrays, reduced = features([(x, y)] + ([(aux[0], aux[1])] if aux is not None else []))
    if aux is not None:
        n_aux, aux_target = aux[0].shape[0], aux[2]
    fitted = _fit(arrays, target, names=names, n_aux=n_aux, aux_target=aux_target, family=learned,
                  weight_decays=weight_decays,
                  seeds=seeds, folds=folds, steps=steps, seed=seed, hidden=hidden, lr=lr, patience=patience,
                  val_fraction=val_fraction, target_dim=target_dim, mlp_features=mlp_features, progress=progress)
    chosen, info = None, None
    if white_box:
        from jaxleak.whitebox import inversion_family

        budget = inversion_budget_s
        if budget == "auto":
            budget = max(30.0, 2.0 * (time.perf_counter() - started))
        elif budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise InputError(f"inversion_budget_s must be a positive number of seconds, 'auto' or None, "
                             f"got {inversion_budget_s!r}")
        chosen, info = inversion_family(task, names, fitted, x, y, aux, n_victims=x.shape[0],
                                        inversion_n=inversion_n, steps=inversion_steps,
                                        restarts=inversion_restarts, seed=seed, progress=progress,
                                        budget_s=None if budget is None else float(budget),
                                        gradients=_exact_gradients(task, layers, used["width"], seed,
                                                                   used["chunk"]))
    scores = _scores(names, fitted, seed=seed, n_boot=n_boot, reduced=reduced, sketch_dim=sketch_dim,
                     n_aux=n_aux, folds=folds, val_fraction=val_fraction, steps=steps, lr=lr, patience=patience,
                     white_box=chosen)
    scores.meta["gradients"] = factor_report(task, sel, x, y)
    if info is not None:
        scores.meta["inversion"] = info
        if info["skipped"]:
            scores.meta["verdict_note"] = (f"the white-box family was cut short by its time budget "
                                           f"({info['budget_s']:.0f} s): {len(info['skipped'])} of {len(names)} "
                                           f"layers not inverted")
    return scores
