"""Peak resident memory of a full ``jaxleak run`` (all measures) on a large model.

Goal (issue 6): vgg16 on 32x32x3 with N = 2048 measured examples finishes
with peak RSS under 4 GiB (N x P per-example gradients alone would be about
2048 x 15.2 M x 4 B = 125 GB).

The data are the shipped digits scaled to 32x32x3 (``digits`` with
``resize=32, channels=3``), augmented by one-pixel shifts to have enough
held-out examples, and written to a temporary .npz; the run goes through the
CLI in a child process, whose peak RSS is read from ``getrusage`` (and
sampled from /proc while it runs).

Usage: ``python benchmarks/memory.py [--model vgg16] [--n 2048] [--probes 16]``
Writes ``benchmarks/results/memory[_<model>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402


def make_data(path: str, n_eval: int, train_fraction: float) -> None:
    import numpy as np

    from jaxleak import data

    base = data.load("digits", resize=32, channels=3)
    need = int(np.ceil(n_eval / (1 - train_fraction))) + 8
    xs, ys, zs = [], [], []
    shift = 0
    while sum(len(x) for x in xs) < need:
        dy, dx = divmod(shift, 3)
        xs.append(np.roll(base.x, (dy - 1, dx - 1), axis=(1, 2)))
        ys.append(base.y)
        zs.append(base.latent["thickness"])
        shift += 1
    np.savez(path, x=np.concatenate(xs)[:need], y=np.concatenate(ys)[:need],
             latent_thickness=np.concatenate(zs)[:need])


def sample_rss(pid: int, peak: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=0)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--permutations", type=int, default=20)
    parser.add_argument("--measures", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    train_fraction = 0.1
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "digits32.npz")
        make_data(npz, args.n, train_fraction)
        cfg = os.path.join(tmp, "run.toml")
        with open(cfg, "w") as f:
            f.write(f"train_fraction = {train_fraction}\n")
        cmd = [sys.executable, "-m", "jaxleak.cli", "run", "--config", cfg, "--dataset", f"npz:{npz}",
               "--model", args.model, "--n", str(args.n), "--epochs", str(args.epochs),
               "--probes", str(args.probes), "--permutations", str(args.permutations),
               "--out", os.path.join(tmp, "run"), "--no-progress"]
        if args.measures:
            cmd += ["--measures", args.measures]
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak, stop = [0], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, stop), daemon=True)
        sampler.start()
        output = proc.communicate()[0]
        stop.set()
        wall = time.time() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        results = None
        if proc.returncode == 0:
            with open(os.path.join(tmp, "run", "results.json")) as f:
                results = json.load(f)
    peak_rss = max(usage.ru_maxrss * 1024, peak[0])
    record = {
        "benchmark": "memory",
        "command": " ".join(cmd[1:]).replace(tmp, "<tmp>"),
        "goal": "peak RSS under 4 GiB for vgg16, 32x32x3, N=2048, all measures",
        "machine": machine_info(),
        "model": args.model,
        "n": args.n,
        "returncode": proc.returncode,
        "wall_s": wall,
        "peak_rss_gib": peak_rss / 2 ** 30,
        "meets_goal": proc.returncode == 0 and peak_rss < 4 * 2 ** 30,
        "timing": results["timing"] if results else None,
        "num_params": results["model"]["num_params"] if results else None,
        "output_tail": output[-3000:],
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "memory.json" if args.model == "vgg16" else f"memory_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    print(output[-2000:])
    print(f"peak RSS {record['peak_rss_gib']:.2f} GiB, wall {wall:.0f} s, exit {proc.returncode}; "
          f"goal (< 4 GiB): {'met' if record['meets_goal'] else 'NOT met'}")


if __name__ == "__main__":
    main()
