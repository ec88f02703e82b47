"""jaxleak: quantify and localize private information leakage from gradients.

The public API is re-exported here; see the README for a tour.
"""

from jaxleak import attacks, data, defenses, measures, metrics, models, sharding
from jaxleak.attacks import InversionResult, invert, invert_per_layer, save_grid, score
from jaxleak.compilation import count_compilations, enable_compile_cache
from jaxleak.defenses import DP, Dropout, Prune, Quantize, Sign, defended_client_updates, defended_updates, dp_epsilon
from jaxleak.errors import (
    ConfigError,
    DataUnavailableError,
    InputError,
    JaxleakError,
    NonFiniteError,
    UnknownNameError,
)
from jaxleak.gradnorm import grad_norms
from jaxleak.grads import (
    ClientUpdates,
    client_batches,
    client_updates,
    layer_grads,
    per_example_grad_fn,
    sketch_grads,
    vmap_grad_fn,
)
from jaxleak.metrics import spearman
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
    "DP",
    "DataUnavailableError",
    "Dropout",
    "InputError",
    "InversionResult",
    "JaxleakError",
    "Layer",
    "LayerScores",
    "LeakageMonitor",
    "NonFiniteError",
    "Prune",
    "Quantize",
    "Score",
    "Sign",
    "Task",
    "UnknownNameError",
    "attacks",
    "client_batches",
    "client_updates",
    "count_compilations",
    "data",
    "defended_client_updates",
    "defended_updates",
    "defenses",
    "dp_epsilon",
    "enable_compile_cache",
    "grad_norms",
    "invert",
    "invert_per_layer",
    "layer_grads",
    "measures",
    "metrics",
    "models",
    "per_example_grad_fn",
    "save_grid",
    "score",
    "sensitivity",
    "sharding",
    "sketch_grads",
    "spearman",
    "subspace_distance",
    "v_information",
    "v_information_from_features",
    "vmap_grad_fn",
]
