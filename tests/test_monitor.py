"""LeakageMonitor inside real Linen/optax and NNX training loops."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import jaxleak as jl
from jaxleak.monitor import LeakageMonitor


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations while the block runs."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(x)


class SmallNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.out = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)).reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def probe(digits):
    return digits.x[:16], digits.y[:16], digits.latent["thickness"][:16]


def test_linen_optax_loop(tmp_path, digits, probe):
    module = SmallCNN()
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=optax.adam(1e-2))

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    @jax.jit
    def step_fn(state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    out = tmp_path / "monitor.jsonl"
    monitor = LeakageMonitor(apply_fn, None, *probe[:2], measures=("grad_norm",), every=3, out=str(out))
    for step in range(10):
        state = step_fn(state, digits.x[100:164], digits.y[100:164])
        if step == 0:
            with count_compiles() as first:
                assert monitor(step, state.params) is not None
            assert first[0] > 0, "the compile counter must see the first measurement compile"
            ctx = count_compiles()
            counter = ctx.__enter__()
            continue
        monitor(step, state.params)
    ctx.__exit__(None, None, None)
    compiles_after_first = counter[0]
    assert compiles_after_first == 0, "monitoring later steps recompiled"
    assert [r["step"] for r in monitor.history] == [0, 3, 6, 9]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 3, 6, 9]
    assert list(lines[0]["measures"]["grad_norm"]["layers"]) == ["Conv_0", "Dense_0"]
    # The recorded norms are those of the parameters at that step.
    task = monitor.task_for(state.params)
    ref = jl.gradnorm.per_example_norms(task, *probe[:2])
    np.testing.assert_allclose(lines[-1]["measures"]["grad_norm"]["layers"]["Dense_0"]["value"],
                               ref["Dense_0"].mean(), rtol=1e-5)
    monitor.plot(str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_nnx_loop(digits, probe):
    model = SmallNNX(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads)

    monitor = LeakageMonitor(model, None, *probe[:2], measures=("grad_norm",), every=2)
    values = []
    for step in range(5):
        train_step(model, optimizer, digits.x[100:164], digits.y[100:164])
        record = monitor(step, model)
        if record:
            values.append(record["measures"]["grad_norm"]["layers"]["conv"]["value"])
    assert len(values) == 3 and len(set(values)) == 3, "the monitor must see the updated parameters"
    steps, series = monitor.series("grad_norm")
    assert list(steps) == [0, 2, 4] and set(series) == {"conv", "out"}


def _linen_loop(module, params):
    """A Linen/optax training loop: yields ``state.params`` after each step."""
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=optax.adam(1e-2))

    @jax.jit
    def step_fn(state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(module.apply({"params": p}, x), y).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    def steps(x, y):
        nonlocal state
        while True:
            state = step_fn(state, x, y)
            yield state.params

    return steps


def _nnx_loop(model):
    """An NNX training loop: yields the module itself after each (in-place) step."""
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(model)
        optimizer.update(model, grads)

    def steps(x, y):
        while True:
            train_step(model, optimizer, x, y)
            yield model

    return steps


@pytest.mark.parametrize("form", ["linen_apply_fn", "task_from_linen", "nnx_module", "task_from_nnx"])
def test_every_documented_form(form, digits, probe):
    """Each documented way to name the model, called with what its training loop has at hand.

    Linen forms get ``state.params``; NNX forms get the module. The recorded
    norms are those of the parameters at that step (checked against a Task
    built from them), and they change as the model trains.
    """
    shape = (8, 8, 1)
    if "linen" in form:
        module = SmallCNN()
        params = module.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
        if form == "linen_apply_fn":
            model = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
        else:
            model = jl.Task.from_linen(module, {"params": params}, input_shape=shape)
        loop = _linen_loop(module, params)
        reference = lambda p: jl.Task.from_linen(module, {"params": p}, input_shape=shape)  # noqa: E731
    else:
        nnx_model = SmallNNX(nnx.Rngs(0))
        model = nnx_model if form == "nnx_module" else jl.Task.from_nnx(nnx_model, input_shape=shape)
        loop = _nnx_loop(nnx_model)
        reference = lambda m: jl.Task.from_nnx(m, input_shape=shape)  # noqa: E731
    monitor = LeakageMonitor(model, None, *probe[:2], measures=("grad_norm",), every=2)
    values = []
    for step, current in zip(range(3), loop(digits.x[100:132], digits.y[100:132])):
        record = monitor(step, current)
        if step % 2:
            assert record is None
            continue
        layers = record["measures"]["grad_norm"]["layers"]
        ref = jl.gradnorm.per_example_norms(reference(current), *probe[:2])
        assert list(layers) == list(ref)
        for name in ref:
            np.testing.assert_allclose(layers[name]["value"], ref[name].mean(), rtol=1e-5)
        values.append([layers[name]["value"] for name in ref])
    assert len(values) == 2 and values[0] != values[1], "the monitor must see the updated parameters"


def test_skipped_steps_touch_nothing(probe):
    monitor = LeakageMonitor(lambda p, x: x, None, *probe[:2], every=5)

    class Explodes:
        def __getattr__(self, name):
            raise AssertionError("parameters were read on a skipped step")

    for step in (1, 2, 3, 4, 6):
        assert monitor(step, Explodes()) is None


def test_monitor_input_errors(probe):
    with pytest.raises(jl.InputError, match="every"):
        LeakageMonitor(lambda p, x: x, None, *probe[:2], every=0)
    with pytest.raises(jl.UnknownNameError, match="unknown measure"):
        LeakageMonitor(lambda p, x: x, None, *probe[:2], measures=("nope",))
