"""jaxleak: quantify and localize private information leakage from gradients.

The public API is re-exported here; see the README for a tour.
"""

from jaxleak import attacks, data, defenses, measures, metrics, models, sharding
from jaxleak.errors import (
    ConfigError,
    DataUnavailableError,
    InputError,
    JaxleakError,
    NonFiniteError,
    UnknownNameError,
)
from jaxleak.gradnorm import grad_norms
from jaxleak.grads import ClientUpdates, client_batches, client_updates, layer_grads, sketch_grads
from jaxleak.monitor import LeakageMonitor
from jaxleak.scores import LayerScores, Score
from jaxleak.sensitivity import sensitivity
from jaxleak.subspace import subspace_distance
from jaxleak.task import Layer, Task
from jaxleak.vinfo import v_information, v_information_from_features

__version__ = "0.1.0"

__all__ = [
    "ClientUpdates",
    "ConfigError",
    "DataUnavailableError",
    "InputError",
    "JaxleakError",
    "Layer",
    "LayerScores",
    "LeakageMonitor",
    "NonFiniteError",
    "Score",
    "Task",
    "UnknownNameError",
    "attacks",
    "client_batches",
    "client_updates",
    "data",
    "defenses",
    "grad_norms",
    "layer_grads",
    "measures",
    "metrics",
    "models",
    "sensitivity",
    "sharding",
    "sketch_grads",
    "subspace_distance",
    "v_information",
    "v_information_from_features",
]
