"""End-to-end time of ``jaxleak run`` on the default (digits, lenet, all measures).

Goal (issue 6): within 60 s on the 2-core CPU machine class, compile included.
The run goes through the public API (``jaxleak.run.run``) exactly as the CLI
calls it, in a fresh process, and the time of each stage is split into
compilation (XLA backend compile + tracing + lowering, from JAX's own
monitoring events) and the rest (compute and host work).

Usage: ``python benchmarks/end_to_end.py [--model lenet] [--dataset digits] [--n 256]``
Writes ``benchmarks/results/end_to_end[_<model>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

COMPILE_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    t_import = time.time()
    import jax

    from jaxleak import run as run_lib

    import_s = time.time() - t_import
    compile_log: list[tuple[float, str, float]] = []

    def listener(event, duration, **kwargs):
        if event in COMPILE_EVENTS:
            compile_log.append((time.time(), event, duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    options = {"dataset": args.dataset, "model": args.model}
    if args.n:
        options["n"] = args.n
    config = run_lib.RunConfig(**options)
    marks = [("start", time.time())]

    def on_measure(key, scores):
        marks.append((key, time.time()))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        results = run_lib.run(config, out=os.path.join(tmp, "run"), progress=False, on_measure=on_measure)
        total = time.time() - t0
    # Stage windows: prepare (data, init, training) ends when the first measure starts.
    prepare_s = results["timing"]["prepare_s"]
    windows = [("prepare", t0, t0 + prepare_s)]
    start = None
    for key in config.measures:
        seconds = results["timing"][key + "_s"]
        end = dict(marks)[key]
        windows.append((key, end - seconds, end))
        start = end
    windows.append(("write (results, figures, report)", start, t0 + total))
    stages = []
    for name, lo, hi in windows:
        compile_s = sum(d for t, e, d in compile_log if lo <= t <= hi)
        stages.append({"stage": name, "seconds": hi - lo, "compile_s": compile_s, "compute_s": hi - lo - compile_s})
    record = {
        "benchmark": "end_to_end",
        "command": "jaxleak run " + " ".join(f"--{k} {v}" for k, v in options.items()),
        "goal": "total within 60 s on the 2-core CPU machine class, compile included",
        "machine": machine_info(),
        "import_s": import_s,
        "total_s": total,
        "compile_s": sum(d for _, _, d in compile_log),
        "stages": stages,
        "meets_goal": total + import_s <= 60.0,
        "test_accuracy": results["training"]["test_accuracy"],
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   "end_to_end.json" if args.model == "lenet" else f"end_to_end_{args.model}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    for s in stages:
        print(f"{s['stage']:<36} {s['seconds']:7.2f} s  (compile {s['compile_s']:6.2f} s, other {s['compute_s']:6.2f} s)")
    print(f"{'total (after import)':<36} {total:7.2f} s; import {import_s:.2f} s; goal 60 s: "
          f"{'met' if record['meets_goal'] else 'NOT met'}")


if __name__ == "__main__":
    main()
