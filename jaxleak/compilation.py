"""XLA compilation: the persistent compile cache, and counting compilations.

A run compiles each jitted program once per process; with the persistent
cache, a later process that builds the same program (same shapes, options,
JAX version and device) loads it from disk instead of compiling it again.

The cache folder, in order of precedence: the ``path`` given to
:func:`enable_compile_cache`; the environment variable
``JAXLEAK_COMPILE_CACHE`` (a folder, or ``off`` to turn the cache off);
a folder already given to JAX (``JAX_COMPILATION_CACHE_DIR``); else
``jaxleak/xla`` in the user's cache folder (``$XDG_CACHE_HOME`` or
``~/.cache`` on Linux, ``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on
Windows). The cache is trusted code: keep it in a folder only you can write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import warnings
from typing import Iterator

import jax

ENV = "JAXLEAK_COMPILE_CACHE"
_OFF = ("off", "0", "false", "no", "none")

# JAX's event around each backend compilation (a cache hit included: then it
# times the read); the cache-hit event fires inside it.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# Tracing to a jaxpr and lowering to MLIR happen before the cache is looked up,
# so they are paid again in every process.
_TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration")


class CompileCacheWarning(UserWarning):
    """The persistent compile cache could not be used; compilation goes on without it."""


def default_cache_dir() -> str:
    """``jaxleak/xla`` in the user's cache folder (XDG_CACHE_HOME is honoured on every platform)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        if sys.platform == "darwin":
            base = os.path.join(os.path.expanduser("~"), "Library", "Caches")
        elif sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
            base = os.environ["LOCALAPPDATA"]
        else:
            base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxleak", "xla")


def cache_disabled_by_env() -> bool:
    """True when ``JAXLEAK_COMPILE_CACHE`` is ``off`` (or 0, false, no, none)."""
    return os.environ.get(ENV, "").strip().lower() in _OFF


def _writable(path: str) -> str | None:
    """None if ``path`` is (or can be made) a folder this process can write to, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


def enable_compile_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns the folder, or None if off.

    ``path=None`` takes the folder from ``JAXLEAK_COMPILE_CACHE`` (``off``
    turns the cache off and returns None), then from JAX's own setting, then
    :func:`default_cache_dir`. Every program is cached, however fast it
    compiled or small it is. A folder that cannot be created or written is a
    :class:`CompileCacheWarning`, never an error: compilation goes on
    without the cache. Calling again with another folder switches to it.
    """
    if path is None:
        env = os.environ.get(ENV, "").strip()
        if env.lower() in _OFF:
            return None
        path = env or jax.config.jax_compilation_cache_dir or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    problem = _writable(path)
    if problem is not None:
        warnings.warn(f"the compile cache {path!r} cannot be written ({problem}); compiling without it",
                      CompileCacheWarning, stacklevel=2)
        return None
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        # JAX opens its cache once, at the first compilation; a new folder needs a reset.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


@dataclasses.dataclass
class Compilations:
    """What XLA compiled while a :func:`count_compilations` block ran.

    ``count``: programs compiled or loaded from the persistent cache;
    ``cache_hits``: of those, loaded from the cache; ``compile_s``: seconds
    in backend compilation (for hits, the cache read); ``trace_s``: seconds
    tracing Python to jaxprs and lowering them to MLIR, paid with or without
    the cache.
    """

    count: int = 0
    cache_hits: int = 0
    compile_s: float = 0.0
    trace_s: float = 0.0

    def timing(self) -> dict:
        """The fields as ``results.json`` records them under ``timing``."""
        return {"compilations": self.count, "compile_cache_hits": self.cache_hits,
                "compile_s": self.compile_s, "trace_s": self.trace_s}


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
    """Count XLA compilations (from JAX's monitoring events) while the block runs.

    Events from every thread of the process are counted.
    """
    seen = Compilations()

    def on_duration(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            seen.count += 1
            seen.compile_s += duration
        elif event in _TRACE_EVENTS:
            seen.trace_s += duration

    def on_event(event, **kwargs):
        if event == _CACHE_HIT_EVENT:
            seen.cache_hits += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
