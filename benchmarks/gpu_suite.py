"""One suite for an accelerator: jaxleak beside torch.func and Opacus on the same card, one JSON.

Runs on whatever backend JAX finds (GPU, TPU or CPU) and reuses the script
that owns each benchmark:

- ``per_example`` (``per_example_grads.py``): per-example gradients of every
  layer, LeNet 28x28x1, the CIFAR CNN and ResNet-18 (GroupNorm) at 32x32x3:
  ``jaxleak.layer_grads`` (default chunking; one chunk), a jitted
  vmap(grad), torch.func vmap(grad) and Opacus;
- ``sensitivity`` (``sensitivity.py``): Hutchinson (16 probes) against the
  GradDefense surrogate and the exact Jacobian (torch.func jacfwd), and
  against jaxleak's own surrogate and exact mode, LeNet on 8x8 digits;
- ``ensemble`` (``vinfo_ensemble.py``): the 64-member V-information attack
  ensemble (8 layers x 8 weight decays, on the attacker's cross-validated
  split) against one member;
- ``inversion`` (``inversion.py``): Inverting Gradients, 8 restarts against 1;
- ``scaling`` (``scaling.py``): sketch_grads and sensitivity against the
  number of examples and the model, one fresh process per point;
- ``floor`` (``floor.py``): every measure in batch gradients (CBG) for lenet
  8x8x1 and 28x28x1, the CIFAR CNN, alexnet, resnet18 and vgg16, next to its
  floor and the torch.func-then-sketch peer on the same card.

The PyTorch peers run in this process when ``torch`` and ``opacus`` import
(the ``bench`` extra): on CUDA when JAX runs on a GPU and torch has a CUDA
build, on the CPU when JAX does; otherwise they are skipped and the reason
is recorded (a CPU peer beside a GPU jaxleak would compare nothing).
Compilation is excluded from every timing (a warm-up call first); the
compile cache is on as in the CLI, so a second run of the suite starts
faster. A section that fails records its error and the suite goes on.

``--small`` shrinks every section (and leaves out the jitted vmap(grad)
reference and the plain-jvp sensitivity variant) and compiles without
XLA's optimisations, so the suite finishes in about a minute on a 2-core
CPU: a smoke test of the script, not a benchmark.

Usage: ``python benchmarks/gpu_suite.py [--small] [--sections per_example,sensitivity,...]
[--reps 5] [--out FILE]``
Writes ``benchmarks/results/gpu_suite_<backend>[_small].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SECTIONS = ("per_example", "sensitivity", "ensemble", "inversion", "scaling", "floor")


def environment() -> dict:
    """The machine (``machine.py``), the device and memory JAX sees, and every library version that matters."""
    import importlib.metadata

    import jax
    import jax.extend

    from machine import machine_info

    info = machine_info()
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    info["device"] = {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                      "memory_bytes_limit": stats.get("bytes_limit"),
                      "platform_version": jax.extend.backend.get_backend().platform_version}
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "numpy",
                 "scikit-learn", "torch", "opacus", "jaxleak"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def peers(backend: str) -> dict:
    """Where the PyTorch peers run: ``{"device": "cuda" | "cpu" | None, "skipped": reason or None}``."""
    import per_example_grads

    missing = per_example_grads.peers_available()
    if missing:
        return {"device": None, "skipped": missing}
    import torch

    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if backend == "cpu":
        return {**out, "device": "cpu", "skipped": None}
    if backend == "gpu" and torch.cuda.is_available():
        return {**out, "device": "cuda", "gpu": torch.cuda.get_device_name(0), "skipped": None}
    return {**out, "device": None,
            "skipped": f"JAX runs on {backend} but torch has no device there (torch {torch.__version__}, "
                       f"CUDA {torch.version.cuda}); a CPU peer would compare nothing"}


# ---------------------------------------------------------------- sections


def per_example(small: bool, reps: int, peer: dict) -> dict:
    import per_example_grads

    batches = {"lenet": 8, "cifar_cnn": 4, "resnet18": 2} if small else {}
    out = {}
    for config in ("lenet", "cifar_cnn", "resnet18"):
        res = per_example_grads.bench_config(config, reps, batch=batches.get(config),
                                             peers=peer["device"] is not None, torch_device=peer["device"] or "cpu",
                                             reference=not small)
        out[config] = res
        print(f"per_example {config:10s} " + "  ".join(f"{k} {m['examples_per_s']:.0f} ex/s"
                                                      for k, m in res["methods"].items()), flush=True)
    return out


def sensitivity(small: bool, reps: int, peer: dict) -> dict:
    import sensitivity as sensitivity_bench

    args = types.SimpleNamespace(device="gpu" if peer["device"] == "cuda" else "cpu", n=16 if small else 256,
                                 n_exact_torch=None, reps=reps, probes=4 if small else 16, resize=None,
                                 error_probes=4 if small else 64, peers=peer["device"] is not None,
                                 plain_jvp=not small)
    res = sensitivity_bench.bench_sensitivity(args)
    print("sensitivity " + "  ".join(f"{k} {v:.0f} ex/s" for k, v in res["examples_per_second"].items()), flush=True)
    return res


def ensemble(small: bool, reps: int, peer: dict) -> dict:
    import statistics

    import floor as floor_bench
    import vinfo_ensemble as vb

    from jaxleak import ensemble as ens

    n, width, steps, victims, folds = (200, 32, 20, 40, 2) if small else (vb.N, vb.WIDTH, 300, vb.VICTIMS, 5)
    x, y = vb.make_data(n=n, width=width)
    split = ens.attacker_split(victims, n - victims, folds, seed=0, strata=y[victims:])  # as vinfo_ensemble.py
    members = [ens.Member("linear", wd, 0) for wd in vb.WEIGHT_DECAYS]
    runs = {"ensemble_64": lambda: vb.run_ensemble(x, y, split, members, steps),
            "one_member": lambda: vb.run_ensemble(x[:1], y, split, members[:1], steps)}
    times = floor_bench.interleaved_times(runs, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"layers": vb.LAYERS, "configurations": vb.CONFIGS, "examples": n, "victims": victims, "folds": folds,
           "features": width, "steps": steps,
           "seconds": times, "median_s": med, "ensemble_over_one_member": med["ensemble_64"] / med["one_member"],
           "goal": "ensemble <= 4x one member"}
    print(f"ensemble 64 members {med['ensemble_64']:.3f} s, one {med['one_member']:.3f} s: "
          f"{res['ensemble_over_one_member']:.1f}x", flush=True)
    return res


def inversion(small: bool, reps: int, peer: dict) -> dict:
    import inversion as inversion_bench

    cases = ([("mlp-sigmoid-8x8", "mlp", "sigmoid", 8)] if small else
             [("mlp-sigmoid-8x8", "mlp", "sigmoid", 8), ("lenet-relu-8x8", "lenet", "relu", 8),
              ("lenet-relu-32x32x3", "lenet", "relu", 32)])
    # The PyTorch IG peer is a CPU loop (inversion.py): beside a GPU it is left out.
    with_torch = peer["device"] == "cpu"
    out = {}
    for name, model, act, size in cases:
        res = inversion_bench.case(name, model, act, size, 5 if small else 100, reps, 1e-4, peers=with_torch)
        out[name] = res
        print(f"inversion {name}: 8 restarts / 1 = {res['cost_8_vs_1_restart']:.2f}x", flush=True)
    return out


def scaling(small: bool, reps: int, peer: dict) -> dict:
    import jax

    import scaling as scaling_bench

    gpu = jax.default_backend() != "cpu"
    # --small: the sensitivity section's shapes, so the child finds those programs in the compile cache
    plan = [("examples", "lenet", n, "digits", 1) for n in
            ((16,) if small else (256, 1024, 4096, 16384, 65536) if gpu else (64, 256, 1024, 4096))]
    if not small:
        plan += [("models", m, 256 if gpu else 64, "cifar", 1)
                 for m in ("mlp", "lenet", "alexnet", "vgg11", "vgg16", "resnet18")]
        plan += [("devices", "lenet", 4096, "digits", d) for d in (2, 4, 8) if d <= jax.device_count()]
    points = []
    for axis, model, n, shape, devices in plan:
        point = scaling_bench.run_point(model, n, shape, devices, 4)
        point["axis"] = axis
        points.append(point)
        if "error" in point:
            raise RuntimeError(f"scaling point {model} n={n}: {point['error'][-1000:]}")
        print(f"scaling {axis} {model} n={n}: sketch {point['sketch_grads']['examples_per_s']:.0f} ex/s, "
              f"sensitivity {point['sensitivity']['examples_per_s']:.0f} ex/s", flush=True)
    return {"probes": 4, "points": points}


def floor(small: bool, reps: int, peer: dict) -> dict:
    import floor as floor_bench

    out = {}
    for name in (("lenet8", "lenet28") if small else floor_bench.MODELS):
        batch, sens = ((4, 2) if small else (None, None))
        res = floor_bench.bench_model(name, reps, peer["device"] is not None, name == "lenet8" and not small,
                                      torch_device=peer["device"] or "cpu", batch=batch, sens_batch=sens)
        out[name] = res
        print(f"floor {name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in res["cbg"].items()), flush=True)
    print(floor_bench.table(out), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes: a smoke test in about a minute on a CPU")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 1 with --small)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    reps = args.reps or (1 if args.small else 5)
    # JAX would take 75% of a GPU's memory up front; half leaves the PyTorch peers room in the same process.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    if args.small:
        # A smoke test is bound by XLA compile time; unoptimised code compiles several times faster.
        os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 " + os.environ.get("XLA_FLAGS", "")).strip()

    import jax

    from jaxleak import enable_compile_cache

    cache = enable_compile_cache()
    backend = jax.default_backend()
    record = {"benchmark": "gpu_suite", "small": args.small, "reps": reps, "compile_cache": cache,
              "machine": environment(), "peers": peers(backend), "sections": {}, "seconds": {}}
    if backend == "cpu":
        record["note"] = "no accelerator: JAX ran on the CPU, so these are CPU numbers"
    if args.small:
        record["note"] = (record.get("note", "") + "; " if backend == "cpu" else "") + (
            "--small: smoke-test sizes, XLA at optimisation level 0, one repetition: not a benchmark")
    funcs = {"per_example": per_example, "sensitivity": sensitivity, "ensemble": ensemble,
             "inversion": inversion, "scaling": scaling, "floor": floor}
    for name in sections:
        t0 = time.perf_counter()
        try:
            record["sections"][name] = funcs[name](args.small, reps, record["peers"])
        except Exception as err:  # noqa: BLE001 - one failed section must not lose the others' numbers
            traceback.print_exc()
            record["sections"][name] = {"error": f"{type(err).__name__}: {err}",
                                        "traceback": traceback.format_exc()[-3000:]}
        record["seconds"][name] = time.perf_counter() - t0
    record["machine"]["load_average_at_end"] = list(os.getloadavg())
    out = args.out or os.path.join(HERE, "results", f"gpu_suite_{backend}{'_small' if args.small else ''}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2, default=str)
    failed = [k for k, v in record["sections"].items() if "error" in v]
    print(f"wrote {out} ({sum(record['seconds'].values()):.0f} s"
          + (f"; failed: {failed}" if failed else "") + ")")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
