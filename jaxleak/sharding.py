"""Multi-device execution: the example axis sharded over a ``jax.sharding.Mesh``.

jaxleak never schedules devices itself. A mesh with one axis, ``"data"``, is
made from the local (or, after ``jax.distributed.initialize``, global)
devices; each chunk of examples is placed with ``NamedSharding(mesh,
P("data"))`` and parameters are replicated, so the jitted computations are
partitioned by XLA (GSPMD). Use it for one call::

    mesh = jaxleak.sharding.make_mesh(4)
    g = jaxleak.layer_grads(task, x, y, mesh=mesh)

or for everything inside a block (the CLI's ``--devices N`` does this)::

    with jaxleak.sharding.use_mesh(mesh):
        jaxleak.run.run(config)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxleak.errors import InputError

AXIS = "data"
_STATE = threading.local()


def make_mesh(devices: int | None = None) -> Mesh:
    """A one-axis ``("data",)`` mesh over the first ``devices`` devices (all when None)."""
    available = jax.devices()
    n = len(available) if devices is None else devices
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"devices must be a positive integer, got {devices!r}")
    if n > len(available):
        raise InputError(
            f"{n} devices requested but only {len(available)} {jax.default_backend()} device(s) are visible; "
            f"on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is imported "
            f"to test with fake devices"
        )
    return Mesh(np.array(available[:n]), (AXIS,))


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """Shard every jaxleak computation in the block over ``mesh`` (None: no sharding)."""
    previous = getattr(_STATE, "mesh", None)
    _STATE.mesh = mesh
    try:
        yield mesh
    finally:
        _STATE.mesh = previous


def current_mesh() -> Mesh | None:
    return getattr(_STATE, "mesh", None)


def resolve(mesh: Mesh | None) -> Mesh | None:
    """The explicit mesh if given, else the one of the enclosing :func:`use_mesh` block."""
    return mesh if mesh is not None else current_mesh()


def round_chunk(chunk: int, mesh: Mesh | None) -> int:
    """The chunk size rounded up to a multiple of the mesh size (each device gets equal rows)."""
    if mesh is None:
        return chunk
    n = mesh.devices.size
    return int(-(-chunk // n) * n)


def shard_rows(array, mesh: Mesh | None):
    """Place ``array`` with its leading axis split over the mesh (unchanged without a mesh)."""
    if mesh is None:
        return array
    spec = PartitionSpec(AXIS, *([None] * (np.ndim(array) - 1)))
    return jax.device_put(array, NamedSharding(mesh, spec))


def replicate(tree, mesh: Mesh | None):
    """Place every leaf of ``tree`` on all devices of the mesh (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def to_host(value) -> np.ndarray:
    """A NumPy copy of a (possibly multi-process) array; every process gets the whole array."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)
