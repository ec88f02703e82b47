"""The gradient engine: per-example, per-layer gradients, client updates, sketches.

All heavy work is one jitted function per (task family, layers, options),
applied chunk by chunk over examples with a fixed chunk shape (the last
chunk is padded), so memory is bounded by the chunk and nothing retraces
after the first call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from jaxleak import compilation, sharding
from jaxleak.errors import InputError, NonFiniteError
from jaxleak.task import Layer, Task

# Incremented when a jaxleak function is traced; tests use it to prove that a
# second call with the same shapes does not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Per-example gradient floats kept live per chunk on the CPU (the bound other modules use).
_CHUNK_FLOATS = 2 ** 25

# Per-example gradient floats returned per chunk by layer_grads' default chunk
# size on the CPU. Smaller than _CHUNK_FLOATS on purpose: XLA's CPU runtime
# allocates every call's output afresh, and a buffer of more than a few tens
# of MiB comes from new pages that are faulted in one 4 KiB page at a time
# (for LeNet at B = 256 that cost more than the arithmetic); chunks of a few
# MiB reuse memory and stay cache-resident until they are copied to the host.
_OUTPUT_CHUNK_FLOATS = 2 ** 22
_CPU_CHUNK_CAP = 256

# On a GPU or TPU a chunk's budget is this fraction of the device memory free
# when the chunk size is chosen (memory_stats(): bytes_limit - bytes_in_use),
# for every chunk rule alike: the rest holds the chunk's activations and
# cotangents, the parameters and what the caller keeps on the device. Big
# chunks keep the device busy; small ones leave it waiting on per-chunk
# dispatch and host copies.
DEVICE_MEMORY_FRACTION = 1 / 8
# The free memory assumed when the device reports no memory_stats().
DEVICE_FREE_BYTES_DEFAULT = 4 * 2 ** 30
_DEVICE_CHUNK_CAP = 16384


def _device():
    return jax.local_devices()[0]


def chunk_limits(cpu_floats: int) -> tuple[int, int]:
    """(float32 values one chunk may hold, examples per chunk at most) on the default device.

    CPU: ``cpu_floats`` and 256 examples. GPU/TPU: DEVICE_MEMORY_FRACTION of
    the free memory reported by ``device.memory_stats()`` (bytes_limit -
    bytes_in_use), or of DEVICE_FREE_BYTES_DEFAULT (4 GiB) when the device
    reports none, and 16384 examples.
    """
    device = _device()
    if device.platform == "cpu":
        return cpu_floats, _CPU_CHUNK_CAP
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        free = max(0, int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    else:
        free = DEVICE_FREE_BYTES_DEFAULT
    return max(1, int(free * DEVICE_MEMORY_FRACTION) // 4), _DEVICE_CHUNK_CAP


def default_chunk_size(task: Task, layers: Sequence[Layer], n: int) -> int:
    """Examples per chunk of per-example gradients (at most ``n``).

    CPU: chunk x sum(P_l) near 2^22 floats (16 MiB), at most 256 examples.
    GPU/TPU: the gradients of a chunk fill DEVICE_MEMORY_FRACTION of the free
    device memory, at most 16384 examples (:func:`chunk_limits`).
    """
    floats, cap = chunk_limits(_OUTPUT_CHUNK_FLOATS)
    size = max(1, sum(layer.size for layer in layers))
    return int(max(1, min(n, cap, floats // size)))


def balanced_chunk(limit: int, n: int) -> int:
    """The chunk size for ``n`` rows at most ``limit`` per chunk that pads the last chunk least:
    as many chunks as ``limit`` needs, sized evenly (n = 256, limit 196: two chunks of 128, not 196 + 60)."""
    limit = max(1, min(int(limit), int(n)))
    count = -(-int(n) // limit)
    return -(-int(n) // count)


class LayerShape(NamedTuple):
    """What one example's per-example gradient of a layer holds in the factor engine.

    ``factored``: a Dense/Conv layer given by its factors, rows (``positions``, ``rows``) and errors
    (``positions``, ``cols``), ``floats`` their size (the layer input and output cotangent); otherwise the
    formed gradient (``floats`` = ``size``).
    """

    size: int
    factored: bool
    positions: int
    rows: int
    cols: int
    floats: int


def layer_shapes(task: Task, layers: Sequence[Layer], x, y) -> dict[str, LayerShape]:
    """:class:`LayerShape` per layer, from one abstract evaluation of the factor engine on one example."""
    key = ("layer_shapes", tuple(layer.name for layer in layers))

    def build():
        fn = per_example_grad_fn(task, layers, factored="all")
        sizes = {layer.name: layer.size for layer in layers}
        found = {}

        def probe(params, x1, y1):
            for name, g in fn(params, x1, y1).items():
                if isinstance(g, (OuterFactors, ConvFactors)):
                    a, d = g.rows(), g.errors()
                    own = g.a.size + g.d.size if isinstance(g, OuterFactors) else g.x.size + g.d.size
                    found[name] = LayerShape(sizes[name], True, a.shape[1], a.shape[2], d.shape[2], int(own))
                else:
                    found[name] = LayerShape(sizes[name], False, 1, sizes[name], 1, sizes[name])
            return jnp.zeros(())

        jax.eval_shape(probe, task.params, jax.ShapeDtypeStruct((1, *np.shape(x)[1:]), np.asarray(x).dtype),
                       jax.ShapeDtypeStruct((1, *np.shape(y)[1:]), np.asarray(y).dtype))
        return found

    return task.cached(key, build)


def factor_report(task: Task, layers: Sequence[Layer], x, y) -> dict[str, list[str]]:
    """For a measure's ``meta``: which layers the factor engine gave as factors (Dense/Conv: inputs and output
    cotangents, no per-example gradient formed) and which had their per-example gradients formed (the
    module's own vector-Jacobian product per example, or ``vmap(grad)``)."""
    shapes = layer_shapes(task, layers, x, y)
    return {"from_factors": [n for n, s in shapes.items() if s.factored],
            "formed": [n for n, s in shapes.items() if not s.factored]}


def factor_chunk_size(per_example_floats: int, n: int) -> int:
    """Examples per chunk when one example needs ``per_example_floats`` floats live, balanced over ``n``
    (:func:`balanced_chunk`); the budget is :func:`chunk_limits` of ``_CHUNK_FLOATS``."""
    floats, cap = chunk_limits(_CHUNK_FLOATS)
    return balanced_chunk(max(1, min(cap, floats // max(1, int(per_example_floats)))), n)


def sketch_floats(shapes: dict[str, LayerShape], dim: int) -> int:
    """Floats one example holds in :func:`sketch_grads`: its outputs, the factors (twice: the forward and
    backward activations beside them) and the largest layer's transient (formed gradient, or patches and
    count-sketches for the tensor route)."""
    out = sum(min(s.size, dim) for s in shapes.values())
    live = sum(s.floats for s in shapes.values())
    transient = 0
    for s in shapes.values():
        if s.size <= dim:
            transient = max(transient, s.size)
        elif s.factored and sketch_route(s.positions, s.rows, s.cols, dim) == "tensor":
            transient = max(transient, s.positions * (s.rows + 4 * dim))
        elif s.factored:  # rows (a Conv layer's patches) and the formed products
            transient = max(transient, s.positions * s.rows + 2 * s.size)
        else:
            transient = max(transient, 2 * s.size)
    return out + 2 * live + transient


def sketch_chunk_size(task: Task, layers: Sequence[Layer], dim: int, x, y, n: int | None = None) -> int:
    """Default examples per chunk of :func:`sketch_grads` for ``n`` rows (default ``len(x)``)."""
    n = int(np.shape(x)[0]) if n is None else int(n)
    return factor_chunk_size(sketch_floats(layer_shapes(task, layers, x, y), int(dim)), n)


def _check_chunk(chunk_size, n: int) -> int:
    if chunk_size is None:
        return n
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(min(chunk_size, n))


def map_chunks(fn: Callable, arrays: Sequence[np.ndarray], chunk_size: int, *, desc: str | None = None,
               progress: bool = False, extra=(), mesh=None) -> dict[str, np.ndarray]:
    """Apply ``fn(*extra, *chunk_arrays) -> {name: (chunk, ...)}`` over the leading axis.

    Every call sees exactly ``chunk_size`` rows (the last chunk is padded with
    copies of its first row and the padding dropped), so ``fn`` compiles once.
    Outputs are gathered on the host. With a mesh (given, or from an enclosing
    ``jaxleak.sharding.use_mesh`` block) the chunk is rounded up to a multiple
    of the device count, its rows are split over the devices and ``extra`` is
    replicated, so XLA partitions ``fn`` over the example axis.
    """
    mesh = sharding.resolve(mesh)
    if mesh is not None:
        chunk_size = sharding.round_chunk(chunk_size, mesh)
        extra = sharding.replicate(tuple(extra), mesh)
    n = int(arrays[0].shape[0])
    out: dict[str, np.ndarray] = {}
    starts = range(0, n, chunk_size)
    if progress and desc and len(starts) > 1:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="chunk", leave=False)
    for start in starts:
        stop = min(start + chunk_size, n)
        pad = chunk_size - (stop - start)
        batch = []
        for a in arrays:
            part = a[start:stop]
            if pad:
                part = np.concatenate([part, np.repeat(part[:1], pad, axis=0)], axis=0)
            batch.append(sharding.shard_rows(part, mesh))
        result = fn(*extra, *batch)
        if start == 0 and stop == n:  # one chunk: hand over the device buffers without a copy
            return {key: sharding.to_host(value)[:n] for key, value in result.items()}
        for key, value in result.items():
            value = sharding.to_host(value)
            if key not in out:
                out[key] = np.empty((n, *value.shape[1:]), value.dtype)
            out[key][start:stop] = value[: stop - start]
    return out


def check_finite(grads: dict[str, np.ndarray], what: str = "gradient") -> None:
    """Raise :class:`NonFiniteError` naming the first layer with NaN/Inf values."""
    for name, g in grads.items():
        if not np.all(np.isfinite(g)):
            rows = np.flatnonzero(~np.all(np.isfinite(g.reshape(g.shape[0], -1)), axis=1))
            raise NonFiniteError(
                f"the {what} of layer {name!r} is NaN or infinite for {rows.size} example(s) "
                f"(first: index {rows[0]}); check the inputs, the loss and the parameters"
            )


# ---------------------------------------------------------------- per-example gradients

def vmap_grad_fn(task: Task, layers: Sequence[Layer]) -> Callable:
    """Pure ``(params, x (B, ...), y (B,)) -> {layer: (B, P_l)}`` by vmap(grad) of one example's loss.

    The reference definition of per-example gradients (a batch-of-one
    gradient per example); works for any model, including NNX ones.
    """
    grad_one = jax.grad(task.example_loss)

    def one(params, x1, y1):
        return task.flatten(grad_one(params, x1, y1), layers)

    def fn(params, x, y):
        return jax.vmap(one, in_axes=(None, 0, 0))(params, x, y)

    return fn


def per_example_grad_fn(task: Task, layers: Sequence[Layer], *, method: str = "auto",
                        factored: bool | str = False, conv_patch_floats: int = 0) -> Callable:
    """Pure ``(params, x (B, ...), y (B,)) -> {layer: (B, P_l)}``: per-example gradients per layer.

    ``method='auto'`` (default) computes the gradients of the parameters of
    Linen leaf modules (Dense, Conv, GroupNorm, ... : modules that own their
    parameters directly) from ONE batched forward and backward pass: the
    backward pass gives the cotangent delta_b of each such module's output
    for every example b, and the module's per-example parameter gradient is
    the vector-Jacobian product of that module alone at (input_b, delta_b);
    for Dense this is the outer product a_b^T delta_b, for Conv a correlation
    of input and delta. Parameters the fast path cannot attribute to one leaf
    module call (NNX models, parameters read outside their module, modules
    with several array inputs or outputs) fall back to vmap(grad).
    ``method='vmap'`` uses vmap(grad) for everything (:func:`vmap_grad_fn`).

    Both are exact (the same quantity, float32 rounding aside) and
    differentiable, so measures can take jvps through them.

    ``factored=True`` (fast path only) returns the layers that are one plain
    Dense call (kernel and bias) as :class:`OuterFactors` (input and output
    cotangent) instead of the (B, P_l) outer products, for computations that
    only need inner products of the gradients with fixed vectors and their
    norms (:mod:`jaxleak.attacks`); other layers are arrays as before.
    ``factored='all'`` also returns plain Conv layers (kernel, with or
    without bias) as :class:`ConvFactors` (input, output cotangent, geometry).

    ``conv_patch_floats`` > 0: a Conv layer's per-example kernel gradient
    whose patch matrix (examples x output positions x kernel taps x input
    channels) has at most that many floats is one batched product of the
    patch matrix with the output cotangents, instead of one product per
    kernel tap. Worth it when the gradients are differentiated again
    (inversion attacks: about 1.5x faster per step for 8 restarts of LeNet,
    whose second-order pass through 25 strided views is slow); for plain
    per-example gradients the taps were faster (LeNet 8x8, B = 256: 16 ms
    against 20 ms), so 0 (never) is the default.
    """
    if method == "vmap":
        return vmap_grad_fn(task, layers)
    if method != "auto":
        raise InputError(f"method must be 'auto' or 'vmap', got {method!r}")
    return _fast_grad_fn(task, layers, factored=factored, patch_floats=conv_patch_floats)


# The fast path. Three passes over the model's Python code, all at trace
# time and all under one Flax method interceptor that numbers every
# intercepted method call in call order:
#  1. discovery: which calls are leaf-module calls with one batched array
#     input and output, and which parameter leaves they own;
#  2. check: those calls are replaced by zeros; a parameter leaf that is
#     still read somewhere (tied weights, parameters read by a parent) loses
#     the fast path, and so does every call that owns it;
#  3. run: a zero "perturbation" is added to the output of each fast call and
#     the gradient of the summed loss with respect to the perturbations is
#     the per-example output cotangent (examples do not interact, so the
#     cotangent of example b is the gradient of loss_b alone).


class _Call(NamedTuple):
    """One fast leaf-module call: its module (unbound), owned leaves by name, other collections."""

    module: object
    method: str
    leaves: dict
    other: dict
    out_shape: tuple
    out_dtype: object


class _Guard:
    """Switches the interceptor off while jaxleak itself runs a module."""

    active = False


def _leaf_module_params(module, leaf_ids: dict) -> dict | None:
    """``{param name: leaf index}`` if ``module`` owns only direct params that are leaves of the task."""
    try:
        variables = module.variables
    except Exception:  # noqa: BLE001 - unbound or mid-setup modules are not leaf calls
        return None
    params = variables.get("params") if hasattr(variables, "get") else None
    if not params:
        return None
    owned = {}
    for name, value in params.items():
        idx = leaf_ids.get(id(value))
        if idx is None:
            return None
        owned[name] = idx
    return owned


def _discover(task: Task, params, x) -> list:
    """Pass 1 and 2: per intercepted call, a :class:`_Call` for fast calls or None."""
    from flax import linen as nn

    batch = x.shape[0]
    plan: list = []

    def probe(params, x):
        leaves = jax.tree.leaves(params)
        leaf_ids = {id(leaf): i for i, leaf in enumerate(leaves)}

        def interceptor(next_fun, args, kwargs, context):
            if _Guard.active:
                return next_fun(*args, **kwargs)
            k = len(plan)
            plan.append(None)
            owned = _leaf_module_params(context.module, leaf_ids)
            simple = (owned and len(args) == 1 and not kwargs and isinstance(args[0], jax.Array)
                      and args[0].ndim >= 1 and args[0].shape[0] == batch)
            out = next_fun(*args, **kwargs)
            if simple and isinstance(out, jax.Array) and out.ndim >= 1 and out.shape[0] == batch:
                other = {c: v for c, v in context.module.variables.items() if c != "params"}
                plan[k] = _Call(context.module.clone(parent=None), context.method_name, owned, other,
                                tuple(out.shape), out.dtype)
            return out

        with nn.intercept_methods(interceptor):
            return task.apply_fn(params, x)

    jax.eval_shape(probe, params, x)
    fast = [c for c in plan if c is not None]
    if not fast:
        return plan
    n_calls = len(plan)

    def check(params, x):
        calls = iter(range(n_calls))

        def interceptor(next_fun, args, kwargs, context):
            if _Guard.active:
                return next_fun(*args, **kwargs)
            call = plan[next(calls)]
            if call is None:
                return next_fun(*args, **kwargs)
            return jnp.zeros(call.out_shape, call.out_dtype)

        with nn.intercept_methods(interceptor):
            return task.apply_fn(params, x)

    closed = jax.make_jaxpr(check)(params, x)
    n_leaves = len(jax.tree.leaves(params))
    read = _leaves_read(closed.jaxpr, n_leaves)
    owners: dict[int, int] = collections.Counter(i for c in fast for i in c.leaves.values())
    bad = {i for i in owners if i in read}
    return [None if c is None or any(i in bad for i in c.leaves.values()) else c for c in plan]


def _leaves_read(jaxpr, n_leaves: int) -> set[int]:
    """Indices of the first ``n_leaves`` inputs of ``jaxpr`` that any equation reads."""
    tracked = {v: i for i, v in enumerate(jaxpr.invars[:n_leaves])}
    read = {tracked[v] for v in jaxpr.outvars if isinstance(v, jex.core.Var) and v in tracked}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if isinstance(v, jex.core.Var) and v in tracked:
                read.add(tracked[v])
    return read


def _same_dtype(module, a, leaves) -> bool:
    """The module computes in its input's float dtype and its parameters have that dtype too."""
    return (jnp.issubdtype(a.dtype, jnp.floating) and module.dtype in (None, a.dtype)
            and all(leaf.dtype == a.dtype for leaf in leaves))


def _is_plain_dense(call: _Call, leaves: list, a) -> bool:
    from flax import linen as nn

    module = call.module
    return (type(module) is nn.Dense and module.dot_general is None and module.dot_general_cls is None
            and _same_dtype(module, a, [leaves[i] for i in call.leaves.values()]))


def _conv_taps_config(call: _Call, leaves: list, a):
    """(kernel size, strides, dilation, explicit padding) when a Conv call can use the tap formula, else None."""
    from flax import linen as nn
    from flax.linen.linear import canonicalize_padding

    module = call.module
    if type(module) is not nn.Conv or not _same_dtype(module, a, [leaves[i] for i in call.leaves.values()]):
        return None
    if (module.mask is not None or module.feature_group_count != 1 or module.conv_general_dilated is not None
            or module.conv_general_dilated_cls is not None or module.precision is not None):
        return None
    size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    if a.ndim != len(size) + 2:
        return None

    def per_dim(v):
        v = 1 if v is None else v
        return (v,) * len(size) if isinstance(v, int) else tuple(v)

    strides, lhs_dil, rhs_dil = per_dim(module.strides), per_dim(module.input_dilation), per_dim(module.kernel_dilation)
    if any(d != 1 for d in lhs_dil):
        return None
    padding = canonicalize_padding(module.padding, len(size))
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            return None
        dilated = [(k - 1) * d + 1 for k, d in zip(size, rhs_dil)]
        padding = jax.lax.padtype_to_pads(a.shape[1:-1], dilated, strides, padding)
    return size, strides, rhs_dil, tuple(tuple(p) for p in padding)


def _conv_kernel_grads(a, delta, config, patch_floats: int = 0):
    """Per-example Conv kernel gradient (B, *kernel_size, C_in, C_out) from kernel-tap views of the input.

    For tap t, grad[b, t] = sum_p a_b(p * stride + t * dilation)^T delta_b(p),
    on a strided view of the padded input: one batched matrix product of all
    taps' views (the patch matrix) with delta when that matrix has at most
    ``patch_floats`` floats, else one product per tap (no patch matrix).
    """
    size, strides, dil, padding = config
    a = jnp.pad(a, ((0, 0), *padding, (0, 0)))
    views = _tap_views(a, size, strides, dil, delta.shape[1:-1])
    b, c, o = a.shape[0], a.shape[-1], delta.shape[-1]
    positions = int(np.prod(delta.shape[1:-1]))
    if b * positions * len(views) * c <= patch_floats:
        # one batched product of the patch matrix (B, positions, taps * C_in) with delta
        patches = jnp.stack(views, axis=-2).reshape(b, positions, len(views) * c)
        grad = jnp.einsum("bpk,bpo->bko", patches, delta.reshape(b, positions, o))
        return grad.reshape(b, *size, c, o)
    taps = [jnp.einsum("b...c,b...o->bco", view, delta) for view in views]
    return jnp.stack(taps, axis=1).reshape(b, *size, c, o)


def _tap_views(padded: jax.Array, size, strides, dil, out_sp) -> list[jax.Array]:
    """For each kernel tap (row-major), the strided view (N, *out_sp, C) of a padded input that it meets."""
    views = []
    for tap in np.ndindex(*size):
        start = (0, *(t * d for t, d in zip(tap, dil)), 0)
        limit = (padded.shape[0], *(b + (o - 1) * s + 1 for b, o, s in zip(start[1:-1], out_sp, strides)),
                 padded.shape[-1])
        views.append(jax.lax.slice(padded, start, limit, (1, *strides, 1)))
    return views


def _module_grads(call: _Call, leaves: list, a: jax.Array, delta: jax.Array,
                  patch_floats: int = 0) -> dict[int, jax.Array]:
    """Per-example gradients ``{leaf index: (B, *shape)}`` of one module call from inputs and output cotangents."""
    module = call.module
    names = call.leaves
    if _is_plain_dense(call, leaves, a):
        a2 = a.reshape(a.shape[0], -1, a.shape[-1])
        d2 = delta.reshape(delta.shape[0], -1, delta.shape[-1])
        out = {names["kernel"]: _outer(a2, d2)}
        if "bias" in names:
            out[names["bias"]] = d2.sum(axis=1)
        return out
    config = _conv_taps_config(call, leaves, a)
    if config is not None:
        out = {names["kernel"]: _conv_kernel_grads(a, delta, config, patch_floats)}
        if "bias" in names:
            out[names["bias"]] = delta.sum(axis=tuple(range(1, delta.ndim - 1)))
        return out

    own = {name: leaves[i] for name, i in names.items()}

    def one(a_b, d_b):
        def apply(p):
            _Guard.active = True
            try:
                return module.apply({"params": p, **call.other}, a_b[None], method=call.method)
            finally:
                _Guard.active = False

        _, vjp = jax.vjp(apply, own)
        return vjp(d_b[None])[0]

    g = jax.vmap(one)(a, delta)
    return {i: g[name] for name, i in names.items()}


def _outer(a2: jax.Array, d2: jax.Array) -> jax.Array:
    """sum_m a2[b, m, :] outer d2[b, m, :]: (B, M, I), (B, M, O) -> (B, I, O).

    Written as a dot_general even for M = 1 (no contraction): its derivative
    with respect to a2 or d2 is then a batched matrix-vector product, where a
    broadcast multiply would differentiate into a strided multiply-and-reduce
    that XLA's CPU backend runs several times slower (this matters when the
    per-example gradients are themselves differentiated, as in inversion
    attacks).
    """
    if a2.shape[1] == 1:
        return jnp.einsum("bi,bo->bio", a2[:, 0], d2[:, 0])
    return jnp.einsum("bmi,bmo->bio", a2, d2)


class OuterFactors(NamedTuple):
    """A Dense layer's per-example gradients in factored form (see ``per_example_grad_fn(factored=True)``).

    The flat gradient of example b ([bias, kernel], as ``task.flatten``
    orders them) is ``sum_m outer(a[b, m], d[b, m]).reshape(-1)``: ``a`` is
    the layer input with a leading 1 (for the bias), (B, M, 1 + I), and
    ``d`` the cotangent of its output, (B, M, O); M = 1 unless the layer is
    applied to a sequence or feature map.
    """

    a: jax.Array
    d: jax.Array

    def materialize(self) -> jax.Array:
        """The flat per-example gradients (B, (1 + I) O)."""
        return _outer(self.a, self.d).reshape(self.a.shape[0], -1)

    def rows(self, constant: float = 1.0) -> jax.Array:
        """Input rows (B, M, R), R = 1 + I (column 0 is the bias's 1, or 0 in a tangent, whatever ``constant``)."""
        return self.a

    def errors(self) -> jax.Array:
        """Output cotangents (B, M, O)."""
        return self.d


@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "d"],
                   meta_fields=["config", "bias", "kernel"])
@dataclasses.dataclass(frozen=True)
class ConvFactors:
    """A Conv layer's per-example gradients in factored form: its input, its output cotangent and its geometry.

    The flat gradient of example b ([bias,] kernel, as ``task.flatten`` orders them) is
    ``sum_m outer(rows[b, m], errors[b, m]).reshape(-1)`` with ``rows`` the kernel-tap patches of the input
    (a leading 1 for the bias): :meth:`rows` forms that patch matrix (B, M, R); :meth:`materialize` forms the
    gradient from strided tap views without it.
    """

    x: jax.Array
    d: jax.Array
    config: tuple
    bias: bool
    kernel: bool = True

    def rows(self, constant: float = 1.0) -> jax.Array:
        """The kernel-tap patches (B, M, R), with a ``constant`` column first for the bias (0 for a tangent)."""
        b, m = self.x.shape[0], int(np.prod(self.d.shape[1:-1]))
        parts = [jnp.full((b, m, 1), constant, self.x.dtype)] if self.bias else []
        if self.kernel:
            size, strides, dil, padding = self.config
            padded = jnp.pad(self.x, ((0, 0), *padding, (0, 0)))
            views = _tap_views(padded, size, strides, dil, self.d.shape[1:-1])
            parts.append(jnp.stack(views, axis=-2).reshape(b, m, -1))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def errors(self) -> jax.Array:
        return self.d.reshape(self.d.shape[0], -1, self.d.shape[-1])

    def materialize(self) -> jax.Array:
        b = self.x.shape[0]
        parts = [self.d.sum(axis=tuple(range(1, self.d.ndim - 1)))] if self.bias else []
        if self.kernel:
            parts.append(_conv_kernel_grads(self.x, self.d, self.config).reshape(b, -1))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def _layer_parts(call: _Call, layer: Layer, subset: bool) -> tuple[bool, bool] | None:
    """(bias, kernel): which of a Dense/Conv call's two tensors the layer holds, in the order ``task.flatten``
    concatenates them (bias first), or None. ``subset=False`` asks for both (the whole module)."""
    names = call.leaves
    if "kernel" not in names or not set(names) <= {"bias", "kernel"}:
        return None
    want = [n for n in ("bias", "kernel") if n in names and names[n] in layer.leaves]
    if not want or layer.leaves != tuple(names[n] for n in want):
        return None
    if not subset and want != ["bias", "kernel"]:
        return None
    return "bias" in want, "kernel" in want


def factored_sq_norms(g: OuterFactors | ConvFactors) -> jax.Array:
    """||g_b||^2 per example (B,) of a factored gradient without forming it where that is cheaper (the ghost
    norm, sum_st (A A^T)_st (E E^T)_st over T output positions); otherwise from the formed gradient (a Conv
    layer's from its input's tap views, no patch matrix)."""
    a, e = g.rows(), g.errors()
    t, na, nd = a.shape[1], a.shape[2], e.shape[2]
    if t * (na + nd) <= na * nd:
        return jnp.sum(jnp.einsum("bsa,bta->bst", a, a) * jnp.einsum("bsd,btd->bst", e, e), axis=(1, 2))
    return jnp.sum(jnp.square(g.materialize()), axis=1)


def _dense_layer_factors(call: _Call, leaves: list, layer: Layer, a: jax.Array,
                         delta: jax.Array, subset: bool = False) -> OuterFactors | None:
    """A Dense layer's per-example gradients [bias, kernel] as :class:`OuterFactors`, or None.

    Prepending a constant 1 to the input makes row 0 of the outer product the
    bias gradient, so the layer vector is one outer product, with no concatenation.
    ``subset``: a layer may hold the bias or the kernel alone (``granularity='tensor'``).
    """
    parts = _layer_parts(call, layer, subset)
    if parts is None or not _is_plain_dense(call, leaves, a):
        return None
    a2 = a.reshape(a.shape[0], -1, a.shape[-1])
    d2 = delta.reshape(delta.shape[0], -1, delta.shape[-1])
    rows = ([jnp.ones_like(a2[..., :1])] if parts[0] else []) + ([a2] if parts[1] else [])
    return OuterFactors(rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=-1), d2)


def _conv_layer_factors(call: _Call, leaves: list, layer: Layer, a: jax.Array,
                        delta: jax.Array) -> ConvFactors | None:
    """A Conv layer's per-example gradients ([bias,] [kernel]) as :class:`ConvFactors`, or None."""
    parts = _layer_parts(call, layer, True)
    if parts is None:
        return None
    config = _conv_taps_config(call, leaves, a)
    if config is None:
        return None
    return ConvFactors(a, delta, config, *parts)


def _fast_grad_fn(task: Task, layers: Sequence[Layer], factored: bool | str = False,
                  patch_floats: int = 0) -> Callable:
    from flax import linen as nn

    wanted = sorted({i for layer in layers for i in layer.leaves})

    def fn(params, x, y):
        plan = _discover(task, params, x)
        leaves = jax.tree.leaves(params)
        treedef = jax.tree.structure(params)
        batch = x.shape[0]
        want = set(wanted)
        # Only calls that own a requested leaf get a perturbation.
        active = [c is not None and any(i in want for i in c.leaves.values()) for c in plan]
        eps = [jnp.zeros(c.out_shape, c.out_dtype) if on else None for c, on in zip(plan, active)]

        def total_loss(eps):
            inputs = [None] * len(plan)
            calls = iter(range(len(plan)))

            def interceptor(next_fun, args, kwargs, context):
                if _Guard.active:
                    return next_fun(*args, **kwargs)
                k = next(calls)
                out = next_fun(*args, **kwargs)
                if not active[k]:
                    return out
                inputs[k] = args[0]
                return out + eps[k]

            with nn.intercept_methods(interceptor):
                logits = task.apply_fn(params, x)
            return jnp.sum(task.loss_fn(logits, y)), inputs

        per_leaf: dict[int, jax.Array] = {}
        flat: dict[str, jax.Array] = {}
        if any(active):
            deltas, inputs = jax.grad(_fast_pooling(total_loss), has_aux=True)(eps)
            owners = collections.Counter(i for k, c in enumerate(plan) if active[k] for i in c.leaves.values())
            call_of = {i: k for k, c in enumerate(plan) if active[k] for i in c.leaves.values()}
            subset = factored == "all"
            for layer in layers:
                ks = {call_of.get(i) for i in layer.leaves}
                if len(ks) == 1 and None not in ks and all(owners[i] == 1 for i in layer.leaves):
                    k = ks.pop()
                    g = _dense_layer_factors(plan[k], leaves, layer, inputs[k], deltas[k], subset)
                    if g is None and subset:
                        g = _conv_layer_factors(plan[k], leaves, layer, inputs[k], deltas[k])
                    if g is not None:
                        flat[layer.name] = g if factored else g.materialize()
            covered = {i for layer in layers if layer.name in flat for i in layer.leaves}
            for k, c in enumerate(plan):  # a call whose every tensor is factored needs no module gradient
                if active[k] and set(c.leaves.values()) <= covered:
                    active[k] = False
            for k, call in enumerate(plan):
                if not active[k]:
                    continue
                for i, g in _module_grads(call, leaves, inputs[k], deltas[k], patch_floats).items():
                    per_leaf[i] = per_leaf[i] + g if i in per_leaf else g
        done = {i for layer in layers if layer.name in flat for i in layer.leaves}
        rest = [i for i in wanted if i not in per_leaf and i not in done]
        if rest:
            def loss_rest(sub, x1, y1):
                full = list(leaves)
                for i, v in zip(rest, sub):
                    full[i] = v
                return task.example_loss(jax.tree.unflatten(treedef, full), x1, y1)

            sub = [leaves[i] for i in rest]
            g = jax.vmap(jax.grad(loss_rest), in_axes=(None, 0, 0))(sub, x, y)
            per_leaf.update(zip(rest, g))
        return {
            layer.name: flat[layer.name] if layer.name in flat
            else jnp.concatenate([per_leaf[i].reshape(batch, -1) for i in layer.leaves], axis=1)
            for layer in layers
        }

    return fn


# ---------------------------------------------------------------- jaxpr rewrites

def _rewriting(fn: Callable, rules: dict[str, Callable]) -> Callable:
    """``fn`` traced to a jaxpr and re-evaluated equation by equation, with ``rules`` applied.

    ``rules[primitive name](invals, params)`` returns the equation's outputs
    (a list) or None to keep the equation as it is. Nested jit calls are
    inlined so that their equations are rewritten too.
    """

    def wrapped(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        out = _eval_jaxpr(closed.jaxpr, closed.consts, rules, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return wrapped


def _eval_jaxpr(jaxpr, consts, rules: dict[str, Callable], *args) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        rule = rules.get(eqn.primitive.name)
        outvals = rule(invals, eqn.params) if rule is not None else None
        if outvals is None:
            outvals = _eval_eqn(eqn, invals, rules)
        for v, val in zip(eqn.outvars, outvals):
            if not isinstance(v, jex.core.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn, invals: list, rules: dict[str, Callable]) -> list:
    if eqn.primitive.name in ("pjit", "jit", "closed_call") and "jaxpr" in eqn.params:
        inner = eqn.params["jaxpr"]
        if isinstance(inner, jex.core.ClosedJaxpr):
            return _eval_jaxpr(inner.jaxpr, inner.consts, rules, *invals)
        return _eval_jaxpr(inner, (), rules, *invals)
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        ans = eqn.primitive.bind(*invals, **params)
    return ans if eqn.primitive.multiple_results else [ans]


def _fast_pooling(fn: Callable) -> Callable:
    """``fn`` with every non-overlapping max pooling replaced by :func:`_block_max`.

    A ``reduce_window_max`` whose windows tile the input (window == stride,
    no padding or dilation) becomes a reshape-and-max with a mask-based
    derivative. The values are identical; only the derivative's
    implementation changes (XLA's CPU select-and-scatter expansion is slow).
    """

    def pool(invals, params):
        if not _tiles(params, invals[0].ndim):
            return None
        return [_block_max(invals[0], tuple(params["window_dimensions"]))]

    return _rewriting(fn, {"reduce_window_max": pool})


def canonical_convs(fn: Callable, *, patch_floats: int = 0) -> Callable:
    """``fn`` with every convolution in the layout XLA's CPU backend computes fast.

    XLA's CPU backend runs a convolution through its optimised (Eigen)
    kernels only in the layout input (batch, spatial..., feature), kernel
    (spatial..., in, out), output (batch, spatial..., feature), and it
    converts other layouts by transposes only in the outermost computation:
    inside a ``lax.scan`` or ``while`` body a convolution in another layout
    falls back to a naive loop, often 10-20x slower. Reverse-mode
    differentiation produces exactly such convolutions (the input gradient
    of a convolution uses the kernel with in and out swapped), so a jitted
    optimisation loop through a CNN (gradient inversion attacks) pays this on
    every step. The wrapper transposes the operands explicitly; the values
    are the same convolution. Apply it to the function that is evaluated,
    after all differentiation (it defines no derivative of its own beyond
    that of the primitives it emits).

    With ``patch_floats`` > 0, a convolution whose patch matrix (output
    positions x kernel taps x input channels) has at most that many floats
    is computed as ONE matrix product of the patches with the kernel
    instead. XLA's CPU convolutions are slow on the small feature maps of
    gradient inversion: a 5x5 kernel over a 4x4 map is rewritten by XLA
    into a convolution with swapped operands that runs in the slow layout,
    and batches of a few images gain little from batching. For 8 images
    inside a scan, a 5x5 convolution from 6 to 16 channels on a 4x4 map
    took 70 us as a convolution and 11 us as a patch product, one from 1
    to 6 channels on 8x8 maps 32 us and 12 us (2-core CPU); on maps of
    16x16 and more with many channels the two are close, so the attack
    uses patches only below 2^20 floats.
    """
    return _rewriting(fn, {"conv_general_dilated": functools.partial(_canonical_conv, patch_floats=patch_floats)})


def _canonical_conv(invals, params, patch_floats: int = 0):
    lhs, rhs = invals
    dn = params["dimension_numbers"]
    n = lhs.ndim
    canon = jax.lax.ConvDimensionNumbers(lhs_spec=(0, n - 1, *range(1, n - 1)),
                                         rhs_spec=(n - 1, n - 2, *range(0, n - 2)),
                                         out_spec=(0, n - 1, *range(1, n - 1)))
    if (not isinstance(dn, jax.lax.ConvDimensionNumbers)
            or params["feature_group_count"] != 1 or params["batch_group_count"] != 1):
        return None
    is_canonical = tuple(map(tuple, dn)) == tuple(map(tuple, canon))
    lhs_perm = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])
    rhs_perm = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])
    lhs_c, rhs_c = _transpose(lhs, lhs_perm), _transpose(rhs, rhs_perm)
    out = _patch_conv(lhs_c, rhs_c, params, patch_floats)
    if out is None:
        if is_canonical:
            return None
        out = jax.lax.conv_general_dilated_p.bind(lhs_c, rhs_c, **dict(params, dimension_numbers=canon))
    # out is (batch, spatial..., feature); put each axis where out_spec wants it.
    position = {dn.out_spec[0]: 0, dn.out_spec[1]: n - 1, **{a: 1 + i for i, a in enumerate(dn.out_spec[2:])}}
    return [_transpose(out, tuple(position[a] for a in range(n)))]


def _patch_conv(lhs: jax.Array, rhs: jax.Array, params: dict, patch_floats: int) -> jax.Array | None:
    """A canonical convolution (N, *S, I) x (*K, I, O) as patches @ kernel, or None where it does not apply.

    Applies without input dilation, in the operands' own dtype, and when the
    patch matrix has at most ``patch_floats`` elements.
    """
    if patch_floats <= 0 or any(d != 1 for d in params["lhs_dilation"]):
        return None
    if params.get("preferred_element_type") not in (None, lhs.dtype) or lhs.dtype != rhs.dtype:
        return None
    size, strides, dil = rhs.shape[:-2], tuple(params["window_strides"]), tuple(params["rhs_dilation"])
    spatial = [n + lo + hi for n, (lo, hi) in zip(lhs.shape[1:-1], params["padding"])]
    out_sp = tuple((p - d * (k - 1) - 1) // s + 1 for p, k, s, d in zip(spatial, size, strides, dil))
    taps = int(np.prod(size))
    if min(out_sp) < 1 or lhs.shape[0] * int(np.prod(out_sp)) * taps * lhs.shape[-1] > patch_floats:
        return None
    padded = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype),
                         ((0, 0, 0), *((lo, hi, 0) for lo, hi in params["padding"]), (0, 0, 0)))
    patches = jnp.stack(_tap_views(padded, size, strides, dil, out_sp), axis=-2).reshape(-1, taps * lhs.shape[-1])
    out = jnp.dot(patches, rhs.reshape(taps * rhs.shape[-2], rhs.shape[-1]), precision=params.get("precision"))
    return out.reshape(lhs.shape[0], *out_sp, rhs.shape[-1])


def _transpose(a: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    return a if perm == tuple(range(a.ndim)) else jnp.transpose(a, perm)


def _tiles(params: dict, ndim: int) -> bool:
    window = tuple(params["window_dimensions"])
    return (tuple(params["window_strides"]) == window and all(tuple(p) == (0, 0) for p in params["padding"])
            and all(d == 1 for d in params["base_dilation"]) and all(d == 1 for d in params["window_dilation"])
            and len(window) == ndim)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _block_max(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """Max over non-overlapping windows (trailing remainders dropped, like VALID pooling)."""
    return jnp.max(_blocks(x, window), axis=tuple(range(1, 2 * x.ndim, 2)))


def _blocks(x: jax.Array, window: tuple[int, ...]) -> jax.Array:
    """View x as (n_0, w_0, n_1, w_1, ...) with n_i = x.shape[i] // w_i."""
    n = [s // w for s, w in zip(x.shape, window)]
    x = jax.lax.slice(x, (0,) * x.ndim, tuple(a * w for a, w in zip(n, window)))
    return x.reshape(tuple(d for pair in zip(n, window) for d in pair))


@_block_max.defjvp
def _block_max_jvp(window, primals, tangents):
    (x,), (t,) = primals, tangents
    xb, tb = _blocks(x, window), _blocks(t, window)
    m = jnp.max(xb, axis=tuple(range(1, 2 * x.ndim, 2)))
    # The derivative follows the first maximum of each window in row-major
    # order, like XLA's select-and-scatter with a >= comparison.
    taken = jnp.zeros(m.shape, bool)
    out = jnp.zeros(m.shape, t.dtype)
    for offset in np.ndindex(*window):
        index = tuple(i for o in offset for i in (slice(None), o))
        hit = (xb[index] == m) & ~taken
        taken = taken | hit
        out = out + jnp.where(hit, tb[index], 0)
    return m, out


_SUM = "\0sum/"  # output key prefix of the row sums; no layer name starts with NUL


def _with_row_sums(g: dict[str, jax.Array]) -> dict:
    """Add each layer's per-example sums under _SUM + layer: a cheap finiteness witness.

    A row that holds NaN or Inf has a non-finite sum, so the host only scans
    the full gradients when some sum is not finite (to name the rows).
    """
    return {**g, **{_SUM + name: jnp.sum(v, axis=tuple(range(1, v.ndim))) for name, v in g.items()}}


def _check_row_sums(out: dict, what: str = "gradient") -> dict[str, np.ndarray]:
    sums = {key[len(_SUM):]: out.pop(key) for key in [k for k in out if k.startswith(_SUM)]}
    if not all(np.all(np.isfinite(s)) for s in sums.values()):
        check_finite(out, what)
    return out


def _compiled_layer_grads(task: Task, layers: Sequence[Layer], method: str = "auto") -> Callable:
    key = ("layer_grads", tuple(layer.name for layer in layers), method)

    def build():
        inner = per_example_grad_fn(task, layers, method=method)

        def traced(params, x, y):
            TRACE_COUNTS[key] += 1
            return _with_row_sums(inner(params, x, y))

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


def layer_grads(task: Task, x, y, *, chunk_size: int | None = None, layers: Sequence[str] | None = None,
                progress: bool = False, mesh=None, method: str = "auto") -> dict[str, np.ndarray]:
    """Per-example gradients of every layer: ``{layer: (N, P_l)}`` in forward order.

    g(x, y) = grad_W loss(f(x; W), y) (docs/method.md section 1), flattened per layer
    (kernel and bias of a module together). Computed by the jitted
    :func:`per_example_grad_fn` (``method='auto'``: one batched backward pass
    plus per-module outer products; ``'vmap'``: vmap(grad)), ``chunk_size``
    examples at a time (default :func:`default_chunk_size`: one chunk's
    gradients near 16 MiB on the CPU, a fraction of the free device memory on
    a GPU or TPU); results are gathered on the host as float32.
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    chunk = _check_chunk(chunk_size, x.shape[0]) if chunk_size else default_chunk_size(task, sel, x.shape[0])
    fn = _compiled_layer_grads(task, sel, method)
    grads = map_chunks(fn, [x, y], chunk, desc="per-example gradients", progress=progress, extra=(task.params,),
                       mesh=mesh)
    grads = _check_row_sums(grads)
    return {layer.name: grads[layer.name] for layer in sel}


# ---------------------------------------------------------------- sketches

class CountSketch(NamedTuple):
    """The sketch of one layer, a count-sketch whose hash is a TensorSketch of the layer's matrix view.

    The layer's flat vector is viewed as a matrix (R, C), index r C + c, with C the last axis its tensors
    share (a Dense or Conv layer's output channels, its bias row first); coordinate (r, c) goes to bucket
    (h1[r] + h2[c]) mod dim with sign s1[r] s2[c] (Pham and Pagh's TensorSketch). Inner products are
    preserved in expectation; the sketch of a sum over positions of outer products a_m ⊗ d_m is the sum of
    circular convolutions of the two factors' count-sketches, so a factored layer is sketched without
    forming its gradient (:func:`tensor_sketch`). Stored as the four factor vectors, never as a P_l x dim
    matrix; a layer whose tensors share no last axis has C = 1 (a plain count-sketch of its R = P_l entries).
    """

    row_buckets: jax.Array
    row_signs: jax.Array
    col_buckets: jax.Array
    col_signs: jax.Array
    dim: int

    @property
    def buckets(self) -> jax.Array:
        """Bucket of every flat coordinate (P_l,)."""
        return ((self.row_buckets[:, None] + self.col_buckets[None, :]) % self.dim).reshape(-1)

    @property
    def signs(self) -> jax.Array:
        """Sign of every flat coordinate (P_l,)."""
        return (self.row_signs[:, None] * self.col_signs[None, :]).reshape(-1)


def matrix_view(layer: Layer) -> tuple[int, int]:
    """(R, C): a layer's flat vector as R rows of the C entries of the last axis all its tensors share (else C = 1)."""
    lasts = {shape[-1] if shape else 1 for shape in layer.shapes}
    c = lasts.pop() if len(lasts) == 1 else 1
    return layer.size // c, c


def _check_dim(dim) -> None:
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
        raise InputError(f"sketch dim must be a positive integer, got {dim!r}")


def make_sketches(layers: Sequence[Layer], dim: int, seed: int) -> dict[str, CountSketch | None]:
    """One independent sketch per layer larger than ``dim`` (None for the others)."""
    _check_dim(dim)
    sketched = tuple((i, matrix_view(layer)) for i, layer in enumerate(layers) if layer.size > dim)
    arrays = dict(zip((i for i, _ in sketched), _sketch_arrays(sketched, int(dim), jax.random.key(seed))))
    return {layer.name: CountSketch(*arrays[i], dim=int(dim)) if i in arrays else None
            for i, layer in enumerate(layers)}


@compilation.jit(key="tensor_sketch_arrays", static_argnames=("sketched", "dim"))
def _sketch_arrays(sketched: tuple[tuple[int, tuple[int, int]], ...], dim: int, root) -> list:
    """(row buckets, row signs, column buckets, column signs) of the sketch of each (layer index, (R, C)),
    from ``fold_in(root, index)``. One program for all layers."""
    out = []
    for i, (r, c) in sketched:
        kr, ksr, kc, ksc = jax.random.split(jax.random.fold_in(root, i), 4)
        out.append((jax.random.randint(kr, (r,), 0, dim, dtype=jnp.int32),
                    jax.random.rademacher(ksr, (r,), dtype=jnp.float32),
                    jax.random.randint(kc, (c,), 0, dim, dtype=jnp.int32),
                    jax.random.rademacher(ksc, (c,), dtype=jnp.float32)))
    return out


def apply_sketch(sketch: CountSketch | None, g: jax.Array) -> jax.Array:
    """Sketch rows of ``g`` (B, P_l) -> (B, dim); identity when ``sketch`` is None.

    The scatter runs along the leading axis of (P_l, B) into (dim, B): each parameter adds a contiguous row
    of B values (on the 2-core CPU about 10x faster than scattering columns of the (B, P_l) layout, with the
    same sums in the same order).
    """
    if sketch is None:
        return g
    return _scatter_rows((g * sketch.signs.astype(g.dtype)).T, sketch.buckets, sketch.dim).T


def _scatter_rows(rows: jax.Array, buckets: jax.Array, dim: int) -> jax.Array:
    """(K, N) -> (dim, N): row k added to row ``buckets[k]``; each coordinate's N values are one contiguous row."""
    return jnp.zeros((dim, rows.shape[1]), rows.dtype).at[buckets].add(rows)


def _count_sketch_rows(v: jax.Array, buckets: jax.Array, signs: jax.Array, dim: int) -> jax.Array:
    """Count-sketch of the last axis of ``v`` (..., K) -> (dim, prod(...)), laid out for a leading-axis scatter."""
    return _scatter_rows((v * signs.astype(v.dtype)).reshape(-1, v.shape[-1]).T, buckets, dim)


def tensor_sketch(sketch: CountSketch, a: jax.Array, d: jax.Array) -> jax.Array:
    """The sketch of sum_m a[b, m] ⊗ d[b, m] (rows R, columns C) for every example: (B, M, R), (B, M, C) -> (B, dim).

    sum_m IFFT(FFT(S1 a_m) FFT(S2 d_m)): the circular convolution of the two count-sketches is the count-sketch
    with buckets (h1 + h2) mod dim and signs s1 s2, the same numbers :func:`apply_sketch` gives for the formed
    gradient, without a (B, R C) array.
    """
    b, m, _ = a.shape
    dim = sketch.dim
    fa = jnp.fft.rfft(_count_sketch_rows(a, sketch.row_buckets, sketch.row_signs, dim), axis=0)
    fd = jnp.fft.rfft(_count_sketch_rows(d, sketch.col_buckets, sketch.col_signs, dim), axis=0)
    prod = (fa * fd).reshape(-1, b, m).sum(axis=-1)
    return jnp.fft.irfft(prod, n=dim, axis=0).T.astype(a.dtype)


def formed_sketch(sketch: CountSketch, a: jax.Array, d: jax.Array) -> jax.Array:
    """The same numbers as :func:`tensor_sketch` by forming the gradient: the signed factors' products laid out
    (R, C, B), so each parameter's B values are one contiguous row of the scatter (no transpose, no sign pass)."""
    b = a.shape[0]
    g = jnp.einsum("bmr,bmc->rcb", a * sketch.row_signs.astype(a.dtype), d * sketch.col_signs.astype(d.dtype))
    return _scatter_rows(g.reshape(-1, b), sketch.buckets, sketch.dim).T


# Cost per example of the two ways to sketch a factored layer, in ns on the 2-core CPU (fitted on Dense and
# Conv shapes from LeNet to ResNet-18): a float multiply-add in a batched product, one scattered element, one
# unit of n log2 n of a real FFT of length n.
_COST_FLOP, _COST_SCATTER, _COST_FFT = 0.02, 1.7, 0.5


def sketch_route(positions: int, rows: int, cols: int, dim: int) -> str:
    """'tensor' (FFTs of the factors' count-sketches) or 'form' (the formed gradient's count-sketch), cheaper first."""
    form = _COST_FLOP * 2 * positions * rows * cols + _COST_SCATTER * rows * cols
    log = max(1.0, float(np.log2(dim)))
    tensor = _COST_SCATTER * positions * (rows + cols) + _COST_FFT * (2 * positions + 1) * dim * log
    return "tensor" if tensor < form else "form"


def _compiled_sketch_grads(task: Task, layers: Sequence[Layer], dim: int, seed: int, route: str = "auto") -> Callable:
    """Jitted ``(params, x, y) -> {layer: (B, min(P_l, dim))}``.

    Dense and Conv layers come from their factors (:class:`OuterFactors`, :class:`ConvFactors`): through
    :func:`tensor_sketch` or by forming the gradient and scattering it, whichever :func:`sketch_route` prices
    lower for the layer's shape (``route`` forces one, for tests); both give the same numbers. Other layers
    are formed and scattered.
    """
    key = ("sketch_grads", tuple(layer.name for layer in layers), dim, seed, route)

    def build():
        sketches = make_sketches(layers, dim, seed)
        grads = per_example_grad_fn(task, layers, factored="all")

        def one(name, g):
            sketch = sketches[name]
            if isinstance(g, (OuterFactors, ConvFactors)):
                if sketch is not None:
                    a, d = g.rows(), g.errors()
                    chosen = route if route != "auto" else sketch_route(a.shape[1], a.shape[2], d.shape[2], dim)
                    return tensor_sketch(sketch, a, d) if chosen == "tensor" else formed_sketch(sketch, a, d)
                g = g.materialize()
            return apply_sketch(sketch, g)

        def traced(params, x, y):
            TRACE_COUNTS[key] += 1
            return {name: one(name, v) for name, v in grads(params, x, y).items()}

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


def sketch_grads(task: Task, x, y, *, dim: int = 1024, seed: int = 0, chunk_size: int | None = None,
                 layers: Sequence[str] | None = None, progress: bool = False, mesh=None) -> dict[str, np.ndarray]:
    """Per-example gradients reduced to at most ``dim`` features per layer: ``{layer: (N, min(P_l, dim))}``.

    Layers with P_l <= dim come back whole; larger ones through a fixed
    sketch (:class:`CountSketch`: a count-sketch with a TensorSketch hash, one
    per layer, derived from ``seed``), applied inside the jitted chunk so that
    the N x P_l gradients of a large layer never exist; Dense and Conv layers
    are sketched from their factors where that is cheaper
    (:func:`tensor_sketch`). Inner products are preserved in expectation.
    The default chunk is sized from what one example holds
    (:func:`sketch_chunk_size`).
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    _check_dim(dim)
    chunk = (_check_chunk(chunk_size, x.shape[0]) if chunk_size
             else sketch_chunk_size(task, sel, int(dim), x, y))
    fn = _compiled_sketch_grads(task, sel, int(dim), int(seed))
    out = map_chunks(fn, [x, y], chunk, desc="sketched gradients", progress=progress, extra=(task.params,),
                     mesh=mesh)
    check_finite(out)
    return {layer.name: out[layer.name] for layer in sel}


# ---------------------------------------------------------------- client updates

class ClientUpdates(NamedTuple):
    """Shared updates u(S) per layer, ``{layer: (M, P_l)}``, and each update's victim index into x."""

    updates: dict[str, np.ndarray]
    victims: np.ndarray


def client_batches(n: int, *, batch_size: int, num_updates: int, seed: int = 0) -> np.ndarray:
    """Example indices of each client batch (M, B); column 0 is the victim.

    Victims are the first M entries of seeded permutations of range(n) (a new
    permutation each time n is used up); the other B - 1 members are drawn
    without replacement from the remaining examples.
    """
    if batch_size < 1 or batch_size > n:
        raise InputError(f"batch_size must be in [1, {n}] (the number of examples), got {batch_size}")
    if num_updates < 1:
        raise InputError(f"num_updates must be >= 1, got {num_updates}")
    key = jax.random.key(seed)
    k_victims, k_members = jax.random.split(key)
    rounds = -(-num_updates // n)
    victims = jnp.concatenate(
        [jax.random.permutation(jax.random.fold_in(k_victims, r), n) for r in range(rounds)]
    )[:num_updates]

    def members(k, v):
        others = jax.random.choice(k, n - 1, (batch_size - 1,), replace=False)
        others = others + (others >= v)  # skip the victim
        return jnp.concatenate([v[None], others])

    keys = jax.random.split(k_members, num_updates)
    return np.asarray(jax.vmap(members)(keys, victims), dtype=np.int64)


def mean_loss_grad(loss: Callable) -> Callable:
    """``jax.grad(loss)`` (in its first argument) with non-overlapping max pooling differentiated as in the factor
    engine (:func:`_fast_pooling`: the first maximum of a window), so that second derivatives through a client's
    update agree with those of the per-example gradients where a window holds a tie (constant image regions)."""
    return jax.grad(_fast_pooling(loss))


def local_sgd_update(grad_loss: Callable, params, x, y, lr, local_steps: int):
    """The client update (W0 - W_K) / (K lr) of K local SGD steps on (x, y): exactly the mean of the K gradients."""

    def step(carry, _):
        p, acc = carry
        g = grad_loss(p, x, y)
        p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
        return (p, jax.tree.map(jnp.add, acc, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (_, total), _ = jax.lax.scan(step, (params, zeros), None, length=local_steps)
    return jax.tree.map(lambda t: t / local_steps, total)


def _compiled_updates(task: Task, layers: Sequence[Layer], local_steps: int, sketch_dim: int | None,
                      sketch_seed: int) -> Callable:
    key = ("client_updates", tuple(layer.name for layer in layers), local_steps, sketch_dim, sketch_seed)

    def build():
        sketches = make_sketches(layers, sketch_dim, sketch_seed) if sketch_dim else {}
        grad_loss = mean_loss_grad(task.loss)

        def one_update(params, lr, xb, yb):
            return task.flatten(local_sgd_update(grad_loss, params, xb, yb, lr, local_steps), layers)

        def traced(params, lr, xb, yb):
            TRACE_COUNTS[key] += 1
            u = jax.vmap(one_update, in_axes=(None, None, 0, 0))(params, lr, xb, yb)
            return {name: apply_sketch(sketches.get(name), v) for name, v in u.items()}

        return compilation.jit(traced, key=task.program_key(key), fast_compile=task.fast_compile)

    return task.cached(key, build)


def check_local_sgd(local_steps, lr) -> None:
    """Validate the local SGD settings of a client update (K >= 1 steps, learning rate > 0)."""
    if not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
        raise InputError(f"local_steps must be a positive integer, got {local_steps!r}")
    if not np.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a positive number, got {lr!r}")


def client_updates(task: Task, x, y, *, batch_size: int, local_steps: int = 1, lr: float = 0.1,
                   num_updates: int, seed: int = 0, chunk_size: int | None = None,
                   layers: Sequence[str] | None = None, sketch_dim: int | None = None, sketch_seed: int = 0,
                   progress: bool = False, mesh=None) -> ClientUpdates:
    """Shared client updates u(S) = (W0 - W_K) / (K lr) (docs/method.md section 1).

    Each of ``num_updates`` clients holds a batch S of ``batch_size`` examples
    (victim at position 0, see :func:`client_batches`) and runs ``local_steps``
    full-batch SGD steps at learning rate ``lr`` from ``task.params``. With
    K = 1 the update is the batch-mean gradient. ``sketch_dim`` count-sketches
    large layers exactly like :func:`sketch_grads` with ``seed=sketch_seed``.
    """
    x, y = task.check_inputs(x, y)
    check_local_sgd(local_steps, lr)
    sel = task.select(layers)
    batches = client_batches(x.shape[0], batch_size=batch_size, num_updates=num_updates, seed=seed)
    per_update = max(1, sum(layer.size for layer in sel) * 3)
    floats, cap = chunk_limits(_CHUNK_FLOATS)
    chunk = _check_chunk(chunk_size, num_updates) if chunk_size else int(
        max(1, min(num_updates, cap, floats // (per_update * max(1, batch_size // 8)))))
    fn = _compiled_updates(task, sel, int(local_steps), sketch_dim, sketch_seed)
    lr32 = jnp.float32(lr)
    out = map_chunks(lambda xb, yb: fn(task.params, lr32, xb, yb), [x[batches], y[batches]], chunk,
                     desc="client updates", progress=progress, mesh=mesh)
    check_finite(out, "client update")
    return ClientUpdates({layer.name: out[layer.name] for layer in sel}, batches[:, 0].copy())
