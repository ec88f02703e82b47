"""The gradient engine: per-example, per-layer gradients, client updates, sketches.

All heavy work is one jitted function per (task family, layers, options),
applied chunk by chunk over examples with a fixed chunk shape (the last
chunk is padded), so memory is bounded by the chunk and nothing retraces
after the first call.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak.errors import InputError, NonFiniteError
from jaxleak.task import Layer, Task

# Incremented when a jaxleak function is traced; tests use it to prove that a
# second call with the same shapes does not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Per-example gradient floats kept live per chunk by the default chunk size.
_CHUNK_FLOATS = 2 ** 25


def default_chunk_size(task: Task, layers: Sequence[Layer], n: int, cap: int = 256) -> int:
    """Examples per chunk: keeps chunk x sum(P_l) near 2^25 floats (128 MiB)."""
    size = max(1, sum(layer.size for layer in layers))
    return int(max(1, min(n, cap, _CHUNK_FLOATS // size)))


def _check_chunk(chunk_size, n: int) -> int:
    if chunk_size is None:
        return n
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise InputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(min(chunk_size, n))


def map_chunks(fn: Callable, arrays: Sequence[np.ndarray], chunk_size: int, *, desc: str | None = None,
               progress: bool = False, extra=()) -> dict[str, np.ndarray]:
    """Apply ``fn(*extra, *chunk_arrays) -> {name: (chunk, ...)}`` over the leading axis.

    Every call sees exactly ``chunk_size`` rows (the last chunk is padded with
    copies of its first row and the padding dropped), so ``fn`` compiles once.
    Outputs are gathered on the host.
    """
    n = int(arrays[0].shape[0])
    out: dict[str, list] = {}
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
            batch.append(part)
        result = fn(*extra, *batch)
        for key, value in result.items():
            out.setdefault(key, []).append(np.asarray(value)[: stop - start])
    return {key: np.concatenate(parts, axis=0) for key, parts in out.items()}


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

def per_example_grad_fn(task: Task, layers: Sequence[Layer]) -> Callable:
    """Pure ``(params, x (B, ...), y (B,)) -> {layer: (B, P_l)}`` by vmap(grad).

    Differentiable, so measures can take jvps through it.
    """
    grad_one = jax.grad(task.example_loss)

    def fn(params, x, y):
        return task.flatten(jax.vmap(grad_one, in_axes=(None, 0, 0))(params, x, y), layers, batched=True)

    return fn


def _compiled_layer_grads(task: Task, layers: Sequence[Layer]) -> Callable:
    key = ("layer_grads", tuple(layer.name for layer in layers))

    def build():
        inner = per_example_grad_fn(task, layers)

        def traced(params, x, y):
            TRACE_COUNTS[key] += 1
            return inner(params, x, y)

        return jax.jit(traced)

    return task.cached(key, build)


def layer_grads(task: Task, x, y, *, chunk_size: int | None = None, layers: Sequence[str] | None = None,
                progress: bool = False) -> dict[str, np.ndarray]:
    """Per-example gradients of every layer: ``{layer: (N, P_l)}`` in forward order.

    g(x, y) = grad_W loss(f(x; W), y) (METHOD section 1), flattened per layer
    (kernel and bias of a module together). Computed by jitted vmap(grad),
    ``chunk_size`` examples at a time (default: a size that keeps one chunk's
    gradients near 128 MiB); results are gathered on the host as float32.
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    chunk = _check_chunk(chunk_size, x.shape[0]) if chunk_size else default_chunk_size(task, sel, x.shape[0])
    fn = _compiled_layer_grads(task, sel)
    grads = map_chunks(fn, [x, y], chunk, desc="per-example gradients", progress=progress, extra=(task.params,))
    check_finite(grads)
    return {layer.name: grads[layer.name] for layer in sel}


# ---------------------------------------------------------------- sketches

class CountSketch(NamedTuple):
    """A count-sketch of one layer: coordinate i goes to bucket ``buckets[i]`` with ``signs[i]``.

    S a = sum_i signs[i] a_i e_{buckets[i]}; E[<S a, S b>] = <a, b>. Stored as
    two length-P_l vectors, never as a P_l x d matrix.
    """

    buckets: jax.Array
    signs: jax.Array
    dim: int


def make_sketches(layers: Sequence[Layer], dim: int, seed: int) -> dict[str, CountSketch | None]:
    """One independent count-sketch per layer larger than ``dim`` (None for the others)."""
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"sketch dim must be a positive integer, got {dim!r}")
    root = jax.random.key(seed)
    out = {}
    for i, layer in enumerate(layers):
        if layer.size <= dim:
            out[layer.name] = None
            continue
        kb, ks = jax.random.split(jax.random.fold_in(root, i))
        out[layer.name] = CountSketch(
            buckets=jax.random.randint(kb, (layer.size,), 0, dim, dtype=jnp.int32),
            signs=jax.random.rademacher(ks, (layer.size,), dtype=jnp.float32),
            dim=int(dim),
        )
    return out


def apply_sketch(sketch: CountSketch | None, g: jax.Array) -> jax.Array:
    """Sketch rows of ``g`` (B, P_l) -> (B, dim); identity when ``sketch`` is None."""
    if sketch is None:
        return g
    out = jnp.zeros((g.shape[0], sketch.dim), g.dtype)
    return out.at[:, sketch.buckets].add(g * sketch.signs)


def _compiled_sketch_grads(task: Task, layers: Sequence[Layer], dim: int, seed: int) -> Callable:
    key = ("sketch_grads", tuple(layer.name for layer in layers), dim, seed)

    def build():
        sketches = make_sketches(layers, dim, seed)
        grads = per_example_grad_fn(task, layers)

        def traced(params, x, y):
            TRACE_COUNTS[key] += 1
            g = grads(params, x, y)
            return {name: apply_sketch(sketches[name], v) for name, v in g.items()}

        return jax.jit(traced)

    return task.cached(key, build)


def sketch_grads(task: Task, x, y, *, dim: int = 1024, seed: int = 0, chunk_size: int | None = None,
                 layers: Sequence[str] | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Per-example gradients reduced to at most ``dim`` features per layer: ``{layer: (N, min(P_l, dim))}``.

    Layers with P_l <= dim come back whole; larger ones through a fixed
    count-sketch (one per layer, derived from ``seed``), applied inside the
    jitted chunk so that the N x P_l gradients of a large layer never exist.
    Inner products are preserved in expectation.
    """
    x, y = task.check_inputs(x, y)
    sel = task.select(layers)
    chunk = _check_chunk(chunk_size, x.shape[0]) if chunk_size else default_chunk_size(task, sel, x.shape[0])
    fn = _compiled_sketch_grads(task, sel, int(dim), int(seed))
    out = map_chunks(fn, [x, y], chunk, desc="sketched gradients", progress=progress, extra=(task.params,))
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


def _compiled_updates(task: Task, layers: Sequence[Layer], local_steps: int, sketch_dim: int | None,
                      sketch_seed: int) -> Callable:
    key = ("client_updates", tuple(layer.name for layer in layers), local_steps, sketch_dim, sketch_seed)

    def build():
        sketches = make_sketches(layers, sketch_dim, sketch_seed) if sketch_dim else {}
        grad_loss = jax.grad(task.loss)

        def one_update(params, lr, xb, yb):
            def step(carry, _):
                p, acc = carry
                g = grad_loss(p, xb, yb)
                p = jax.tree.map(lambda w, gw: w - lr * gw, p, g)
                return (p, jax.tree.map(jnp.add, acc, g)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (_, total), _ = jax.lax.scan(step, (params, zeros), None, length=local_steps)
            # (W0 - W_K) / (K lr) is exactly the mean of the K gradients.
            return task.flatten(jax.tree.map(lambda t: t / local_steps, total), layers)

        def traced(params, lr, xb, yb):
            TRACE_COUNTS[key] += 1
            u = jax.vmap(one_update, in_axes=(None, None, 0, 0))(params, lr, xb, yb)
            return {name: apply_sketch(sketches.get(name), v) for name, v in u.items()}

        return jax.jit(traced)

    return task.cached(key, build)


def client_updates(task: Task, x, y, *, batch_size: int, local_steps: int = 1, lr: float = 0.1,
                   num_updates: int, seed: int = 0, chunk_size: int | None = None,
                   layers: Sequence[str] | None = None, sketch_dim: int | None = None, sketch_seed: int = 0,
                   progress: bool = False) -> ClientUpdates:
    """Shared client updates u(S) = (W0 - W_K) / (K lr) (METHOD section 1).

    Each of ``num_updates`` clients holds a batch S of ``batch_size`` examples
    (victim at position 0, see :func:`client_batches`) and runs ``local_steps``
    full-batch SGD steps at learning rate ``lr`` from ``task.params``. With
    K = 1 the update is the batch-mean gradient. ``sketch_dim`` count-sketches
    large layers exactly like :func:`sketch_grads` with ``seed=sketch_seed``.
    """
    x, y = task.check_inputs(x, y)
    if not isinstance(local_steps, (int, np.integer)) or local_steps < 1:
        raise InputError(f"local_steps must be a positive integer, got {local_steps!r}")
    if not np.isfinite(lr) or lr <= 0:
        raise InputError(f"lr must be a positive number, got {lr!r}")
    sel = task.select(layers)
    batches = client_batches(x.shape[0], batch_size=batch_size, num_updates=num_updates, seed=seed)
    per_update = max(1, sum(layer.size for layer in sel) * 3)
    chunk = _check_chunk(chunk_size, num_updates) if chunk_size else int(
        max(1, min(num_updates, 256, _CHUNK_FLOATS // (per_update * max(1, batch_size // 8)))))
    fn = _compiled_updates(task, sel, int(local_steps), sketch_dim, sketch_seed)
    lr32 = jnp.float32(lr)
    out = map_chunks(lambda xb, yb: fn(task.params, lr32, xb, yb), [x[batches], y[batches]], chunk,
                     desc="client updates", progress=progress)
    check_finite(out, "client update")
    return ClientUpdates({layer.name: out[layer.name] for layer in sel}, batches[:, 0].copy())
