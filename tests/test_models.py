import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import models
from jaxleak.errors import InputError, UnknownNameError
from jaxleak.task import enumerate_layers

SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3), (64, 64, 3)]


def test_names():
    assert models.names() == ["mlp", "lenet", "alexnet", "vgg11", "vgg16", "resnet18", "resnet20"]


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="lenet"):
        models.get("lenet7", 10)


def test_bad_arguments():
    with pytest.raises(InputError, match="num_classes"):
        models.get("mlp", 1)
    with pytest.raises(InputError, match="input_shape"):
        models.get("mlp", 10, (8, 8))


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_models_adapt_to_input_shape(name, shape):
    module = models.get(name, 7, shape)
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    out = jax.eval_shape(module.apply, variables, x)
    assert out.shape == (2, 7)
    assert set(variables) == {"params"}, "no batch-coupling state such as batch_stats"


def test_lenet_layers_in_forward_order():
    module = models.get("lenet", 10)
    x = jnp.zeros((1, 8, 8, 1))
    params = module.init(jax.random.key(0), x)["params"]
    layers = enumerate_layers(lambda p, x: module.apply({"params": p}, x), params, x)
    assert [layer.name for layer in layers] == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
    sizes = [layer.size for layer in layers]
    assert sizes[0] == 5 * 5 * 1 * 6 + 6
    assert sum(sizes) == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


def test_resnet_uses_groupnorm_and_orders_blocks():
    module = models.get("resnet20", 10)
    x = jnp.zeros((1, 8, 8, 3))
    params = module.init(jax.random.key(0), x)["params"]
    layers = enumerate_layers(lambda p, x: module.apply({"params": p}, x), params, x)
    names = [layer.name for layer in layers]
    assert names[0] == "Conv_0" and names[-1] == "Dense_0"
    assert names.index("BasicBlock_0/Conv_0") < names.index("BasicBlock_1/Conv_0") < names.index("BasicBlock_8/Conv_1")
    assert any("GroupNorm" in n for n in names)


def test_dropout_only_in_train_mode():
    module = models.get("mlp", 10, dropout=0.5)
    x = jnp.ones((4, 8, 8, 1))
    variables = module.init(jax.random.key(0), x)
    a = module.apply(variables, x)
    b = module.apply(variables, x)
    np.testing.assert_array_equal(a, b)
    c = module.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, c)
