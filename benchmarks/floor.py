"""Every measure priced in batch gradients (CBG), next to its floor and the peer a user would write.

CBG = (time per example of a measure) / (time per example of one jitted batch-mean
``jax.value_and_grad`` of the same model's loss on the same batch). The ratio hardly moves with the
machine; the floor of a measure that reads every layer's per-example gradient is about one batch gradient
(a batched forward and backward pass gives every layer's factors). Measures, per model:

- ``sketch_grads``: ``jaxleak.sketch_grads`` (width 1024), public API with its default chunks, host copy.
- ``grad_norm``: ``jaxleak.gradnorm.per_example_norms`` (the ghost norm from factors).
- ``grams``: ``jaxleak.subspace.layer_grams`` (N x N Gram matrix of every layer, its N x N products included);
  ``gram_features``: its factor passes alone (rows and errors to the host), the part priced against 2 CBG.
- ``sensitivity``: Hutchinson with 16 probes (``sensitivity.per_example_terms``), at its own batch size,
  against ``sensitivity_floor``: a plain jitted ``vmap`` over the probes of ``jax.jvp(jax.grad(loss))`` in
  the input, on the batch, with no per-layer work (its squared norms summed so nothing P-sized is returned).
- ``torch_sketch`` (peer; ``pip install -e '.[bench]'``): ``torch.func`` per-example gradients of the same
  architecture followed by the same count-sketch in PyTorch (``index_add_`` per layer), for lenet 28x28x1,
  the CIFAR CNN and resnet18; beside it PyTorch's own batch-mean gradient (``torch_batch_grad``), which
  shows how much of the speed-up is the two libraries' convolutions rather than the per-example work.
- ``--heavy``: V-information (latent: the label's parity; original: the input with the white-box family),
  64 victims and 128 auxiliary examples, priced per example handled (victims + auxiliary), and the
  Inverting Gradients attack (1 restart, 200 steps) per inverted example; one warm repetition each.

One process, interleaved repetitions (each method once per round), compilation excluded, medians.
Usage: ``python benchmarks/floor.py [--models lenet8,lenet28,cifar_cnn,alexnet,resnet18,vgg16] [--reps 3]
[--heavy lenet8] [--out benchmarks/results/floor_cpu.json]``.
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
from machine import machine_info  # noqa: E402

# name: (zoo model or "cifar_cnn", input shape, batch, sensitivity batch, torch twin in per_example_grads.py)
MODELS = {
    "lenet8": ("lenet", (8, 8, 1), 256, 256, None),
    "lenet28": ("lenet", (28, 28, 1), 256, 64, "lenet"),
    "cifar_cnn": ("cifar_cnn", (32, 32, 3), 128, 16, "cifar_cnn"),
    "alexnet": ("alexnet", (32, 32, 3), 64, 16, None),
    "resnet18": ("resnet18", (32, 32, 3), 32, 8, "resnet18"),
    "vgg16": ("vgg16", (32, 32, 3), 32, 8, None),
}
PROBES = 16
SKETCH_DIM = 1024
GOALS = {"sketch_grads": 1.5, "grad_norm": 1.3, "gram_features": 2.0}
SENSITIVITY_GOAL = 1.2     # x its own floor
PEER_GOAL = 2.0            # sketch_grads at least 2x faster than torch_sketch


def _task(name: str):
    import jax
    import jax.numpy as jnp

    from jaxleak import models
    from jaxleak.task import Task
    from per_example_grads import cifar_cnn_linen

    zoo, shape, *_ = MODELS[name]
    module = cifar_cnn_linen(10) if zoo == "cifar_cnn" else models.get(zoo, 10, shape)
    variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
    return Task.from_linen(module, variables, input_shape=shape, name=name)


def _data(shape, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *shape)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


def _batch_grad_fn(task):
    import jax
    import jax.numpy as jnp

    fn = jax.jit(jax.value_and_grad(lambda p, x, y: jnp.mean(task.loss_fn(task.apply_fn(p, x), y))))

    def run(x, y):
        return jax.block_until_ready(fn(task.params, x, y))

    return run


def _sensitivity_floor_fn(task, probes: int):
    """vmap over probes of jvp (in x) of the batch-summed loss's parameter gradient; squared norms summed."""
    import jax
    import jax.numpy as jnp

    def grad_x(xx, y):
        return jax.grad(lambda p: jnp.sum(task.loss_fn(task.apply_fn(p, xx), y)))(task.params)

    @jax.jit
    def fn(x, y, v):
        def one(vv):
            _, tangent = jax.jvp(lambda xx: grad_x(xx, y), (x,), (vv,))
            return sum(jnp.sum(t * t) for t in jax.tree.leaves(tangent))
        return jax.vmap(one)(v)

    def run(x, y, v):
        return jax.block_until_ready(fn(x, y, v))

    return run


def _torch_sketch_fn(config: str, x: np.ndarray, y: np.ndarray, dim: int, device: str = "cpu"):
    """torch.func per-example gradients, then a count-sketch of every layer wider than ``dim`` (index_add_),
    copied to the host like jaxleak's."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    from per_example_grads import torch_model

    torch.manual_seed(0)
    model = torch_model(config).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    xt = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))).to(device)
    yt = torch.from_numpy(y.astype(np.int64)).to(device)
    gen = torch.Generator().manual_seed(0)
    sketches = {k: (torch.randint(0, dim, (v.numel(),), generator=gen).to(device),
                    (torch.randint(0, 2, (v.numel(),), generator=gen).float() * 2 - 1).to(device))
                for k, v in params.items() if v.numel() > dim}

    def loss_one(p, xb, yb):
        return F.cross_entropy(functional_call(model, p, (xb[None],)), yb[None])

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def batch_grad():
        """PyTorch's own batch-mean gradient of the same model and batch (its CBG unit)."""
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xt), yt).backward()
        sync()

    def run():
        with torch.no_grad():
            g = per_example(params, xt, yt)
            out = {}
            for k, v in g.items():
                flat = v.reshape(v.shape[0], -1)
                if k in sketches:
                    buckets, signs = sketches[k]
                    flat = torch.zeros(flat.shape[0], dim, device=device).index_add_(1, buckets, flat * signs)
                out[k] = flat.cpu().numpy()
        return out

    return run, batch_grad


def _gram_features(task, x, y):
    """The factor passes of ``layer_grams`` alone (rows and errors, or summed outer products, to the host),
    without the N x N products: the part of the Gram computation that is priced in batch gradients."""
    from jaxleak import grads, subspace

    n = x.shape[0]
    plans = [p for p in subspace.linear_plans(task, task.layers, x, y) if p is not None]
    acts = sum(s.floats for s in grads.layer_shapes(task, task.layers, x, y).values() if s.factored)
    out = []
    for items in subspace._passes(plans, n):
        fn = subspace._features_fn(task, items)
        out.append(subspace._fill_chunks(fn, task.params, x, y, subspace._pass_chunk(items, acts, n), False))
    return out


def _seconds(fn) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved_times(methods: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each method in each of ``reps`` rounds, each method once per round, after one warm-up call."""
    for fn in methods.values():  # compile and warm up
        fn()
    times = {k: [] for k in methods}
    for _ in range(reps):
        for k, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def interleaved(methods: dict, reps: int) -> dict[str, float]:
    """Median seconds of each method over :func:`interleaved_times`."""
    return {k: statistics.median(v) for k, v in interleaved_times(methods, reps).items()}


def bench_model(name: str, reps: int, peers: bool, heavy: bool, *, torch_device: str = "cpu",
                batch: int | None = None, sens_batch: int | None = None) -> dict:
    """CBG of every measure on one model (``peers``: the torch.func peer on ``torch_device``)."""
    import jax
    import jax.numpy as jnp

    import jaxleak
    from jaxleak import gradnorm, subspace
    from jaxleak.sensitivity import per_example_terms

    zoo, shape, default_batch, default_sens, twin = MODELS[name]
    batch, sens_batch = batch or default_batch, sens_batch or default_sens
    task = _task(name)
    x, y = _data(shape, batch)
    xs, ys = x[:sens_batch], y[:sens_batch]
    xj, yj, xsj, ysj = (jnp.asarray(a) for a in (x, y, xs, ys))
    probes = jax.random.rademacher(jax.random.key(1), (PROBES, *xs.shape), dtype=jnp.float32)
    batch_grad, floor = _batch_grad_fn(task), _sensitivity_floor_fn(task, PROBES)
    print(f"{name}: {task.num_params:,} parameters, batch {batch}, sensitivity batch {sens_batch}", flush=True)

    main = {
        "batch_grad": lambda: batch_grad(xj, yj),
        "sketch_grads": lambda: jaxleak.sketch_grads(task, x, y, dim=SKETCH_DIM),
        "grad_norm": lambda: gradnorm.per_example_norms(task, x, y),
        "grams": lambda: subspace.layer_grams(task, x, y),
        "gram_features": lambda: _gram_features(task, x, y),
    }
    if peers and twin is not None:
        main["torch_sketch"], main["torch_batch_grad"] = _torch_sketch_fn(twin, x, y, SKETCH_DIM, torch_device)
    sens = {
        "batch_grad": lambda: batch_grad(xsj, ysj),
        "sensitivity_floor": lambda: floor(xsj, ysj, probes),
        "sensitivity": lambda: per_example_terms(task, xs, ys, probes=PROBES),
    }
    if _seconds(main["batch_grad"]) < 0.1:  # a small model's batch gradient: more rounds for a steady median
        reps = 3 * reps
    t_main = interleaved(main, reps)
    t_sens = interleaved(sens, reps)
    per_ex = t_main["batch_grad"] / batch
    cbg = {k: t / batch / per_ex for k, t in t_main.items()}
    per_ex_s = t_sens["batch_grad"] / sens_batch
    cbg["sensitivity_floor"] = t_sens["sensitivity_floor"] / sens_batch / per_ex_s
    cbg["sensitivity"] = t_sens["sensitivity"] / sens_batch / per_ex_s
    result = {
        "model": zoo, "input_shape": list(shape), "params": int(task.num_params), "batch": batch,
        "sensitivity_batch": sens_batch, "probes": PROBES, "sketch_dim": SKETCH_DIM, "reps": reps,
        "seconds": {**{k: v for k, v in t_main.items()}, **{f"{k}@{sens_batch}": v for k, v in t_sens.items()}},
        "batch_grad_us_per_example": per_ex * 1e6,
        "cbg": cbg,
        "sensitivity_vs_floor": t_sens["sensitivity"] / t_sens["sensitivity_floor"],
    }
    if "torch_sketch" in t_main:
        result["sketch_speedup_vs_torch"] = t_main["torch_sketch"] / t_main["sketch_grads"]
        # each library against its own batch gradient: what separates the speed-up from the CBG
        result["torch_sketch_cbg_own"] = t_main["torch_sketch"] / t_main["torch_batch_grad"]
    if heavy:
        result["heavy"] = bench_heavy(task, shape, per_ex)
    result["goals"] = _goals(result)
    result["machine"] = machine_info()
    return result


def bench_heavy(task, shape, per_ex: float) -> dict:
    """V-information (latent, original) on 64 victims + 128 auxiliary examples and Inverting Gradients."""
    import jaxleak
    from jaxleak import grads

    xv, yv = _data(shape, 64, seed=1)
    xa, ya = _data(shape, 128, seed=2)
    out = {}

    def timed(key, fn, rows):
        fn()  # compile
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        out[key] = {"seconds": dt, "rows": rows, "cbg": dt / rows / per_ex}
        print(f"  {key}: {dt:.2f} s, {out[key]['cbg']:.1f} CBG", flush=True)

    timed("vinfo_latent", lambda: jaxleak.v_information(task, xv, yv, yv % 2, aux=(xa, ya, ya % 2)), 64 + 128)
    timed("vinfo_original", lambda: jaxleak.v_information(task, xv, yv, "input", aux=(xa, ya)), 64 + 128)
    victims = 8
    target = grads.layer_grads(task, xv[:victims], yv[:victims])
    timed("inversion", lambda: jaxleak.invert(task, target, restarts=1, steps=200, labels=yv[:victims]), victims)
    return out


def _goals(r: dict) -> dict:
    goals = {k: {"cbg": r["cbg"][k], "goal": g, "met": r["cbg"][k] <= g} for k, g in GOALS.items()}
    goals["sensitivity"] = {"x_floor": r["sensitivity_vs_floor"], "goal": SENSITIVITY_GOAL,
                            "met": r["sensitivity_vs_floor"] <= SENSITIVITY_GOAL}
    if "sketch_speedup_vs_torch" in r:
        goals["sketch_vs_torch"] = {"speedup": r["sketch_speedup_vs_torch"], "goal": PEER_GOAL,
                                    "met": r["sketch_speedup_vs_torch"] >= PEER_GOAL}
    return goals


def table(results: dict) -> str:
    rows = ["| model | batch grad (us/example) | sketch_grads | grad_norm | Grams: factors (with N x N products) "
            "| sensitivity, 16 probes (x floor; floor in CBG) | torch.func + sketch (jaxleak's speed-up; torch's "
            "own batch gradient) "
            "| V-info latent / original | inversion |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        c = r["cbg"]
        peer = (f"{c['torch_sketch']:.2f} ({r['sketch_speedup_vs_torch']:.2f}x; torch batch grad "
                f"{c['torch_batch_grad']:.2f})" if "torch_sketch" in c else "")
        heavy = r.get("heavy", {})
        vinfo = (f"{heavy['vinfo_latent']['cbg']:.0f} / {heavy['vinfo_original']['cbg']:.0f}" if heavy else "")
        inv = f"{heavy['inversion']['cbg']:.0f}" if heavy else ""
        rows.append(f"| {name} | {r['batch_grad_us_per_example']:.0f} | {c['sketch_grads']:.2f} | {c['grad_norm']:.2f} | "
                    f"{c['gram_features']:.2f} ({c['grams']:.2f}) | {r['sensitivity_vs_floor']:.2f}x ({c['sensitivity_floor']:.1f}) | {peer} | "
                    f"{vinfo} | {inv} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--heavy", default="lenet8", help="models that also price V-information and inversion ('' for none)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--merge", action="store_true", help="keep the other models' results already in --out")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    peers = not args.no_peers
    # PyTorch's OpenMP threads would otherwise spin after each of its calls and slow the JAX call timed next
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if peers:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError:
            print("torch is not installed (pip install -e '.[bench]'): no peer", flush=True)
            peers = False
    heavy = set(filter(None, args.heavy.split(",")))
    results = {}
    for name in names:
        results[name] = bench_model(name, args.reps, peers, name in heavy)
        print(json.dumps({name: results[name]["goals"]}, indent=None), flush=True)
    import jax

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"floor_{jax.default_backend()}.json")
    if args.merge and os.path.exists(out):
        with open(out) as fh:
            results = {**json.load(fh)["results"], **results}
    record = {"machine": machine_info(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": results}
    tmp = out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=1)
    os.replace(tmp, out)
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
