"""jaxleak: quantify and localize private information leakage from gradients.

The public API is re-exported here; see the README for a tour.
"""

from jaxleak import data, models
from jaxleak.errors import (
    ConfigError,
    DataUnavailableError,
    InputError,
    JaxleakError,
    NonFiniteError,
    UnknownNameError,
)
from jaxleak.grads import ClientUpdates, client_batches, client_updates, layer_grads, sketch_grads
from jaxleak.task import Layer, Task

__version__ = "0.1.0"

__all__ = [
    "ClientUpdates",
    "ConfigError",
    "DataUnavailableError",
    "InputError",
    "JaxleakError",
    "Layer",
    "NonFiniteError",
    "Task",
    "UnknownNameError",
    "client_batches",
    "client_updates",
    "data",
    "layer_grads",
    "models",
    "sketch_grads",
]
