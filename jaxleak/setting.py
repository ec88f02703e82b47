"""One setting of a study: its knobs, the model it measures, and where its parts are written.

Shared by the study runner (:mod:`jaxleak.studies`) and the validation
study (:mod:`jaxleak.validation`), so that neither imports the other's
internals.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxleak import defenses as defenses_lib
from jaxleak.task import Task


@dataclasses.dataclass
class Setting:
    """One point of a study: its key, the knobs, and how to build the measured model."""

    key: str
    params: dict
    defense: Any = None
    batch_size: int = 1
    local_steps: int = 1
    epochs: int | None = None


def part_path(out: str, setting: str, measure: str) -> str:
    """``<out>/parts/<setting>/<measure>.json``: where one finished (setting, measure) is written."""
    return os.path.join(out, "parts", setting, f"{measure}.json")


def load_part(path: str) -> dict | None:
    """The JSON at ``path``, or None where no such file exists (the part is still to compute)."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def trained(ctx, setting: Setting) -> tuple[Task, dict]:
    """The model measured in ``setting`` (trained with its defence) and its training facts.

    ``ctx`` is a study's context: ``config`` (the study's configuration),
    ``dataset``, ``train_x``/``train_y`` (what the model trains on),
    ``eval_x``/``eval_y`` (where its accuracy is measured) and ``tasks``, a
    dict that caches each trained model by (epochs, defence). The facts are
    the epochs, the training losses, the test accuracy and, under DP, the
    (epsilon, delta) of the training run by the RDP accountant.
    """
    from jaxleak.train import accuracy, train

    config = ctx.config
    epochs = config.epochs if setting.epochs is None else setting.epochs
    defense = setting.defense if config.study == "defenses" else None
    key = (epochs, defense)
    if key in ctx.tasks:
        return ctx.tasks[key]
    options = {**config.model_options, **defenses_lib.model_options(defense)}
    task = Task.init(config.model, ctx.dataset, config.seed, **options)
    result = train(task, ctx.train_x, ctx.train_y, epochs=epochs, batch_size=config.batch_size, lr=config.lr,
                   seed=config.seed, defense=defense)
    batch = int(min(config.batch_size, ctx.train_x.shape[0]))
    steps = epochs * (ctx.train_x.shape[0] // batch)
    info = {"epochs": epochs, "train_loss": result.losses, "test_accuracy": accuracy(result.task, ctx.eval_x, ctx.eval_y),
            "train_examples": int(ctx.train_x.shape[0]), "eval_examples": int(ctx.eval_x.shape[0])}
    if isinstance(defense, defenses_lib.DP):
        rate = batch / ctx.train_x.shape[0]
        info["dp"] = {"epsilon": defenses_lib.dp_epsilon(defense.noise_multiplier, rate, steps, config.dp_delta),
                      "delta": config.dp_delta, "sampling_rate": rate, "steps": steps,
                      "noise_multiplier": defense.noise_multiplier, "clip_norm": defense.clip_norm,
                      "accountant": "rdp, Poisson-subsampled Gaussian (dp_accounting)"}
    ctx.tasks[key] = (result.task, info)
    return ctx.tasks[key]


__all__ = ["Setting", "part_path", "load_part", "trained"]
