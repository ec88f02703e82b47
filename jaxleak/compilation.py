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
import contextvars
import dataclasses
import functools
import inspect
import os
import sys
import tempfile
import warnings
from typing import Callable, Iterator

import jax

ENV = "JAXLEAK_COMPILE_CACHE"
# ``off`` keeps the compile cache but traces every program again (no stored programs)
STORE_ENV = "JAXLEAK_PROGRAM_STORE"
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
    global _PROGRAMS_DIR
    if path is None:
        env = os.environ.get(ENV, "").strip()
        if env.lower() in _OFF:
            _PROGRAMS_DIR = None
            return None
        path = env or jax.config.jax_compilation_cache_dir or default_cache_dir()
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    problem = _writable(path)
    if problem is not None:
        warnings.warn(f"the compile cache {path!r} cannot be written ({problem}); compiling without it",
                      CompileCacheWarning, stacklevel=2)
        _PROGRAMS_DIR = None
        return None
    if jax.config.jax_compilation_cache_dir != path:
        from jax.experimental.compilation_cache import compilation_cache

        # JAX opens its cache once, at the first compilation; a new folder needs a reset.
        compilation_cache.reset_cache()
        jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _PROGRAMS_DIR = _programs_dir_for(path)
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
        elif event in _TRACE_EVENTS or event == _STORE_EVENT:
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


# ---------------------------------------------------------------- stored programs
#
# The persistent cache above saves XLA's backend compilation, but every process still traces each program from
# Python and lowers it to StableHLO before the cache is consulted (about 4 s of a default run on the 2-core CPU).
# Inside a :func:`program_store` block, the programs made by :func:`jit` are kept on disk as serialized
# ``jax.export`` artefacts (StableHLO, no pickles), keyed by everything that decides them: the store's key (the
# jaxleak sources, the versions of jax, jaxlib, flax, optax and numpy, the backend and its devices, JAX's
# configuration, and what the caller adds: for ``jaxleak run``, its options and a digest of its data and
# parameters), the program's own key, its static arguments and the shapes, dtypes and tree structure of its
# arguments. A later process with the same key loads the program instead of tracing it; the XLA compilation
# that follows is then a hit in the persistent cache. Outside such a block, :func:`jit` is ``jax.jit``.

_STORE_EVENT = "/jaxleak/program_store/load_duration"
_STORE_SUFFIX = ".jaxexport"
# at most this many stored programs are kept; the least recently written go first
_STORE_MAX_FILES = 2000
# programs that hold more than this in arrays (constants) are not stored
_STORE_MAX_HELD_BYTES = 16 * 2 ** 20
_PROGRAMS_DIR: str | None = None
_WARNED: set = set()


def programs_dir() -> str | None:
    """The stored-program folder that goes with the compile cache :func:`enable_compile_cache` turned on, or None."""
    return _PROGRAMS_DIR


def _programs_dir_for(cache: str) -> str:
    """``<cache>-programs`` next to the XLA cache folder (``jaxleak/xla-programs`` by default)."""
    return cache.rstrip(os.sep) + "-programs"


@dataclasses.dataclass
class _Store:
    folder: str
    key: bytes
    loaded: int = 0
    written: int = 0


def _digest(*parts) -> bytes:
    import hashlib

    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        data = part if isinstance(part, bytes) else repr(part).encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def array_digest(*trees) -> bytes:
    """A digest of the values, shapes and dtypes of every array in ``trees`` (and of their tree structure)."""
    import hashlib

    import numpy as np

    h = hashlib.blake2b(digest_size=20)
    for tree in trees:
        leaves, treedef = jax.tree.flatten(tree)
        h.update(str(treedef).encode())
        for leaf in leaves:
            a = np.asarray(leaf)
            h.update(str((a.dtype, a.shape)).encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.digest()


def _source_digest() -> bytes:
    """A digest of jaxleak's own Python sources (the programs are written there)."""
    import hashlib

    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


def _environment_key() -> tuple:
    """What decides a traced program besides jaxleak's sources and the caller's key."""
    import importlib.metadata
    import platform

    versions = []
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            versions.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((dist, None))
    skip = ("cache", "log", "explain")  # where to keep and what to print, not what to compute
    config = sorted((k, repr(v)) for k, v in jax.config.values.items() if not any(s in k for s in skip))
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    return (_source_digest(), tuple(versions), platform.python_version(), platform.machine(), jax.default_backend(),
            tuple(devices), tuple(config))


_ACTIVE = contextvars.ContextVar("jaxleak_program_store", default=None)


@contextlib.contextmanager
def program_store(*key, folder: str | os.PathLike | None = None) -> Iterator[_Store | None]:
    """Within the block, keep the programs of :func:`jit` on disk and reuse them across processes.

    ``key``: everything, besides jaxleak's sources and the environment (which
    are added here), that the block's programs depend on and their
    arguments do not carry: options, and a digest (:func:`array_digest`) of
    any data or parameters that a program may hold as constants. Extend it
    with :func:`extend_store_key` when more becomes known. ``folder``:
    default :func:`programs_dir` (the folder that goes with the compile
    cache); with neither, the block runs without a store and yields None.
    A folder that cannot be written is a :class:`CompileCacheWarning`.
    """
    folder = os.fspath(folder) if folder is not None else _PROGRAMS_DIR
    if folder is None or os.environ.get(STORE_ENV, "").strip().lower() in _OFF:
        yield None
        return
    problem = _writable(folder)
    if problem is not None:
        warnings.warn(f"the program store {folder!r} cannot be written ({problem}); tracing every program",
                      CompileCacheWarning, stacklevel=3)
        yield None
        return
    store = _Store(folder, _digest(_environment_key(), key))
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)


def active_store() -> _Store | None:
    """The :func:`program_store` this code runs in, or None."""
    return _ACTIVE.get()


def extend_store_key(*parts) -> None:
    """Add ``parts`` to the key of the active :func:`program_store` (nothing when none is active)."""
    store = _ACTIVE.get()
    if store is not None:
        store.key = _digest(store.key, parts)


def _namedtuple_types(tree, found: dict) -> None:
    """Every namedtuple class inside ``tree`` (dicts, lists, tuples), by ``module:qualname``."""
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        found[f"{type(tree).__module__}:{type(tree).__qualname__}"] = type(tree)
    if isinstance(tree, dict):
        for value in tree.values():
            _namedtuple_types(value, found)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            _namedtuple_types(value, found)


def _register_namedtuples(types: dict) -> None:
    from jax._src.export import _export

    for name, cls in types.items():
        if name not in _export.deserialization_registry and cls not in _export.serialization_registry:
            jax.export.register_namedtuple_serialization(cls, serialized_name=name)


def _resolve_namedtuples(names) -> dict | None:
    """The namedtuple classes called ``module:qualname``, from modules already imported; None if one is missing.

    Nothing is imported: a stored program can only name classes this process already has.
    """
    out = {}
    for name in names:
        module, _, qualname = name.partition(":")
        obj = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
            return None
        out[name] = obj
    return out


def _leaf_signature(leaf):
    """(shape, dtype, weak type) of an argument leaf; None where the store should not be used."""
    import numpy as np

    if isinstance(leaf, jax.Array):
        if len(leaf.sharding.device_set) != 1:
            return None  # sharded over a mesh: traced as usual
        return (leaf.shape, str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))
    if isinstance(leaf, np.ndarray) or isinstance(leaf, np.generic):
        return (leaf.shape, str(leaf.dtype), False)
    if isinstance(leaf, (bool, int, float)):
        return ((), type(leaf).__name__, True)
    return None


def _warn_once(what: str, err: BaseException) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"{what} ({type(err).__name__}: {err}); tracing it in every run", CompileCacheWarning,
                      stacklevel=4)


class Program:
    """A jitted function that, inside a :func:`program_store` block, is traced once and reused from disk.

    ``key`` names the program and everything its closure holds that the
    store's key does not (for a program built per task: the builder's cache
    key). Static arguments (``static_argnames``) enter the key by ``repr``;
    a static argument whose ``repr`` shows an object address keeps the
    program out of the store. Outside a store, calls go to ``jax.jit``.
    """

    def __init__(self, fun: Callable, *, key, static_argnames: tuple[str, ...] = (),
                 donate_argnames: tuple[str, ...] = (), compiler_options: dict | None = None):
        self._fun = fun
        self._key = (getattr(fun, "__module__", None), getattr(fun, "__qualname__", None), key)
        self._static = tuple(static_argnames)
        self._donate = tuple(donate_argnames)
        self._options = compiler_options
        self._jit = jax.jit(fun, static_argnames=self._static or None, donate_argnames=self._donate or None,
                            compiler_options=compiler_options)
        self._signature = inspect.signature(fun)
        self._calls: dict = {}
        functools.update_wrapper(self, fun, updated=())

    def lower(self, *args, **kwargs):
        """``jax.jit(fun).lower``: the program traced and lowered in this process (never the stored one)."""
        return self._jit.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        store = _ACTIVE.get()
        if store is None:
            return self._jit(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        statics = {name: bound.arguments[name] for name in self._static}
        names = tuple(name for name in bound.arguments if name not in statics)
        dynamic = tuple(bound.arguments[name] for name in names)
        leaves, treedef = jax.tree.flatten(dynamic)
        signature = [_leaf_signature(leaf) for leaf in leaves]
        static_repr = repr(sorted(statics.items()))
        if any(s is None for s in signature) or " at 0x" in static_repr:
            return self._jit(*args, **kwargs)
        ident = _digest(store.key, self._key, static_repr, names, str(treedef), signature)
        call = self._calls.get(ident)
        if call is None:
            call = self._calls[ident] = self._stored_call(store, ident, statics, names, dynamic)
        return call(*dynamic)

    def _stored_call(self, store: _Store, ident: bytes, statics: dict, names: tuple, dynamic: tuple) -> Callable:
        import json
        import time

        path = os.path.join(store.folder, ident.hex() + _STORE_SUFFIX)
        exported = None
        if os.path.isfile(path):
            start = time.perf_counter()
            try:
                with open(path, "rb") as f:
                    blob = f.read()
                size = int.from_bytes(blob[:4], "little")
                types = _resolve_namedtuples(json.loads(blob[4:4 + size]))
                if types is not None:
                    _register_namedtuples(types)
                    exported = jax.export.deserialize(bytearray(blob[4 + size:]))
                    store.loaded += 1
            except Exception:  # a damaged or foreign file: traced again and rewritten
                exported = None
            jax.monitoring.record_event_duration_secs(_STORE_EVENT, time.perf_counter() - start)
        if exported is None:
            fun, signature, fixed = self._fun, self._signature, dict(statics)

            def bound_fun(*values):
                call = inspect.BoundArguments(signature, {**dict(zip(names, values)), **fixed})
                return fun(*call.args, **call.kwargs)

            bound_fun.__name__ = getattr(fun, "__name__", "program")
            jitted = jax.jit(bound_fun)
            try:
                # Arrays the program holds (e.g. a large layer's count-sketch) would be written into the stored
                # program; above 16 MiB the program is not stored but traced by jit in every run.
                held = sum(int(getattr(c, "nbytes", 0)) for c in jitted.trace(*dynamic).jaxpr.consts)
                if held > _STORE_MAX_HELD_BYTES:
                    return _call_by_name(self._jit, self._signature, names, statics)
                exported = jax.export.export(jitted)(*dynamic)
                types: dict = {}
                _namedtuple_types(dynamic, types)
                _namedtuple_types(exported.out_tree.unflatten([0] * exported.out_tree.num_leaves), types)
                _register_namedtuples(types)
                blob = exported.serialize()
            except Exception as err:  # not exportable (e.g. a custom pytree node): plain jit, every run
                _warn_once(f"jaxleak could not store the program {self._key[1]}", err)
                return _call_by_name(self._jit, self._signature, names, statics)
            header = json.dumps(sorted(types)).encode()
            try:
                _write_atomic(path, len(header).to_bytes(4, "little") + header + bytes(blob))
                store.written += 1
                _prune(store.folder)
            except OSError as err:
                _warn_once(f"the program store {store.folder!r} cannot be written", err)
        donate = tuple(i for i, name in enumerate(names) if name in self._donate)

        def program(*values):
            return exported.call(*values)

        program.__name__ = program.__qualname__ = exported.fun_name  # named as the traced function in JAX's logs
        return jax.jit(program, donate_argnums=donate, compiler_options=self._options)


def _call_by_name(jitted: Callable, signature, names: tuple, statics: dict) -> Callable:
    def call(*values):
        bound = inspect.BoundArguments(signature, {**dict(zip(names, values)), **statics})
        return jitted(*bound.args, **bound.kwargs)

    return call


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _prune(folder: str) -> None:
    """Keep the newest :data:`_STORE_MAX_FILES` stored programs."""
    names = [n for n in os.listdir(folder) if n.endswith(_STORE_SUFFIX)]
    if len(names) <= _STORE_MAX_FILES:
        return
    paths = sorted((os.path.join(folder, n) for n in names), key=lambda p: os.stat(p).st_mtime)
    for path in paths[:len(paths) - _STORE_MAX_FILES]:
        with contextlib.suppress(OSError):
            os.unlink(path)


def jit(fun: Callable | None = None, *, key=(), static_argnames: tuple[str, ...] = (),
        donate_argnames: tuple[str, ...] = (), compiler_options: dict | None = None):
    """``jax.jit`` whose programs a :func:`program_store` block keeps on disk (see :class:`Program`).

    Usable as a decorator (``@jit(key=...)``) or a call (``jit(fun, key=...)``).
    """
    if fun is None:
        return lambda f: Program(f, key=key, static_argnames=static_argnames, donate_argnames=donate_argnames,
                                 compiler_options=compiler_options)
    return Program(fun, key=key, static_argnames=static_argnames, donate_argnames=donate_argnames,
                   compiler_options=compiler_options)
