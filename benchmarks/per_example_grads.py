"""Per-example gradient throughput: jaxleak.layer_grads vs torch.func and Opacus.

Three configurations (issue 2's benchmark, issue 6's speed goal; ``resnet18``
is run by ``gpu_suite.py`` and on request):

- ``lenet``: jaxleak's LeNet (``jaxleak.models.get('lenet')``) on 28x28x1
  inputs, B = 256.
- ``cifar_cnn``: the CIFAR-10 CNN used by the DP-SGD literature (Papernot et
  al. 2021, "Tempered Sigmoid Activations for Deep Learning with Differential
  Privacy"; also the JAX/Opacus comparison of Subramani et al. 2021): conv
  32-32-pool-64-64-pool-128-128-pool (3x3, SAME), dense 128, dense 10, ReLU,
  on 32x32x3 inputs, B = 128. It is built as a user Linen model, so it also
  exercises ``Task.from_linen`` on a model outside the zoo.
- ``resnet18``: jaxleak's ResNet-18 (GroupNorm, so per-example gradients are
  defined) on 32x32x3 inputs, B = 64; the peers run the same architecture in
  PyTorch (GroupNorm eps differs, 1e-5 against Flax's 1e-6: no effect on speed).

For each configuration and method, one process, interleaved repetitions
(method A, B, C, A, B, C, ...), compile/warm-up excluded, every result forced
(``block_until_ready`` / host copy). Each method returns the per-example
gradients of every parameter:

- ``jaxleak``: ``jaxleak.layer_grads(task, x, y)`` -> {layer: np (B, P_l)}
  on the host (the public API with its default chunking, host copy
  included);
- ``jaxleak_one_chunk``: the same with ``chunk_size=B`` (the whole batch in
  one compiled call; shows what the default chunking gains);
- ``jaxleak_vmap``: the plain jitted vmap(grad) reference (what
  ``layer_grads`` did before the fast path), device arrays;
- ``torch_func``: ``torch.func.vmap(grad(loss of one example))``;
- ``opacus``: ``opacus.GradSampleModule`` forward + backward, ``grad_sample``
  of every parameter (loss_reduction='sum').

Also measured: the machine's float32 matrix-multiply peak (jnp.dot of two
2048 x 2048 matrices, and torch's) and the achieved GFLOP/s of each method
(FLOPs of forward + input backward + per-example weight gradients, counted
analytically from the layer shapes).

The peers need ``torch`` and ``opacus`` (the ``bench`` extra); without them only
the jaxleak methods run. PyTorch runs on CUDA when asked (``torch_device``) by
``gpu_suite.py`` on a GPU.

Usage: ``python benchmarks/per_example_grads.py [--reps 7] [--configs lenet,cifar_cnn,resnet18]``
Writes ``benchmarks/results/per_example_grads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info as base_machine_info  # noqa: E402


def machine_info(shared: bool) -> dict:
    """benchmarks/machine.py's record, plus the Opacus version and whether other jobs shared the CPU."""
    info = base_machine_info()
    try:
        import opacus

        info["opacus"] = opacus.__version__
    except ImportError:
        pass
    if shared:
        info["note"] = ("other jobs were running concurrently on this 2-core machine; interleaved "
                        "repetitions and medians reduce but do not remove the effect")
    return info


# ---------------------------------------------------------------- models


def cifar_cnn_linen(num_classes: int = 10):
    from flax import linen as nn

    class CifarCNN(nn.Module):
        """conv 32-32-M-64-64-M-128-128-M (3x3 SAME), dense 128, dense num_classes; ReLU."""

        num_classes: int = 10

        @nn.compact
        def __call__(self, x):
            for width in (32, 32, "M", 64, 64, "M", 128, 128, "M"):
                if width == "M":
                    x = nn.max_pool(x, (2, 2), strides=(2, 2))
                else:
                    x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(self.num_classes)(x)

    return CifarCNN(num_classes)


def torch_resnet18(num_classes: int = 10):
    """jaxleak's ResNet-18 in PyTorch: 3x3 stem, basic blocks with GroupNorm, global average pooling."""
    import torch
    import torch.nn as tnn

    def norm(c):
        return tnn.GroupNorm(max(1, min(32, c // 4)), c)

    class Block(tnn.Module):
        def __init__(self, cin, width, stride):
            super().__init__()
            self.conv1, self.norm1 = tnn.Conv2d(cin, width, 3, stride, 1, bias=False), norm(width)
            self.conv2, self.norm2 = tnn.Conv2d(width, width, 3, 1, 1, bias=False), norm(width)
            self.shortcut = (tnn.Sequential(tnn.Conv2d(cin, width, 1, stride, bias=False), norm(width))
                             if stride != 1 or cin != width else tnn.Identity())

        def forward(self, x):
            y = torch.relu(self.norm1(self.conv1(x)))
            return torch.relu(self.shortcut(x) + self.norm2(self.conv2(y)))

    class ResNet18(tnn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.norm = tnn.Conv2d(3, 64, 3, 1, 1, bias=False), norm(64)
            blocks, cin = [], 64
            for stage, width in enumerate((64, 128, 256, 512)):
                for b in range(2):
                    blocks.append(Block(cin, width, 2 if stage > 0 and b == 0 else 1))
                    cin = width
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(512, num_classes)

        def forward(self, x):
            x = self.blocks(torch.relu(self.norm(self.stem(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet18()


def torch_model(config: str):
    import torch.nn as tnn

    if config == "resnet18":
        return torch_resnet18(10)
    if config == "lenet":
        return tnn.Sequential(
            tnn.Conv2d(1, 6, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Flatten(), tnn.Linear(16 * 7 * 7, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(),
            tnn.Linear(84, 10),
        )
    layers = []
    cin = 3
    for width in (32, 32, "M", 64, 64, "M", 128, 128, "M"):
        if width == "M":
            layers.append(tnn.MaxPool2d(2))
        else:
            layers += [tnn.Conv2d(cin, width, 3, padding=1), tnn.ReLU()]
            cin = width
    layers += [tnn.Flatten(), tnn.Linear(128 * 4 * 4, 128), tnn.ReLU(), tnn.Linear(128, 10)]
    return tnn.Sequential(*layers)


CONFIGS = {
    "lenet": {"input_shape": (28, 28, 1), "batch": 256, "model": "jaxleak.models lenet"},
    "cifar_cnn": {"input_shape": (32, 32, 3), "batch": 128,
                  "model": "CIFAR-10 CNN of the DP-SGD literature (conv 32,32,M,64,64,M,128,128,M; dense 128, 10)"},
    "resnet18": {"input_shape": (32, 32, 3), "batch": 64, "model": "jaxleak.models resnet18 (GroupNorm)"},
}


def peers_available() -> str | None:
    """None when torch and opacus import, else why the peers are skipped."""
    try:
        import opacus  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"{err.name or err} is not installed (the bench extra: pip install -e '.[bench]')"
    return None


def model_flops(task, x) -> float:
    """FLOPs of one per-example gradient pass for the whole batch.

    2 * MACs for each of: forward, backward to the layer inputs (all layers
    but the first), per-example weight gradients. Counted from the Dense/Conv
    calls of the model (their input and output shapes).
    """
    import jax
    from flax import linen as nn

    macs = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if isinstance(module, nn.Dense) and context.method_name == "__call__":
            macs.append(np.prod(out.shape) * args[0].shape[-1])
        elif isinstance(module, nn.Conv) and context.method_name == "__call__":
            macs.append(np.prod(out.shape) * np.prod(module.kernel_size) * args[0].shape[-1])
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(task.apply_fn, task.params, x)
    total = 0.0
    for i, m in enumerate(macs):
        total += 2 * m * (2 if i == 0 else 3)
    return float(total)


# ---------------------------------------------------------------- methods


def build_methods(config: str, seed: int = 0, *, batch: int | None = None, peers: bool = True,
                  torch_device: str = "cpu", reference: bool = True):
    """The timed callables of one configuration, its FLOPs, batch and parameter counts.

    ``batch`` overrides the configuration's; ``peers=False`` leaves out
    torch.func and Opacus; ``torch_device`` is where PyTorch runs ("cuda" on a
    GPU); ``reference=False`` leaves out the jitted vmap(grad).
    """
    import jax
    import jax.numpy as jnp

    import jaxleak
    from jaxleak import models
    from jaxleak.task import Task

    spec = CONFIGS[config]
    shape, batch = spec["input_shape"], batch or spec["batch"]
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)

    module = cifar_cnn_linen(10) if config == "cifar_cnn" else models.get(config, 10, shape)
    variables = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))
    task = Task.from_linen(module, variables, input_shape=shape, name=config)

    grad_one = jax.grad(task.example_loss)
    plain = jax.jit(jax.vmap(grad_one, in_axes=(None, 0, 0)))
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def run_jaxleak():
        return jaxleak.layer_grads(task, x, y)

    def run_jaxleak_one_chunk():
        return jaxleak.layer_grads(task, x, y, chunk_size=batch)

    def run_plain():
        return jax.block_until_ready(plain(task.params, xj, yj))

    methods = {"jaxleak": run_jaxleak, "jaxleak_one_chunk": run_jaxleak_one_chunk}
    if reference:
        methods["jaxleak_vmap"] = run_plain
    n_params = {"jax": task.num_params}
    if peers:
        methods_t, n_params["torch"] = torch_methods(config, x, y, torch_device)
        methods.update(methods_t)
    return methods, model_flops(task, xj), batch, n_params


def torch_methods(config: str, x: np.ndarray, y: np.ndarray, device: str = "cpu") -> tuple[dict, int]:
    """torch.func vmap(grad) and Opacus per-example gradients of the configuration's PyTorch twin."""
    import torch
    import torch.nn.functional as F
    from opacus import GradSampleModule
    from torch.func import functional_call, grad, vmap

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tmodel = torch_model(config).to(device)
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    tparams = {k: v.detach() for k, v in tmodel.named_parameters()}

    def loss_one(p, xb, yb):
        return F.cross_entropy(functional_call(tmodel, p, (xb[None],)), yb[None])

    tf = vmap(grad(loss_one), in_dims=(None, 0, 0))
    gsm = GradSampleModule(torch_model(config).to(device), loss_reduction="sum")

    def run_torch_func():
        with torch.no_grad():
            out = tf(tparams, xt, yt)
        sync()
        return out

    def run_opacus():
        for p in gsm.parameters():
            p.grad = None
            p.grad_sample = None
        loss = F.cross_entropy(gsm(xt), yt, reduction="sum")
        loss.backward()
        sync()
        return [p.grad_sample for p in gsm.parameters()]

    return {"torch_func": run_torch_func, "opacus": run_opacus}, int(sum(p.numel() for p in tmodel.parameters()))


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
    """float32 matrix-multiply throughput (GFLOP/s) of jnp.dot and torch.matmul, n x n."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    out = {"n": n}
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    out["jax_gflops"] = 2 * n ** 3 / statistics.median(times) / 1e9
    try:
        import torch

        ta, tb = torch.randn(n, n), torch.randn(n, n)
        ta @ tb
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            ta @ tb
            times.append(time.perf_counter() - t)
        out["torch_gflops"] = 2 * n ** 3 / statistics.median(times) / 1e9
    except ImportError:
        pass
    return out


def bench_config(config: str, reps: int, *, batch: int | None = None, peers: bool = True,
                 torch_device: str = "cpu", reference: bool = True) -> dict:
    methods, flops, batch, n_params = build_methods(config, batch=batch, peers=peers, torch_device=torch_device,
                                                    reference=reference)
    for fn in methods.values():  # compile and warm up
        fn()
        fn()
    times = {name: [] for name in methods}
    loads = []
    for _ in range(reps):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        loads.append(os.getloadavg()[0])
    res = {"batch": batch, "load_average_1min_after_each_rep": loads, "params": n_params, "gflop_per_batch": flops / 1e9, "model": CONFIGS[config]["model"],
           "input_shape": CONFIGS[config]["input_shape"], "methods": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        res["methods"][name] = {"median_s": med, "times_s": ts, "examples_per_s": batch / med,
                                "gflops": flops / med / 1e9}
    base = res["methods"]["jaxleak"]["examples_per_s"]
    res["ratios"] = {f"jaxleak/{name}": base / m["examples_per_s"]
                     for name, m in res["methods"].items() if name != "jaxleak"}
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--configs", default="lenet,cifar_cnn")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--not-shared", action="store_true", help="the machine had no other jobs")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "per_example_grads.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    result = {"benchmark": "per_example_grads", "machine": machine_info(not args.not_shared),
              "reps": args.reps, "matmul_peak": matmul_peak(), "configs": {}}
    for config in args.configs.split(","):
        res = bench_config(config, args.reps)
        result["configs"][config] = res
        peak = result["matmul_peak"]["jax_gflops"]
        for name, m in res["methods"].items():
            print(f"{config:10s} {name:13s} {m['examples_per_s']:9.1f} ex/s  {m['median_s'] * 1e3:8.1f} ms  "
                  f"{m['gflops']:6.1f} GFLOP/s ({100 * m['gflops'] / peak:4.1f}% of jnp.dot peak)", file=sys.stderr)
        print("  " + "  ".join(f"{k} = {v:.2f}x" for k, v in res["ratios"].items()), file=sys.stderr)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=2)
    os.replace(tmp, args.out)
    print(f"matmul peak: jnp.dot {result['matmul_peak']['jax_gflops']:.1f} GFLOP/s, torch "
          f"{result['matmul_peak'].get('torch_gflops', float('nan')):.1f} GFLOP/s; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
