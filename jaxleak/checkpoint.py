"""Loading and saving parameters: flax msgpack or orbax, never pickle."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import serialization

from jaxleak import io
from jaxleak.errors import InputError
from jaxleak.task import first_tree_difference


def save_params(path: str, params) -> None:
    """Write parameters as flax msgpack, atomically."""
    io.write_bytes(path, serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))


def _check_structure(template, loaded, source: str):
    if jax.tree.structure(loaded) != jax.tree.structure(template):
        raise InputError(f"{source}: {first_tree_difference(template, loaded)}")
    for a, b in zip(jax.tree.leaves(template), jax.tree.leaves(loaded)):
        if np.shape(a) != np.shape(b):
            raise InputError(f"{source}: {first_tree_difference(template, loaded)}")
    return jax.tree.map(lambda t, v: np.asarray(v, dtype=np.asarray(t).dtype), template, loaded)


def load_params(path: str, template):
    """Parameters from a flax msgpack file or an orbax checkpoint folder.

    ``template`` is the model's parameter tree; the loaded tree must have the
    same structure and shapes, else :class:`InputError` names the first path
    that differs. A file holding ``{'params': ...}`` (full Linen variables) is
    accepted too.
    """
    if not os.path.exists(path):
        raise InputError(f"parameter file {path!r} does not exist")
    if os.path.isdir(path):
        import orbax.checkpoint as ocp

        try:
            loaded = ocp.StandardCheckpointer().restore(os.path.abspath(path))
        except Exception as err:  # noqa: BLE001 - orbax raises many types
            raise InputError(f"{path!r} is not a readable orbax checkpoint: {err}") from err
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            loaded = serialization.msgpack_restore(raw)
        except Exception as err:  # noqa: BLE001 - msgpack raises many types
            raise InputError(f"{path!r} is not a flax msgpack parameter file: {err}") from err
    if isinstance(loaded, dict) and "params" in loaded and jax.tree.structure(template) != jax.tree.structure(loaded):
        loaded = loaded["params"]
    return _check_structure(template, loaded, f"parameters in {path!r}")
