"""Benchmark of the attack-independent measures (issue 3).

1. Sensitivity on LeNet (digits, 8x8x1), the same weights in JAX and PyTorch,
   timed interleaved in one process (median of ``--reps`` rounds):
   - jaxleak's Hutchinson estimator, 16 probes (full ||J_l||_F^2 for every layer);
   - PyTorch exact Jacobian: torch.func vmap(jacfwd(grad)) per example;
   - PyTorch GradDefense surrogate: double backward with an all-ones
     cotangent, one per parameter tensor, on the batch;
   - jaxleak's own ``ones`` surrogate and ``exact`` mode, for reference.
   Goals: Hutchinson >= 50x the exact PyTorch Jacobian and >= 1x the
   surrogate, in examples per second. Also the estimator's error against
   jaxleak's exact mode.
2. subspace_distance for vgg16 on 32x32x3 with n = 256 per group (synthetic
   images): wall time and peak resident memory, measured in a subprocess
   (getrusage ru_maxrss). Goal: under 4 GiB.

Usage: python benchmarks/sensitivity.py [--device cpu|gpu] [--out FILE]
Results go to benchmarks/results/sensitivity-<device>.json by default.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from machine import machine_info  # noqa: E402


def _parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--n", type=int, default=256, help="examples per timed call")
    p.add_argument("--n-exact-torch", type=int, default=None,
                   help="examples per call of the (slow) exact PyTorch Jacobian (default: 32 on cpu, --n on gpu)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--resize", type=int, default=None,
                   help="digits scaled to RESIZE x RESIZE (28: the MNIST shape; default: the native 8x8)")
    p.add_argument("--out", default=None)
    p.add_argument("--skip-subspace", action="store_true")
    p.add_argument("--subspace-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--per-group", type=int, default=256)
    return p.parse_args()


# ---------------------------------------------------------------- PyTorch twin of jaxleak's LeNet

def torch_lenet(params, device):
    import torch
    import torch.nn.functional as F

    class LeNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv0 = torch.nn.Conv2d(1, 6, 5, padding=2)
            self.conv1 = torch.nn.Conv2d(6, 16, 5, padding=2)
            self.fc0 = torch.nn.Linear(params["Dense_0"]["kernel"].shape[0], 120)
            self.fc1 = torch.nn.Linear(120, 84)
            self.fc2 = torch.nn.Linear(84, params["Dense_2"]["kernel"].shape[1])

        @staticmethod
        def pool(x):
            return x if min(x.shape[-2:]) < 2 else F.max_pool2d(x, 2)

        def forward(self, x):  # x: (B, H, W, C) like the JAX model
            x = x.permute(0, 3, 1, 2)
            x = self.pool(F.relu(self.conv0(x)))
            x = self.pool(F.relu(self.conv1(x)))
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in NHWC order, as Flax does
            x = F.relu(self.fc0(x))
            x = F.relu(self.fc1(x))
            return self.fc2(x)

    import numpy as np

    model = LeNet()
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)
    with torch.no_grad():
        for tm, name in ((model.conv0, "Conv_0"), (model.conv1, "Conv_1")):
            tm.weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
            tm.bias.copy_(t(params[name]["bias"]))
        for tm, name in ((model.fc0, "Dense_0"), (model.fc1, "Dense_1"), (model.fc2, "Dense_2")):
            tm.weight.copy_(t(params[name]["kernel"]).T)
            tm.bias.copy_(t(params[name]["bias"]))
    return model.to(device).eval()


def torch_exact_fn(model):
    """Per-example ||J_t||_F^2 for every parameter tensor: torch.func vmap(jacfwd(grad))."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, jacfwd, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(x, y):
        return F.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    def grad_x(x, y):
        return grad(lambda p: F.cross_entropy(functional_call(model, p, (x[None],)), y[None]))(params)

    jac = vmap(jacfwd(grad_x, argnums=0))

    def run(x, y):
        j = jac(x, y)
        return {k: v.flatten(1).pow(2).sum(1) for k, v in j.items()}

    del loss_one
    return run


def torch_surrogate_fn(model):
    """GradDefense surrogate ||J_t^T 1|| per example and parameter tensor (double backward)."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters()]

    def run(x, y):
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        out = []
        for i, g in enumerate(grads):
            (dx,) = torch.autograd.grad(g.sum(), x, retain_graph=i < len(grads) - 1)
            out.append(dx.flatten(1).norm(dim=1))
        return torch.stack(out)

    return run


# ---------------------------------------------------------------- timing

def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def bench_sensitivity(args) -> dict:
    """The timings and checks of part 1; with ``args.peers`` False or without torch, only jaxleak's own
    modes run (the peer fields are None)."""
    import jax
    import numpy as np

    from jaxleak import Task, data
    from jaxleak.sensitivity import per_example_terms, sensitivity

    torch = None
    if getattr(args, "peers", True):
        try:
            import torch
        except ImportError:
            pass

    ds = data.load("digits", resize=args.resize) if args.resize else data.load("digits")
    task = Task.init("lenet", ds, seed=0)
    side = ds.x.shape[1]
    # exact modes hold the (P x D) Jacobian per example: few examples per call when D is large
    exact_chunk = args.n if side * side <= 64 else 4
    ne = min(args.n_exact_torch or (args.n if args.device == "gpu" else 32 if side * side <= 64 else 4), args.n)
    x, y = ds.x[: args.n], ds.y[: args.n]
    diff = agree = None
    if torch is not None:
        tdev = torch.device("cuda" if args.device == "gpu" else "cpu")
        sync = (lambda: torch.cuda.synchronize()) if args.device == "gpu" else (lambda: None)
        model = torch_lenet(task.params, tdev)
        xt = torch.tensor(x, device=tdev)
        yt = torch.tensor(y, dtype=torch.long, device=tdev)
        with torch.no_grad():
            diff = float(np.abs(model(xt).cpu().numpy() - np.asarray(task.apply_fn(task.params, x))).max())
        exact_t = torch_exact_fn(model)
        surr_t = torch_surrogate_fn(model)

    def run_hutch():
        per_example_terms(task, x, y, probes=args.probes, chunk_size=args.n)

    # The same estimator through the plain jvp of the per-example gradient (no
    # activation/error route): a fresh task (own compile cache) built while
    # jaxleak cannot see the Linen layers.
    from jaxleak import grads as grads_lib

    plain_jvp = getattr(args, "plain_jvp", True)
    generic = Task(task.apply_fn, task.params, task.input_shape, name="lenet-generic")
    seen = grads_lib._dense_layer_factors, grads_lib._conv_layer_factors
    grads_lib._dense_layer_factors = grads_lib._conv_layer_factors = lambda *a: None
    try:
        if plain_jvp:
            per_example_terms(generic, x, y, probes=args.probes, chunk_size=args.n)
    finally:
        grads_lib._dense_layer_factors, grads_lib._conv_layer_factors = seen

    def run_hutch_generic():
        per_example_terms(generic, x, y, probes=args.probes, chunk_size=args.n)

    def run_ones():
        per_example_terms(task, x, y, method="ones", chunk_size=args.n)

    def run_exact_jax():
        per_example_terms(task, x[:ne], y[:ne], method="exact", chunk_size=min(ne, exact_chunk))

    def run_exact_torch():
        exact_t(xt[:ne], yt[:ne])
        sync()

    def run_surr_torch():
        surr_t(xt, yt)
        sync()

    methods = {
        "jaxleak_hutchinson": (run_hutch, args.n),
        "jaxleak_ones_surrogate": (run_ones, args.n),
        "jaxleak_exact": (run_exact_jax, ne),
    }
    if plain_jvp:
        methods["jaxleak_hutchinson_plain_jvp"] = (run_hutch_generic, args.n)
    if torch is not None:
        methods["torch_exact_jacfwd"] = (run_exact_torch, ne)
        methods["torch_graddefense_surrogate"] = (run_surr_torch, args.n)
    for fn, _ in methods.values():  # compile / warm up
        fn()
    times = {k: [] for k in methods}
    for _ in range(args.reps):  # interleaved rounds
        for name, (fn, _) in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    throughput = {name: methods[name][1] / _median(ts) for name, ts in times.items()}

    if torch is not None:  # torch exact agrees with jaxleak exact (per parameter tensor -> per layer)
        te = exact_t(xt[:4], yt[:4])
        sq_exact, _ = per_example_terms(task, x[:4], y[:4], method="exact")
        layer_of = {"conv0": "Conv_0", "conv1": "Conv_1", "fc0": "Dense_0", "fc1": "Dense_1", "fc2": "Dense_2"}
        torch_sq = {}
        for k, v in te.items():
            torch_sq[layer_of[k.split(".")[0]]] = torch_sq.get(layer_of[k.split(".")[0]], 0) + v.cpu().numpy()
        agree = max(float(np.max(np.abs(torch_sq[n] - sq_exact[n][:, 0]) / np.maximum(sq_exact[n][:, 0], 1e-12)))
                    for n in torch_sq)

    # estimator error against jaxleak's exact mode on the same examples
    ne_err = args.n if side * side <= 64 else 64
    ex = sensitivity(task, x[:ne_err], y[:ne_err], method="exact", chunk_size=min(ne_err, exact_chunk))
    errors = {"examples": ne_err}
    for probes in sorted({args.probes, getattr(args, "error_probes", 64)}):
        h = sensitivity(task, x[:ne_err], y[:ne_err], probes=probes, seed=1)
        errors[str(probes)] = {
            n: {"exact": ex[n].value, "hutchinson": h[n].value,
                "rel_error": abs(h[n].value - ex[n].value) / ex[n].value,
                "probe_ci": list(h[n]["probe_ci"]),
                "exact_in_probe_ci": bool(h[n]["probe_ci"][0] <= ex[n].value <= h[n]["probe_ci"][1])}
            for n in ex
        }
    hut = throughput["jaxleak_hutchinson"]
    exact_x = hut / throughput["torch_exact_jacfwd"] if torch is not None else None
    surrogate_x = hut / throughput["torch_graddefense_surrogate"] if torch is not None else None
    return {
        "model": "lenet", "data": f"digits {side}x{side}x1", "examples_per_call": args.n,
        "torch_exact_examples_per_call": ne, "probes": args.probes, "reps": args.reps,
        "logits_max_abs_diff_jax_vs_torch": diff,
        "exact_sq_norm_rel_diff_jax_vs_torch": agree,
        "seconds": {k: sorted(v) for k, v in times.items()},
        "examples_per_second": throughput,
        "speedup_vs_torch_exact": exact_x,
        "ratio_vs_torch_surrogate": surrogate_x,
        "speedup_vs_jaxleak_exact": hut / throughput["jaxleak_exact"],
        "ratio_vs_jaxleak_ones_surrogate": hut / throughput["jaxleak_ones_surrogate"],
        "goal_50x_exact_met": exact_x >= 50 if exact_x is not None else None,
        "goal_1x_surrogate_met": surrogate_x >= 1 if surrogate_x is not None else None,
        "estimator_error_vs_exact": errors,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "jax_backend": jax.default_backend(),
    }


def subspace_child(args) -> None:
    """Runs in a subprocess: vgg16 32x32x3, n per group, synthetic data; prints one JSON line."""
    import jax
    import numpy as np

    from jaxleak import Task, data
    from jaxleak.subspace import subspace_distance

    rng = np.random.default_rng(0)
    n = 2 * args.per_group
    ds = data.from_arrays(rng.random((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n),
                          {"z": np.repeat([0, 1], args.per_group)}, num_classes=10)
    task = Task.init("vgg16", ds, seed=0)
    t0 = time.perf_counter()
    res = subspace_distance(task, ds.x, ds.y, ds.latent["z"], stratify=False)
    wall = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    print(json.dumps({
        "model": "vgg16", "input": [32, 32, 3], "n_per_group": args.per_group, "seconds": wall,
        "peak_rss_bytes": peak_rss,
        "device_peak_bytes": (stats or {}).get("peak_bytes_in_use"),
        "gram_sources": sorted({s["gram_source"] for s in res.values()}),
        "layers": {k: {"value": v.value, "null_mean": v["null_mean"], "k": v["k"], "gram_source": v["gram_source"]}
                   for k, v in res.items()},
    }))


def bench_subspace(args) -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cmd = [sys.executable, os.path.abspath(__file__), "--subspace-child", "--device", args.device,
           "--per-group", str(args.per_group)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["children_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    out["goal_under_4GiB_met"] = out["peak_rss_bytes"] < 4 * 2 ** 30
    return out


def main():
    args = _parse()
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.subspace_child:
        subspace_child(args)
        return
    result = {
        "machine": {**machine_info(), "device": args.device},
        "sensitivity": bench_sensitivity(args),
    }
    if args.device == "gpu":
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0)
    if not args.skip_subspace:
        result["subspace_distance"] = bench_subspace(args)
    out = args.out or os.path.join(HERE, "results", f"sensitivity-{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    s = result["sensitivity"]
    print(f"examples/s: " + ", ".join(f"{k} {v:.1f}" for k, v in s["examples_per_second"].items()))
    if s["speedup_vs_torch_exact"] is None:
        print("torch is not installed: no peer ratios")
    else:
        print(f"hutchinson ({s['probes']} probes) vs torch exact: {s['speedup_vs_torch_exact']:.1f}x "
              f"(goal 50x: {'met' if s['goal_50x_exact_met'] else 'NOT met'}); vs torch surrogate: "
              f"{s['ratio_vs_torch_surrogate']:.2f}x (goal 1x: {'met' if s['goal_1x_surrogate_met'] else 'NOT met'})")
    if "subspace_distance" in result:
        sd = result["subspace_distance"]
        if "error" in sd:
            print("subspace_distance failed:", sd["error"][-500:])
        else:
            print(f"subspace_distance vgg16 32x32x3 n={sd['n_per_group']}/group: {sd['seconds']:.1f} s, "
                  f"peak RSS {sd['peak_rss_bytes'] / 2 ** 30:.2f} GiB "
                  f"(goal < 4 GiB: {'met' if sd['goal_under_4GiB_met'] else 'NOT met'})")
    print("wrote", out)


if __name__ == "__main__":
    main()
