"""The registry of per-layer measures, shared by ``jaxleak run``, studies and the monitor.

Each entry says where the measure goes in results.json (a dotted key), how a
table shows it, and how to compute it from (task, x, y, z, options). Options
are the run-level settings: ``seed``, ``chunk_size``, ``probes``,
``permutations``, ``sketch_dim``, ``noise_std``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

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
