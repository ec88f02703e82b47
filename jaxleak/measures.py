"""The registry of per-layer measures, shared by ``jaxleak run``, studies and the monitor.

Each entry says where the measure goes in results.json (a dotted key), how a
table shows it, and how to compute it from (task, x, y, z, options). Options
are the run-level settings: ``seed``, ``chunk_size``, ``probes``,
``permutations``, ``sketch_dim``, ``noise_std``, ``vinfo_steps``,
``vinfo_folds``, ``vinfo_patience``, ``inversion_n``, ``inversion_steps``, and ``aux``, the
attacker's auxiliary examples ``(x, y, z)`` (V-information trains its attack
models on them; without it, it cross-fits over the measured examples).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from jaxleak import defaults
from jaxleak.errors import UnknownNameError
from jaxleak.scores import LayerScores
from jaxleak.task import Task

Compute = Callable[[Task, np.ndarray, np.ndarray, "np.ndarray | None", Mapping, bool], LayerScores]


@dataclasses.dataclass(frozen=True)
class Measure:
    """A measure: results key, table column, which per-layer field is the headline, and how to compute it."""

    key: str
    column: str
    show: str
    ylabel: str
    compute: Compute
    needs_latent: bool = False


def _grad_norm(task, x, y, z, opts, progress):
    from jaxleak.gradnorm import grad_norms

    return grad_norms(task, x, y, chunk_size=opts.get("chunk_size"), progress=progress)


def _sensitivity(task, x, y, z, opts, progress):
    from jaxleak.sensitivity import sensitivity

    return sensitivity(task, x, y, probes=opts.get("probes", defaults.PROBES), seed=opts.get("seed", 0),
                       chunk_size=opts.get("chunk_size"), noise_std=opts.get("noise_std"), progress=progress)


def _subspace(task, x, y, z, opts, progress):
    from jaxleak.subspace import subspace_distance

    return subspace_distance(task, x, y, z, permutations=opts.get("permutations", defaults.PERMUTATIONS), seed=opts.get("seed", 0),
                             progress=progress)


def _vinfo(target_kind: str):
    def compute(task, x, y, z, opts, progress):
        from jaxleak.vinfo import v_information

        target = z if target_kind == "latent" else "input"
        aux = opts.get("aux")
        if aux is not None:
            aux = tuple(aux) if target_kind == "latent" else tuple(aux[:2])
        return v_information(task, x, y, target, aux=aux, sketch_dim=opts.get("sketch_dim", defaults.SKETCH_DIM),
                             seed=opts.get("seed", 0), steps=opts.get("vinfo_steps", defaults.VINFO_STEPS),
                             patience=opts.get("vinfo_patience", defaults.VINFO_PATIENCE),
                             folds=opts.get("vinfo_folds", defaults.VINFO_FOLDS),
                             inversion_n=opts.get("inversion_n", defaults.INVERSION_N),
                             inversion_steps=opts.get("inversion_steps", defaults.INVERSION_STEPS),
                             inversion_budget_s=opts.get("inversion_budget_s", "auto"),
                             chunk_size=opts.get("chunk_size"),
                             progress=progress)

    return compute


REGISTRY: dict[str, Measure] = {}


def register(measure: Measure) -> None:
    REGISTRY[measure.key] = measure


def get(key: str) -> Measure:
    if key not in REGISTRY:
        raise UnknownNameError(f"unknown measure {key!r}; choose from {names()}")
    return REGISTRY[key]


def names() -> list[str]:
    return list(REGISTRY)


register(Measure("grad_norm", "grad norm", "value", "mean ||g_l||", _grad_norm))
register(Measure("sensitivity", "sensitivity R", "value", "relative sensitivity R_l", _sensitivity))
register(Measure("subspace_distance", "subspace excess", "excess", "subspace distance excess over null",
                 _subspace, needs_latent=True))
register(Measure("v_information.latent", "V-info latent (bits)", "value", "I_V(g_l -> z) [bits]",
                 _vinfo("latent"), needs_latent=True))
register(Measure("v_information.original", "V-info input (bits/dim)", "value", "I_V(g_l -> x) [bits/dim]",
                 _vinfo("input")))
