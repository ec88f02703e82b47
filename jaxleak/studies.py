"""Studies: every measure, per layer, across settings of aggregation, defences and training stage.

docs/method.md sections 1 and 8. A study measures what one member of a client batch
(the victim, index 0) leaks through the **shared update**

    u(S) = (W0 - W_K) / (K eta)          (K local SGD steps on batch S, |S| = B)

for each setting of one knob:

- ``aggregation``: B in ``batch_sizes`` x K in ``local_steps``;
- ``defenses``: no defence, DP-SGD (clip C, noise sigma C), top-p% pruning,
  sign and quantised updates, dropout in the model, each with its strength
  swept; every model is trained with its defence first, so the task accuracy
  after training is the utility side of the trade-off;
- ``training``: the model after E epochs, for E in ``epochs_list``;
- ``validation``: per-layer reconstruction attacks against the measures
  (:mod:`jaxleak.validation`).

Measures on M client updates (victims drawn from the held-out pool):

- ``grad_norm``: sqrt(mean ||u_l||^2);
- ``sensitivity``: the Jacobian of the update with respect to the victim's
  input, J_l = d u_l / d x_0, by Hutchinson (jax.jvp of the update function
  with Rademacher probes), summarised by
  :func:`jaxleak.sensitivity.layer_statistics`: R_l = sqrt(mean ||J_l||_F^2 /
  mean ||u_l||^2). With K = 1, u = (1/B) sum_i g(x_i), so the raw S_l is the
  per-example raw S_l divided by B. Under DP noise of std s_l per coordinate
  the headline is the noise-normalised form mean ||J_l||_F^2 / s_l^2 (the
  trace of the Fisher information about x_0); sign and deterministic
  quantisation are piecewise constant, so their Jacobian is not defined as a
  leakage measure and the entry is null with the reason;
- ``subspace_distance``: from the Gram matrix of the (sketched) updates,
  grouped by the victim's latent attribute (stratified by its label);
- ``v_information.latent`` / ``.original``: empirical V-information of the
  (sketched) updates about z[victim] / x[victim].

Every finished (setting, measure) is written at once to
``parts/<setting>/<measure>.json``; ``resume`` skips what is there and
produces the same results.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import defaults
from jaxleak import data as data_lib
from jaxleak import defenses as defenses_lib
from jaxleak import grads as grads_lib
from jaxleak import io
from jaxleak.errors import InputError, JaxleakError, UnknownNameError
from jaxleak.run import check_resume, split_victims_aux
from jaxleak.scores import LayerScores, Score
from jaxleak.setting import Setting
from jaxleak.setting import load_part as _load
from jaxleak.setting import part_path as _part
from jaxleak.setting import trained as _trained
from jaxleak.task import Task

SCHEMA = "jaxleak.results/1"
STUDIES = ("aggregation", "defenses", "training", "validation")
MEASURES = ("grad_norm", "sensitivity", "subspace_distance", "v_information.latent", "v_information.original")
DEFAULT_DEFENSES = ("none", "dp:noise_multiplier=0.1", "dp:noise_multiplier=1.0", "prune:fraction=0.1",
                    "prune:fraction=0.01", "sign", "quantize:bits=4", "dropout:rate=0.5")
# Which way each defence's strength goes: +1 = a larger parameter is a stronger defence.
_STRENGTH = {"dp": ("noise_multiplier", +1), "prune": ("fraction", -1), "quantize": ("bits", -1),
             "dropout": ("rate", +1)}


@dataclasses.dataclass
class StudyConfig:
    """Everything that decides a study's numbers (written to results.json as ``config``).

    Shared: data set, model, seed, the held-out pool of ``n`` examples the
    victims come from, ``num_updates`` client updates per setting (default
    ``n``), training before measuring (``epochs``, ``batch_size``, ``lr``),
    the measures and their budgets (``probes``, ``permutations``,
    ``sketch_dim``, and the V-information ensemble's ``vinfo_steps``,
    ``vinfo_folds``, ``vinfo_boot``). Per study: ``batch_sizes`` and
    ``local_steps`` (aggregation); ``defenses`` as ``"name:key=value,..."``
    strings, ``dp_delta`` (defences); ``epochs_list`` (training);
    ``update_batch_size``/``update_local_steps``: B and K of the updates in
    the defence and training studies; ``local_lr``: the clients' eta
    (default 0.01: at 0.1 the K = 4 local steps of the trained default LeNet
    diverge, and its update sensitivity at B = 4 rose from 4.9 to 25.7
    instead of falling; at 0.01 it falls with B and with K).
    """

    study: str = "aggregation"
    dataset: str = "digits"
    model: str = "lenet"
    seed: int = 0
    n: int = 256
    aux_n: int = 2048
    num_updates: int | None = None
    epochs: int = 5
    train_fraction: float = 0.4
    batch_size: int = 64
    lr: float = 3e-3
    latent: str = "thickness"
    measures: tuple[str, ...] = MEASURES
    probes: int = 8
    permutations: int = defaults.PERMUTATIONS
    sketch_dim: int = defaults.SKETCH_DIM
    vinfo_steps: int = defaults.VINFO_STEPS
    vinfo_folds: int = defaults.VINFO_FOLDS
    vinfo_patience: int = defaults.VINFO_PATIENCE
    vinfo_boot: int = 200
    local_lr: float = 0.01
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    local_steps: tuple[int, ...] = (1, 2, 4)
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    dp_delta: float = 1e-5
    epochs_list: tuple[int, ...] = (0, 1, 5)
    update_batch_size: int = 1
    update_local_steps: int = 1
    attack_victims: int = 4
    attack_steps: int = 300
    attack_restarts: int = 4
    data_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("measures", "batch_sizes", "local_steps", "defenses", "epochs_list"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            setattr(self, name, tuple(value))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("measures", "batch_sizes", "local_steps", "defenses", "epochs_list"):
            d[name] = list(d[name])
        return d


def validate(config: StudyConfig) -> None:
    """Raise an :class:`InputError`/:class:`UnknownNameError` for any invalid option, before any work."""
    from jaxleak import models

    if config.study not in STUDIES:
        raise UnknownNameError(f"unknown study {config.study!r}; choose one of {list(STUDIES)}")
    unknown = [m for m in config.measures if m not in MEASURES]
    if unknown:
        raise UnknownNameError(f"unknown measure(s) {unknown} for a study; choose from {list(MEASURES)}")
    if not config.measures:
        raise InputError("a study needs at least one measure")
    if config.model not in models.names():
        raise UnknownNameError(f"unknown model {config.model!r}; choose one of {models.names()}")
    for name in ("n", "probes", "sketch_dim", "batch_size", "vinfo_steps", "vinfo_patience", "vinfo_boot",
                 "update_batch_size",
                 "update_local_steps", "attack_victims", "attack_steps", "attack_restarts"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            raise InputError(f"{name} must be an integer >= 1, got {getattr(config, name)!r}")
    if config.vinfo_folds < 2:
        raise InputError(f"vinfo_folds must be >= 2, got {config.vinfo_folds}")
    if config.permutations < 1:
        raise InputError(f"permutations must be >= 1, got {config.permutations}")
    if config.num_updates is not None and config.num_updates < 4:
        raise InputError(f"num_updates must be >= 4, got {config.num_updates}")
    if config.epochs < 0 or any(e < 0 for e in config.epochs_list):
        raise InputError("epochs must be >= 0")
    if not 0.0 < config.train_fraction < 1.0:
        raise InputError(f"train_fraction must be in (0, 1), got {config.train_fraction}")
    if not (config.lr > 0 and config.local_lr > 0):
        raise InputError("lr and local_lr must be positive")
    if not 0 < config.dp_delta < 1:
        raise InputError(f"dp_delta must be in (0, 1), got {config.dp_delta}")
    for name in ("batch_sizes", "local_steps", "epochs_list"):
        values = getattr(config, name)
        if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            raise InputError(f"{name} must be a non-empty list of integers, got {list(values)!r}")
    if config.study == "aggregation" and any(b < 1 or b > config.n for b in config.batch_sizes):
        raise InputError(f"batch sizes must be in [1, n={config.n}], got {list(config.batch_sizes)}")
    if config.study in ("defenses", "training") and config.update_batch_size > config.n:
        raise InputError(f"update_batch_size must be <= n={config.n}, got {config.update_batch_size}")
    if any(k < 1 for k in config.local_steps):
        raise InputError(f"local steps must be >= 1, got {list(config.local_steps)}")
    for spec in config.defenses:
        parse_defense(spec)


def parse_defense(spec: str) -> defenses_lib.Defense | None:
    """``"none"``, ``"sign"``, ``"dp:clip_norm=1,noise_multiplier=0.5"``, ``"prune:fraction=0.1"``, ..."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"a defence is given as 'name' or 'name:key=value,...', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    if name == "none":
        return None
    params = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"defence option {item!r} in {spec!r} must be key=value")
        params[key.strip()] = _number(value.strip())
    return defenses_lib.make(name, **params)


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


# ---------------------------------------------------------------- updates under a defence, and their Jacobian

def update_fn(task: Task, defense: defenses_lib.Defense | None, local_steps: int) -> Callable:
    """Pure ``(params, lr, rng, xb (B, ...), yb (B,)) -> {layer: (P_l,)}``: one client's shared update.

    K = ``local_steps`` SGD steps at learning rate lr from ``params``;
    u = (W0 - W_K) / (K lr), the mean of the K step gradients. Step k uses
    the key ``fold_in(rng, k)``: DP runs DP-SGD in each step (per-example
    clipping over all layers, N(0, (sigma C)^2) on the sum, divided by B),
    Dropout uses the model's training mode with that key as the dropout
    mask's seed; Prune / Sign / Quantize transform the final update (key
    ``fold_in(rng, K)``). Without dropout this is exactly
    :func:`jaxleak.defenses.defended_client_updates`'s update.
    Differentiable in ``xb`` wherever the defence is (not sign/quantise).
    """
    dp = defense if isinstance(defense, defenses_lib.DP) else None
    dropout = isinstance(defense, defenses_lib.Dropout) and task.train_apply_fn is not None
    step_grad = defenses_lib.batch_gradient_fn(task, dp)

    def dropout_loss(p, xb, yb, k):
        return jnp.mean(task.loss_fn(task.train_apply_fn(p, xb, k), yb))

    def one(params, lr, rng, xb, yb):
        def step(carry, k):
            p, acc = carry
            key = jax.random.fold_in(rng, k)
            g = grads_lib.mean_loss_grad(dropout_loss)(p, xb, yb, key) if dropout else step_grad(p, xb, yb, key)
            p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
            return (p, jax.tree.map(jnp.add, acc, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (_, total), _ = jax.lax.scan(step, (params, zeros), jnp.arange(local_steps))
        u = task.flatten(jax.tree.map(lambda t: t / local_steps, total))
        if defense is not None and dp is None and not isinstance(defense, defenses_lib.Dropout):
            u = {n: v[0] for n, v in defenses_lib.apply(defense, {n: v[None] for n, v in u.items()},
                                                         jax.random.fold_in(rng, local_steps)).items()}
        return u

    return one


def _update_keys(seed: int, num_updates: int) -> jax.Array:
    return jax.random.split(jax.random.key(seed + 1), num_updates)


def _compiled_features(task: Task, defense, local_steps: int, sketch_dim: int, sketch_seed: int) -> Callable:
    key = ("study_features", defense, local_steps, sketch_dim, sketch_seed)

    def build():
        one = update_fn(task, defense, local_steps)
        sketches = grads_lib.make_sketches(task.layers, sketch_dim, sketch_seed)

        def traced(params, lr, keys, xb, yb):
            grads_lib.TRACE_COUNTS[key] += 1
            u = jax.vmap(one, in_axes=(None, None, 0, 0, 0))(params, lr, keys, xb, yb)
            out = {f"u/{n}": grads_lib.apply_sketch(sketches[n], v) for n, v in u.items()}
            out.update({f"g2/{n}": jnp.sum(jnp.square(v), axis=1) for n, v in u.items()})
            return out

        return jax.jit(traced)

    return task.cached(key, build)


def _compiled_sensitivity(task: Task, defense, local_steps: int, probes: int) -> Callable:
    key = ("study_update_sensitivity", defense, local_steps, probes)

    def build():
        one = update_fn(task, defense, local_steps)
        from jaxleak.sensitivity import rademacher_probes

        def client(params, lr, rng, xb, yb, v):
            def f(x0):
                return one(params, lr, rng, xb.at[0].set(x0), yb)

            u, lin = jax.linearize(f, xb[0])
            jv = jax.vmap(lin)(v)  # {layer: (probes, P_l)}
            return ({n: jnp.sum(jnp.square(t), axis=1) for n, t in jv.items()},
                    {n: jnp.sum(jnp.square(t)) for n, t in u.items()})

        def traced(params, lr, pkey, keys, index, xb, yb):
            grads_lib.TRACE_COUNTS[key] += 1
            v = rademacher_probes(pkey, index, probes, xb.shape[2:], xb.dtype)  # (probes, M, ...)
            sq, g2 = jax.vmap(client, in_axes=(None, None, 0, 0, 0, 1))(params, lr, keys, xb, yb, v)
            out = {f"sq/{n}": t for n, t in sq.items()}
            out.update({f"g2/{n}": t for n, t in g2.items()})
            return out

        return jax.jit(traced)

    return task.cached(key, build)


# Updates per chunk at most on the CPU (each update is a batch of B examples).
_CPU_UPDATES_CAP = 64


def _chunk(task: Task, num_updates: int, batch_size: int, factor: int) -> int:
    """Updates per chunk: ``factor`` floats per parameter per example within the backend's chunk budget
    (:func:`jaxleak.grads.chunk_limits`: 128 MiB on the CPU, a fraction of the free device memory on a GPU/TPU)."""
    floats, cap = grads_lib.chunk_limits(grads_lib._CHUNK_FLOATS)
    if grads_lib._device().platform == "cpu":
        cap = _CPU_UPDATES_CAP
    per = max(1, task.num_params * batch_size * factor)
    return int(max(1, min(num_updates, cap, floats // per)))


def study_updates(task: Task, x, y, *, defense=None, batch_size: int = 1, local_steps: int = 1, lr: float = 0.1,
                  num_updates: int, seed: int = 0, sketch_dim: int = 1024, chunk_size: int | None = None,
                  sketch_seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Client updates under a defence: ``(features, sq_norms, batches, victims)``.

    ``features[layer]`` (M, min(P_l, sketch_dim)): each update, count-sketched
    (seed ``seed``) where the layer is wider than ``sketch_dim``;
    ``sq_norms[layer]`` (M,): ||u_l||^2 of the full update; ``batches`` (M, B)
    from :func:`jaxleak.grads.client_batches` (victim in column 0).
    """
    x, y = task.check_inputs(x, y)
    batches = grads_lib.client_batches(x.shape[0], batch_size=batch_size, num_updates=num_updates, seed=seed)
    fn = _compiled_features(task, defense, int(local_steps), int(sketch_dim),
                            int(seed if sketch_seed is None else sketch_seed))
    keys = _update_keys(seed, num_updates)
    chunk = int(chunk_size or _chunk(task, num_updates, batch_size, 3))
    lr32 = jnp.float32(lr)
    out = grads_lib.map_chunks(lambda i, xb, yb: fn(task.params, lr32, keys[i], xb, yb),
                               [np.arange(num_updates), x[batches], y[batches]], chunk)
    grads_lib.check_finite(out, "client update")
    names = task.layer_names
    return ({n: out[f"u/{n}"] for n in names}, {n: out[f"g2/{n}"].astype(np.float64) for n in names},
            batches, batches[:, 0].copy())


def update_sensitivity_terms(task: Task, x, y, *, defense=None, batch_size: int = 1, local_steps: int = 1,
                             lr: float = 0.1, num_updates: int, seed: int = 0, probes: int = 8,
                             chunk_size: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Hutchinson samples of ||d u_l / d x_victim||_F^2 for each client update: ``(sq, g2)``.

    ``sq[layer]`` (M, probes): ||J_l v||^2 with J_l = d u_l(S) / d x_0 (the
    other batch members, labels and noise held fixed) and Rademacher v,
    keyed by ``seed`` and the update's index exactly as
    :func:`jaxleak.sensitivity.per_example_terms` keys example i, so with
    B = K = 1 the samples are those of the per-example measure on
    ``x[victims]``. ``g2[layer]`` (M,): ||u_l||^2. Batches and keys are those
    of :func:`study_updates` with the same arguments.
    """
    x, y = task.check_inputs(x, y)
    if not isinstance(probes, (int, np.integer)) or probes < 2:
        raise InputError(f"probes must be an integer >= 2, got {probes!r}")
    batches = grads_lib.client_batches(x.shape[0], batch_size=batch_size, num_updates=num_updates, seed=seed)
    fn = _compiled_sensitivity(task, defense, int(local_steps), int(probes))
    keys = _update_keys(seed, num_updates)
    chunk = int(chunk_size or _chunk(task, num_updates, batch_size, 3 + int(probes)))
    lr32 = jnp.float32(lr)
    pkey = jax.random.key(int(seed))
    out = grads_lib.map_chunks(
        lambda i, xb, yb: fn(task.params, lr32, pkey, keys[i], i.astype(jnp.int32), xb, yb),
        [np.arange(num_updates, dtype=np.int32), x[batches], y[batches]], chunk)
    sq = {n: out[f"sq/{n}"].astype(np.float64) for n in task.layer_names}
    g2 = {n: out[f"g2/{n}"].astype(np.float64) for n in task.layer_names}
    grads_lib.check_finite(sq, "update sensitivity term")
    return sq, g2


def update_sensitivity(task: Task, x, y, *, defense=None, batch_size: int = 1, local_steps: int = 1,
                       lr: float = 0.1, num_updates: int, seed: int = 0, probes: int = 8,
                       noise_std: Mapping[str, float] | None = None, chunk_size: int | None = None) -> LayerScores:
    """Sensitivity of the shared update to the victim's input, per layer (docs/method.md section 4 on u(S)).

    ``value`` R_l = sqrt(mean ||J_l||_F^2 / mean ||u_l||^2), J_l = d u_l / d x_0;
    extras ``raw`` S_l = sqrt(mean ||J_l||_F^2) (for K = 1: the per-example
    S_l / B) and the intervals of :func:`jaxleak.sensitivity.layer_statistics`.
    With ``noise_std`` (per-coordinate std s_l of additive noise on u_l) the
    headline ``value`` is the noise-normalised form mean ||J_l||_F^2 / s_l^2
    (Fisher trace, 1 / input unit^2) with its CI, and R_l moves to
    ``relative``.
    """
    from jaxleak.sensitivity import layer_statistics

    sq, g2 = update_sensitivity_terms(task, x, y, defense=defense, batch_size=batch_size, local_steps=local_steps,
                                      lr=lr, num_updates=num_updates, seed=seed, probes=probes, chunk_size=chunk_size)
    scores = {}
    for name in sq:
        s = noise_std.get(name) if noise_std else None
        st = layer_statistics(sq[name], g2[name], s)
        value, ci = st.pop("value"), st.pop("ci")
        if s is not None:
            st["relative"], st["relative_ci"] = value, ci
            st["noise_std"] = s
            value, ci = st.pop("fisher"), st.pop("fisher_ci")
        scores[name] = Score(value, ci, st)
    meta = {"method": "hutchinson", "probes": int(probes), "probe_distribution": "rademacher", "seed": int(seed),
            "target": "shared update u(S) w.r.t. the victim's input x_0",
            "batch_size": int(batch_size), "local_steps": int(local_steps)}
    if noise_std:
        meta["headline"] = "fisher = mean ||J_l||_F^2 / s_l^2 (noise-normalised; trace of the Fisher information)"
        unit = "1/input_unit^2"
    else:
        meta["headline"] = "R_l = sqrt(mean ||J_l||_F^2 / mean ||u_l||^2)"
        unit = "1/input unit"
    return LayerScores("sensitivity", scores, unit=unit, meta=meta)


# ---------------------------------------------------------------- measures on updates

def null_scores(measure: str, layers: Sequence[str], reason: str) -> dict:
    """A results entry for a measure that is not defined in a setting: every layer null, with the reason."""
    return {"measure": measure, "unit": "", "meta": {"note": reason, "defined": False}, "top": None,
            "layers": {name: {"value": None, "ci": None, "reason": reason} for name in layers}}


def _grad_norm_scores(g2: Mapping[str, np.ndarray]) -> LayerScores:
    scores = {}
    for name, v in g2.items():
        norms = np.sqrt(v)
        rms = float(np.sqrt(np.mean(v)))
        if v.size > 1:
            se = float(np.std(v, ddof=1) / math.sqrt(v.size))
            lo, hi = math.sqrt(max(float(np.mean(v)) - 1.96 * se, 0.0)), math.sqrt(float(np.mean(v)) + 1.96 * se)
            ci = (lo, hi)
        else:
            ci = None
        scores[name] = Score(rms, ci, {"mean_norm": float(np.mean(norms)), "n": int(v.size)})
    return LayerScores("grad_norm", scores, unit="gradient units",
                       meta={"definition": "sqrt(mean ||u_l||^2) over client updates", "ci": "95%, normal on the mean"})


def _subspace_scores(features, z, y, permutations: int, seed: int, sketched: Mapping[str, int]) -> LayerScores:
    from jaxleak.subspace import balanced_groups, subspace_distance_from_grams, verdict_meta, with_verdicts

    index, group = balanced_groups(z, seed=seed, strata=y)
    scores, nulls = {}, {}
    for name, f in features.items():
        f = np.asarray(f, np.float64)[index]
        res = subspace_distance_from_grams(f @ f.T, group, permutations=permutations, seed=seed * 1000003,
                                           strata=y[index])
        value = res.pop("value")
        nulls[name] = np.asarray(res.pop("null"), np.float64)
        res["gram_source"] = "count-sketch" if name in sketched else "exact"
        scores[name] = Score(value, None, res)
    return LayerScores("subspace_distance", with_verdicts(scores, nulls), unit="dimensionless", meta={
        "definition": "D_l = sqrt(mean_i sin^2 theta_i) between the update subspaces of z[victim] = 0 and 1",
        **verdict_meta(int(permutations)),
        "stratified_by_label": True, "sketched_layers": dict(sketched)}, rank_by="excess")


def _vinfo_scores(features, target, config: StudyConfig, sketched: Mapping[str, int], aux=None) -> LayerScores:
    from jaxleak.vinfo import v_information_from_features

    aux_features, aux_target = aux if aux is not None else (None, None)
    scores = v_information_from_features(features, target, aux_features=aux_features, aux_target=aux_target,
                                         sketch_dim=config.sketch_dim, steps=config.vinfo_steps,
                                         folds=config.vinfo_folds, n_boot=config.vinfo_boot, seed=config.seed,
                                         patience=config.vinfo_patience)
    if sketched:
        from jaxleak.vinfo import LOWER_BOUND_NOTE

        scores.meta["sketched_layers"] = sorted(sketched)
        scores.meta["lower_bound"] = LOWER_BOUND_NOTE
        for name in sketched:
            if scores[name].extras.get("reduced"):
                scores[name].extras["reduced"]["size"] = int(sketched[name])
                scores[name].extras["reduced"]["sketch"] = int(np.asarray(features[name]).shape[1])
    scores.meta["observation"] = "shared client update u(S), victim at index 0"
    return scores


# ---------------------------------------------------------------- settings

def settings(config: StudyConfig) -> list[Setting]:
    """The settings of ``config.study``, in order."""
    b, k = config.update_batch_size, config.update_local_steps
    if config.study == "aggregation":
        return [Setting(f"B{bs}_K{ks}", {"batch_size": bs, "local_steps": ks}, None, bs, ks)
                for ks in config.local_steps for bs in config.batch_sizes]
    if config.study == "defenses":
        out = []
        for spec in config.defenses:
            d = parse_defense(spec)
            key = "none" if d is None else spec.replace(":", "_").replace("=", "").replace(",", "_")
            out.append(Setting(key, {"defense": defenses_lib.to_dict(d), "spec": spec}, d, b, k))
        return out
    if config.study == "training":
        return [Setting(f"epochs{e}", {"epochs": e}, None, b, k, e) for e in config.epochs_list]
    return [Setting("default", {}, None, 1, 1)]


def _num_updates(config: StudyConfig) -> int:
    return int(config.num_updates or config.n)


@dataclasses.dataclass
class _Context:
    config: StudyConfig
    dataset: data_lib.Dataset
    pool_x: np.ndarray
    pool_y: np.ndarray
    pool_z: np.ndarray | None
    aux_x: np.ndarray
    aux_y: np.ndarray
    aux_z: np.ndarray | None
    aux_info: dict
    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    tasks: dict = dataclasses.field(default_factory=dict)


def _context(config: StudyConfig) -> _Context:
    dataset = data_lib.load(config.dataset, **config.data_options)
    needs_latent = any(m in ("subspace_distance", "v_information.latent") for m in config.measures)
    if needs_latent and config.latent not in dataset.latent:
        raise UnknownNameError(f"data set {dataset.name!r} has no latent attribute {config.latent!r}; "
                               f"choose one of {sorted(dataset.latent)}")
    train_set, eval_set = dataset.split(config.train_fraction, seed=config.seed)
    if eval_set.n < 4 or train_set.n < 1:
        raise InputError(f"data set {dataset.name!r} has only {dataset.n} examples; too few to split")
    n_pool, n_aux, compromise = split_victims_aux(eval_set.n, config.n, config.aux_n)
    pool = eval_set.subset(slice(0, n_pool))
    aux = eval_set.subset(slice(n_pool, n_pool + n_aux))
    largest = max(4, max(config.batch_sizes) if config.study == "aggregation" else config.update_batch_size)
    if pool.n < largest:
        raise InputError(f"the held-out pool has {pool.n} examples, fewer than the largest batch size")
    if 0 < aux.n < largest:
        n_aux, compromise = 0, (f"only {aux.n} auxiliary examples, fewer than the largest batch size {largest}: "
                                f"V-information is cross-fitted over the victims' updates")
        aux = eval_set.subset(slice(n_pool, n_pool))
    aux_info = {"n": n_aux, "requested": config.aux_n, "compromise": compromise,
                "source": (f"held-out examples of {dataset.name!r}, disjoint from the victims' pool and the training "
                           f"data; the attacker simulates client updates of the same B and K from them")
                if n_aux else "none: V-information is cross-fitted over the victims' updates"}
    return _Context(config, dataset, pool.x, pool.y, pool.latent.get(config.latent), aux.x, aux.y,
                    aux.latent.get(config.latent), aux_info, train_set.x, train_set.y, eval_set.x, eval_set.y)


def _undefined_reason(measure: str, defense) -> str | None:
    if measure == "sensitivity" and isinstance(defense, defenses_lib.Sign):
        return "sign() is piecewise constant: d u / d x is 0 almost everywhere and undefined at jumps"
    if measure == "sensitivity" and isinstance(defense, defenses_lib.Quantize):
        return "quantisation is piecewise constant: d u / d x is 0 almost everywhere and undefined at jumps"
    return None


class _SettingData:
    """Lazily computed updates of one setting, shared by its measures."""

    def __init__(self, ctx: _Context, setting: Setting):
        self.ctx, self.setting = ctx, setting
        self._task = self._info = self._features = self._aux = None

    @property
    def task(self) -> Task:
        if self._task is None:
            self._task, self._info = _trained(self.ctx, self.setting)
        return self._task

    @property
    def info(self) -> dict:
        self.task  # noqa: B018 - trains on first use
        return self._info

    def noise_std(self) -> dict[str, float] | None:
        d = self.setting.defense
        if isinstance(d, defenses_lib.DP):
            s = d.noise_std(self.setting.batch_size, self.setting.local_steps)
            return {name: s for name in self.task.layer_names}
        return None

    def features(self):
        if self._features is None:
            c = self.ctx.config
            self._features = study_updates(self.task, self.ctx.pool_x, self.ctx.pool_y, defense=self.setting.defense,
                                           batch_size=self.setting.batch_size, local_steps=self.setting.local_steps,
                                           lr=c.local_lr, num_updates=_num_updates(c), seed=c.seed,
                                           sketch_dim=self.width())
        return self._features

    def aux(self, victims_target: str):
        """The attacker's simulated updates (same B, K, defence and sketch) and their victims' targets, or None."""
        ctx = self.ctx
        if not ctx.aux_info["n"]:
            return None
        if self._aux is None:
            c = ctx.config
            self._aux = study_updates(self.task, ctx.aux_x, ctx.aux_y, defense=self.setting.defense,
                                      batch_size=self.setting.batch_size, local_steps=self.setting.local_steps,
                                      lr=c.local_lr, num_updates=int(ctx.aux_info["n"]), seed=c.seed + 1,
                                      sketch_dim=self.width(), sketch_seed=c.seed)
        features, _, _, victims = self._aux
        return features, (ctx.aux_z if victims_target == "latent" else ctx.aux_x)[victims]

    def width(self) -> int:
        """The count-sketch width of the updates on the device: every layer whole within the feature budget
        (victims' and attacker's updates together), wider ones sketched to fill it (:func:`vinfo.feature_width`)."""
        from jaxleak.vinfo import feature_width

        rows = _num_updates(self.ctx.config) + int(self.ctx.aux_info["n"])
        return feature_width([layer.size for layer in self.task.layers], rows, self.ctx.config.sketch_dim)

    def sketched(self) -> dict[str, int]:
        return {layer.name: layer.size for layer in self.task.layers if layer.size > self.width()}

    def compute(self, measure: str) -> dict:
        c, s = self.ctx.config, self.setting
        reason = _undefined_reason(measure, s.defense)
        if reason:
            return null_scores(measure, self.task.layer_names, reason)
        if measure == "sensitivity":
            scores = update_sensitivity(self.task, self.ctx.pool_x, self.ctx.pool_y, defense=s.defense,
                                        batch_size=s.batch_size, local_steps=s.local_steps, lr=c.local_lr,
                                        num_updates=_num_updates(c), seed=c.seed, probes=c.probes,
                                        noise_std=self.noise_std())
            return scores.to_dict()
        features, g2, _, victims = self.features()
        if measure == "grad_norm":
            return _grad_norm_scores(g2).to_dict()
        if measure == "subspace_distance":
            return _subspace_scores(features, self.ctx.pool_z[victims], self.ctx.pool_y[victims], c.permutations,
                                    c.seed, self.sketched()).to_dict()
        if measure == "v_information.latent":
            return _vinfo_scores(features, self.ctx.pool_z[victims], c, self.sketched(), self.aux("latent")).to_dict()
        return _vinfo_scores(features, self.ctx.pool_x[victims], c, self.sketched(), self.aux("input")).to_dict()


# ---------------------------------------------------------------- the study

def headline(measure: str, layer_entry: Mapping) -> float | None:
    """The per-layer number a study plots and checks: ``excess`` for subspace distance, else ``value``."""
    v = layer_entry.get("excess" if measure == "subspace_distance" else "value")
    return None if v is None else float(v)


def run_study(config: StudyConfig, *, out: str | None = None, resume: bool = False, progress: bool = True,
              on_part: Callable[[str, str], None] | None = None) -> dict:
    """Run a study and write its directory; returns results.json's content.

    Files: ``config.json``; ``parts/<setting>/info.json`` (training facts:
    accuracy, DP epsilon) and ``parts/<setting>/<measure>.json``, each
    written atomically as soon as it is done; ``results.json`` (schema
    ``jaxleak.results/1``, ``study``, one entry per setting under
    ``settings`` and the per-layer measures under ``measures[setting]``,
    the study's own monotonicity check under ``monotonicity``); PNG
    figures; ``report.html``. ``resume=True`` keeps the finished parts of
    ``out`` and computes only what is missing; the results are the same as
    an uninterrupted run's. ``on_part(setting, measure)`` is called after
    each part is written.
    """
    started = time.time()
    validate(config)
    out = out or os.path.join("runs", f"study-{config.study}-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    if resume:
        check_resume(out, config.to_dict(), "study")
    elif os.path.exists(out) and os.listdir(out):
        raise InputError(f"output directory {out!r} exists and is not empty; choose another --out "
                         f"or continue it with --resume")
    ctx = _context(config)
    with io.run_directory(out, resume=resume, cleanup=(JaxleakError,)):
        if not resume:
            io.write_json(os.path.join(out, "config.json"), config.to_dict())
        if config.study == "validation":
            from jaxleak import validation

            body = validation.run_validation(ctx, out, resume=resume, progress=progress, on_part=on_part)
        else:
            body = _run_settings(ctx, out, resume, progress, on_part)
        base_task = Task.init(config.model, ctx.dataset, config.seed, **config.model_options)
        from jaxleak.run import environment

        results = {
            "schema": SCHEMA,
            "study": config.study,
            "config": config.to_dict(),
            "dataset": {"name": ctx.dataset.name, "n": ctx.dataset.n, "n_measured": int(ctx.pool_x.shape[0]),
                        "num_updates": _num_updates(config), "input_shape": list(ctx.dataset.input_shape),
                        "num_classes": ctx.dataset.num_classes, "latent": sorted(ctx.dataset.latent),
                        "latent_descriptions": dict(ctx.dataset.descriptions)},
            "model": {"name": config.model, "num_params": base_task.num_params,
                      "layers": [{"name": layer.name, "params": layer.size} for layer in base_task.layers]},
            "aux": ctx.aux_info,
            **body,
            "environment": environment(),
        }
        results["timing"] = {**results.pop("timing", {}), "total_s": time.time() - started,
                             "finished": datetime.datetime.now().isoformat(timespec="seconds")}
        io.write_json(os.path.join(out, "results.json"), results)
        draw_figures(out, results)
        from jaxleak.report import write_report

        write_report(out, title=f"jaxleak study: {config.study} ({config.model} on {ctx.dataset.name})")
    results["out"] = out
    return results


def _run_settings(ctx: _Context, out: str, resume: bool, progress: bool, on_part) -> dict:
    config = ctx.config
    all_settings = settings(config)
    timing: dict[str, float] = {}
    entries, measures = [], {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(all_settings) * len(config.measures), desc=f"study {config.study}", unit="part")
    for setting in all_settings:
        data = _SettingData(ctx, setting)
        info_path = os.path.join(out, "parts", setting.key, "info.json")
        info = _load(info_path) if resume else None
        if info is None:
            info = data.info
            io.write_json(info_path, info)
        measures[setting.key] = {}
        for measure in config.measures:
            path = _part(out, setting.key, measure)
            entry = _load(path) if resume else None
            if entry is None:
                t0 = time.time()
                entry = data.compute(measure)
                entry["seconds"] = time.time() - t0
                io.write_json(path, entry)
                if on_part is not None:
                    on_part(setting.key, measure)
            timing[f"{setting.key}/{measure}_s"] = entry.pop("seconds", None)
            measures[setting.key][measure] = entry
            if bar is not None:
                bar.update(1)
        entries.append({"key": setting.key, "params": setting.params, "batch_size": setting.batch_size,
                        "local_steps": setting.local_steps, **info})
    if bar is not None:
        bar.close()
    body = {"settings": entries, "measures": measures, "timing": timing}
    body["monotonicity"] = monotonicity(config.study, entries, measures, config.measures)
    body["summary"] = summary_lines(body["monotonicity"])
    return body


# ---------------------------------------------------------------- checks

def _rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    import scipy.stats

    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None and math.isfinite(y)]
    if len(pairs) < 2 or len({p[0] for p in pairs}) < 2 or len({p[1] for p in pairs}) < 2:
        return None
    if len(pairs) == 2:  # two settings: rho is the sign of the change
        (x0, y0), (x1, y1) = pairs
        return float(np.sign(x1 - x0) * np.sign(y1 - y0))
    return float(scipy.stats.spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def _layer_values(measures: dict, key: str, measure: str) -> dict[str, float | None]:
    return {name: headline(measure, e) for name, e in measures[key][measure]["layers"].items()}


def _trend(xs: Sequence[float], keys: Sequence[str], measures: dict, measure: str) -> dict:
    """Spearman rho of each layer's headline (and of the most-leaking layer's) against ``xs``."""
    per_layer = {}
    layer_names = list(measures[keys[0]][measure]["layers"])
    for name in layer_names:
        per_layer[name] = _rho(xs, [_layer_values(measures, k, measure)[name] for k in keys])
    maxima = []
    for k in keys:
        vals = [v for v in _layer_values(measures, k, measure).values() if v is not None]
        maxima.append(max(vals) if vals else None)
    rho_max = _rho(xs, maxima)
    falling = [r for r in per_layer.values() if r is not None]
    return {"x": list(xs), "settings": list(keys), "max_over_layers": maxima, "rho_max": rho_max,
            "rho_layers": per_layer, "falls": None if rho_max is None else rho_max < 0,
            "fraction_layers_falling": (sum(r < 0 for r in falling) / len(falling)) if falling else None}


def monotonicity(study: str, entries: list[dict], measures: dict, measure_names: Sequence[str]) -> dict:
    """The study's own trend check, recorded (never forced).

    aggregation: for each K, Spearman rho between B and each layer's headline
    value and the largest headline over layers (``falls``: rho < 0); and for
    each B, rho between K and the values. defenses: for each defence kind
    swept over >= 2 strengths, rho between strength (larger = stronger) and
    the values; and for every defended setting whether its largest headline
    is below the undefended one. training: rho between epochs and values.
    Sensitivity under noise (Fisher form) is not compared with settings
    without noise.
    """
    out: dict[str, Any] = {"check": "Spearman rho across settings of each layer's headline value (subspace: excess) "
                                    "and of the largest over layers; falls = rho < 0", "measures": {}}
    for m in measure_names:
        res: dict[str, Any] = {}
        if study == "aggregation":
            ks = sorted({e["local_steps"] for e in entries})
            bs = sorted({e["batch_size"] for e in entries})
            by_b = {}
            for k in ks:
                sel = sorted((e for e in entries if e["local_steps"] == k), key=lambda e: e["batch_size"])
                by_b[f"K={k}"] = _trend([e["batch_size"] for e in sel], [e["key"] for e in sel], measures, m)
            by_k = {}
            for b in bs:
                sel = sorted((e for e in entries if e["batch_size"] == b), key=lambda e: e["local_steps"])
                if len(sel) >= 2:
                    by_k[f"B={b}"] = _trend([e["local_steps"] for e in sel], [e["key"] for e in sel], measures, m)
            falls = [t["falls"] for t in by_b.values() if t["falls"] is not None]
            res = {"vs_batch_size": by_b, "vs_local_steps": by_k,
                   "falls_with_batch_size": (all(falls) if falls else None)}
            falls_k = [t["falls"] for t in by_k.values() if t["falls"] is not None]
            res["falls_with_local_steps"] = all(falls_k) if falls_k else None
        elif study == "defenses":
            kinds: dict[str, list] = {}
            for e in entries:
                name = e["params"]["defense"]["name"]
                if name in _STRENGTH:
                    field, sign = _STRENGTH[name]
                    kinds.setdefault(name, []).append((sign * e["params"]["defense"][field], e["key"]))
            res["vs_strength"] = {}
            for name, items in kinds.items():
                items.sort()
                if len(items) >= 2:
                    res["vs_strength"][name] = _trend([s for s, _ in items], [k for _, k in items], measures, m)
            base = next((e["key"] for e in entries if e["params"]["defense"]["name"] == "none"), None)
            if base is not None:
                comparable = {}
                base_vals = [v for v in _layer_values(measures, base, m).values() if v is not None]
                base_max = max(base_vals) if base_vals else None
                base_unit = measures[base][m].get("unit")
                for e in entries:
                    if e["key"] == base:
                        continue
                    vals = [v for v in _layer_values(measures, e["key"], m).values() if v is not None]
                    if not vals or base_max is None or measures[e["key"]][m].get("unit") != base_unit:
                        comparable[e["key"]] = None
                    else:
                        comparable[e["key"]] = {"max": max(vals), "baseline_max": base_max,
                                                "lower_than_none": max(vals) < base_max}
                res["vs_no_defense"] = comparable
        elif study == "training":
            sel = sorted(entries, key=lambda e: e["epochs"])
            res["vs_epochs"] = _trend([e["epochs"] for e in sel], [e["key"] for e in sel], measures, m)
        out["measures"][m] = res
    return out


def summary_lines(mono: dict) -> list[str]:
    lines = []
    for m, res in mono["measures"].items():
        if "falls_with_batch_size" in res:
            parts = ", ".join(f"{k}: rho={_f(t['rho_max'])}" for k, t in res["vs_batch_size"].items())
            lines.append(f"{m}: falls with B: {res['falls_with_batch_size']} ({parts}); "
                         f"falls with K: {res['falls_with_local_steps']}")
        for kind, t in res.get("vs_strength", {}).items():
            lines.append(f"{m}: rho(strength of {kind}, max over layers) = {_f(t['rho_max'])}")
        if "vs_no_defense" in res:
            below = [k for k, v in res["vs_no_defense"].items() if v and v["lower_than_none"]]
            above = [k for k, v in res["vs_no_defense"].items() if v and not v["lower_than_none"]]
            lines.append(f"{m}: below no defence: {below or '-'}; not below: {above or '-'}")
        if "vs_epochs" in res:
            lines.append(f"{m}: rho(epochs, max over layers) = {_f(res['vs_epochs']['rho_max'])}")
    return lines


def _f(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


# ---------------------------------------------------------------- output

_YLABEL = {"grad_norm": "sqrt mean ||u_l||^2", "sensitivity": "update sensitivity R_l (DP: Fisher trace)",
           "subspace_distance": "subspace excess over null", "v_information.latent": "I_V(u_l -> z) [bits]",
           "v_information.original": "I_V(u_l -> x) [bits/dim]"}


def format_table(results: dict) -> str:
    """One block per measure: layers x settings, the headline value (subspace: excess)."""
    keys = [s["key"] for s in results["settings"]]
    layers = [layer["name"] for layer in results["model"]["layers"]]
    blocks = []
    for m in results["config"]["measures"]:
        rows = [[m] + keys]
        for name in layers:
            row = [name]
            for k in keys:
                v = headline(m, results["measures"][k][m]["layers"].get(name, {}))
                row.append("-" if v is None else f"{v:.3g}")
            rows.append(row)
        if results["study"] in ("defenses", "training"):
            rows.append(["accuracy"] + [f"{s['test_accuracy']:.3f}" for s in results["settings"]])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks + results.get("summary", []))


def draw_figures(out: str, results: dict) -> None:
    """Heat map per measure (layers x settings); leakage vs B (aggregation), vs epochs (training), vs accuracy (defences)."""
    if results["study"] == "validation":
        from jaxleak.validation import draw_validation

        draw_validation(out, results)
        return
    for m in results["config"]["measures"]:
        _heatmap(results, m, os.path.join(out, f"{m}_heatmap.png"))
        if results["study"] == "aggregation":
            _leakage_vs(results, m, os.path.join(out, f"{m}_vs_B.png"), x="batch_size", group="local_steps")
        elif results["study"] == "training":
            _leakage_vs(results, m, os.path.join(out, f"{m}_vs_epochs.png"), x="epochs", group=None)
        else:
            _leakage_vs_accuracy(results, m, os.path.join(out, f"{m}_vs_accuracy.png"))


def _grid(results: dict, m: str) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    keys = [s["key"] for s in results["settings"]]
    layers = [layer["name"] for layer in results["model"]["layers"]]
    values = np.full((len(layers), len(keys)), np.nan)
    units = []
    for j, k in enumerate(keys):
        entry = results["measures"][k][m]
        units.append(entry.get("unit", ""))
        for i, name in enumerate(layers):
            v = headline(m, entry["layers"].get(name, {}))
            values[i, j] = np.nan if v is None else v
    return keys, layers, values, units


def _heatmap(results: dict, m: str, path: str) -> None:
    """Layers x settings; colour scaled within each unit (so Fisher columns do not swamp the others)."""
    import matplotlib.pyplot as plt

    from jaxleak.plots import save_figure

    keys, layers, values, units = _grid(results, m)
    colour = np.full_like(values, np.nan)
    for unit in set(units):
        cols = [j for j, u in enumerate(units) if u == unit]
        block = values[:, cols]
        top = np.nanmax(np.abs(block)) if np.any(np.isfinite(block)) else np.nan
        colour[:, cols] = block / top if top and np.isfinite(top) else np.nan
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(keys) + 2.0), 0.45 * len(layers) + 1.8))
    im = ax.imshow(colour, cmap="viridis", aspect="auto", vmin=min(0.0, float(np.nanmin(colour)) if np.any(
        np.isfinite(colour)) else 0.0), vmax=1.0)
    for i in range(len(layers)):
        for j in range(len(keys)):
            text = "n/a" if not np.isfinite(values[i, j]) else f"{values[i, j]:.2g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color="white" if not np.isfinite(
                colour[i, j]) or colour[i, j] < 0.6 else "black")
    labels = [k + (f"\n[{u}]" if len(set(units)) > 1 else "") for k, u in zip(keys, units)]
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels(layers, fontsize=8)
    fig.colorbar(im, ax=ax, label="share of the largest value (per unit)")
    ax.set_title(f"{_YLABEL[m]}: layer x setting ({results['study']})", fontsize=9)
    save_figure(fig, path)


def _leakage_vs(results: dict, m: str, path: str, *, x: str, group: str | None) -> None:
    """One line per layer against ``x`` (log2 axis for B), one panel per value of ``group``."""
    import matplotlib.pyplot as plt

    from jaxleak.plots import save_figure

    entries = results["settings"]
    groups = sorted({e[group] for e in entries}) if group else [None]
    layers = [layer["name"] for layer in results["model"]["layers"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups) + 1.0, 3.2), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], groups):
        sel = sorted((e for e in entries if group is None or e[group] == g), key=lambda e: e[x])
        xs = [e[x] for e in sel]
        for name in layers:
            ys = [headline(m, results["measures"][e["key"]][m]["layers"].get(name, {})) for e in sel]
            ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=name)
        if x == "batch_size":
            ax.set_xscale("log", base=2)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_xlabel({"batch_size": "batch size B", "epochs": "training epochs"}.get(x, x))
        if g is not None:
            ax.set_title(f"{group.replace('_', ' ')} = {g}", fontsize=9)
    axes[0, 0].set_ylabel(_YLABEL[m], fontsize=8)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{m} per layer ({results['model']['name']} on {results['dataset']['name']})", fontsize=10)
    save_figure(fig, path)


def _leakage_vs_accuracy(results: dict, m: str, path: str) -> None:
    """Each defence setting at (test accuracy after training with it, leakage); one marker series per layer."""
    import matplotlib.pyplot as plt

    from jaxleak.plots import save_figure

    entries = results["settings"]
    layers = [layer["name"] for layer in results["model"]["layers"]]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name in layers:
        xs, ys = [], []
        for e in entries:
            v = headline(m, results["measures"][e["key"]][m]["layers"].get(name, {}))
            if v is not None and results["measures"][e["key"]][m].get("unit") == results["measures"][
                    entries[0]["key"]][m].get("unit"):
                xs.append(e["test_accuracy"])
                ys.append(v)
        ax.scatter(xs, ys, label=name, s=18)
    for e in entries:
        vals = [headline(m, layer) for layer in results["measures"][e["key"]][m]["layers"].values()]
        vals = [v for v in vals if v is not None]
        if vals and results["measures"][e["key"]][m].get("unit") == results["measures"][entries[0]["key"]][m].get(
                "unit"):
            ax.annotate(e["params"].get("spec", e["key"]), (e["test_accuracy"], max(vals)), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("test accuracy after training with the defence")
    ax.set_ylabel(_YLABEL[m], fontsize=8)
    ax.set_title(f"{m}: leakage vs utility (settings with the baseline's unit)", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
