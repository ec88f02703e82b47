"""Scaling of the gradient engine: time and memory vs examples, model size and devices.

Each point runs in a fresh child process (so peak RSS is that point's own and
the device count can be set before jax is imported) and times, after a
warm-up call that compiles:

- ``sketch_grads`` (per-example gradients of every layer, sketched to 1024
  features per layer: what V-information and the sketch Grams consume);
- ``sensitivity`` (Hutchinson, 4 probes; forward-over-reverse).

Axes: number of examples (lenet, 8x8 digits), model (mlp, lenet, alexnet,
vgg11, vgg16, resnet18 on 32x32x3), device count (1, 2, 4; on a CPU these are
XLA's fake host devices sharing the same cores, so no speed-up is expected
there: the axis shows the sharding overhead; on a multi-GPU host it shows
real scaling).

Usage: ``python benchmarks/scaling.py [--axes examples,models,devices] [--quick]``
Writes ``benchmarks/results/scaling_<backend>.json`` and ``scaling_<backend>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys, time
import numpy as np
import jax
import jaxleak as jl
from jaxleak.sharding import make_mesh, use_mesh

model, n, shape, devices, probes = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
jl.enable_compile_cache()  # as the CLI does: first_call_s is compile time only for programs not cached yet
if shape == "digits":
    ds = jl.data.load("digits")
else:
    ds = jl.data.load("digits", resize=32, channels=3)
idx = np.arange(n) % ds.n
x, y = ds.x[idx], ds.y[idx]
task = jl.Task.init(model, ds, 0)
out = {"model": model, "n": n, "shape": list(ds.input_shape), "devices": devices, "params": task.num_params}
mesh = make_mesh(devices) if devices > 1 else None
with use_mesh(mesh):
    for name, fn in (("sketch_grads", lambda: jl.sketch_grads(task, x, y, dim=1024)),
                     ("sensitivity", lambda: jl.sensitivity(task, x, y, probes=probes))):
        t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
        times = []
        for _ in range(2):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
        best = min(times)
        out[name] = {"first_call_s": first, "s": best, "examples_per_s": n / best}
out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out["backend"] = jax.default_backend()
print("RESULT " + json.dumps(out))
"""


def run_point(model: str, n: int, shape: str, devices: int, probes: int) -> dict:
    env = dict(os.environ)
    if devices > 1 and env.get("JAX_PLATFORMS", "cpu") == "cpu" and "cuda" not in env.get("JAX_PLATFORMS", ""):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} " + env.get("XLA_FLAGS", "")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, model, str(n), shape, str(devices), str(probes)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            point = json.loads(line[len("RESULT "):])
            point["wall_s"] = time.time() - t0
            return point
    return {"model": model, "n": n, "devices": devices, "error": proc.stderr[-1500:]}


def main() -> None:
    from machine import machine_info

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axes", default="examples,models,devices")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller points")
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    axes = args.axes.split(",")
    plan = []
    if "examples" in axes:
        for n in ((64, 256) if args.quick else (64, 256, 1024, 4096)):
            plan.append(("examples", "lenet", n, "digits", 1))
    if "models" in axes:
        names = ("mlp", "lenet", "alexnet") if args.quick else ("mlp", "lenet", "alexnet", "vgg11", "vgg16", "resnet18")
        for m in names:
            plan.append(("models", m, 32 if args.quick else 64, "cifar", 1))
    if "devices" in axes:
        for d in ((1, 2) if args.quick else (1, 2, 4)):
            plan.append(("devices", "lenet", 512, "digits", d))
    points = []
    for axis, model, n, shape, devices in plan:
        point = run_point(model, n, shape, devices, args.probes)
        point["axis"] = axis
        points.append(point)
        if "error" in point:
            print(f"{axis:8} {model:9} n={n:5} devices={devices}: ERROR {point['error'][-300:]}")
        else:
            print(f"{axis:8} {model:9} n={n:5} devices={devices}: sketch {point['sketch_grads']['examples_per_s']:9.1f} ex/s, "
                  f"sensitivity {point['sensitivity']['examples_per_s']:8.1f} ex/s, peak RSS {point['peak_rss_gib']:.2f} GiB")
    info = machine_info()
    backend = info["backend"]
    record = {"benchmark": "scaling", "machine": info, "probes": args.probes, "points": points}
    folder = os.path.join(os.path.dirname(__file__), "results")
    out = args.out or os.path.join(folder, f"scaling_{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    plot(points, out[:-5] + ".png", f"{backend}: {info['devices'][0]}")


def plot(points: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in points if "error" not in p]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, axis, key, label in ((axes[0], "examples", "n", "examples"), (axes[1], "models", "params", "parameters"),
                                 (axes[2], "devices", "devices", "devices")):
        pts = sorted((p for p in ok if p["axis"] == axis), key=lambda p: p[key])
        if not pts:
            ax.set_visible(False)
            continue
        xs = [p[key] for p in pts]
        for measure in ("sketch_grads", "sensitivity"):
            ax.plot(xs, [p[measure]["s"] for p in pts], marker="o", label=f"{measure} time [s]")
        ax2 = ax.twinx()
        ax2.plot(xs, [p["peak_rss_gib"] for p in pts], color="gray", linestyle="--", marker="x", label="peak RSS")
        ax2.set_ylabel("peak RSS [GiB]")
        if axis != "devices":
            ax.set_xscale("log")
        if axis == "models":
            for p in pts:
                ax.annotate(p["model"], (p["params"], p["sketch_grads"]["s"]), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per call")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"jaxleak scaling ({title})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
