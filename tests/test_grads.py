"""Tests of the gradient engine (jaxleak/grads.py) against independent references.

References: a Python loop of jax.grad over one example at a time (per-example
gradients), jax.grad of the batch-mean loss (client update, K = 1), a
hand-written SGD loop (K > 1), and the closed-form mean and variance of the
count-sketch inner-product estimator.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxleak import grads, models
from jaxleak.errors import InputError, NonFiniteError
from jaxleak.task import Layer, Task


@contextlib.contextmanager
def float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def to64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def quick_jit(fn, *args):
    """jax.jit(fn) compiled for ``args`` with LLVM optimisations off: the same
    computation, compiled several times faster (these tests are compile-bound)."""
    compiled = jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})
    return compiled


def loop_reference(task: Task, params, x, y) -> dict[str, np.ndarray]:
    """Per-example gradients by a Python loop of jax.grad over batches of one."""
    grad_one = quick_jit(jax.grad(task.example_loss), params, x[0], y[0])
    rows = []
    for i in range(x.shape[0]):
        g = task.flatten(grad_one(params, x[i], y[i]))
        rows.append({name: np.asarray(v) for name, v in g.items()})
    return {name: np.stack([r[name] for r in rows]) for name in rows[0]}


def assert_layers_close(got, want, rtol=1e-5):
    assert set(got) == set(want)
    for name in want:
        scale = np.max(np.abs(want[name]))
        assert scale > 0, f"layer {name} has an all-zero reference gradient; the test would be vacuous"
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=rtol, atol=1e-9 * scale,
                                   err_msg=f"layer {name}")


def zoo_task(name: str, shape=(8, 8, 3), num_classes=10, seed=0) -> Task:
    module = models.get(name, num_classes, shape)
    # Initialisation compiled without LLVM optimisations: several times faster to
    # compile for the deep models, and the parameters are only test values.
    args = (jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))
    variables = quick_jit(module.init, *args)(*args)
    return Task.from_linen(module, variables, input_shape=shape, name=name)


def batch(shape, n=3, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *shape)).astype(np.float32), rng.integers(0, num_classes, n).astype(np.int32)


# ---------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize("name", models.names())
def test_per_example_grads_equal_batch_of_one_loop_for_every_zoo_model(name):
    # Small inputs keep the deep models fast; every layer type and stride still runs.
    shape = (8, 8, 1) if name in ("mlp", "lenet") else (4, 4, 3)
    task = zoo_task(name, shape)
    x, y = batch(shape, n=2)
    # A silent fallback to vmap(grad) would be correct but slow: every zoo
    # parameter must be owned by a fast leaf-module call.
    plan = grads._discover(task, task.params, jnp.asarray(x))
    owned = {i for call in plan if call is not None for i in call.leaves.values()}
    assert owned == set(range(len(jax.tree.leaves(task.params))))
    with float64():
        params, x64 = to64(task.params), jnp.asarray(x, jnp.float64)
        got = quick_jit(grads.per_example_grad_fn(task, task.layers), params, x64, y)(params, x64, y)
        want = loop_reference(task, params, x64, y)
        assert all(np.asarray(v).dtype == np.float64 for v in got.values())
        assert_layers_close(got, want)


class OddModel(nn.Module):
    """Exercises the awkward cases: dilation, strides, VALID padding, odd-sized
    max pooling, average pooling, Dense on a 3-d input (a sum over positions),
    a parameter read outside any leaf module, and a tied Dense kernel."""

    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, kernel_dilation=1, padding="SAME")(x))
        x = jnp.tanh(nn.Conv(5, (2, 2), kernel_dilation=2, padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.avg_pool(x, (1, 1))
        x = nn.Dense(6)(x)  # applied at every position: (B, h, w, 6)
        scale = self.param("scale", nn.initializers.normal(1.0), (6,))
        x = jnp.tanh(x * scale).reshape((x.shape[0], -1))
        shared = nn.Dense(6, name="shared")
        x = jnp.tanh(shared(x[:, :6]) + shared(x[:, -6:]))
        return nn.Dense(3)(x)


@pytest.mark.parametrize("patch_floats", [2 ** 22, 0], ids=["patch-matrix", "per-tap"])
def test_user_linen_model_with_awkward_layers_matches_loop(patch_floats):
    # both formulations of the per-example conv kernel gradient (conv_patch_floats)
    shape = (11, 11, 2)
    module = OddModel()
    variables = module.init(jax.random.key(1), jnp.zeros((1, *shape)))
    task = Task.from_linen(module, variables, input_shape=shape)
    x, y = batch(shape, n=4, num_classes=3, seed=1)
    plan = grads._discover(task, task.params, jnp.asarray(x))
    fast = {i for call in plan if call is not None for i in call.leaves.values()}
    scale_leaf = task.layer("scale").leaves[0]
    assert scale_leaf not in fast  # read by the parent module: vmap(grad) fallback
    assert any(call is not None and "kernel" in call.leaves and call.leaves["kernel"] in task.layer("shared").leaves
               for call in plan)  # the tied Dense is still fast (its two calls are summed)
    with float64():
        params, x64 = to64(task.params), jnp.asarray(x, jnp.float64)
        fn = grads.per_example_grad_fn(task, task.layers, conv_patch_floats=patch_floats)
        got = quick_jit(fn, params, x64, y)(params, x64, y)
        assert_layers_close(got, loop_reference(task, params, x64, y))


def test_parameter_read_outside_its_module_loses_the_fast_path():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4, name="enc")
            h = jnp.tanh(dense(x.reshape((x.shape[0], -1))))
            return h @ dense.variables["params"]["kernel"][:4, :].T  # reuse of the kernel

    shape = (2, 2, 1)
    module = Tied()
    variables = module.init(jax.random.key(0), jnp.zeros((1, *shape)))
    task = Task.from_linen(module, variables, input_shape=shape)
    plan = grads._discover(task, task.params, jnp.zeros((3, *shape)))
    assert all(call is None for call in plan)
    x, y = batch(shape, n=3, num_classes=4)
    with float64():
        params, x64 = to64(task.params), jnp.asarray(x, jnp.float64)
        got = quick_jit(grads.per_example_grad_fn(task, task.layers), params, x64, y)(params, x64, y)
        assert_layers_close(got, loop_reference(task, params, x64, y))


def test_nnx_model_falls_back_to_vmap_and_matches_loop():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 3, (3, 3), rngs=rngs)
            self.out = nnx.Linear(3 * 6 * 6, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.conv(x)).reshape((x.shape[0], -1)))

    shape = (6, 6, 1)
    task = Task.from_nnx(Net(nnx.Rngs(0)), input_shape=shape)
    x, y = batch(shape, n=3, num_classes=4)
    with float64():
        params, x64 = to64(task.params), jnp.asarray(x, jnp.float64)
        got = quick_jit(grads.per_example_grad_fn(task, task.layers), params, x64, y)(params, x64, y)
        assert_layers_close(got, loop_reference(task, params, x64, y))


class PoolNet(nn.Module):
    """Conv, max pooling and Dense: every fast-path ingredient in a model that compiles quickly."""

    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(jnp.tanh(nn.Conv(3, (3, 3))(x)), (2, 2), strides=(2, 2))
        return nn.Dense(4)(jnp.tanh(nn.Dense(5)(x.reshape((x.shape[0], -1)))))


def test_fast_path_is_differentiable_like_vmap_grad():
    # The sensitivity measure takes jax.jvp through per_example_grad_fn (with
    # respect to x) and may differentiate with respect to the parameters.
    shape = (6, 6, 2)
    module = PoolNet()
    task = Task.from_linen(module, module.init(jax.random.key(2), jnp.zeros((1, *shape))), input_shape=shape)
    x, y = batch(shape, n=2, num_classes=4)
    with float64():
        params, x64 = to64(task.params), jnp.asarray(x, jnp.float64)
        v = jnp.asarray(np.random.default_rng(3).normal(size=x.shape))
        tp = jax.tree.map(lambda p: jnp.ones_like(p), params)
        for wrt in ("x", "params"):
            def jvp(grad_fn):
                if wrt == "x":
                    return jax.jvp(lambda z: grad_fn(params, z, y), (x64,), (v,))[1]
                return jax.jvp(lambda p: grad_fn(p, x64, y), (params,), (tp,))[1]

            fast = quick_jit(lambda: jvp(grads.per_example_grad_fn(task, task.layers)))()
            ref = quick_jit(lambda: jvp(grads.vmap_grad_fn(task, task.layers)))()
            assert_layers_close(fast, {k: np.asarray(a) for k, a in ref.items()})


def test_canonical_convs_keep_values_and_give_xla_cpu_layouts_inside_loops():
    # The input gradient of a convolution uses the kernel with in/out swapped;
    # inside a scan XLA's CPU backend would run it as a naive loop. The rewrite
    # transposes operands explicitly: same values, canonical layouts only.
    # Non-canonical specs on purpose (NCHW input, OIHW kernel) to exercise
    # every operand permutation.
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, (2, 1), [(1, 2), (0, 1)], rhs_dilation=(1, 2),
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def step(x, k):
        # second order, like a gradient-inversion step: grad_x of a function of grad_k
        gk = jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k)) ** 2))(k)
        return jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, gk))))(x)

    def loop(fn):
        return lambda x, k: jax.lax.scan(lambda c, _: (c + 0.1 * fn(c, k), None), x, None, length=2)[0]

    rng = np.random.default_rng(0)
    with float64():
        x = jnp.asarray(rng.normal(size=(2, 3, 7, 6)))
        k = jnp.asarray(rng.normal(size=(4, 3, 3, 2)))
        want = np.asarray(quick_jit(loop(step), x, k)(x, k))
        fast = quick_jit(loop(grads.canonical_convs(step)), x, k)
        np.testing.assert_allclose(np.asarray(fast(x, k)), want, rtol=1e-10, atol=1e-12 * np.max(np.abs(want)))
        hlo = jax.jit(loop(grads.canonical_convs(step))).lower(x, k).compile().as_text()
    labels = {line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines() if " convolution(" in line}
    assert labels == {"b01f_01io->b01f"}, labels


@pytest.mark.parametrize("spec", [
    dict(dn=("NCHW", "OIHW", "NCHW"), strides=(2, 1), padding=[(1, 2), (0, 1)], rhs_dilation=(1, 2),
         x=(2, 3, 7, 6), k=(4, 3, 3, 2)),
    dict(dn=("NHWC", "HWIO", "NHWC"), strides=(1, 1), padding="SAME", rhs_dilation=(1, 1),
         x=(3, 4, 4, 2), k=(5, 5, 2, 3)),  # kernel larger than the map (XLA swaps operands)
    dict(dn=("NWC", "WIO", "NWC"), strides=(1,), padding=[(-1, 2)], rhs_dilation=(2,), x=(2, 9, 2), k=(3, 2, 3)),
    dict(dn=("NDHWC", "DHWIO", "NDHWC"), strides=(1, 2, 1), padding="VALID", rhs_dilation=(1, 1, 1),
         x=(1, 4, 5, 4, 2), k=(2, 3, 2, 2, 3)),
])
def test_patch_convolutions_equal_xla_convolutions(spec):
    # canonical_convs(patch_floats=...) computes small convolutions as patches @ kernel,
    # including every convolution differentiation creates (input dilation excepted: those stay).
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, spec["strides"], spec["padding"], rhs_dilation=spec["rhs_dilation"],
                                            dimension_numbers=spec["dn"])

    def step(x, k):
        gk = jax.grad(lambda k: jnp.sum(jnp.tanh(conv(x, k)) ** 2))(k)
        return jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, gk))))(x)

    rng = np.random.default_rng(1)
    with float64():
        x, k = jnp.asarray(rng.normal(size=spec["x"])), jnp.asarray(rng.normal(size=spec["k"]))
        want = np.asarray(quick_jit(step, x, k)(x, k))
        got = np.asarray(quick_jit(grads.canonical_convs(step, patch_floats=2 ** 20), x, k)(x, k))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.max(np.abs(want)))
        hlo = jax.jit(grads.canonical_convs(step, patch_floats=2 ** 20)).lower(x, k).compile().as_text()
        kept = jax.jit(grads.canonical_convs(step, patch_floats=1)).lower(x, k).compile().as_text()
    count = lambda text: sum(" convolution(" in line for line in text.splitlines())  # noqa: E731
    assert count(kept) >= 3
    if all(s == 1 for s in spec["strides"]):
        assert count(hlo) == 0, hlo
    else:
        assert count(hlo) < count(kept)


# ---------------------------------------------------------------- layer_grads API


@pytest.fixture(scope="module")
def lenet():
    task = zoo_task("lenet", (8, 8, 1))
    x, y = batch((8, 8, 1), n=7, seed=5)
    return task, x, y


def test_layer_grads_float32_close_to_loop_and_vmap_method(lenet):
    task, x, y = lenet
    got = grads.layer_grads(task, x, y)
    want = loop_reference(task, task.params, jnp.asarray(x), jnp.asarray(y))
    for name in want:
        assert got[name].shape == (7, task.layer(name).size) and got[name].dtype == np.float32
        # float32: elementwise agreement up to accumulation-order rounding
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6 * np.max(np.abs(want[name])))
    vm = grads.layer_grads(task, x, y, method="vmap")
    for name in want:
        np.testing.assert_allclose(vm[name], want[name], rtol=1e-4, atol=1e-6 * np.max(np.abs(want[name])))


def test_chunking_does_not_change_results(lenet):
    task, x, y = lenet
    whole = grads.layer_grads(task, x, y)
    for chunk in (3,):  # 7 = 3 + 3 + 1: the last chunk is padded
        parts = grads.layer_grads(task, x, y, chunk_size=chunk)
        for name in whole:
            np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, atol=1e-7)


class _StubDevice:
    """A device that reports a platform and a memory report, for the chunk rule."""

    def __init__(self, platform, stats):
        self.platform, self._stats = platform, stats

    def memory_stats(self):
        return self._stats


def _stub_device(monkeypatch, platform, stats=None):
    monkeypatch.setattr(grads, "_device", lambda: _StubDevice(platform, stats))


def test_cpu_chunk_rule_is_16_mib_of_gradients(lenet):
    task, _, _ = lenet
    size = sum(layer.size for layer in task.layers)
    assert jax.local_devices()[0].platform == "cpu"
    assert grads.chunk_limits(grads._CHUNK_FLOATS) == (2 ** 25, 256)
    assert grads.default_chunk_size(task, task.layers, 10 ** 6) == min(256, 2 ** 22 // size)
    assert grads.default_chunk_size(task, task.layers, 5) == 5
    wide = [Layer("w", 2 ** 20, (0,), ((2 ** 20,),), ("w",))]
    assert grads.default_chunk_size(task, wide, 10 ** 6) == 4


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_accelerator_chunks_follow_free_memory(lenet, monkeypatch, platform):
    task, _, _ = lenet
    wide = [Layer("w", 2 ** 20, (0,), ((2 ** 20,),), ("w",))]  # 4 MiB of gradient per example
    chunks = []
    for free_gib in (8, 16, 32):
        in_use = 3 * 2 ** 30
        _stub_device(monkeypatch, platform, {"bytes_limit": free_gib * 2 ** 30 + in_use, "bytes_in_use": in_use})
        floats, cap = grads.chunk_limits(grads._OUTPUT_CHUNK_FLOATS)
        assert floats == int(free_gib * 2 ** 30 * grads.DEVICE_MEMORY_FRACTION) // 4 and cap == 16384
        chunks.append(grads.default_chunk_size(task, wide, 10 ** 6))
    assert chunks == [int(g * 2 ** 30 * grads.DEVICE_MEMORY_FRACTION) // 2 ** 22 for g in (8, 16, 32)]
    assert chunks == [256, 512, 1024]  # the chunk doubles with the free memory
    assert grads.default_chunk_size(task, task.layers, 10 ** 6) == 16384  # small models: the cap
    assert grads.default_chunk_size(task, wide, 100) == 100


def test_study_chunks_follow_the_backend(lenet, monkeypatch):
    """Client-update chunks of the studies: 64 updates on the CPU, the free device memory on a GPU."""
    from jaxleak import studies

    task, _, _ = lenet
    per = task.num_params * 4 * 3  # B = 4 examples, 3 floats per parameter each
    assert studies._chunk(task, 10 ** 6, 4, 3) == min(64, grads._CHUNK_FLOATS // per)
    sizes = []
    for free_gib in (8, 16):
        _stub_device(monkeypatch, "gpu", {"bytes_limit": free_gib * 2 ** 30, "bytes_in_use": 0})
        sizes.append(studies._chunk(task, 10 ** 6, 4, 3))
    assert sizes == [min(16384, int(g * 2 ** 30 * grads.DEVICE_MEMORY_FRACTION) // 4 // per) for g in (8, 16)]
    assert sizes[1] > sizes[0] > 64


def test_accelerator_without_memory_report_uses_the_documented_default(lenet, monkeypatch):
    task, _, _ = lenet
    wide = [Layer("w", 2 ** 20, (0,), ((2 ** 20,),), ("w",))]
    _stub_device(monkeypatch, "gpu", None)
    want = int(grads.DEVICE_FREE_BYTES_DEFAULT * grads.DEVICE_MEMORY_FRACTION) // 2 ** 22
    assert grads.default_chunk_size(task, wide, 10 ** 6) == want == 128


def test_chunk_size_overrides_the_accelerator_rule(lenet, monkeypatch):
    task, x, y = lenet
    _stub_device(monkeypatch, "gpu", {"bytes_limit": 2 ** 40, "bytes_in_use": 0})
    seen = []
    real = grads.map_chunks
    monkeypatch.setattr(grads, "map_chunks", lambda fn, arrays, chunk, **kw: seen.append(chunk) or real(
        fn, arrays, chunk, **kw))
    grads.layer_grads(task, x, y, chunk_size=3)
    grads.layer_grads(task, x, y)
    assert seen == [3, 7]


def test_layer_subset(lenet):
    task, x, y = lenet
    whole = grads.layer_grads(task, x, y)
    sub = grads.layer_grads(task, x, y, layers=["Dense_1", "Conv_0"])
    assert list(sub) == ["Conv_0", "Dense_1"]
    for name in sub:
        np.testing.assert_allclose(sub[name], whole[name], rtol=1e-5, atol=1e-7)


def test_second_call_does_not_retrace(lenet):
    task, x, y = lenet
    grads.layer_grads(task, x, y, chunk_size=3)
    grads.sketch_grads(task, x, y, dim=500, seed=3)
    before = dict(grads.TRACE_COUNTS)
    grads.layer_grads(task, x[::-1], y[::-1], chunk_size=3)
    grads.layer_grads(task.with_params(jax.tree.map(lambda p: p * 0.5, task.params)), x, y, chunk_size=3)
    grads.sketch_grads(task, x, y, dim=500, seed=3)
    assert dict(grads.TRACE_COUNTS) == before


def test_non_finite_gradient_names_the_layer(lenet):
    task, x, y = lenet
    params = jax.tree.map(lambda p: p, task.params)
    params["Dense_2"]["bias"] = params["Dense_2"]["bias"].at[0].set(jnp.inf)
    with pytest.raises(NonFiniteError, match="layer 'Conv_0'"):
        grads.layer_grads(task.with_params(params), x, y)
    g = {"Conv_0": np.zeros((3, 2)), "Dense_1": np.array([[0.0, 1.0], [np.nan, 0.0], [0.0, 0.0]])}
    with pytest.raises(NonFiniteError, match=r"layer 'Dense_1'.*index 1"):
        grads.check_finite(g)


def test_bad_inputs_raise_input_error(lenet):
    task, x, y = lenet
    with pytest.raises(InputError, match="'x'"):
        grads.layer_grads(task, x[..., 0], y)
    with pytest.raises(InputError, match="'y'"):
        grads.layer_grads(task, x, y[:-1])
    with pytest.raises(InputError, match="'y'"):
        grads.layer_grads(task, x, y + 10)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        grads.layer_grads(task, bad, y)
    with pytest.raises(InputError, match="chunk_size"):
        grads.layer_grads(task, x, y, chunk_size=-1)
    with pytest.raises(InputError, match="method"):
        grads.layer_grads(task, x, y, method="magic")
    with pytest.raises(InputError, match="dim"):
        grads.sketch_grads(task, x, y, dim=0)
    with pytest.raises(InputError, match="local_steps"):
        grads.client_updates(task, x, y, batch_size=2, local_steps=0, num_updates=2)
    with pytest.raises(InputError, match="batch_size"):
        grads.client_updates(task, x, y, batch_size=100, num_updates=2)


# ---------------------------------------------------------------- client updates


def test_client_update_with_one_step_is_the_batch_mean_gradient(lenet):
    task, x, y = lenet
    out = grads.client_updates(task, x, y, batch_size=3, local_steps=1, lr=0.05, num_updates=4, seed=2)
    members = grads.client_batches(7, batch_size=3, num_updates=4, seed=2)
    np.testing.assert_array_equal(out.victims, members[:, 0])
    assert all(len(set(row)) == 3 for row in members)
    grad_mean = jax.jit(jax.grad(task.loss))
    for m, idx in enumerate(members):
        want = task.flatten(grad_mean(task.params, x[idx], y[idx]))
        for name, w in want.items():
            np.testing.assert_allclose(out.updates[name][m], np.asarray(w), rtol=1e-5,
                                       atol=1e-6 * np.max(np.abs(w)))


def test_client_update_with_several_steps_matches_hand_written_sgd(lenet):
    task, x, y = lenet
    k, lr = 3, 0.5
    out = grads.client_updates(task, x, y, batch_size=4, local_steps=k, lr=lr, num_updates=2, seed=4)
    members = grads.client_batches(7, batch_size=4, num_updates=2, seed=4)
    grad_mean = jax.jit(jax.grad(task.loss))
    with float64():
        for m, idx in enumerate(members):
            xb = jnp.asarray(x[idx], jnp.float64)
            w0 = to64(task.params)
            w = w0
            for _ in range(k):
                w = jax.tree.map(lambda p, gp: p - lr * gp, w, grad_mean(w, xb, y[idx]))
            first = task.flatten(grad_mean(w0, xb, y[idx]))
            f0, fk = task.flatten(w0), task.flatten(w)
            for name in f0:
                want = np.asarray((f0[name] - fk[name]) / (k * lr))
                scale = np.max(np.abs(want))
                # float32 SGD against float64 SGD: the difference is float32 rounding.
                np.testing.assert_allclose(out.updates[name][m], want, rtol=1e-4, atol=1e-6 * scale)
            # Not vacuous: K steps differ from the first gradient by far more than the tolerance.
            assert max(np.max(np.abs(np.asarray(first[n]) - np.asarray((f0[n] - fk[n]) / (k * lr))))
                       / np.max(np.abs(np.asarray(first[n]))) for n in f0) > 1e-2


# ---------------------------------------------------------------- sketches


def test_count_sketch_preserves_inner_products_in_expectation():
    rng = np.random.default_rng(0)
    p, dim, seeds = 3000, 32, 300
    a = rng.normal(size=p)
    b = 0.6 * a + 0.8 * rng.normal(size=p)
    layer = Layer("w", p, (0,), ((p,),), ("w",))
    stacked = jnp.asarray(np.stack([a, b]), jnp.float32)
    estimates = []
    for seed in range(seeds):
        sk = grads.make_sketches([layer], dim, seed)["w"]
        s = np.asarray(grads.apply_sketch(sk, stacked), np.float64)
        estimates.append(s[0] @ s[1])
    estimates = np.asarray(estimates)
    exact = a @ b
    # Closed-form variance of the count-sketch estimator of <a, b>.
    var = ((a @ a) * (b @ b) + exact ** 2 - 2 * np.sum(a ** 2 * b ** 2)) / dim
    z = (estimates.mean() - exact) / np.sqrt(var / seeds)
    assert abs(z) < 4.0, (estimates.mean(), exact, z)
    assert 0.6 < estimates.var(ddof=1) / var < 1.5


def test_count_sketch_is_the_signed_bucket_sums():
    """apply_sketch against np.add.at in float64: out[b, h(j)] += s(j) g[b, j], every bucket and example."""
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(1)
        p, dim, b = 5000, 96, 7
        layer = Layer("w", p, (0,), ((p,),), ("w",))
        sk = grads.make_sketches([layer], dim, 4)["w"]
        g = rng.normal(size=(b, p))
        got = np.asarray(grads.apply_sketch(sk, jnp.asarray(g, jnp.float64)))
        want = np.zeros((b, dim))
        for row in range(b):
            np.add.at(want[row], np.asarray(sk.buckets), g[row] * np.asarray(sk.signs))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_sketches_are_one_program_with_the_per_layer_values():
    sizes = (3000, 40, 5000, 700)
    shapes = ((3000,), (40,), (50, 100), (7, 100))
    layers = [Layer(f"l{i}", p, (i,), (s,), (f"l{i}",)) for i, (p, s) in enumerate(zip(sizes, shapes))]
    from jaxleak.compilation import count_compilations

    grads.make_sketches(layers, 64, 0)
    with count_compilations() as again:
        sketches = grads.make_sketches(layers, 64, 11)
    assert again.count == 0  # another seed, same sizes: no new program
    root = jax.random.key(11)
    for i, layer in enumerate(layers):
        if layer.size <= 64:
            assert sketches[layer.name] is None
            continue
        r, c = grads.matrix_view(layer)
        assert (r, c) == ((1, 3000) if i == 0 else (50, 100) if i == 2 else (7, 100))
        kr, ksr, kc, ksc = jax.random.split(jax.random.fold_in(root, i), 4)
        h1, s1 = jax.random.randint(kr, (r,), 0, 64), jax.random.rademacher(ksr, (r,))
        h2, s2 = jax.random.randint(kc, (c,), 0, 64), jax.random.rademacher(ksc, (c,))
        sk = sketches[layer.name]
        np.testing.assert_array_equal(sk.buckets, ((np.asarray(h1)[:, None] + np.asarray(h2)[None, :]) % 64).ravel())
        np.testing.assert_array_equal(sk.signs, (np.asarray(s1)[:, None] * np.asarray(s2)[None, :]).ravel())
        assert sk.dim == 64


@pytest.mark.parametrize("rank", [1, 16])
def test_tensor_sketch_is_unbiased_with_variance_near_the_count_sketch(rank):
    """<S g, S g'> for gradients sum_m a_m ⊗ d_m: mean within 4 se of the exact inner product, variance at most
    3x the closed-form variance of a count-sketch with independent buckets (Pham and Pagh: a constant factor)."""
    rng = np.random.default_rng(rank)
    r, c, dim, seeds = 121, 84, 256, 300
    a, d = rng.normal(size=(2, rank, r)), rng.normal(size=(2, rank, c))
    a[1], d[1] = 0.6 * a[0] + 0.8 * a[1], 0.6 * d[0] + 0.8 * d[1]
    g = np.einsum("bmr,bmc->brc", a, d).reshape(2, -1)
    layer = Layer("w", r * c, (0,), ((r, c),), ("w",))
    est = []
    for seed in range(seeds):
        s = np.asarray(grads.apply_sketch(grads.make_sketches([layer], dim, seed)["w"], jnp.asarray(g, jnp.float32)),
                       np.float64)
        est.append(s[0] @ s[1])
    est, exact = np.asarray(est), g[0] @ g[1]
    var_cs = ((g[0] @ g[0]) * (g[1] @ g[1]) + exact ** 2 - 2 * np.sum(g[0] ** 2 * g[1] ** 2)) / dim
    assert abs(est.mean() - exact) / np.sqrt(est.var(ddof=1) / seeds) < 4.0
    assert est.var(ddof=1) / var_cs < 3.0, est.var(ddof=1) / var_cs


@pytest.mark.parametrize("positions", [1, 5])
def test_tensor_sketch_of_factors_is_the_sketch_of_the_formed_gradient(positions):
    """tensor_sketch (FFTs of the factors' count-sketches) against apply_sketch of sum_m a_m ⊗ d_m, float64."""
    jax.config.update("jax_enable_x64", True)
    try:
        rng = np.random.default_rng(positions)
        b, r, c, dim = 3, 37, 11, 64
        a, d = rng.normal(size=(b, positions, r)), rng.normal(size=(b, positions, c))
        layer = Layer("w", r * c, (0,), ((r, c),), ("w",))
        sk = grads.make_sketches([layer], dim, 5)["w"]
        want = np.asarray(grads.apply_sketch(sk, jnp.asarray(np.einsum("bmr,bmc->brc", a, d).reshape(b, -1))))
        got = np.asarray(grads.tensor_sketch(sk, jnp.asarray(a), jnp.asarray(d)))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.max(np.abs(want)))
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("route", ["auto", "form", "tensor"])
def test_sketch_grads_are_the_sketch_of_layer_grads(lenet, route):
    """Every route (the tensor sketch of the factors, the formed gradient's scatter, and the cost model's
    choice per layer) gives the sketch of the exact per-example gradients."""
    task, x, y = lenet
    dim = 500
    full = grads.layer_grads(task, x, y)
    if route == "auto":
        sk = grads.sketch_grads(task, x, y, dim=dim, seed=3)
    else:
        out = grads._compiled_sketch_grads(task, task.layers, dim, 3, route=route)(task.params, jnp.asarray(x),
                                                                                  jnp.asarray(y))
        sk = {k: np.asarray(v) for k, v in out.items()}
    sketches = grads.make_sketches(task.layers, dim, 3)
    for layer in task.layers:
        if layer.size <= dim:
            assert sketches[layer.name] is None
            np.testing.assert_allclose(sk[layer.name], full[layer.name], rtol=1e-5, atol=1e-7)
        else:
            want = np.asarray(grads.apply_sketch(sketches[layer.name], jnp.asarray(full[layer.name])))
            assert sk[layer.name].shape == (7, dim)
            np.testing.assert_allclose(sk[layer.name], want, rtol=1e-4, atol=1e-6 * np.max(np.abs(want)))


def test_chunks_are_balanced_and_sized_from_factors(lenet):
    assert grads.balanced_chunk(196, 256) == 128
    assert grads.balanced_chunk(256, 822) == 206
    assert grads.balanced_chunk(1000, 7) == 7 and grads.balanced_chunk(1, 5) == 1
    task, x, y = lenet
    shapes = grads.layer_shapes(task, task.layers, x, y)
    sizes = {layer.name: layer.size for layer in task.layers}
    for name, s in shapes.items():
        assert s.size == sizes[name]
        if s.factored:  # rows x cols is the layer's matrix view, the factors far smaller than the gradient here
            assert s.rows * s.cols == s.size and (s.rows, s.cols) == grads.matrix_view(task.layer(name))
    assert all(s.factored for s in shapes.values())
    # the chunk holds factors and sketches, not sum_l P_l per example
    assert grads.sketch_floats(shapes, 64) < sum(sizes.values())


@pytest.mark.parametrize("model", ["lenet", "mlp", "resnet20"])
def test_grad_norms_from_factors_are_the_norms_of_per_example_gradients(model):
    """The ghost norm of Dense/Conv layers (no per-example gradient formed) and the formed norm of the others
    (resnet20's GroupNorm layers) against the norms of layer_grads, which are checked against a batch-of-one loop."""
    from jaxleak import data, gradnorm

    ds = data.load("digits")
    task = Task.init(model, ds, seed=0)
    x, y = ds.x[:12], ds.y[:12]
    got = gradnorm.per_example_norms(task, x, y)
    full = grads.layer_grads(task, x, y)
    assert list(got) == list(full)
    report = gradnorm.grad_norms(task, x, y).meta["gradients"]
    assert sorted(report["from_factors"] + report["formed"]) == sorted(full)
    # Dense/Conv (a kernel) from factors; normalisation layers (scale and bias) formed
    assert report["formed"] == [n for n in full if not any(p.endswith("kernel") for p in task.layer(n).paths)]
    for name, g in full.items():
        np.testing.assert_allclose(got[name], np.linalg.norm(g.astype(np.float64), axis=1), rtol=5e-6, err_msg=name)
