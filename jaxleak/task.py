"""The pure-function view of a model: :class:`Task`.

A task is ``apply_fn(params, x) -> logits``, the parameters, a per-example
loss and the ordered list of parameterised layers. Everything downstream
(gradients, measures, attacks) works on this view only, so any Linen or NNX
model plugs in.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax

from jaxleak.errors import InputError, UnknownNameError

PyTree = Any
# where a task family made by Task.init keeps its identity for stored programs (jaxleak.compilation)
_PROGRAM_IDENTITY = "program identity"
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def softmax_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy (nats) with integer labels: (B, C), (B,) -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One parameterised layer: the parameters of one module (or one tensor).

    Attributes:
      name: path in the parameter tree joined by '/', e.g. ``Conv_0``.
      size: number of parameters P_l (length of the flattened gradient).
      leaves: indices into ``jax.tree.leaves(params)`` of this layer's tensors,
        in tree order; the flattened gradient concatenates them in this order.
      shapes: shapes of those tensors.
      paths: their full key paths, for messages.
    """

    name: str
    size: int
    leaves: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    paths: tuple[str, ...]


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _first_use_order(fn: Callable, params: PyTree, x: jax.Array) -> list[int]:
    """Position of the first equation that reads each parameter leaf.

    Walks the jaxpr of ``fn(params, x)`` depth first, entering nested calls
    (jit, custom derivatives) whose inputs map one to one, so that the order
    follows the forward computation even when a model wraps layers in jit.
    """
    closed = jax.make_jaxpr(fn)(params, x)
    n_leaves = len(jax.tree.leaves(params))
    first: dict[int, int] = {}
    counter = [0]

    def walk(jaxpr, tracked: dict):
        for eqn in jaxpr.eqns:
            counter[0] += 1
            subs = [p for p in eqn.params.values() if isinstance(p, (jex.core.Jaxpr, jex.core.ClosedJaxpr))]
            sub = subs[0] if len(subs) == 1 else None
            sub = sub.jaxpr if isinstance(sub, jex.core.ClosedJaxpr) else sub
            if sub is not None and len(sub.invars) == len(eqn.invars):
                inner = {}
                for outer_v, inner_v in zip(eqn.invars, sub.invars):
                    if isinstance(outer_v, jex.core.Var) and outer_v in tracked:
                        inner[inner_v] = tracked[outer_v]
                walk(sub, inner)
                continue
            for v in eqn.invars:
                if isinstance(v, jex.core.Var) and v in tracked:
                    first.setdefault(tracked[v], counter[0])

    walk(closed.jaxpr, {v: i for i, v in enumerate(closed.jaxpr.invars[:n_leaves])})
    never = counter[0] + 1
    return [first.get(i, never) for i in range(n_leaves)]


def enumerate_layers(
    apply_fn: Callable, params: PyTree, x_example: jax.Array, granularity: str = "module"
) -> list[Layer]:
    """The parameterised layers of a model in forward order.

    ``granularity='module'`` groups the tensors of one module (kernel and bias
    together, docs/method.md section 1); ``'tensor'`` makes each tensor its own layer.
    """
    if granularity not in ("module", "tensor"):
        raise InputError(f"granularity must be 'module' or 'tensor', got {granularity!r}")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    if not flat:
        raise InputError("the model has no parameters")
    use = _first_use_order(apply_fn, params, x_example)
    groups: dict[str, list[int]] = {}
    paths = []
    for i, (path, _) in enumerate(flat):
        names = [_key_name(k) for k in path]
        paths.append("/".join(names))
        if granularity == "module" and len(names) > 1:
            group = "/".join(names[:-1])
        else:
            group = "/".join(names)
        groups.setdefault(group, []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: (min(use[i] for i in kv[1]), min(kv[1])))
    leaves = [leaf for _, leaf in flat]
    return [
        Layer(
            name=name,
            size=int(sum(np.prod(leaves[i].shape, dtype=np.int64) for i in idx)),
            leaves=tuple(idx),
            shapes=tuple(tuple(leaves[i].shape) for i in idx),
            paths=tuple(paths[i] for i in idx),
        )
        for name, idx in ordered
    ]



# Models up to this many parameters compile their programs with the CPU's faster-compiling options (Task.fast_compile).
FAST_COMPILE_PARAMS = 100_000

class Task:
    """A model as pure functions: ``apply_fn(params, x)``, a loss, and its layers.

    Attributes:
      apply_fn: ``(params, x (B, H, W, C)) -> logits (B, C)``, deterministic.
      params: the parameter pytree the gradients are taken with respect to.
      loss_fn: ``(logits (B, C), y (B,)) -> per-example loss (B,)`` in nats;
        softmax cross-entropy by default.
      layers: :class:`Layer` list in forward order.
      input_shape: (H, W, C) of one example.
      num_classes: width of the logits.
      name: a label for reports.
      train_apply_fn: optional ``(params, x, rng) -> logits`` in training mode
        (dropout active); None when the model has no such mode.
    """

    def __init__(
        self,
        apply_fn: Callable,
        params: PyTree,
        input_shape: Sequence[int],
        *,
        loss_fn: LossFn | None = None,
        name: str = "model",
        granularity: str = "module",
        train_apply_fn: Callable | None = None,
        _layers: list[Layer] | None = None,
        _cache: dict | None = None,
    ):
        self.apply_fn = apply_fn
        self.params = params
        self.loss_fn = loss_fn or softmax_cross_entropy
        self.input_shape = tuple(int(s) for s in input_shape)
        self.name = name
        self.granularity = granularity
        self.train_apply_fn = train_apply_fn
        x0 = np.zeros((1, *self.input_shape), np.float32)
        if _layers is None:
            try:
                out = jax.eval_shape(apply_fn, params, x0)
            except Exception as err:  # noqa: BLE001 - any failure means the shapes do not fit
                raise InputError(
                    f"model {name!r} cannot be applied to inputs of shape (1, {', '.join(map(str, self.input_shape))}): {err}"
                ) from err
            if len(out.shape) != 2 or out.shape[0] != 1:
                raise InputError(f"model {name!r} must return logits of shape (batch, classes), got {out.shape}")
            self.num_classes = int(out.shape[1])
            _layers = enumerate_layers(apply_fn, params, x0, granularity)
        else:
            self.num_classes = int(jax.eval_shape(apply_fn, params, x0).shape[1])
        self.layers = _layers
        # Compiled functions live here and are shared by tasks that differ only
        # in parameter values, so a new checkpoint never retraces.
        self._cache = {} if _cache is None else _cache

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_linen(cls, module, variables: PyTree, *, input_shape: Sequence[int], loss_fn: LossFn | None = None,
                   name: str | None = None, granularity: str = "module", **apply_kwargs) -> "Task":
        """Wrap a Linen module and its variables.

        ``variables`` is what ``module.init`` returned (``{'params': ..., other
        collections}``) or the ``params`` collection alone. Only ``params`` are
        differentiated; other collections (e.g. BatchNorm statistics, which
        must be used in inference mode) are held fixed.
        """
        variables = dict(variables)
        if "params" in variables:
            params = variables.pop("params")
            rest = variables
        else:
            params, rest = variables, {}

        def apply_fn(p, x):
            return module.apply({"params": p, **rest}, x, **apply_kwargs)

        train_apply_fn = None
        if _accepts_train(module):
            def train_apply_fn(p, x, rng):
                return module.apply({"params": p, **rest}, x, train=True, rngs={"dropout": rng}, **apply_kwargs)

        return cls(apply_fn, params, input_shape, loss_fn=loss_fn, name=name or type(module).__name__,
                   granularity=granularity, train_apply_fn=train_apply_fn)

    @classmethod
    def from_nnx(cls, module, *, input_shape: Sequence[int], loss_fn: LossFn | None = None,
                 name: str | None = None, granularity: str = "module") -> "Task":
        """Wrap an NNX module: its ``nnx.Param`` state becomes a plain dict of arrays.

        The module should be in evaluation mode (``module.eval()``) if it has
        dropout or BatchNorm; its other state is held fixed.
        """
        from flax import nnx

        graphdef, state, rest = nnx.split(module, nnx.Param, ...)
        params = nnx.to_pure_dict(state)

        def apply_fn(p, x):
            st = jax.tree.map(lambda v: v, state)  # a fresh container; the module is not mutated
            nnx.replace_by_pure_dict(st, p)
            return nnx.merge(graphdef, st, rest)(x)

        return cls(apply_fn, params, input_shape, loss_fn=loss_fn, name=name or type(module).__name__,
                   granularity=granularity)

    @classmethod
    def init(cls, model_name: str, dataset, seed: int = 0, *, granularity: str = "module",
             loss_fn: LossFn | None = None, **model_options) -> "Task":
        """A zoo model initialised for ``dataset`` (its input shape and classes)."""
        from jaxleak import models

        module = models.get(model_name, dataset.num_classes, dataset.input_shape, **model_options)
        x0 = np.zeros((1, *dataset.input_shape), np.float32)
        try:
            init = _compiled_init(module)
        except TypeError:  # a module with unhashable options: initialised op by op
            init = module.init
        variables = init(jax.random.key(seed), x0)
        task = cls.from_linen(module, variables, input_shape=dataset.input_shape, loss_fn=loss_fn,
                              name=model_name, granularity=granularity)
        module_identity = _module_identity(module)
        if loss_fn is None and module_identity is not None:
            # everything the task's functions hold: the module (its class and options), the input shape, the
            # non-parameter variables made by init (from the seed), the layer split and the default loss
            task._cache[_PROGRAM_IDENTITY] = ("zoo", model_name, module_identity, task.input_shape, int(seed),
                                              granularity)
        return task

    def with_params(self, params: PyTree) -> "Task":
        """The same model with other parameter values (same structure); shares compiled code."""
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise InputError(first_tree_difference(self.params, params))
        for a, b, path in zip(jax.tree.leaves(self.params), jax.tree.leaves(params), _leaf_paths(self.params)):
            if np.shape(a) != np.shape(b):
                raise InputError(f"parameter {path} has shape {np.shape(b)}, the model expects {np.shape(a)}")
        return Task(self.apply_fn, params, self.input_shape, loss_fn=self.loss_fn, name=self.name,
                    granularity=self.granularity, train_apply_fn=self.train_apply_fn,
                    _layers=self.layers, _cache=self._cache)

    # ------------------------------------------------------------------ helpers

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise UnknownNameError(f"model {self.name!r} has no layer {name!r}; layers are {self.layer_names}")

    def select(self, names: Sequence[str] | None) -> list[Layer]:
        """The named layers (all when ``names`` is None), in forward order."""
        if names is None:
            return list(self.layers)
        wanted = set(names)
        for n in wanted:
            self.layer(n)
        return [layer for layer in self.layers if layer.name in wanted]

    @property
    def num_params(self) -> int:
        return int(sum(layer.size for layer in self.layers))

    @property
    def fast_compile(self) -> bool:
        """Whether this task's programs compile with :func:`jaxleak.compilation.fast_compile_options`: for
        small models only (at most ``FAST_COMPILE_PARAMS``), where compiling dominates. On a large model the
        older emitters compile no faster and run slower (resnet18, a 64-example batch gradient on the 2-core
        CPU: 8.6 s against 6.5 s per call)."""
        return self.num_params <= FAST_COMPILE_PARAMS

    def loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Mean loss over the batch (nats)."""
        return jnp.mean(self.loss_fn(self.apply_fn(params, x), y))

    def example_loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Loss of one example: x (H, W, C), y () -> scalar (nats).

        The mean over the batch of one, so a loss that already averages over
        the batch works as well as a per-example one.
        """
        return jnp.mean(self.loss_fn(self.apply_fn(params, x[None]), y[None]))

    def flatten(self, tree: PyTree, layers: Sequence[Layer] | None = None, *, batched: bool = False
                ) -> dict[str, jax.Array]:
        """Per-layer flat vectors of a parameter-shaped tree: {layer: (P_l,)}.

        With ``batched=True`` every leaf has a leading batch axis B and the
        result is {layer: (B, P_l)}.
        """
        leaves = jax.tree.leaves(tree)
        if batched:
            flat = lambda a: jnp.reshape(a, (a.shape[0], -1))  # noqa: E731
        else:
            flat = jnp.ravel
        return {
            layer.name: jnp.concatenate([flat(leaves[i]) for i in layer.leaves], axis=-1)
            for layer in (self.layers if layers is None else layers)
        }

    def program_key(self, key):
        """``key`` with this task family's identity, for a program that a program store may keep; None if it may not.

        Only tasks made by :meth:`init` (a zoo model, its options, input
        shape, seed and the default loss) have an identity that a later
        process can recognise; programs of any other task (a user's own
        model, a custom loss) are traced in every process
        (:mod:`jaxleak.compilation`).
        """
        identity = self._cache.get(_PROGRAM_IDENTITY)
        return None if identity is None else (identity, key)

    def cached(self, key, build: Callable[[], Callable]) -> Callable:
        """A compiled function built once per task family and key."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def check_inputs(self, x, y=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Validate a batch for this model; returns float32 x and int32 y."""
        x = np.asarray(x)
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise InputError(
                f"array 'x' has shape {x.shape} but model {self.name!r} takes (N, {', '.join(map(str, self.input_shape))})"
            )
        if x.shape[0] == 0:
            raise InputError("array 'x' is empty; at least one example is needed")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise InputError(f"array 'x' must be real-valued, got dtype {x.dtype}")
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise InputError("array 'x' contains NaN or infinite values")
        if y is None:
            return x, None
        y = np.asarray(y)
        if y.shape != (x.shape[0],):
            raise InputError(f"array 'y' has shape {y.shape}; expected ({x.shape[0]},) to match 'x'")
        if not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"array 'y' must hold integer labels, got dtype {y.dtype}")
        if y.min() < 0 or y.max() >= self.num_classes:
            raise InputError(
                f"array 'y' has labels in [{y.min()}, {y.max()}] but model {self.name!r} has {self.num_classes} classes"
            )
        return x, y.astype(np.int32)

    def __repr__(self) -> str:
        return f"Task({self.name!r}, input_shape={self.input_shape}, layers={len(self.layers)}, params={self.num_params})"


@functools.lru_cache(maxsize=64)
def _compiled_init(module) -> Callable:
    """``module.init`` as one compiled program, shared by equal modules.

    The eager ``module.init`` would compile every initialiser and layer of
    the forward pass as a program of its own. It runs once, so on the CPU it
    is compiled without XLA's backend optimisations (LeNet: 0.7 s instead of
    3 s to compile); its values equal the eager ones up to float rounding
    (at most one unit in the last place).
    """
    from jaxleak import compilation

    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    identity = _module_identity(module)
    if identity is None:
        return jax.jit(module.init, compiler_options=options)

    def init(rngs, x):
        return module.init(rngs, x)

    return compilation.jit(init, key=("init", identity), compiler_options=options)


def _module_identity(module) -> tuple | None:
    """A Linen module's class and options as a later process sees them; None when its repr hides what it holds."""
    text = repr(module)
    if " at 0x" in text:
        return None
    return (type(module).__module__, type(module).__qualname__, text)


def _accepts_train(module) -> bool:
    import inspect

    try:
        return "train" in inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return False


def _leaf_paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def first_tree_difference(expected: PyTree, got: PyTree) -> str:
    """A message naming the first path where two parameter trees differ."""
    a = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    b = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    ka = {jax.tree_util.keystr(k): v for k, v in a.items()}
    kb = {jax.tree_util.keystr(k): v for k, v in b.items()}
    for path in sorted(set(ka) | set(kb)):
        if path not in kb:
            return f"parameters do not match the model: {path} is missing"
        if path not in ka:
            return f"parameters do not match the model: unexpected entry {path}"
        if np.shape(ka[path]) != np.shape(kb[path]):
            return f"parameters do not match the model: {path} has shape {np.shape(kb[path])}, expected {np.shape(ka[path])}"
    return "parameters do not match the model's tree structure"
