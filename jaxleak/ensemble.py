"""Ensembles of attack models trained in parallel, with cross-fitting.

This is the engine behind empirical V-information (docs/method.md section 3,
:mod:`jaxleak.vinfo`). An *ensemble* is every member (architecture x weight
decay x seed) for every layer and every cross-fitting fold. All of them train
in one jitted computation: the parameters of a family carry leading axes
``(layers, folds, members)`` and one loss, the sum of the members'
independent objectives, is differentiated once per step, so each member gets
exactly its own gradient and Adam (element-wise) treats it on its own.
Linear members are not trained step by step but solved: ridge decoders in
closed form, linear classifiers by L-BFGS with an exact line search, all
members of a layer in one loop.

Data layout: features ``(L, N, W)`` (every layer brought to a common width W
by the caller) and boolean masks ``(F, N)`` that say, per fold, which
examples train, which validate and which are held out. Every member sees all
N rows in its forward pass, with the rows of other roles masked out of its
loss; that costs a little arithmetic but keeps one shape for every fold and
gives the validation loss of the current parameters for free at each step.
Held-out targets enter only the final scoring: training, early stopping and
member selection read train and validation rows only (``jnp.where`` masks,
so not even a NaN gradient can leak through).

Standardisation uses each fold's training statistics (mean and standard
deviation over its non-held-out rows) and is folded into the first weight
matrix, ``(x - mu) / sd @ w = x @ (w / sd) - mu @ (w / sd)``, so no
per-fold copy of the features is made. Features that are constant on the
training rows (zero padding among them) get ``1 / sd = 0``: they are
ignored, and their weights stay exactly zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxleak import compilation, defaults
from jaxleak.errors import InputError, NonFiniteError
from jaxleak.grads import TRACE_COUNTS

FAMILIES = ("linear", "mlp")
CLASSIFICATION = "classification"
REGRESSION = "regression"


class Member(NamedTuple):
    """One configuration of attack model: family, L2 weight decay, seed, hidden width (MLP only)."""

    family: str
    weight_decay: float
    seed: int
    hidden: int = 0

    def describe(self) -> str:
        if self.family == "linear":
            return f"linear wd={self.weight_decay:g}"
        return f"mlp(hidden={self.hidden}) wd={self.weight_decay:g} seed={self.seed}"


def make_members(family: Sequence[str] = FAMILIES, weight_decays: Sequence[float] = defaults.VINFO_WEIGHT_DECAYS,
                 seeds: int = 2, hidden: int = 32, seed: int = 0) -> list[Member]:
    """The members of an ensemble, grouped by family in the order of ``family``.

    Linear members are solved to the minimiser of a convex objective, so
    seeds would give identical copies: the linear family has one member per
    weight decay. The MLP family (one hidden
    ReLU layer of width ``hidden``) has one member per weight decay and seed,
    seeds ``seed, seed + 1, ..., seed + seeds - 1``.
    """
    family = (family,) if isinstance(family, str) else tuple(family)
    if not family:
        raise InputError("family is empty; give at least one of 'linear', 'mlp'")
    for name in family:
        if name not in FAMILIES:
            raise InputError(f"unknown attack family {name!r}; known families are {list(FAMILIES)}")
    if len(set(family)) != len(family):
        raise InputError(f"family lists a family twice: {list(family)}")
    wds = [float(w) for w in np.atleast_1d(np.asarray(weight_decays, dtype=np.float64))]
    if not wds or not all(math.isfinite(w) and w >= 0 for w in wds):
        raise InputError(f"weight_decays must be a non-empty list of finite numbers >= 0, got {weight_decays!r}")
    if not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise InputError(f"seeds must be a positive integer (the number of seeds per MLP configuration), got {seeds!r}")
    if "mlp" in family and (not isinstance(hidden, (int, np.integer)) or hidden < 1):
        raise InputError(f"hidden must be a positive integer (the MLP's hidden width), got {hidden!r}")
    out = []
    for name in family:
        if name == "linear":
            out += [Member("linear", w, int(seed)) for w in wds]
        else:
            out += [Member("mlp", w, int(seed) + s, int(hidden)) for w in wds for s in range(seeds)]
    return out


class Split(NamedTuple):
    """Roles of N examples in F folds, boolean ``(F, N)`` each.

    In every fold the three masks are disjoint. Cross-fitting
    (``shared=False``): ``fold_of[i]`` is the fold whose model scores example
    i (each example is held out exactly once) and each fold selects its own
    member. The attacker's split (``shared=True``, :func:`attacker_split`):
    the test rows (the victims) are the same in every fold, the folds are a
    cross-validation of the auxiliary rows, one member is selected by its
    pooled out-of-fold loss, and a victim is scored by the average of the
    F fold models' predictions.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    fold_of: np.ndarray
    shared: bool = False


def _stratified_order(index: np.ndarray, strata: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """``index`` shuffled, then grouped by stratum (random order inside each stratum)."""
    perm = index[rng.permutation(index.size)]
    if strata is None:
        return perm
    return perm[np.argsort(strata[perm], kind="stable")]


def cross_fit_split(n: int, folds: int = 5, *, val_fraction: float = 0.2, seed: int = 0,
                    strata: np.ndarray | None = None) -> Split:
    """k-fold cross-fitting with a validation split carved from each training part.

    Examples are dealt to ``folds`` held-out folds (stratified by ``strata``,
    e.g. class labels, when given); in fold f the other examples are split
    into validation (``val_fraction`` of them, stratified, spread evenly over
    a seeded shuffle) and training.
    """
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"folds must be an integer >= 2 (k-fold cross-fitting), got {folds!r}")
    if not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if n < 3 * folds:
        raise InputError(f"{n} examples are too few for {folds} folds; give at least {3 * folds}")
    rng = np.random.default_rng(seed)
    order = _stratified_order(np.arange(n), strata, rng)
    fold_of = np.empty(n, np.int32)
    fold_of[order] = np.arange(n) % folds
    train = np.zeros((folds, n), bool)
    val = np.zeros((folds, n), bool)
    test = fold_of[None, :] == np.arange(folds)[:, None]
    for f in range(folds):
        rest = _stratified_order(np.flatnonzero(~test[f]), strata, rng)
        pos = np.arange(rest.size)
        is_val = np.floor((pos + 1) * val_fraction) > np.floor(pos * val_fraction)
        val[f, rest[is_val]] = True
        train[f, rest[~is_val]] = True
    return Split(train, val, test, fold_of)


def single_split(n: int, *, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0,
                 strata: np.ndarray | None = None) -> Split:
    """One train/validation/test split (F = 1); the examples outside the test set are never scored."""
    rng = np.random.default_rng(seed)
    order = _stratified_order(np.arange(n), strata, rng)
    pos = np.arange(n)
    is_test = np.floor((pos + 1) * test_fraction) > np.floor(pos * test_fraction)
    test = np.zeros((1, n), bool)
    test[0, order[is_test]] = True
    rest = _stratified_order(np.flatnonzero(~test[0]), strata, rng)
    pos = np.arange(rest.size)
    is_val = np.floor((pos + 1) * val_fraction) > np.floor(pos * val_fraction)
    val = np.zeros((1, n), bool)
    train = np.zeros((1, n), bool)
    val[0, rest[is_val]] = True
    train[0, rest[~is_val]] = True
    return Split(train, val, test, np.zeros(n, np.int32))


def attacker_split(n_victims: int, n_aux: int, folds: int = 5, *, seed: int = 0,
                   strata: np.ndarray | None = None) -> Split:
    """The attacker's split: rows ``[0, n_victims)`` are the victims, the ``n_aux`` rows after them the
    attacker's auxiliary data, cross-validated in ``folds`` folds (stratified by ``strata``, the aux rows'
    classes, when given). The victims are the test rows of every fold: no victim trains or selects."""
    if n_victims < 1:
        raise InputError(f"there must be at least one victim, got {n_victims}")
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError(f"folds must be an integer >= 2 (cross-validation inside the auxiliary data), got {folds!r}")
    if n_aux < 3 * folds:
        raise InputError(f"{n_aux} auxiliary examples are too few to train and validate attack models in {folds} "
                         f"folds; give at least {3 * folds}")
    n = n_victims + n_aux
    rng = np.random.default_rng(seed)
    aux = _stratified_order(np.arange(n_victims, n), None if strata is None else
                            np.concatenate([np.zeros(n_victims, np.int64), np.asarray(strata)]), rng)
    fold = np.full(n, -1)
    fold[aux] = np.arange(aux.size) % folds
    val = fold[None, :] == np.arange(folds)[:, None]
    train = (fold[None, :] >= 0) & ~val
    test = np.zeros((folds, n), bool)
    test[:, :n_victims] = True
    return Split(train, val, test, np.zeros(n, np.int32), True)


class EnsembleFit(NamedTuple):
    """What :func:`fit_ensemble` returns (L layers, F folds, M members, N examples, K outputs).

    Losses are per example in the target's own units: cross-entropy in nats
    (classification) or the squared error summed over the D target dimensions
    (regression).

    Attributes:
      members: the M members, in the order of the member axis.
      val_loss: (L, F, M) best validation loss of each member (training units:
        nats, or half the mean squared error per dimension of the standardised
        target), the criterion of selection.
      best_step: (L, F, M) the step whose parameters were kept (``CLOSED_FORM``
        for linear decoders, solved exactly; ``SOLVED`` for linear
        classifiers, solved to their minimiser by L-BFGS).
      member_test_loss: (L, F, M) mean held-out loss of every member, for
        diagnostics only (selection never reads it).
      chosen: (L, F) index of the member chosen in each fold (lowest
        validation loss; always a trained member), or M for the average of
        the M members' predictions (a mixture of attack models, itself a
        member of the family).
      val_gain: (L, F) validation loss of the ignorant predictor minus that of
        the lowest-validation member (per example, target units).
      val_gain_se: (L, F) standard error of that paired difference.
      heldout_loss: (L, S) loss of scored row ``rows[i]`` under the chosen
        member of the fold that held it out (S = the rows held out in some
        fold: all N under cross-fitting, the victims under an attacker split).
      heldout_pred: (L, S, K) that member's prediction: class probabilities
        (mixed with the prior, see ``mix``), or the reconstruction in the
        target's units, or its principal-component coefficients when the
        target was reduced (``target_basis``; :meth:`decode` maps them back).
      null_loss: (S,) loss of the ignorant predictor of the row's fold (smoothed
        class frequencies, or the training mean).
      null_pred: (S, K) its prediction.
      steps_run: optimisation steps of the layer that trained longest (less
        than asked when every layer stopped: none of its members improved
        for ``patience`` steps).
      layer_steps: (L,) the optimisation steps each layer trained (0 where
        every member was solved: in closed form or by the solver).
      solver_iterations: (L, F, M') classification: the L-BFGS iterations
        each linear member took to reach the tolerance (M' linear members;
        ``SOLVER_MAX_ITER`` where it stopped there); else None.
      mix: (L, F) classification: weight of the prior in the held-out
        prediction ``(1 - mix) p_member + mix p_prior``, chosen on validation
        rows from ``MIX_WEIGHTS``.
      target_basis: (F, D, r) regression with a reduced target: each fold's
        top-r principal directions of its training targets; else None.
      target_mean: (F, D) regression: each fold's training mean; else None.
      fold_of: (S,) the fold that held out each scored row.
      rows: (S,) indices of the scored rows.
      val_row_loss: (L, N) out-of-fold loss of each row under the chosen
        member of the fold it validates in (after prior mixing; NaN for rows
        that never validate), the selection's own criterion in target units.
      constant_columns: (L, F) number of each layer's columns (of its true
        width, padding excluded) treated as constant on each fold's rows and
        ignored (spread at most :func:`constant_floor`; see
        :func:`_fold_standardisation`), for the caller's metadata.
      member_pred: (L, M + 1, S, K) every member's prediction of each scored
        row, not mixed with the prior (index M: the members' average; under
        the attacker's split the fold models' average, else the model of the
        row's fold), in the units of ``heldout_pred``: what the detection test
        reads for every member (selection never reads it).
    """

    members: tuple[Member, ...]
    val_loss: np.ndarray
    best_step: np.ndarray
    member_test_loss: np.ndarray
    chosen: np.ndarray
    val_gain: np.ndarray
    val_gain_se: np.ndarray
    heldout_loss: np.ndarray
    heldout_pred: np.ndarray
    null_loss: np.ndarray
    null_pred: np.ndarray
    steps_run: int
    mix: np.ndarray | None = None
    target_basis: np.ndarray | None = None
    target_mean: np.ndarray | None = None
    fold_of: np.ndarray | None = None
    rows: np.ndarray | None = None
    val_row_loss: np.ndarray | None = None
    constant_columns: np.ndarray | None = None
    member_pred: np.ndarray | None = None
    layer_steps: np.ndarray | None = None
    solver_iterations: np.ndarray | None = None

    def decode(self, pred: np.ndarray) -> np.ndarray:
        """(N, r) principal-component coefficients -> (N, D) reconstructions (identity when not reduced)."""
        if self.target_basis is None:
            return np.asarray(pred)
        out = np.empty((pred.shape[0], self.target_basis.shape[1]), np.float64)
        for f in range(self.target_basis.shape[0]):
            rows = self.fold_of == f
            out[rows] = self.target_mean[f] + np.asarray(pred[rows], np.float64) @ self.target_basis[f].T
        return out


class _Spec(NamedTuple):
    """Static structure of an ensemble: what the compiled functions depend on besides shapes."""

    kind: str
    families: tuple[tuple[str, int, int], ...]  # (family, hidden, number of members)
    shared: bool = False  # the attacker's split: one member for all folds, victims scored by the fold average
    projected: bool = False  # MLP members read each fold's principal components ("z"), not the features


class _State(NamedTuple):
    params: dict
    opt_state: optax.OptState
    best_params: dict
    best_val: dict
    best_step: dict
    step: jax.Array


# ---------------------------------------------------------------- one member

@jax.custom_vjp
def _feature_matmul(x, xt, w):
    """x @ w for constant features x (N, W), with xt = x.T (W, N) given for the weight gradient.

    Reverse mode would otherwise transpose the whole feature matrix at every
    step; a stored transpose makes the gradient one plain matrix product.
    """
    return x @ w


def _feature_matmul_fwd(x, xt, w):
    return x @ w, xt


def _feature_matmul_bwd(xt, g):
    return None, None, xt @ g


_feature_matmul.defvjp(_feature_matmul_fwd, _feature_matmul_bwd)


def _first_layer(w, x, xt, mu, inv_sd):
    """(x - mu) * inv_sd @ w without forming the standardised x."""
    w_eff = w * inv_sd[:, None]
    return _feature_matmul(x, xt, w_eff) - mu @ w_eff


def _apply(family: str, p: dict, x, xt, mu, inv_sd):
    """One member's output (N, K) on raw features x (N, W), standardised with (mu, inv_sd)."""
    if family == "linear":
        return _first_layer(p["w"], x, xt, mu, inv_sd) + p["b"]
    h = jax.nn.relu(_first_layer(p["w1"], x, xt, mu, inv_sd) + p["b1"])
    return h @ p["w2"] + p["b2"]


def _penalty(p: dict):
    return sum(jnp.sum(jnp.square(v)) for k, v in p.items() if k.startswith("w"))


def _train_loss(kind: str, out, t):
    """Per-example training loss (N,): nats, or half the mean squared error per dim of the standardised target.

    (For a target reduced to principal-component coefficients: per coefficient, the
    coefficients standardised by their own mean variance.)
    """
    if kind == CLASSIFICATION:
        return optax.softmax_cross_entropy_with_integer_labels(_logits(out), t)
    return 0.5 * jnp.mean(jnp.square(out - t), axis=-1)


def _logits(out):
    """Class logits from a member's output: a single output (two classes) is the logit of class 1 against 0.

    Two classes need one logit, as in binary logistic regression: half the
    parameters and arithmetic of a two-column softmax, and the weight decay
    acts on the one coefficient vector that decides (as in scikit-learn).
    """
    if out.shape[-1] == 1:
        return jnp.concatenate([jnp.zeros_like(out), out], axis=-1)
    return out


def _masked_mean(values, mask):
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _family_inputs(family: str, layer: dict, spec: "_Spec"):
    """What a family reads on one layer: (x, xt, mu, inv_sd, fold axis of x and xt or None).

    Linear members read the features (N, W), standardised per fold by
    (mu, inv_sd); projected MLP members read their fold's principal
    components z (F, N, r), already standardised and centred.
    """
    if family == "mlp" and spec.projected:
        return layer["z"], layer.get("zt"), jnp.zeros_like(layer["z_isd"]), layer["z_isd"], 0
    return layer["x"], layer.get("xt"), layer["mu"], layer["inv_sd"], None


def _family_objective(kind, family, params, wd, inputs, t, train, val):
    """Objectives and validation losses of one family on one layer, both (F, M)."""
    x, xt, mu, inv_sd, x_axis = inputs

    def member(p, wd_m, x_f, xt_f, mu_f, isd_f, t_f, tr_f, va_f):
        ex = _train_loss(kind, _apply(family, p, x_f, xt_f, mu_f, isd_f), t_f)
        obj = _masked_mean(ex, tr_f) + 0.5 * wd_m * _penalty(p)
        return obj, jax.lax.stop_gradient(_masked_mean(ex, va_f))

    over_m = jax.vmap(member, in_axes=(0, 0, None, None, None, None, None, None, None))
    over_f = jax.vmap(over_m, in_axes=(0, None, x_axis, x_axis, 0, 0, 0, 0, 0))
    return over_f(params, wd, x, xt, mu, inv_sd, t, train, val)


# ---------------------------------------------------------------- the compiled pieces

# Width up to which a layer's attack models train at the full learning rate (see layer_lr).
LR_REFERENCE_WIDTH = 16


def layer_lr(lr: float, widths) -> np.ndarray:
    """Per-layer Adam learning rate: ``lr * min(1, sqrt(16 / width))``.

    Adam moves every weight by about ``lr`` per step whatever its gradient,
    so a linear member's output moves by about ``lr * sqrt(width)`` on
    standardised features: on a 1024-wide sketch the full rate overfits
    within a couple of steps, before the weak directions that carry the
    signal have been found. Scaling by ``1 / sqrt(width)`` keeps the step in
    output space the same for every width.
    """
    widths = np.maximum(np.asarray(widths, np.float64), 1.0)
    return lr * np.minimum(1.0, np.sqrt(LR_REFERENCE_WIDTH / widths))


def _optimizer(lr, steps):
    """Adam with a cosine decay of the learning rate to zero over the step budget."""
    schedule = lambda count: lr * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(count, steps) / steps))  # noqa: E731
    return optax.adam(schedule)


def _total(params, spec: _Spec, data: dict, layer: dict):
    total, vals = 0.0, {}
    for family, _, _ in spec.families:
        obj, val = _family_objective(spec.kind, family, params[family], data["wd"][family],
                                     _family_inputs(family, layer, spec), data["t_train"], data["train"], data["val"])
        total = total + jnp.sum(obj)
        vals[family] = val
    return total, vals


def _segment(state: _State, data: dict, num_steps, spec: _Spec) -> _State:
    """``num_steps`` full-batch Adam steps of every member, keeping each member's best validated parameters.

    Layers run one after the other (a loop over the layer axis), all folds
    and members of a layer together (``vmap``): a layer's features then stay
    in cache for the forward and backward passes of all its steps instead of
    streaming every layer's features from memory at every step. Each layer's
    slice of the (donated) state is updated in place, so the state exists
    once, not as an input and a stacked output copy.
    """
    TRACE_COUNTS["ensemble_segment"] += 1

    def where_better(better, new, old):
        return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

    def train_layer(index, full: _State) -> _State:
        layer = {name: data[name][index] for name in _LAYER_KEYS if name in data}
        s = jax.tree.map(lambda a: a[index], full)
        s = jax.lax.fori_loop(0, num_steps, lambda i, s_: body(layer, s_), s)
        return jax.tree.map(lambda a, v: a.at[index].set(v), full, s)

    def run_layer(index, full: _State) -> _State:
        # a layer whose members have all stopped improving is left as it is (see _train)
        return jax.lax.cond(data["active"][index], lambda f: train_layer(index, f), lambda f: f, full)

    def body(layer, s: _State) -> _State:
        (_, vals), grads = jax.value_and_grad(_total, has_aux=True)(s.params, spec, data, layer)
        # Step 0 is the ignorant starting point; every member is selected from its trained steps, so an
        # estimate is always the held-out gain of a real attack model, never a copy of the null.
        better = {f: (vals[f] < s.best_val[f]) & (s.step > 0) for f in vals}
        best_params = {f: jax.tree.map(lambda n, o, b=better[f]: where_better(b, n, o), s.params[f], s.best_params[f])
                       for f in vals}
        best_val = {f: jnp.where(better[f], vals[f], s.best_val[f]) for f in vals}
        best_step = {f: jnp.where(better[f], s.step, s.best_step[f]) for f in vals}
        updates, opt_state = _optimizer(layer["lr"], data["steps"]).update(grads, s.opt_state, s.params)
        return _State(optax.apply_updates(s.params, updates), opt_state, best_params, best_val, best_step, s.step + 1)

    return jax.lax.fori_loop(0, data["lr"].shape[0], run_layer, state)


_LAYER_KEYS = ("x", "xt", "mu", "inv_sd", "lr", "z", "zt", "z_isd")

# the training loop's run time dominates its compile time: XLA's default (slower-compiling, faster) emitters
_segment_jit = compilation.jit(_segment, key="ensemble_segment", static_argnames=("spec",), donate_argnames=("state",),
                               fast_compile=False)


def _score(best_params: dict, best_val: dict, data: dict, spec: _Spec):
    """Held-out losses of every member, the chosen member per fold, and its held-out predictions."""
    TRACE_COUNTS["ensemble_score"] += 1
    test, fold_of = data["test"], data["fold_of"]
    n = fold_of.shape[0]

    def layer(args):
        params_l, inputs_l, val_l = args
        outs = []
        for family, _, _ in spec.families:
            x_l, _, mu_l, isd_l, x_axis = _family_inputs(family, inputs_l, spec)
            member = lambda p, x_f, mu_f, isd_f, fam=family: _apply(fam, p, x_f, None, mu_f, isd_f)  # noqa: E731
            outs.append(jax.vmap(jax.vmap(member, in_axes=(0, None, None, None)), in_axes=(0, x_axis, 0, 0))(
                params_l[family], x_l, mu_l, isd_l))
        out = jnp.concatenate(outs, axis=1)  # (F, M, N, K)
        val_rows = data["val"]
        if spec.kind == CLASSIFICATION:
            pred = jax.nn.softmax(_logits(out), axis=-1)
            # The average of the members' predictions is a member too (index M): a mixture of attack models.
            pred = jnp.concatenate([pred, pred.mean(axis=1, keepdims=True)], axis=1)
            labels = jnp.broadcast_to(data["y"], pred.shape[:-1])
            loss = -jnp.log(jnp.maximum(jnp.take_along_axis(pred, labels[..., None], axis=-1)[..., 0], 1e-30))
            val_avg = jax.vmap(_masked_mean)(loss[:, -1], val_rows)
        else:
            out = jnp.concatenate([out, out.mean(axis=1, keepdims=True)], axis=1)
            val_avg = jax.vmap(_masked_mean)(_train_loss(spec.kind, out[:, -1], data["t_train"]), val_rows)
            pred = data["t_mean"][:, None, None, :] + data["t_scale"][:, None, None, None] * out
            # outputs clipped to the fold's training range of the target (or of its coefficients)
            pred = jnp.clip(pred, data["t_lo"][:, None, None, :], data["t_hi"][:, None, None, :])
            loss = jnp.sum(jnp.square(pred - data["t"][:, None]), axis=-1) + data["t_resid"][:, None]
        member_test = jax.vmap(jax.vmap(_masked_mean, in_axes=(0, None)))(loss[:, :-1], test)  # (F, M)
        folds = jnp.arange(loss.shape[0])
        if spec.shared:
            # One member for every fold: the lowest pooled out-of-fold loss on the auxiliary rows (target units).
            pooled = jnp.sum(jnp.where(val_rows[:, None], loss, 0.0), axis=(0, 2)) / jnp.sum(val_rows)
            chosen = jnp.broadcast_to(jnp.argmin(pooled), folds.shape)
            pred_rows = pred[folds, chosen].mean(axis=0)  # (N, K): the fold models' average
            if spec.kind == CLASSIFICATION:
                loss_rows = -jnp.log(jnp.maximum(jnp.take_along_axis(pred_rows, data["y"][:, None], axis=-1)[:, 0],
                                                 1e-30))
            else:
                loss_rows = jnp.sum(jnp.square(pred_rows - data["t"][0]), axis=-1) + data["t_resid"][0]
        else:
            chosen = jnp.argmin(jnp.concatenate([val_l, val_avg[:, None]], axis=1), axis=1)  # (F,), M = average
            pred_rows = pred[fold_of, chosen[fold_of], jnp.arange(n)]  # (N, K): each row under its own fold
            loss_rows = loss[fold_of, chosen[fold_of], jnp.arange(n)]
        loss_c = loss[folds, chosen]  # (F, N): every row under each fold's chosen member
        scored = data["scored"]
        if spec.shared:
            member_pred = pred[:, :, scored].mean(axis=0)  # (M + 1, S, K): each member's fold average
        else:
            member_pred = jnp.swapaxes(pred[fold_of[scored], :, scored], 0, 1)  # each row under its own fold
        return member_test, chosen, loss_c, pred_rows, loss_rows, member_pred

    val = jnp.concatenate([best_val[f] for f, _, _ in spec.families], axis=2)
    inputs = {name: data[name] for name in ("x", "mu", "inv_sd", "z", "z_isd") if name in data}
    return jax.lax.map(layer, (best_params, inputs, val))


_score_jit = compilation.jit(_score, key="ensemble_score", static_argnames=("spec",))

# ---------------------------------------------------------------- linear classifiers, solved

# A linear classifier is solved to the minimiser of its objective: L-BFGS (optax's ``scale_by_lbfgs``) with an
# exact line search, stopped when every entry of the member's gradient is at most SOLVER_TOL (scikit-learn's
# lbfgs criterion on the same objective) or after SOLVER_MAX_ITER iterations.
SOLVER_TOL = 1e-4
SOLVER_MAX_ITER = 100
# Newton steps of the exact line search (safeguarded by bisection; the objective is convex along the line).
_LINE_STEPS = 4
# best_step of a linear classifier solved to its minimiser (no path of steps to select from)
SOLVED = -2


def _class_terms(z, t):
    """Per-example loss, d loss / d logits and the curvature form of logits z (N, F, M, K) for labels t (N, F, 1).

    K = 1: binary logistic loss of the logit of class 1; K > 1: softmax cross-entropy. Returns (loss
    (N, F, M), residual (N, F, M, K), curvature(a) -> a' H a (N, F, M) for logit directions a).
    """
    if z.shape[-1] == 1:
        zz = z[..., 0]
        t1 = t.astype(z.dtype)
        p = jax.nn.sigmoid(zz)
        h = p * (1.0 - p)
        return jax.nn.softplus(zz) - t1 * zz, (p - t1)[..., None], lambda a: h * jnp.square(a[..., 0])
    logp = jax.nn.log_softmax(z, axis=-1)
    p = jnp.exp(logp)
    onehot = jax.nn.one_hot(t, z.shape[-1], dtype=z.dtype)
    loss = -jnp.sum(onehot * logp, axis=-1)
    return loss, p - onehot, lambda a: jnp.sum(p * jnp.square(a), -1) - jnp.square(jnp.sum(p * a, -1))


def _line_search(z, a, labels, train, n_tr, wd, w_dot_d, d_sq, active):
    """Per member, the step t >= 0 minimising its objective along a direction d (a: d's change of the logits).

    phi(t) = mean over training rows of loss(z + t a) + wd / 2 ||w + t d||^2, with w_dot_d = <w, d> and
    d_sq = ||d||^2 (F, M). Safeguarded Newton from t = 1 (the quasi-Newton step): a Newton step that leaves
    the bracket [lo, hi] of the minimum is replaced by bisection, or by quadrupling while no upper end is
    known. Members not ``active`` take t = 0.
    """
    def step(_, c):
        t, lo, hi = c
        _, r, curv = _class_terms(z + t[..., None] * a, labels)
        d1 = jnp.sum(jnp.where(train, jnp.sum(r * a, -1), 0.0), 0) / n_tr + wd * (w_dot_d + t * d_sq)
        d2 = jnp.sum(jnp.where(train, curv(a), 0.0), 0) / n_tr + wd * d_sq
        lo = jnp.where(d1 < 0, t, lo)
        hi = jnp.where(d1 < 0, hi, t)
        newton = t - d1 / jnp.maximum(d2, 1e-30)
        fallback = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 4.0 * jnp.maximum(t, lo))
        return jnp.where((newton > lo) & (newton < hi), newton, fallback), lo, hi

    ones = jnp.ones(w_dot_d.shape, z.dtype)
    t, _, _ = jax.lax.fori_loop(0, _LINE_STEPS, step, (ones, 0.0 * ones, jnp.inf * ones))
    return jnp.where(active, t, 0.0)


def _solve_linear(data: dict, wd, b0, max_iter, tol):
    """Every linear classifier (L, F, M) solved to the minimiser of its objective, for weight decays wd (M,).

    Per layer (one after the other, as the training segments), all folds and weight decays together.
    A member's logits z = s(x) w + b over all rows are carried along (laid out (N, F, M, K), rows first), so
    an iteration costs two plain matrix products with the features for every member at once: the gradient
    x' r and the direction's change of the logits x d. Returns parameters {"w": (L, F, M, W, K),
    "b": (L, F, M, K)}, validation losses (L, F, M) and the iterations each member took (L, F, M).
    """
    TRACE_COUNTS["ensemble_solve"] += 1
    lbfgs = optax.scale_by_lbfgs()
    init, update = jax.vmap(jax.vmap(lbfgs.init)), jax.vmap(jax.vmap(lbfgs.update))  # per member (F, M)
    wd = wd[None, :]  # (1, M)
    labels = data["t_train"].T[:, :, None]  # (N, F, 1)
    train, val = data["train"].T[:, :, None], data["val"].T[:, :, None]
    n_tr = jnp.maximum(jnp.sum(train, 0), 1).astype(jnp.float32)  # (F, 1)
    num_m, k = wd.shape[1], b0.shape[-1]

    def layer(args):
        x, xt, mu, inv_sd = args  # (N, W), (W, N), (F, W), (F, W)
        n, (num_f, width) = x.shape[0], mu.shape

        def logits_change(dw, db):  # s(x) dw + db for every member: (N, F, M, K)
            v = dw * inv_sd[:, None, :, None]  # (F, M, W, K)
            xv = x @ jnp.transpose(v, (2, 0, 1, 3)).reshape(width, -1)
            return xv.reshape(n, num_f, num_m, k) + (db - jnp.einsum("fw,fmwk->fmk", mu, v))[None]

        def gradient(w, z):
            _, r, _ = _class_terms(z, labels)
            r = jnp.where(train[..., None], r, 0.0) / n_tr[..., None]  # (N, F, M, K)
            r_sum = jnp.sum(r, 0)
            xr = jnp.transpose((xt @ r.reshape(n, -1)).reshape(width, num_f, num_m, k), (1, 2, 0, 3))
            xr = (xr - mu[:, None, :, None] * r_sum[:, :, None]) * inv_sd[:, None, :, None]
            return {"w": xr + wd[..., None, None] * w, "b": r_sum}

        def gmax(g):
            return jnp.maximum(jnp.max(jnp.abs(g["w"]), axis=(2, 3)), jnp.max(jnp.abs(g["b"]), axis=2))

        def cond(c):  # some member's gradient above the tolerance, iterations left
            return (c[5] < max_iter) & jnp.any(c[4] > tol)

        def body(c):
            p, z, s, g, gm, it, iters = c
            active = gm > tol  # (F, M)
            u, s_new = update(g, s, p)
            d = jax.tree.map(jnp.negative, u)
            a = logits_change(d["w"], d["b"])
            t = _line_search(z, a, labels, train, n_tr, wd, jnp.sum(p["w"] * d["w"], (2, 3)),
                             jnp.sum(jnp.square(d["w"]), (2, 3)), active)
            p = {"w": p["w"] + t[..., None, None] * d["w"], "b": p["b"] + t[..., None] * d["b"]}
            z = z + t[..., None] * a
            s = jax.tree.map(lambda new, old: jnp.where(
                active.reshape(active.shape + (1,) * (new.ndim - 2)), new, old), s_new, s)
            g = gradient(p["w"], z)
            return p, z, s, g, gmax(g), it + 1, iters + active.astype(jnp.int32)

        b = jnp.broadcast_to(b0[:, None, :], (num_f, num_m, k)).astype(jnp.float32)
        p0 = {"w": jnp.zeros((num_f, num_m, width, k), jnp.float32), "b": b}
        z0 = jnp.broadcast_to(b[None], (n, num_f, num_m, k))
        g0 = gradient(p0["w"], z0)
        start = (p0, z0, init(p0), g0, gmax(g0), jnp.int32(0), jnp.zeros((num_f, num_m), jnp.int32))
        p, z, _, _, _, _, iters = jax.lax.while_loop(cond, body, start)
        loss, _, _ = _class_terms(z, labels)
        val_loss = jnp.sum(jnp.where(val, loss, 0.0), 0) / jnp.maximum(jnp.sum(val, 0), 1)
        return p, val_loss, iters

    return jax.lax.map(layer, (data["x"], data["xt"], data["mu"], data["inv_sd"]))


# an optimisation loop: XLA's default (slower-compiling, faster) emitters, as the training segments
_solve_linear_jit = compilation.jit(_solve_linear, key="ensemble_solve", fast_compile=False)

# ---------------------------------------------------------------- set-up on the host

# A column whose spread is at most this fraction of its scale is treated as constant (see constant_floor).
CONSTANT_RTOL = 1e-6
# The smallest spread a column may have on a fold's rows: 1 / sd stays <= 1e30, so the folded weights
# w / sd (float32) cannot overflow. Binding only for raw features whose whole scale is below 1e-24.
_SD_FLOOR = 1e-30


def constant_floor(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The spread at or below which a column counts as constant: ``CONSTANT_RTOL * max(|mean|, scale, tiny)``.

    Scale invariant (multiplying a column by any c != 0 multiplies its spread and the floor by |c|), so a
    layer scaled by 1e-20 or 1e20 keeps exactly the columns of the unscaled one. The ``|mean|`` term: a
    spread of 1e-6 of the magnitude is a few float32 ulps (eps = 1.2e-7), i.e. the rounding of features
    computed in float32, not signal, and standardising it would blow rounding up to unit scale (and the
    float32 first layer, ``x @ (w / sd) - mu @ (w / sd)``, could not resolve it anyway). ``scale``: see
    :func:`_fold_standardisation`. ``tiny`` makes an all-zero column constant.
    """
    return CONSTANT_RTOL * np.maximum(np.maximum(np.abs(mean), scale), np.finfo(np.float64).tiny)


def _fold_standardisation(x: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold feature mean and 1/sd over each fold's non-held-out rows: (L, F, W) each.

    Statistics are computed in float64, the variance about the fold's own mean (two passes, so a column
    constant on the fold's rows has spread 0 up to float64 rounding, not float32 cancellation noise). A
    column whose spread on the fold's rows is at most :func:`constant_floor` of (its fold mean, its spread
    over all N rows) is constant there: ``1 / sd = 0``, it contributes nothing (its weights stay zero).
    The all-rows term makes the floor a fraction of the column's own scale (after
    :func:`jaxleak.vinfo._stack` that is 1, and the float32 stacked features carry rounding of about 1e-7):
    a column whose variation lies almost entirely on rows the fold may not read is not amplified a
    millionfold. It also bounds every standardised value, held-out rows included:
    ``|x - mu| / sd <= 2 sqrt(N) / CONSTANT_RTOL``, so nothing derived from the standardised features and
    cast to float32 can overflow, whatever the scale of the input.
    """
    num_l, n, width = x.shape
    num_f = keep.shape[0]
    mu = np.zeros((num_l, num_f, width), np.float64)
    sd = np.zeros((num_l, num_f, width), np.float64)
    first = [next(g for g in range(num_f) if np.array_equal(keep[g], keep[f])) for f in range(num_f)]
    for i in range(num_l):
        xl = x[i].astype(np.float64)
        scale = xl.std(axis=0)
        for f in range(num_f):
            if first[f] != f:  # the same rows as an earlier fold (the attacker's split): the same statistics
                mu[i, f], sd[i, f] = mu[i, first[f]], sd[i, first[f]]
                continue
            rows = xl[keep[f]]
            mu[i, f] = rows.mean(axis=0)
            sd[i, f] = np.sqrt(np.mean(np.square(rows - mu[i, f]), axis=0))
        sd[i] = np.where((sd[i] > constant_floor(mu[i], scale[None])) & (sd[i] > _SD_FLOOR), sd[i], 0.0)
    inv_sd = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    return mu.astype(np.float32), inv_sd.astype(np.float32)


def _init_params(spec: _Spec, members: Sequence[Member], shape_lf: tuple[int, int], widths: dict, k: int,
                 b0: np.ndarray) -> dict:
    """Initial parameters, leading axes (L, F, M): every member starts as the ignorant predictor.

    Output weights are zero and the output bias is the fold's null prediction
    (log smoothed class frequencies; 0 = the training mean for regression).
    MLP input weights are He-normal with the variance of the layer's true
    width (``widths[family]`` = (input columns, (L,) columns in use, (L,) true
    widths)); unused columns (zero padding) start, and stay, at zero.
    """
    num_l, num_f = shape_lf
    params, start = {}, 0
    b0 = np.asarray(b0, np.float32)  # (F, K)
    for family, hidden, m in spec.families:
        group = members[start:start + m]
        start += m
        cols, used, true = widths[family]
        bias = np.broadcast_to(b0[None, :, None, :], (num_l, num_f, m, k))
        if family == "linear":
            params[family] = {"w": np.zeros((num_l, num_f, m, cols, k), np.float32), "b": bias}
            continue
        rows = (np.arange(cols)[None, :] < used[:, None]).astype(np.float32)  # (L, cols)
        scale = np.sqrt(2.0 / np.maximum(true, 1)).astype(np.float32)[:, None] * rows
        w1 = np.stack([np.random.default_rng(mem.seed).standard_normal((num_l, num_f, cols, hidden), np.float32)
                       for mem in group], axis=2)
        w1 = w1 * scale[:, None, None, :, None]
        params[family] = {
            "w1": w1,
            "b1": np.zeros((num_l, num_f, m, hidden), np.float32),
            "w2": np.zeros((num_l, num_f, m, hidden, k), np.float32),
            "b2": bias,
        }
    return params


def mlp_input_width(mlp_features: int | None, width: int) -> int | None:
    """The number of principal components MLP members read from features of ``width`` columns, or None when
    they read every column (``mlp_features`` None or not below the width)."""
    return int(mlp_features) if mlp_features is not None and mlp_features < width else None


def _standardised(x: np.ndarray, mu: np.ndarray, inv_sd: np.ndarray, layer: int, fold: int) -> np.ndarray:
    """Layer ``layer``'s features (N, W) in float64, standardised with fold ``fold``'s statistics."""
    return (x[layer].astype(np.float64) - mu[layer, fold]) * inv_sd[layer, fold]


def _numerical_rank_tol(e: np.ndarray, a: np.ndarray) -> float:
    """Eigenvalues of a's Gram matrix at or below this are zero up to float64 rounding (relative, so scale free)."""
    return float(max(a.shape) * np.finfo(np.float64).eps * max(float(e.max(initial=0.0)), 0.0))


def _top_directions(a: np.ndarray, r: int) -> np.ndarray:
    """(W, r) orthonormal top-r principal directions of the rows of a (n, W), via the smaller Gram matrix.

    Directions beyond a's numerical rank (eigenvalue at most :func:`_numerical_rank_tol`) are rounding
    noise, not directions of the data: they are returned as zero columns. (Through the n x n Gram matrix,
    ``a.T u / sqrt(e)`` of such an eigenvalue, often a tiny negative one, would be a vector of norm up to
    1e150, and the projected features would overflow float32.)
    """
    n, w = a.shape
    if n < w:
        e, u = np.linalg.eigh(a @ a.T)
        u, e = u[:, ::-1][:, :r], e[::-1][:r]
        real = e > _numerical_rank_tol(e, a)
        v = (a.T @ u) / np.sqrt(np.where(real, e, 1.0)) * real
    else:
        e, v = np.linalg.eigh(a.T @ a)
        v, e = v[:, ::-1][:, :r], e[::-1][:r]
        v = v * (e > _numerical_rank_tol(e, a))
    return _fix_signs(v)


def _principal_features(x: np.ndarray, mu: np.ndarray, inv_sd: np.ndarray, keep: np.ndarray, widths: np.ndarray,
                        r: int, shared: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each fold's top-r principal components of the standardised features, and their columns in use.

    z[l, f] = ((x[l] - mu[l, f]) * inv_sd[l, f]) @ V[l, f] for every row, V the top principal directions of
    fold f's non-held-out rows (the rows whose features the fold may read). Returns z (L, F, N, r) float32
    and the number of columns in use per layer, min(r, true width, rows - 1); the rest are zero.
    Directions beyond a layer's numerical rank are zero columns (:func:`_top_directions`).
    """
    num_l, n, _ = x.shape
    num_f = keep.shape[0]
    z = np.zeros((num_l, num_f, n, r), np.float32)
    used = np.minimum(np.minimum(r, widths), keep.sum(axis=1).min() - 1).astype(np.int64)
    for i in range(num_l):
        for f in range(num_f):
            if shared and f > 0:
                z[i, f] = z[i, 0]
                continue
            a = _standardised(x, mu, inv_sd, i, f)
            v = _top_directions(a[keep[f]], int(used[i]))
            z[i, f, :, : used[i]] = a @ v
    return z, used


def _ridge(x: np.ndarray, mu: np.ndarray, inv_sd: np.ndarray, t: np.ndarray, train: np.ndarray, val: np.ndarray,
           wds: np.ndarray) -> tuple[dict, np.ndarray]:
    """Linear decoders in closed form: the exact minimiser of the linear members' objective.

    For weight decay lambda and a fold's n training rows, the objective
    (1 / (2 n K)) sum ||s(x) w + b - t||^2 + lambda / 2 ||w||^2 (s: the fold's
    standardisation, t: the standardised target of K columns) is minimised by
    b = mean(t) - mean(s(x)) w and w = (Xc' Xc + n K lambda I)^-1 Xc' Tc over
    the centred training rows, computed from one eigendecomposition per layer
    and fold (of the smaller Gram matrix) for every lambda. Returns the
    parameters (L, F, M, ...) and the validation losses (L, F, M) in training
    units (half the mean squared error per target column).
    """
    num_l, n, width = x.shape
    num_f, k, m = train.shape[0], t.shape[-1], wds.size
    w_out = np.zeros((num_l, num_f, m, width, k), np.float32)
    b_out = np.zeros((num_l, num_f, m, k), np.float32)
    val_loss = np.zeros((num_l, num_f, m), np.float32)
    for i in range(num_l):
        for f in range(num_f):
            s = _standardised(x, mu, inv_sd, i, f)
            tf = t[f].astype(np.float64)
            xs, ts = s[train[f]], tf[train[f]]
            xbar, tbar = xs.mean(axis=0), ts.mean(axis=0)
            xc, tc = xs - xbar, ts - tbar
            lam = xs.shape[0] * k * wds
            # (e + lam)^-1, with directions beyond the numerical rank left out when lam ~ 0 (weight decay 0 on
            # constant or collinear columns): the minimum-norm solution instead of a division by zero
            if xc.shape[0] < width:  # w = Xc' (Xc Xc' + lam I)^-1 Tc
                e, u = np.linalg.eigh(xc @ xc.T)
                proj = u.T @ tc
                w = np.stack([xc.T @ (u @ (proj * _inverse(e, lv, _numerical_rank_tol(e, xc))[:, None]))
                              for lv in lam])
            else:  # w = (Xc' Xc + lam I)^-1 Xc' Tc
                e, v = np.linalg.eigh(xc.T @ xc)
                proj = v.T @ (xc.T @ tc)
                w = np.stack([v @ (proj * _inverse(e, lv, _numerical_rank_tol(e, xc))[:, None]) for lv in lam])
            b = tbar[None] - np.einsum("w,mwk->mk", xbar, w)
            out = np.einsum("nw,mwk->mnk", s[val[f]], w) + b[:, None]
            val_loss[i, f] = 0.5 * np.mean(np.square(out - tf[val[f]][None]), axis=(1, 2))
            w_out[i, f], b_out[i, f] = w, b
    return {"w": w_out, "b": b_out}, val_loss


def _inverse(e: np.ndarray, lam: float, tol: float) -> np.ndarray:
    """1 / (e + lam) for eigenvalues e >= -tol of a Gram matrix, 0 where e + lam is at most tol (a null direction)."""
    d = np.maximum(e, 0.0) + lam
    return np.divide(1.0, d, out=np.zeros_like(d), where=d > tol)


def _check_split(split: Split, n: int) -> None:
    for name in ("train", "val", "test"):
        mask = np.asarray(getattr(split, name))
        if mask.ndim != 2 or mask.shape[1] != n or mask.dtype != bool:
            raise InputError(f"split.{name} must be a boolean (folds, {n}) array, got {mask.dtype} {mask.shape}")
        if not np.all(mask.sum(axis=1) > 0):
            raise InputError(f"split.{name} leaves a fold without any {name} example")
    if np.any(split.train & split.val) or np.any(split.train & split.test) or np.any(split.val & split.test):
        raise InputError("split.train, split.val and split.test must be disjoint in every fold")
    fold_of = np.asarray(split.fold_of)
    if fold_of.shape != (n,):
        raise InputError(f"split.fold_of must have shape ({n},), got {fold_of.shape}")


def _family_groups(members: tuple[Member, ...]) -> list[list]:
    """[family, hidden, count] per family, checking that members come grouped by family."""
    families: list[list] = []
    for mem in members:
        if families and families[-1][0] == mem.family:
            families[-1][2] += 1
        elif any(f[0] == mem.family for f in families):
            raise InputError("members must be grouped by family (as make_members returns them)")
        else:
            families.append([mem.family, mem.hidden, 1])
    if any(mem.hidden != families[[f[0] for f in families].index(mem.family)][1] for mem in members):
        raise InputError("all MLP members must have the same hidden width")
    return families


class _Targets(NamedTuple):
    """What the members predict and the null that they are measured against (host arrays)."""

    data: dict  # host arrays for the compiled pieces (targets, scales, clipping range)
    b0: np.ndarray  # (F, K) the null's output bias: every member starts as the ignorant predictor
    null_loss: np.ndarray  # (F, N) every row under each fold's null
    null_pred: np.ndarray  # (F, K) each fold's null prediction
    basis: np.ndarray | None
    mean: np.ndarray | None


def _classification_targets(target, keep: np.ndarray, num_classes: int) -> _Targets:
    y = np.asarray(target).astype(np.int32)
    k, num_f, n = int(num_classes), keep.shape[0], y.size
    counts = keep.sum(axis=1)
    freq = np.stack([np.bincount(y[keep[f]], minlength=k) for f in range(num_f)]).astype(np.float64)
    prior = (freq + 1.0) / (counts[:, None] + k)  # Laplace-smoothed training frequencies
    b0 = np.log(prior)
    if k == 2:  # one output: the logit of class 1 against class 0
        b0 = b0[:, 1:] - b0[:, :1]
    data = {"y": y, "t_train": np.ascontiguousarray(np.broadcast_to(y, (num_f, n)))}
    return _Targets(data, b0, -np.log(prior[:, y]), prior, None, None)


def _regression_targets(target, keep: np.ndarray, target_dim: int | None) -> _Targets:
    num_f = keep.shape[0]
    n = keep.shape[1]
    t = np.asarray(target, np.float64).reshape(n, -1)
    dims = t.shape[1]
    counts = keep.sum(axis=1)
    t_mean = np.stack([t[keep[f]].mean(axis=0) for f in range(num_f)])
    null_loss = np.stack([np.sum(np.square(t - t_mean[f]), axis=1) for f in range(num_f)])
    basis = None
    if target_dim is not None and dims > target_dim:
        r = int(min(target_dim, counts.min()))
        basis = np.stack([_principal_directions(t[keep[f]] - t_mean[f], r) for f in range(num_f)])
        out_t = np.stack([(t - t_mean[f]) @ basis[f] for f in range(num_f)])  # (F, N, r) coefficients
        resid = np.maximum(null_loss - np.sum(np.square(out_t), axis=2), 0.0)
        # the coefficients' own scale (the unexplained residual is not the decoders' to fit)
        t_scale = np.sqrt(np.stack([np.square(out_t[f, keep[f]]).mean() for f in range(num_f)]))
        out_mean = np.zeros((num_f, r))
    else:
        out_t = np.broadcast_to(t, (num_f, n, dims))
        resid = np.zeros((num_f, n))
        t_scale = np.sqrt(np.stack([t[keep[f]].var(axis=0).mean() for f in range(num_f)]))
        out_mean = t_mean
    # out_t: what the decoders predict (the target, or its coefficients), with its fold means out_mean
    t_scale = np.where(t_scale > 0, t_scale, 1.0)
    data = {
        "t": np.asarray(out_t, np.float32),
        "t_mean": np.asarray(out_mean, np.float32),
        "t_train": np.asarray((out_t - out_mean[:, None]) / t_scale[:, None, None], np.float32),
        "t_lo": np.stack([out_t[f, keep[f]].min(axis=0) for f in range(num_f)]).astype(np.float32),
        "t_hi": np.stack([out_t[f, keep[f]].max(axis=0) for f in range(num_f)]).astype(np.float32),
        "t_resid": np.asarray(resid, np.float32),
        "t_scale": np.asarray(t_scale, np.float32),
    }
    return _Targets(data, np.zeros((num_f, out_t.shape[2])), null_loss, out_mean, basis, t_mean)


def _train(state: _State, data: dict, spec: _Spec, steps: int, segment: int, patience: int | None,
           progress: bool) -> tuple[_State, int]:
    """Run the compiled segments until the step budget is spent or every member has stalled."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(steps), desc="attack ensemble", unit="step", leave=False)
    done = 0
    active = np.ones(data["lr"].shape[0], bool)
    try:
        while done < steps and active.any():
            count = min(segment, steps - done)
            state = _segment_jit(state, {**data, "active": active}, jnp.int32(count), spec=spec)
            done += count
            if bar is not None:
                bar.update(count)
            if patience is not None:
                # a layer stops once none of its members (any family, fold or seed) has improved its validation
                # loss for `patience` steps: how long a layer trains depends on that layer alone
                last = np.asarray(state.step)[:, None, None] - 1
                active = np.zeros_like(active)
                for best in state.best_step.values():
                    active |= np.any(last - np.asarray(best) <= patience, axis=(1, 2))
    finally:
        if bar is not None:
            bar.close()
    return state, done


def fit_ensemble(features: np.ndarray, target: np.ndarray, split: Split, members: Sequence[Member], *,
                 kind: str, num_classes: int | None = None, widths: np.ndarray | None = None, steps: int = 300,
                 lr: float = 0.05, patience: int | None = 100, target_dim: int | None = None,
                 segment: int | None = None, mlp_features: int | None = 256, progress: bool = False) -> EnsembleFit:
    """Train every member on every layer and fold at once; select per fold by validation loss; score held out.

    Args:
      features: (L, N, W) float features of L layers at a common width W
        (zero-padded); standardised here per fold, so any affine scaling of
        a column is irrelevant.
      target: (N,) int classes in [0, num_classes) for ``kind='classification'``,
        or (N, D) floats for ``kind='regression'``.
      split: roles of the rows (:func:`cross_fit_split`, :func:`single_split`,
        :func:`attacker_split`). Only rows held out in some fold are scored.
      members: ensemble members (:func:`make_members`), grouped by family.
      widths: (L,) true width of each layer before padding (default W).
      steps: step budget of full-batch Adam at learning rate ``lr`` (>= 2),
        scaled per layer by :func:`layer_lr`.
      patience: stop a layer early once none of its members (in any fold) has improved
        its validation loss for this many steps (None: run all steps). Each
        member keeps the parameters of its best validation step after at
        least one update.
      target_dim: regression: a target of more than this many dimensions is
        decoded in the span of each fold's top ``target_dim`` principal
        directions of its training targets (the decoders predict the
        coefficients, standardised by their mean variance; the residual
        outside the span counts fully as error, and the null is unchanged),
        which bounds the decoders' size for image targets. The family is then
        restricted, so the information is a lower bound of the unrestricted
        family's. None: never reduce.
      segment: steps per compiled segment (progress and stopping are checked
        between segments); default max(10, steps // 20).
      mlp_features: MLP members read the top ``mlp_features`` principal
        components of each fold's standardised features (computed on the
        rows the fold may read: its training and validation rows) instead of
        all W columns, which divides the cost of their first layer by
        W / mlp_features. A restricted family (the linear members still read
        every column). None, or a value >= W: the MLP reads every column.

    Linear decoders (regression) are solved in closed form (:func:`_ridge`,
    the exact minimiser of their objective for each weight decay; their
    ``best_step`` is ``CLOSED_FORM``); linear classifiers are solved to the
    minimiser of theirs by L-BFGS with an exact line search
    (:func:`_solve_linear`, to scikit-learn's gradient tolerance; ``SOLVED``);
    MLPs train by full-batch Adam, keeping each member's best validated step.

    Selection: per layer and fold, the member (and its step) with the lowest
    validation loss. It is always a trained model, never the ignorant
    predictor, and no gate replaces it by the null: a weak attack shows as a
    small or negative held-out gain with an honest interval, not as an exact 0.

    Regression: every decoder's output is clipped to the range its fold's
    training targets (or, for a reduced target, their coefficients) span, so
    a held-out example with extreme features cannot be reconstructed outside
    anything the attacker has seen (selection and scoring use the clipped
    outputs; training uses the unclipped loss).

    Classification: the held-out prediction of a fold's chosen member is
    mixed with the fold's prior, ``(1 - w) p + w prior``, at the weight w in
    ``MIX_WEIGHTS`` with the lowest validation loss. Mixtures are members
    of the family too; the smallest weight bounds the held-out loss of an
    overconfident member at ``-log(MIX_WEIGHTS[0] * prior)`` per example,
    where a lone confident mistake would otherwise swamp a small held-out set.

    Objective of a member with weight decay lambda: mean training loss +
    lambda / 2 * (sum of squared weights, biases excluded) on standardised
    features (and, for regression, the target standardised by the fold's
    training mean and one overall scale).
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 3:
        raise InputError(f"features must be a (layers, examples, width) array, got shape {x.shape}")
    num_l, n, width = x.shape
    _check_split(split, n)
    if kind not in (CLASSIFICATION, REGRESSION):
        raise InputError(f"kind must be {CLASSIFICATION!r} or {REGRESSION!r}, got {kind!r}")
    if not isinstance(steps, (int, np.integer)) or steps < 2:
        raise InputError(f"steps must be an integer >= 2 (members are selected after at least one update), "
                         f"got {steps!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if target_dim is not None and (not isinstance(target_dim, (int, np.integer)) or target_dim < 1):
        raise InputError(f"target_dim must be a positive integer or None, got {target_dim!r}")
    if mlp_features is not None and (not isinstance(mlp_features, (int, np.integer)) or mlp_features < 1):
        raise InputError(f"mlp_features must be a positive integer or None, got {mlp_features!r}")
    members = tuple(members)
    families = _family_groups(members)
    widths = np.full(num_l, width) if widths is None else np.asarray(widths)
    num_f = split.train.shape[0]
    keep = split.train | split.val
    mu, inv_sd = _fold_standardisation(x, keep)
    constant_columns = np.sum((inv_sd == 0) & (np.arange(width) < widths[:, None])[:, None, :], axis=2)
    # Under the attacker's split every fold shares the auxiliary rows' null and target basis, so the fold
    # models' predictions can be averaged.
    stats_keep = np.broadcast_to(keep.any(axis=0), keep.shape) if split.shared else keep
    targets = (_classification_targets(target, stats_keep, num_classes) if kind == CLASSIFICATION
               else _regression_targets(target, stats_keep, target_dim))
    names = [f for f, _, _ in families]
    projected = "mlp" in names and mlp_input_width(mlp_features, width) is not None
    closed_form = kind == REGRESSION and "linear" in names  # ridge: solved exactly, not trained
    solved = kind == CLASSIFICATION and "linear" in names  # logistic: solved by L-BFGS, not trained
    trained = [f for f in families if f[0] != "linear"]
    reads_x = solved or (bool(trained) and not projected)

    # host arrays; each piece below receives them once as device arrays
    data = {"x": x, "mu": mu, "inv_sd": inv_sd, "train": np.asarray(split.train), "val": np.asarray(split.val),
            "test": np.asarray(split.test), "fold_of": np.asarray(split.fold_of, np.int32),
            "lr": layer_lr(lr, widths).astype(np.float32), "steps": np.float32(steps), "wd": {}, **targets.data}
    if reads_x:
        data["xt"] = np.ascontiguousarray(x.transpose(0, 2, 1))
    in_widths = {"linear": (width, widths, widths), "mlp": (width, widths, widths)}
    if projected:
        z, used = _principal_features(x, mu, inv_sd, keep, widths, int(mlp_features), bool(split.shared))
        data["z"] = z
        data["zt"] = np.ascontiguousarray(z.transpose(0, 1, 3, 2))
        cols = np.arange(z.shape[-1])[None, :] < used[:, None]
        data["z_isd"] = np.ascontiguousarray(np.broadcast_to(cols[:, None], (num_l, num_f, z.shape[-1])), np.float32)
        in_widths["mlp"] = (z.shape[-1], used, widths)
    start = 0
    for family, _, m in families:
        data["wd"][family] = np.asarray([mem.weight_decay for mem in members[start:start + m]], np.float32)
        start += m
    spec = _Spec(kind, tuple((f, int(h), int(m)) for f, h, m in families), bool(split.shared), projected)
    train_spec = spec._replace(families=tuple((f, int(h), int(m)) for f, h, m in trained))
    k = targets.b0.shape[1]
    shape = lambda m: (num_l, num_f, m)  # noqa: E731
    done = 0
    best_params, best_val, best_step = {}, {}, {}
    layer_steps = np.zeros(num_l, np.int64)
    solver_iterations = None
    train_data = _training_rows(data, keep.any(axis=0))
    if solved:
        solve_data = {name: train_data[name] for name in ("x", "xt", "mu", "inv_sd", "t_train", "train", "val")}
        params, val, iters = _solve_linear_jit(jax.device_put(solve_data), data["wd"]["linear"],
                                               np.asarray(targets.b0, np.float32), np.int32(SOLVER_MAX_ITER),
                                               np.float32(SOLVER_TOL))
        best_params["linear"], best_val["linear"] = params, val
        best_step["linear"] = np.full(shape(data["wd"]["linear"].size), SOLVED, np.int32)
        solver_iterations = np.asarray(iters, np.int64)
    if trained:
        params = _init_params(train_spec, [mem for mem in members if mem.family != "linear"],
                              (num_l, num_f), in_widths, k, targets.b0)
        state = _init_state_jit(params, num_l)
        if projected:  # the MLP members read principal components only
            train_data = {key: value for key, value in train_data.items() if key not in ("x", "xt")}
        state, done = _train(state, jax.device_put(train_data), train_spec, int(steps),
                             int(segment or max(10, steps // 20)), patience, progress)
        best_params.update(state.best_params)
        best_val.update(state.best_val)
        best_step.update(state.best_step)
        layer_steps = np.asarray(state.step, np.int64)
    if closed_form:
        wds = np.asarray([mem.weight_decay for mem in members if mem.family == "linear"], np.float64)
        best_params["linear"], val = _ridge(x, mu, inv_sd, np.asarray(data["t_train"]), split.train, split.val, wds)
        best_val["linear"] = val
        best_step["linear"] = np.full(shape(wds.size), CLOSED_FORM, np.int32)
    scoring = {key: value for key, value in data.items() if key not in ("xt", "zt")}  # transposes train only
    fit = _select_and_score(best_params, best_val, best_step, scoring, spec, split, members, targets, done)
    return fit._replace(constant_columns=constant_columns, layer_steps=layer_steps,
                        solver_iterations=solver_iterations)


def _init_state(params: dict, num_layers: int) -> _State:
    """The training state, every buffer distinct (the state is donated): parameters, Adam's state (which does
    not depend on the learning rate), best parameters and validation losses so far, steps per layer."""
    TRACE_COUNTS["ensemble_init"] += 1
    opt_state = jax.vmap(_optimizer(1.0, 1.0).init)(params)
    shapes = {f: p["b1" if "b1" in p else "b"].shape[:3] for f, p in params.items()}
    return _State(params, opt_state, jax.tree.map(jnp.copy, params),
                  {f: jnp.full(s, jnp.inf, jnp.float32) for f, s in shapes.items()},
                  {f: jnp.zeros(s, jnp.int32) for f, s in shapes.items()}, jnp.zeros(num_layers, jnp.int32))


_init_state_jit = compilation.jit(_init_state, key="ensemble_init", static_argnames=("num_layers",))


# best_step of a member solved in closed form (no optimisation steps)
CLOSED_FORM = -1


def _training_rows(data: dict, rows: np.ndarray) -> dict:
    """The (host) data the training segments read, restricted to the rows that train or validate in some fold
    (scoring-only rows, e.g. the victims of the attacker's split, never enter a training step)."""
    out = dict(data)  # a new dict: the caller may drop keys from it
    if rows.all():
        return out
    index = np.flatnonzero(rows)
    out["x"] = data["x"][:, index]
    if "xt" in data:
        out["xt"] = data["xt"][:, :, index]
    for key in ("train", "val", "t_train"):
        out[key] = data[key][:, index]
    if "z" in data:
        out["z"] = data["z"][:, :, index]
        out["zt"] = data["zt"][..., index]
    return out


def _select_and_score(best_params: dict, best_val: dict, best_step: dict, data: dict, spec: _Spec, split: Split,
                      members: tuple[Member, ...], targets: _Targets, steps_run: int) -> EnsembleFit:
    """Each fold's member with the lowest validation loss, its validation gain, and the scored rows' losses."""
    rows = np.flatnonzero(np.asarray(split.test).any(axis=0))  # the scored rows
    member_test, chosen, loss_c, pred_rows, loss_rows, member_pred = _score_jit(
        best_params, best_val, {**data, "scored": rows.astype(np.int32)}, spec=spec)
    _check_finite(np.asarray(loss_rows), np.asarray(pred_rows), np.asarray(loss_c), split)
    chosen = np.array(chosen)
    loss_c = np.asarray(loss_c, np.float64)
    num_l, num_f = chosen.shape
    fold_of = np.asarray(split.fold_of)[rows]
    null_rows = targets.null_loss[fold_of, rows]
    null_pred = targets.null_pred[fold_of]
    pred = np.asarray(pred_rows, np.float64)[:, rows]
    heldout_loss = np.asarray(loss_rows, np.float64)[:, rows]
    mix = None
    if spec.kind == CLASSIFICATION:
        mix, loss_c = _mix_with_prior(loss_c, targets.null_loss, split.val, pooled=split.shared)
        w = mix[:, fold_of]  # (L, S)
        heldout_loss = -np.logaddexp(np.log1p(-w) - heldout_loss, np.log(w) - null_rows[None])
        pred = (1.0 - w[..., None]) * pred + w[..., None] * null_pred[None]
    # Validation gain of each fold's chosen member over the ignorant predictor, paired per example.
    gain = np.zeros((num_l, num_f))
    gain_se = np.zeros((num_l, num_f))
    val_row_loss = np.full((num_l, split.val.shape[1]), np.nan)
    for f in range(num_f):
        diff = targets.null_loss[f, split.val[f]][None] - loss_c[:, f, split.val[f]]
        gain[:, f] = diff.mean(axis=1)
        gain_se[:, f] = diff.std(axis=1, ddof=1) / math.sqrt(diff.shape[1]) if diff.shape[1] > 1 else np.inf
        val_row_loss[:, split.val[f]] = loss_c[:, f, split.val[f]]
    best_step = np.concatenate([np.asarray(best_step[f]) for f, _, _ in spec.families], axis=2)
    val = np.concatenate([np.asarray(best_val[f]) for f, _, _ in spec.families], axis=2)
    return EnsembleFit(members, val, best_step, np.asarray(member_test), chosen, gain, gain_se, heldout_loss,
                       pred, null_rows, null_pred, steps_run, mix, targets.basis, targets.mean, fold_of, rows,
                       val_row_loss, member_pred=np.asarray(member_pred))


def _check_finite(loss_rows: np.ndarray, pred_rows: np.ndarray, loss_c: np.ndarray, split: Split) -> None:
    """Raise :class:`NonFiniteError` naming every layer (by index) whose chosen attack gives a NaN or infinite
    held-out loss or prediction, or validation loss: such an estimate must never be stored silently."""
    scored = np.asarray(split.test).any(axis=0)
    checks = (("held-out loss", ~np.isfinite(loss_rows[:, scored])),
              ("held-out prediction", ~np.isfinite(pred_rows[:, scored]).all(axis=-1)),
              ("validation loss", ~np.isfinite(np.where(np.asarray(split.val)[None], loss_c, 0.0)).any(axis=1)))
    problems = []
    for quantity, bad in checks:
        layers = np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))
        problems += [f"layer {i}: {quantity} of the chosen attack model is NaN or infinite "
                     f"({int(bad[i].sum())} rows)" for i in layers]
    if problems:
        raise NonFiniteError(
            "attack ensemble: " + "; ".join(problems) + " (layers are indices into the features' layers). "
            "Likely cause: features of extreme or degenerate scale (near-constant or low-rank columns) that "
            "overflowed float32 after standardisation, or an attack model that diverged (try a smaller lr)")


# Prior weights tried when a classifier's held-out probabilities are mixed with the prior.
MIX_WEIGHTS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 0.6, 0.9)


def _mix_with_prior(loss_c: np.ndarray, null_loss: np.ndarray, val: np.ndarray,
                    pooled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per (layer, fold), the prior weight with the lowest validation loss, and every row's mixed loss.

    loss_c: (L, F, N) -log p of each row under each fold's chosen member;
    null_loss: (F, N) -log prior; val: (F, N) validation rows (the only rows
    that choose the weight). ``pooled``: one weight per layer, chosen on the
    validation rows of all folds together (the attacker's split).
    """
    weights = np.asarray(MIX_WEIGHTS)[:, None, None, None]
    mixed = -np.logaddexp(np.log1p(-weights) - loss_c[None], np.log(weights) + -null_loss[None, None])
    val_loss = np.stack([mixed[:, :, f, val[f]].mean(axis=-1) for f in range(val.shape[0])], axis=-1)  # (W, L, F)
    if pooled:
        counts = val.sum(axis=1).astype(np.float64)
        val_loss = np.broadcast_to((val_loss * counts).sum(axis=-1, keepdims=True) / counts.sum(), val_loss.shape)
    best = np.argmin(val_loss, axis=0)  # (L, F)
    mixed_c = np.take_along_axis(mixed, best[None, :, :, None], axis=0)[0]
    return np.asarray(MIX_WEIGHTS)[best], mixed_c


def _principal_directions(centred: np.ndarray, r: int) -> np.ndarray:
    """(D, r) orthonormal top-r right singular vectors of centred rows (n, D); sign fixed for determinism."""
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return _fix_signs(vt[:r].T)


def _fix_signs(v: np.ndarray) -> np.ndarray:
    """Columns of v with their largest-magnitude entry positive (a deterministic sign for each direction)."""
    signs = np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(v.shape[1])])
    return v * np.where(signs == 0, 1.0, signs)
