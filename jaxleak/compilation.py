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
# jaxleak sources, the versions of the libraries that programs are traced with, the backend and its devices,
# JAX's configuration, and what the caller adds: for ``jaxleak run``, its options and a digest of its data and
# parameters), the program's own key, its static arguments and the shapes, dtypes and tree structure of its
# arguments. A later process with the same key loads the program instead of tracing it; the XLA compilation
# that follows is then a hit in the persistent cache. Outside such a block, :func:`jit` is ``jax.jit``; a
# program whose key is None (e.g. one built for a task made from a user's own model) is never stored.

_STORE_EVENT = "/jaxleak/program_store/load_duration"
_STORE_SUFFIX = ".jaxexport"
# stored programs kept at most (files and bytes); the least recently used go first
_STORE_MAX_FILES = 2000
_STORE_MAX_BYTES = 2 ** 30
# a program holding more than this in arrays (constants, e.g. a large layer's count-sketch) is not stored
_STORE_MAX_HELD_BYTES = 16 * 2 ** 20
_STORE_MAX_FILE_BYTES = 64 * 2 ** 20
# the libraries whose code is traced into jaxleak's programs
_TRACED_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy", "chex", "dm-pix", "jax-cuda12-plugin",
                     "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu")
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
    """A digest of jaxleak's own Python sources as they are on disk now (the programs are written there)."""
    import hashlib

    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.digest()


# The sources this process runs: if the files change under a running process, its programs (traced from the
# old code) must not be stored under the new code's key.
_SOURCES_AT_IMPORT = _source_digest()


def _environment_key() -> tuple:
    """What decides a traced program besides jaxleak's sources and the caller's key."""
    import importlib.metadata
    import platform

    versions = []
    for dist in _TRACED_LIBRARIES:
        try:
            versions.append((dist, importlib.metadata.version(dist)))
        except importlib.metadata.PackageNotFoundError:
            versions.append((dist, None))
    skip = ("cache", "log", "explain")  # where to keep and what to print, not what to compute
    config = sorted((k, repr(v)) for k, v in jax.config.values.items() if not any(s in k for s in skip))
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    return (_SOURCES_AT_IMPORT, tuple(versions), platform.python_version(), platform.machine(),
            jax.default_backend(), tuple(devices), tuple(config))


_ACTIVE = contextvars.ContextVar("jaxleak_program_store", default=None)


@contextlib.contextmanager
def program_store(*key, folder: str | os.PathLike | None = None) -> Iterator[_Store | None]:
    """Within the block, keep the programs of :func:`jit` on disk and reuse them across processes.

    ``key``: everything, besides jaxleak's sources and the environment (which
    are added here), that the block's programs depend on and their
    arguments do not carry: options, and a digest (:func:`array_digest`) of
    any data or parameters that a program may hold as constants. Extend it
    with :func:`extend_store_key` when more becomes known. Programs that
    jaxleak builds for a task carry the task's identity themselves when the
    task came from :meth:`jaxleak.Task.init` (a zoo model) and are never
    stored otherwise. ``folder``: default :func:`programs_dir` (the folder
    that goes with the compile cache); with neither, or with
    ``JAXLEAK_PROGRAM_STORE=off``, the block runs without a store and yields
    None. A folder that cannot be written, or jaxleak's sources changed on
    disk since this process imported them, is a :class:`CompileCacheWarning`
    and no store.
    """
    folder = os.fspath(folder) if folder is not None else _PROGRAMS_DIR
    if folder is None or os.environ.get(STORE_ENV, "").strip().lower() in _OFF:
        yield None
        return
    problem = _writable(folder)
    if problem is None and _source_digest() != _SOURCES_AT_IMPORT:
        problem = "jaxleak's source files changed since this process imported them; start a new process"
    if problem is not None:
        warnings.warn(f"the program store {folder!r} is not used ({problem}); tracing every program",
                      CompileCacheWarning, stacklevel=3)
        yield None
        return
    _remove_stale_temporaries(folder)
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
        known = _export.deserialization_registry.get(name)
        if known is None and cls not in _export.serialization_registry:
            jax.export.register_namedtuple_serialization(cls, serialized_name=name)
        elif known is not None and known[0] is not cls:
            raise ValueError(f"{name} is registered for another class")


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

    if isinstance(leaf, jax.core.Tracer):
        return None  # called inside another transformation: that one is what gets traced
    if isinstance(leaf, jax.Array):
        if len(leaf.sharding.device_set) != 1:
            return None  # sharded over a mesh: traced as usual
        return (leaf.shape, str(leaf.dtype), bool(getattr(leaf, "weak_type", False)))
    if isinstance(leaf, (np.ndarray, np.generic)):
        return (leaf.shape, str(leaf.dtype), False)
    if isinstance(leaf, (bool, int, float)):
        return ((), type(leaf).__name__, True)
    return None


def _held_bytes(value, depth: int = 0, seen: set | None = None) -> int:
    """Bytes of the arrays a function's closure holds (through nested closures, dicts, lists and tuples)."""
    import numpy as np

    seen = set() if seen is None else seen
    if id(value) in seen or depth > 6:
        return 0
    seen.add(id(value))
    if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, jax.core.Tracer):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_held_bytes(v, depth + 1, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_held_bytes(v, depth + 1, seen) for v in value)
    cells = getattr(value, "__closure__", None) or ()
    total = 0
    for cell in cells:
        try:
            total += _held_bytes(cell.cell_contents, depth + 1, seen)
        except ValueError:  # an empty cell
            pass
    return total


def _warn_once(what: str, err: BaseException) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(f"{what} ({type(err).__name__}: {err}); tracing it in every run", CompileCacheWarning,
                      stacklevel=4)


def _matches(exported, dynamic: tuple) -> bool:
    """Whether a loaded program takes exactly these arguments (tree, shapes, dtypes) on this backend."""
    leaves, treedef = jax.tree.flatten((dynamic, {}))
    if treedef != exported.in_tree or len(leaves) != len(exported.in_avals):
        return False
    if jax.default_backend() not in exported.platforms:
        return False
    return all(tuple(a.shape) == tuple(getattr(x, "shape", ())) and a.dtype == _canonical_dtype(x)
               for a, x in zip(exported.in_avals, leaves))


def _canonical_dtype(x):
    """The dtype ``x`` has as a jitted function's argument (float64 -> float32 without x64; key types kept)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return jax.numpy.result_type(x)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
        return dtype
    return jax.dtypes.canonicalize_dtype(dtype)


class Program:
    """A jitted function that, inside a :func:`program_store` block, is traced once and reused from disk.

    ``key`` names the program and everything its closure holds that the
    store's key does not (for a program built per task: the builder's cache
    key with the task's identity, :meth:`jaxleak.Task.program_key`); None
    keeps it out of every store. Static arguments (``static_argnames``)
    enter the key by ``repr``; a static argument whose ``repr`` shows an
    object address keeps the call out of the store. Arguments not passed
    keep their defaults as Python constants, as with ``jax.jit``. Outside a
    store, calls go to ``jax.jit``.
    """

    def __init__(self, fun: Callable, *, key, static_argnames: tuple[str, ...] = (),
                 donate_argnames: tuple[str, ...] = (), compiler_options: dict | None = None,
                 fast_compile: bool = True):
        self._fun = fun
        self._storable = key is not None
        self._key = (getattr(fun, "__module__", None), getattr(fun, "__qualname__", None), key)
        self._static = tuple(static_argnames)
        self._donate = tuple(donate_argnames)
        self._given_options = compiler_options
        self._fast_compile = fast_compile
        self._jitted = self._nested = None
        self._signature = inspect.signature(fun)
        self._calls: dict = {}
        functools.update_wrapper(self, fun, updated=())

    @property
    def _options(self) -> dict | None:
        """The compiler options: :func:`fast_compile_options` (unless turned off) under the given ones."""
        options = {**(fast_compile_options() if self._fast_compile else {}), **(self._given_options or {})}
        return options or None

    @property
    def _jit(self):
        # made at the first use, not at import: the options depend on the backend, which must not be
        # initialised when jaxleak is imported
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, static_argnames=self._static or None,
                                   donate_argnames=self._donate or None, compiler_options=self._options)
        return self._jitted

    def _jit_for(self, args, kwargs):
        """The top-level jit, or, called inside another transformation (which compiles it as part of its own
        program, with its own options), a jit without compiler options of its own (JAX allows none there)."""
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
            return self._jit
        if self._nested is None:
            self._nested = jax.jit(self._fun, static_argnames=self._static or None,
                                   donate_argnames=self._donate or None)
        return self._nested

    def lower(self, *args, **kwargs):
        """``jax.jit(fun).lower``: the program traced and lowered in this process (never the stored one)."""
        return self._jit.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        store = _ACTIVE.get()
        if store is None or not self._storable:
            return self._jit_for(args, kwargs)(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        statics = {name: bound.arguments[name] for name in self._static if name in bound.arguments}
        names = tuple(name for name in bound.arguments if name not in statics)
        dynamic = tuple(bound.arguments[name] for name in names)
        leaves, treedef = jax.tree.flatten(dynamic)
        signature = [_leaf_signature(leaf) for leaf in leaves]
        static_repr = repr(sorted(statics.items()))
        if any(s is None for s in signature) or " at 0x" in static_repr:
            return self._jit_for(args, kwargs)(*args, **kwargs)
        ident = _digest(store.key, self._key, static_repr, names, str(treedef), signature)
        call = self._calls.get(ident)
        if call is None:
            call = self._calls[ident] = self._stored_call(store, ident, statics, names, dynamic)
        return call(*dynamic)

    def _load(self, store: _Store, path: str, dynamic: tuple):
        """The stored program at ``path`` if it is whole and takes these arguments, else None."""
        import json
        import time

        if not os.path.isfile(path):
            return None
        start = time.perf_counter()
        exported = None
        try:
            with open(path, "rb") as f:
                blob = f.read()
            size = int.from_bytes(blob[:4], "little")
            types = _resolve_namedtuples(json.loads(blob[4:4 + size]))
            if types is not None:
                _register_namedtuples(types)
                exported = jax.export.deserialize(bytearray(blob[4 + size:]))
                if not _matches(exported, dynamic):
                    exported = None
        except Exception:  # a damaged or foreign file: traced again and rewritten
            exported = None
        if exported is not None:
            store.loaded += 1
            with contextlib.suppress(OSError):
                os.utime(path)  # used now: pruned last
        jax.monitoring.record_event_duration_secs(_STORE_EVENT, time.perf_counter() - start)
        return exported

    def _stored_call(self, store: _Store, ident: bytes, statics: dict, names: tuple, dynamic: tuple) -> Callable:
        import json

        path = os.path.join(store.folder, ident.hex() + _STORE_SUFFIX)
        exported = self._load(store, path, dynamic)
        if exported is None:
            if _held_bytes(self._fun) > _STORE_MAX_HELD_BYTES:
                return _call_by_name(self._jit, self._signature, names, statics)
            bound_fun = _call_by_name(self._fun, self._signature, names, statics)
            bound_fun.__name__ = getattr(self._fun, "__name__", "program")
            try:
                exported = jax.export.export(jax.jit(bound_fun))(*dynamic)
                types: dict = {}
                _namedtuple_types(dynamic, types)
                _namedtuple_types(exported.out_tree.unflatten([0] * exported.out_tree.num_leaves), types)
                _register_namedtuples(types)
                blob = exported.serialize()
            except Exception as err:
                # an error of the function itself (bad shapes, invalid input) is raised as jax.jit raises it;
                # a program that traces but cannot be exported (e.g. a custom pytree node) runs under plain jit
                jax.jit(bound_fun).trace(*dynamic)
                _warn_once(f"jaxleak could not store the program {self._key[1]}", err)
                return _call_by_name(self._jit, self._signature, names, statics)
            header = json.dumps(sorted(types)).encode()
            data = len(header).to_bytes(4, "little") + header + bytes(blob)
            if len(data) > _STORE_MAX_FILE_BYTES:  # large constants after all: not worth a file
                return _call_by_name(self._jit, self._signature, names, statics)
            try:
                _write_atomic(path, data)
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


def _remove_stale_temporaries(folder: str, age_s: float = 3600.0) -> None:
    """Remove half-written files that a killed process left (older than an hour)."""
    import time

    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    if time.time() - os.stat(path).st_mtime > age_s:
                        os.unlink(path)


def _prune(folder: str) -> None:
    """Keep at most :data:`_STORE_MAX_FILES` stored programs and :data:`_STORE_MAX_BYTES`, newest used first."""
    entries = []
    for name in os.listdir(folder):
        if name.endswith(_STORE_SUFFIX):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # pruned by another process meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, path))
    entries.sort(reverse=True)
    kept_bytes = 0
    for i, (_, size, path) in enumerate(entries):
        kept_bytes += size
        if i >= _STORE_MAX_FILES or kept_bytes > _STORE_MAX_BYTES:
            with contextlib.suppress(OSError):
                os.unlink(path)


def jit(fun: Callable | None = None, *, key=(), static_argnames: tuple[str, ...] = (),
        donate_argnames: tuple[str, ...] = (), compiler_options: dict | None = None, fast_compile: bool = True):
    """``jax.jit`` whose programs a :func:`program_store` block keeps on disk (see :class:`Program`).

    Usable as a decorator (``@jit(key=...)``) or a call (``jit(fun, key=...)``); ``key=None``: never stored.
    ``fast_compile``: compile with :func:`fast_compile_options`; turn it off for a program whose run time,
    not its compile time, dominates (a long training or optimisation loop).
    """
    def make(f):
        return Program(f, key=key, static_argnames=static_argnames, donate_argnames=donate_argnames,
                       compiler_options=compiler_options, fast_compile=fast_compile)

    return make if fun is None else make(fun)


# XLA's CPU compiler emits fused loops through its MLIR fusion emitters by default; the older LLVM IR emitters
# compile the same fusions in about half the time (the default run's programs: 17 s instead of 28 s on the 2-core
# CPU), with the same results in every program measured but up to 30% slower code in long loops (the attack
# ensemble's training, the inversion), which therefore keep the default (fast_compile=False).
_FAST_COMPILE_CPU = {"xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=None)
def fast_compile_options() -> dict:
    """Compiler options that cut compile time on this backend: on the CPU, XLA's older fusion emitters; none
    elsewhere, or where this XLA does not know the option (checked once by compiling a tiny program)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda v: v + 1, compiler_options=_FAST_COMPILE_CPU).lower(jax.ShapeDtypeStruct((), "float32")).compile()
    except Exception:  # an XLA without the option: compile with its defaults
        return {}
    return dict(_FAST_COMPILE_CPU)
