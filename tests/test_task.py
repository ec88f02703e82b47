import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jaxleak as jl
from jaxleak.errors import InputError, UnknownNameError


class UserLinen(nn.Module):
    """Not in the zoo; submodule names sort in the opposite order of the forward pass."""

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        x = nn.tanh(nn.Dense(16, name="zeta")(x))
        x = nn.tanh(nn.Dense(12, name="mid")(x))
        return nn.Dense(10, name="alpha")(x)


class UserNNX(nnx.Module):
    def __init__(self, rngs):
        self.second = nnx.Linear(16, 10, rngs=rngs)
        self.first = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.mid = nnx.Linear(4 * 8 * 8, 16, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.first(x)).reshape((x.shape[0], -1))
        return self.second(nnx.relu(self.mid(h)))


def _batch_of_one(task, x, y):
    g = jax.grad(task.loss)
    rows = [task.flatten(g(task.params, x[i:i + 1], y[i:i + 1])) for i in range(x.shape[0])]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def test_user_linen_model_plugs_in(digits):
    module = UserLinen()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    task = jl.Task.from_linen(module, variables, input_shape=(8, 8, 1))
    assert task.layer_names == ["zeta", "mid", "alpha"]
    assert task.num_classes == 10
    g = jl.layer_grads(task, digits.x[:5], digits.y[:5])
    ref = _batch_of_one(task, digits.x[:5], digits.y[:5])
    for name in task.layer_names:
        np.testing.assert_allclose(g[name], ref[name], rtol=1e-5, atol=1e-7)


def test_user_nnx_model_plugs_in(digits):
    model = UserNNX(nnx.Rngs(0))
    task = jl.Task.from_nnx(model, input_shape=(8, 8, 1))
    assert task.layer_names == ["first", "mid", "second"]
    assert [layer.size for layer in task.layers] == [3 * 3 * 4 + 4, 256 * 16 + 16, 16 * 10 + 10]
    g = jl.layer_grads(task, digits.x[:4], digits.y[:4])
    ref = _batch_of_one(task, digits.x[:4], digits.y[:4])
    for name in task.layer_names:
        np.testing.assert_allclose(g[name], ref[name], rtol=1e-5, atol=1e-7)


def test_tensor_granularity(digits):
    task = jl.Task.init("lenet", digits, 0, granularity="tensor")
    # forward order: the kernel is read before the bias is added
    assert task.layer_names[:2] == ["Conv_0/kernel", "Conv_0/bias"]


def test_wrong_input_shape_is_named(digits):
    task = jl.Task.init("mlp", digits, 0)
    with pytest.raises(InputError, match=r"array 'x' has shape \(3, 8, 8\)"):
        jl.layer_grads(task, np.zeros((3, 8, 8)), np.zeros(3, int))
    with pytest.raises(InputError, match="'y' has shape"):
        jl.layer_grads(task, digits.x[:3], digits.y[:4])
    with pytest.raises(InputError, match="NaN"):
        jl.layer_grads(task, np.full((2, 8, 8, 1), np.nan), np.zeros(2, int))
    with pytest.raises(InputError, match="10 classes"):
        jl.layer_grads(task, digits.x[:2], np.array([0, 10]))
    with pytest.raises(UnknownNameError, match="Dense_0"):
        task.layer("Conv_9")


def test_with_params_checks_structure(digits):
    task = jl.Task.init("mlp", digits, 0)
    doubled = jax.tree.map(lambda a: 2 * a, task.params)
    other = task.with_params(doubled)
    assert other.layers is task.layers and other._cache is task._cache
    bad = dict(task.params)
    bad.pop("Dense_1")
    with pytest.raises(InputError, match="Dense_1"):
        task.with_params(bad)


def test_victims_and_auxiliary_examples_split_with_a_named_compromise():
    from jaxleak.run import split_victims_aux

    assert split_victims_aux(1078, 256, 2048)[:2] == (256, 822)
    assert "only 822 of the 2048" in split_victims_aux(1078, 256, 2048)[2]
    assert split_victims_aux(2000, 256, 1000) == (256, 1000, None)
    assert split_victims_aux(1078, 256, 0) == (256, 0, None)  # cross-fitting by choice
    n_v, n_a, note = split_victims_aux(270, 256, 2048)  # 14 left: halve instead
    assert (n_v, n_a) == (135, 135) and "too small" in note
    n_v, n_a, note = split_victims_aux(30, 256, 2048)  # too small for any auxiliary set
    assert (n_v, n_a) == (30, 0) and "cross-fitted" in note
