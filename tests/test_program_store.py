"""Stored programs (jaxleak.compilation.program_store / jit): traced once, reused from disk, never stale.

A new :class:`~jaxleak.compilation.Program` object has no programs in memory,
so calling it inside a store reads the stored file as a new process would.
Every stored result is compared with plain ``jax.jit`` of the same function.
"""

import collections
import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxleak import compilation

TRACES = collections.Counter()
State = collections.namedtuple("State", ["w", "step"])


def _affine(x, y, scale: float):
    TRACES["affine"] += 1
    return {"sum": jnp.sin(x) * scale + y, "max": jnp.max(x, axis=-1)}


def _program(fun=_affine, **kwargs):
    kwargs.setdefault("key", "test")
    return compilation.jit(fun, **kwargs)


def _files(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".jaxexport"))


X = np.linspace(-1.0, 1.0, 12, dtype=np.float32).reshape(3, 4)
Y = np.float32(0.5)


def _check(out, scale=2.0, x=X):
    want = jax.jit(_affine, static_argnames="scale")(x, Y, scale=scale)
    np.testing.assert_array_equal(out["sum"], want["sum"])
    np.testing.assert_array_equal(out["max"], want["max"])


def test_stored_once_then_loaded_without_tracing(tmp_path):
    with compilation.program_store("k", folder=tmp_path) as store:
        _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store.written == 1 and store.loaded == 0 and len(_files(tmp_path)) == 1
    before = TRACES["affine"]
    with compilation.program_store("k", folder=tmp_path) as store, compilation.count_compilations() as seen:
        _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store.loaded == 1 and store.written == 0
    assert TRACES["affine"] == before, "a stored program was traced again"
    assert seen.count == 1  # compiled (or read from the XLA cache) once, from the stored program


def test_anything_that_decides_the_program_gives_a_new_one(tmp_path):
    with compilation.program_store("k", folder=tmp_path):
        _program(static_argnames=("scale",))(X, Y, scale=2.0)
    cases = [
        (("other key",), {}, X, 2.0),  # the store's key
        (("k",), {"key": "another program"}, X, 2.0),  # the program's key
        (("k",), {}, X, 3.0),  # a static argument
        (("k",), {}, X[:2], 2.0),  # a shape
        (("k",), {}, X.astype(np.float16), 2.0),  # a dtype
    ]
    for i, (store_key, extra, x, scale) in enumerate(cases):
        before = TRACES["affine"]
        with compilation.program_store(*store_key, folder=tmp_path) as store:
            out = _program(static_argnames=("scale",), **extra)(x, Y, scale=scale)
        assert store.loaded == 0 and store.written == 1 and TRACES["affine"] == before + 1, i
        assert len(_files(tmp_path)) == i + 2
        np.testing.assert_array_equal(out["sum"], jax.jit(_affine, static_argnames="scale")(x, Y, scale=scale)["sum"])


def test_closed_over_data_is_covered_by_the_extended_key(tmp_path):
    """A program that holds data as a constant: the data's digest in the key keeps a stale program out."""
    def make(constant):
        def f(x):
            return x * constant
        return f

    results = []
    for value in (1.0, 5.0):
        constant = np.full(4, value, np.float32)
        with compilation.program_store("k", folder=tmp_path) as store:
            compilation.extend_store_key("data", compilation.array_digest(constant))
            results.append(np.asarray(_program(make(constant), key="scaled")(np.ones(4, np.float32))))
        assert store.loaded == 0
    np.testing.assert_array_equal(results[0], 1.0)
    np.testing.assert_array_equal(results[1], 5.0)
    assert compilation.array_digest(np.zeros(3)) != compilation.array_digest(np.zeros(4))
    assert compilation.array_digest(np.zeros(3)) != compilation.array_digest(np.zeros(3, np.float32))


def test_outside_a_store_it_is_plain_jit(tmp_path):
    out = _program(static_argnames=("scale",))(X, Y, scale=2.0)
    _check(out)
    assert compilation.active_store() is None
    with compilation.program_store("k") as store:  # no folder and no compile cache: no store
        assert store is None or compilation.programs_dir() is not None


def test_env_switch_turns_the_store_off(tmp_path, monkeypatch):
    monkeypatch.setenv(compilation.STORE_ENV, "off")
    with compilation.program_store("k", folder=tmp_path) as store:
        _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store is None and _files(tmp_path) == []


def test_a_damaged_file_is_traced_again_and_rewritten(tmp_path):
    with compilation.program_store("k", folder=tmp_path):
        _program(static_argnames=("scale",))(X, Y, scale=2.0)
    (path,) = _files(tmp_path)
    full = tmp_path / path
    full.write_bytes(full.read_bytes()[:40])
    before = TRACES["affine"]
    with compilation.program_store("k", folder=tmp_path) as store:
        _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store.loaded == 0 and store.written == 1 and TRACES["affine"] == before + 1
    with compilation.program_store("k", folder=tmp_path) as store:
        _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store.loaded == 1


def test_namedtuples_and_optax_states_round_trip(tmp_path):
    opt = optax.adam(0.1)

    def step(state, opt_state, g):
        updates, opt_state = opt.update(g, opt_state, state.w)
        return State(optax.apply_updates(state.w, updates), state.step + 1), opt_state

    w = jnp.arange(3.0)
    args = (State(w, jnp.int32(0)), opt.init(w), jnp.ones(3))
    want = jax.jit(step)(*args)
    for expect_loaded in (0, 1):
        with compilation.program_store("k", folder=tmp_path) as store:
            got = _program(step, key="adam step", donate_argnames=("opt_state",))(
                State(w, jnp.int32(0)), opt.init(w), jnp.ones(3))
        assert store.loaded == expect_loaded
        assert type(got[0]) is State and type(got[1]) is type(want[1])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pair:
    a: jax.Array
    b: jax.Array


def test_an_unexportable_argument_falls_back_to_jit_with_a_warning(tmp_path):
    def f(p):
        return p.a * 2.0 + p.b

    with compilation.program_store("k", folder=tmp_path), pytest.warns(compilation.CompileCacheWarning,
                                                                          match="could not store"):
        out = _program(f, key="pair")(Pair(jnp.ones(2), jnp.arange(2.0)))
    np.testing.assert_array_equal(out, [2.0, 3.0])
    assert _files(tmp_path) == []


def test_a_static_argument_without_a_faithful_repr_is_not_stored(tmp_path):
    class Opaque:
        def __init__(self, k):
            self.k = k

    def f(x, obj):
        return x * obj.k

    fun = _program(f, key="opaque", static_argnames=("obj",))
    with compilation.program_store("k", folder=tmp_path):
        a, b = fun(np.ones(2, np.float32), Opaque(2.0)), fun(np.ones(2, np.float32), Opaque(3.0))
    np.testing.assert_array_equal(a, 2.0)
    np.testing.assert_array_equal(b, 3.0)
    assert _files(tmp_path) == []


def test_a_program_holding_large_arrays_is_not_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation, "_STORE_MAX_HELD_BYTES", 1000)
    small, large = np.ones(8, np.float32), np.ones(1000, np.float32)

    def holding(constant):
        def f(x):
            return jnp.sum(x * constant)
        return f

    with compilation.program_store("k", folder=tmp_path) as store:
        assert float(_program(holding(large), key="large")(np.ones(1000, np.float32))) == 1000.0
        assert store.written == 0
        assert float(_program(holding(small), key="small")(np.ones(8, np.float32))) == 8.0
        assert store.written == 1


def test_task_programs_carry_the_models_identity(tmp_path, digits):
    """Two zoo models that differ only in an option never share a stored program; a user's model is never stored."""
    from jaxleak import Task
    from jaxleak.gradnorm import per_example_norms

    x, y = digits.x[:8], digits.y[:8]
    plain = {}
    for activation in ("relu", "tanh"):
        task = Task.init("mlp", digits, 0, activation=activation)
        plain[activation] = per_example_norms(task, x, y)
    for activation in ("relu", "tanh"):
        with compilation.program_store("same key", folder=tmp_path) as store:
            got = per_example_norms(Task.init("mlp", digits, 0, activation=activation), x, y)
        assert store.loaded == 0 and store.written >= 1, activation
        for name in got:
            np.testing.assert_array_equal(got[name], plain[activation][name])
    assert not np.allclose(plain["relu"]["Dense_0"], plain["tanh"]["Dense_0"])

    zoo = Task.init("mlp", digits, 0)
    own = Task(zoo.apply_fn, zoo.params, zoo.input_shape)  # a user's model: no identity
    assert own.program_key("k") is None and zoo.program_key("k") is not None
    assert zoo.with_params(zoo.params).program_key("k") == zoo.program_key("k")
    before = set(_files(tmp_path))
    with compilation.program_store("same key", folder=tmp_path) as store:
        per_example_norms(own, x, y)
    assert set(_files(tmp_path)) == before and store.written == 0


def test_called_inside_another_transformation_it_is_traced_as_part_of_it(tmp_path):
    fun = _program(static_argnames=("scale",))
    with compilation.program_store("k", folder=tmp_path) as store:
        out = jax.jit(lambda x: fun(x, Y, scale=2.0)["sum"])(X)
        grad = jax.grad(lambda x: jnp.sum(fun(x, Y, scale=2.0)["sum"]))(X)
    np.testing.assert_allclose(out, np.sin(X) * 2.0 + Y, rtol=1e-6)
    np.testing.assert_allclose(grad, np.cos(X) * 2.0, rtol=1e-6)
    assert store.written == 0


def test_defaults_not_passed_stay_python_constants(tmp_path):
    def power(x, p=3):
        return x ** p

    want = jax.jit(power)(X)
    for expect_loaded in (0, 1):
        with compilation.program_store("k", folder=tmp_path) as store:
            got = _program(power, key="power")(X)
        assert store.loaded == expect_loaded
        np.testing.assert_array_equal(got, want)


def test_an_error_of_the_function_is_raised_as_jit_raises_it(tmp_path):
    def bad(x):
        return x @ jnp.ones((5, 2))

    with compilation.program_store("k", folder=tmp_path), warnings.catch_warnings():
        warnings.simplefilter("error", compilation.CompileCacheWarning)  # no "could not store" for a real error
        with pytest.raises(TypeError, match="dot_general"):
            _program(bad, key="bad")(X)
    assert _files(tmp_path) == []


def test_changed_sources_turn_the_store_off(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation, "_SOURCES_AT_IMPORT", b"other sources")
    with pytest.warns(compilation.CompileCacheWarning, match="source files changed"):
        with compilation.program_store("k", folder=tmp_path) as store:
            _check(_program(static_argnames=("scale",))(X, Y, scale=2.0))
    assert store is None and _files(tmp_path) == []

