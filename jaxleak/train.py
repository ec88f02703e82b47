"""Training a task's model with optax (to study measures at a training stage)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxleak import compilation
from jaxleak.errors import InputError
from jaxleak.task import Task


class TrainResult(NamedTuple):
    """The trained task and, per epoch, the mean training loss (nats)."""

    task: Task
    losses: list[float]


def _step_fn(task: Task, lr: float, use_dropout: bool, defense=None) -> Callable:
    """The jitted training step of Adam at learning rate ``lr`` (:func:`_adam`)."""
    key = ("train_step", lr, use_dropout, defense)
    optimizer = _adam(lr)

    def build():
        def loss(params, x, y, rng):
            logits = task.train_apply_fn(params, x, rng) if use_dropout else task.apply_fn(params, x)
            return jnp.mean(task.loss_fn(logits, y))

        defended = None
        if defense is not None and defense.name != "dropout":
            from jaxleak.defenses import batch_gradient_fn

            defended = batch_gradient_fn(task, defense)

        def step(params, opt_state, x, y, rng):
            value, grads = jax.value_and_grad(loss)(params, x, y, rng)
            if defended is not None:
                grads = defended(params, x, y, jax.random.fold_in(rng, 1))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value

        return compilation.jit(step, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


_OPTIMIZERS: dict = {}


def _adam(lr: float) -> optax.GradientTransformation:
    # One optimizer object per learning rate keeps the compiled step reusable.
    if lr not in _OPTIMIZERS:
        _OPTIMIZERS[lr] = optax.adam(lr)
    return _OPTIMIZERS[lr]


def train(task: Task, x, y, *, epochs: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
          dropout: bool = True, progress: bool = False, defense=None) -> TrainResult:
    """Train with Adam on shuffled mini-batches for ``epochs`` epochs.

    Dropout (if the model has it) is active during training when ``dropout``
    is True. ``defense`` (a :mod:`jaxleak.defenses` configuration, e.g.
    ``DP(clip_norm, noise_multiplier)`` for DP-SGD or ``Prune(0.1)``;
    ``Dropout`` is a model option and changes nothing here) replaces the
    step's gradient by :func:`jaxleak.defenses.batch_gradient_fn`, computed
    without dropout; the recorded loss is the plain batch loss. The last
    incomplete batch of each epoch is dropped so the step compiles once.
    Returns a new task; the input task is not modified.
    """
    x, y = task.check_inputs(x, y)
    if epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    if epochs == 0:
        return TrainResult(task, [])
    batch_size = int(min(batch_size, x.shape[0]))
    optimizer = _adam(float(lr))
    use_dropout = bool(dropout and task.train_apply_fn is not None)
    step = _step_fn(task, float(lr), use_dropout, defense)
    params = task.params
    # One program for the whole state (eagerly, each leaf shape compiles its own zeros).
    init_key = ("optimizer_init", float(lr))
    opt_state = task.cached(init_key, lambda: compilation.jit(optimizer.init, key=init_key))(params)
    key = jax.random.key(seed)
    losses = []
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epoch_iter = tqdm(epoch_iter, desc="training", unit="epoch", leave=False)
    for epoch in epoch_iter:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), x.shape[0]))
        batch_losses = []
        for b in range(x.shape[0] // batch_size):
            idx = order[b * batch_size:(b + 1) * batch_size]
            rng = jax.random.fold_in(jax.random.fold_in(key, epoch), b + 1_000_003)
            params, opt_state, value = step(params, opt_state, x[idx], y[idx], rng)
            batch_losses.append(value)
        losses.append(float(np.mean(jax.device_get(batch_losses))))
    return TrainResult(task.with_params(params), losses)


def accuracy(task: Task, x, y, *, batch_size: int = 512) -> float:
    """Fraction of examples whose arg-max logit equals the label.

    Batches of equal size (at most ``batch_size``, the last one padded), so
    the prediction compiles once.
    """
    from jaxleak.grads import map_chunks

    x, y = task.check_inputs(x, y)
    def predict_fn(p, xb):
        return {"label": jnp.argmax(task.apply_fn(p, xb), -1)}

    predict = task.cached("predict", lambda: compilation.jit(predict_fn, key=task.program_key("predict"),
                                                                     fast_compile=task.fast_compile))
    batches = -(-x.shape[0] // batch_size)
    labels = map_chunks(predict, [x], -(-x.shape[0] // batches), extra=(task.params,))["label"]
    return int(np.sum(labels == y)) / x.shape[0]
