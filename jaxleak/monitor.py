"""Leakage monitoring inside a user's own training loop."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxleak import defaults
from jaxleak import io
from jaxleak import measures as measures_lib
from jaxleak.errors import InputError
from jaxleak.task import Task


def _is_nnx_module(obj) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return False
    return isinstance(obj, nnx.Module)


class LeakageMonitor:
    """Per-layer leakage measures on a fixed probe set, every ``every`` steps.

    Call ``monitor(step, params)`` in the training loop: with a Linen/optax
    loop pass ``state.params``; with an NNX loop pass the module itself
    (whether the monitor was given the module or ``Task.from_nnx(module)``). On
    steps that are not a multiple of ``every`` the call returns ``None`` at
    once and touches nothing. Compiled code is built on the first measured
    step and reused: later steps never retrace.

    Args:
      model: a :class:`Task`, an ``apply_fn(params, x) -> logits``, or an NNX
        module (then ``monitor(step, module)`` reads its ``nnx.Param`` state).
      loss: ``(logits, y) -> per-example loss``; softmax cross-entropy by default.
      probe_x, probe_y: the probe examples (N, H, W, C) and labels (N,).
      probe_latent: latent attribute (N,) for latent measures, or None.
      measures: names from :func:`jaxleak.measures.names`.
      every: measure on steps where ``step % every == 0``.
      out: a JSONL file to which each record is appended as it is made.
      options: measure options (``probes``, ``permutations``, ``sketch_dim``,
        ``chunk_size``, ``seed``).
      aux: the attacker's auxiliary examples ``(x, y, z)`` (``z`` may be None
        when no latent measure runs), disjoint from the probe set and ideally
        from the training data: V-information trains its attack models on
        their gradients at each measured step and scores the probe set once.
        None: V-information cross-fits over the probe set.
    """

    def __init__(self, model: Task | Callable | Any, loss: Callable | None = None, probe_x=None, probe_y=None,
                 probe_latent=None, *, measures: Sequence[str] = ("grad_norm",), every: int = 100,
                 out: str | None = None, options: Mapping | None = None, aux=None):
        if probe_x is None or probe_y is None:
            raise InputError("LeakageMonitor needs probe_x and probe_y")
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise InputError(f"every must be a positive integer, got {every!r}")
        self.measures = [measures_lib.get(m) for m in measures]
        self.every = int(every)
        self.out = out
        self.options = {"seed": 0, "chunk_size": None, "probes": defaults.PROBES,
                        "permutations": defaults.PERMUTATIONS, "sketch_dim": defaults.SKETCH_DIM,
                        **dict(options or {})}
        x = np.asarray(probe_x, dtype=np.float32)
        if x.ndim < 2:
            raise InputError(f"probe_x must have shape (N, ...), got {x.shape}")
        self._nnx = _is_nnx_module(model)
        if isinstance(model, Task):
            self._task = model if loss is None else Task(model.apply_fn, model.params, model.input_shape,
                                                         loss_fn=loss, name=model.name)
        elif self._nnx:
            self._task = Task.from_nnx(model, input_shape=x.shape[1:], loss_fn=loss)
        elif callable(model):
            self._apply_fn, self._loss = model, loss
            self._task = None  # built from the first parameters seen
        else:
            raise InputError(f"model must be a Task, an apply_fn or an NNX module, got {type(model).__name__}")
        self.probe_x, self.probe_y = x, np.asarray(probe_y)
        if self._task is not None:
            self.probe_x, self.probe_y = self._task.check_inputs(x, probe_y)
        self.probe_latent = None if probe_latent is None else np.asarray(probe_latent)
        if self.probe_latent is not None and self.probe_latent.shape != (x.shape[0],):
            raise InputError(f"probe_latent has shape {self.probe_latent.shape}; expected ({x.shape[0]},)")
        missing = [m.key for m in self.measures if m.needs_latent and self.probe_latent is None]
        if missing:
            raise InputError(f"measures {missing} need probe_latent")
        if aux is not None:
            if not isinstance(aux, (tuple, list)) or len(aux) not in (2, 3):
                raise InputError("aux must be the attacker's examples (x_aux, y_aux) or (x_aux, y_aux, z_aux)")
            aux_z = aux[2] if len(aux) == 3 else None
            if aux_z is None and any(m.key == "v_information.latent" for m in self.measures):
                raise InputError("measure 'v_information.latent' with aux needs the auxiliary latent: "
                                 "aux=(x_aux, y_aux, z_aux)")
            self.options["aux"] = (np.asarray(aux[0], np.float32), np.asarray(aux[1]),
                                   None if aux_z is None else np.asarray(aux_z))
        self.history: list[dict] = []
        if out:
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)

    def _params_of(self, params):
        # An NNX module stands for its Param state, whether the monitor was
        # given the module itself or a Task made from it by Task.from_nnx.
        if _is_nnx_module(params):
            from flax import nnx

            return nnx.to_pure_dict(nnx.state(params, nnx.Param))
        return params

    def task_for(self, params) -> Task:
        params = self._params_of(params)
        if self._task is None:
            self._task = Task(self._apply_fn, params, self.probe_x.shape[1:], loss_fn=self._loss)
            self.probe_x, self.probe_y = self._task.check_inputs(self.probe_x, self.probe_y)
        return self._task.with_params(params)

    def __call__(self, step: int, params) -> dict | None:
        """Measure at ``step`` if it is due; returns the record or None."""
        if step % self.every:
            return None
        task = self.task_for(params)
        record = {"step": int(step), "measures": {}}
        for m in self.measures:
            scores = m.compute(task, self.probe_x, self.probe_y, self.probe_latent, self.options, False)
            record["measures"][m.key] = scores.to_dict()
        self.history.append(record)
        if self.out:
            io.append_jsonl(self.out, record)
        return record

    def series(self, measure: str, field: str | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(steps, {layer: values}) of one measure's headline (or ``field``) over the history."""
        field = field or measures_lib.get(measure).show
        steps = np.array([r["step"] for r in self.history])
        layers: dict[str, list] = {}
        for r in self.history:
            for name, entry in r["measures"][measure]["layers"].items():
                v = entry.get(field)
                layers.setdefault(name, []).append(np.nan if v is None else v)
        return steps, {k: np.asarray(v, dtype=float) for k, v in layers.items()}

    def plot(self, path: str) -> None:
        """Leakage over training: one panel per measure, one line per layer (PNG)."""
        from jaxleak.plots import plt, save_figure

        if not self.history:
            raise InputError("nothing to plot: the monitor has not measured any step yet")
        fig, axes = plt.subplots(1, len(self.measures), figsize=(4.5 * len(self.measures), 3.4), squeeze=False)
        for ax, m in zip(axes[0], self.measures):
            steps, layers = self.series(m.key)
            for name, values in layers.items():
                ax.plot(steps, values, marker="o", markersize=3, label=name)
            ax.set_xlabel("training step")
            ax.set_ylabel(m.ylabel)
            ax.set_title(m.key, fontsize=10)
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save_figure(fig, path)
