"""The model matrix: every zoo model through a default ``jaxleak run`` at 32x32x3, per model and measure.

For each model (``mlp lenet alexnet vgg11 vgg16 resnet18 resnet20``) and data set (``digits`` resized to
32x32 with 3 channels, and ``planted`` at 32x32x3), one ``jaxleak run`` with every default measure at
n = 128 victims, 256 auxiliary examples and 1 epoch of training, each in a fresh process with a fresh
compile cache (cold). Recorded per model and measure: seconds, the process's peak resident memory at the
end of the measure, and whether every value and interval is finite; per run: total seconds, compilations,
peak memory, the exit status and, when a run fails, its one-line error. Goals (issue "every zoo model end
to end"): every value finite, peak memory under 4 GiB, each run within 15 minutes.

Usage: ``python benchmarks/models.py [--models mlp,lenet,...] [--data digits,planted] [--n 128]
[--aux-n 256] [--timeout 1800] [--out benchmarks/results/models.json]``. Writes the JSON after every run, so
an interrupted matrix keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

MODELS = ("mlp", "lenet", "alexnet", "vgg11", "vgg16", "resnet18", "resnet20")
DATA = {"digits": ["resize=32", "channels=3"], "planted": ["resize=32", "channels=3"]}
GOAL_S, GOAL_GIB = 900.0, 4.0


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def finite_report(entry) -> tuple[bool, list[str]]:
    """Whether every layer's value and interval of a measure is finite (an 'undefined' layer says why)."""
    bad = []
    for name, layer in (entry.get("layers") or {}).items():
        values = [layer.get("value")] + list(layer.get("ci") or [])
        if any(v is None or not math.isfinite(float(v)) for v in values) and not layer.get("undefined"):
            bad.append(name)
    return not bad, bad


def _measure_entries(measures: dict, prefix: str = ""):
    for key, entry in measures.items():
        if isinstance(entry, dict) and "layers" in entry:
            yield prefix + key, entry
        elif isinstance(entry, dict):
            yield from _measure_entries(entry, prefix + key + ".")


def one_run(spec: dict) -> dict:
    """One ``jaxleak run`` in this process, through the CLI's own code path (compile cache as the CLI sets it)."""
    from jaxleak import cli
    from jaxleak import run as run_lib

    peaks: dict[str, float] = {}
    marks: dict[str, float] = {}
    original = run_lib.run

    def run_with_marks(config, **kwargs):
        def on_measure(key, scores):
            marks[key] = time.time()
            peaks[key] = peak_rss_gib()

        return original(config, **{**kwargs, "on_measure": on_measure})

    run_lib.run = run_with_marks
    argv = ["run", "--model", spec["model"], "--dataset", spec["dataset"], "--n", str(spec["n"]), "--aux-n",
            str(spec["aux_n"]), "--epochs", "1", "--out", spec["out"], "--no-progress"]
    for opt in spec.get("data_opts", DATA[spec["dataset"]]):
        argv += ["--data-opt", opt]
    argv += spec.get("extra", [])
    t0 = time.time()
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = cli.main(argv)
        except SystemExit as exit_:  # argparse
            status = exit_.code
    total = time.time() - t0
    shown = " ".join(a if a != spec["out"] else "DIR" for a in argv)
    out = {"argv": "jaxleak " + shown, "exit": status, "seconds": total,
           "peak_rss_gib": peak_rss_gib(), "error": None, "measures": {}}
    lines = [line for line in err.getvalue().splitlines() if line.startswith("jaxleak: error:")]
    if status != 0:
        out["error"] = lines[-1] if lines else err.getvalue().strip().splitlines()[-1:]
    path = os.path.join(spec["out"], "results.json")
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
        timing = results.get("timing", {})
        out["compilations"] = timing.get("compilations")
        out["prepare_s"] = timing.get("prepare_s")
        for key, entry in _measure_entries(results.get("measures", {})):
            ok, bad = finite_report(entry)
            out["measures"][key] = {"seconds": timing.get(key + "_s"), "peak_rss_gib_at_end": peaks.get(key),
                                    "finite": ok, "not_finite": bad, "layers": len(entry.get("layers") or {}),
                                    "verdict": (entry.get("verdict") or {}).get("text"),
                                    "meta_notes": {k: entry.get("meta", {}).get(k) for k in ("white_box", "cannot_reject")
                                                   if entry.get("meta", {}).get(k)}}
    else:
        parts = os.path.join(spec["out"], "parts")
        for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else []:
            with open(os.path.join(parts, name)) as f:
                entry = json.load(f)
            ok, bad = finite_report(entry)
            out["measures"][name[:-5]] = {"seconds": entry.get("seconds"), "finite": ok, "not_finite": bad,
                                          "peak_rss_gib_at_end": peaks.get(name[:-5])}
    out["all_finite"] = bool(out["measures"]) and all(m["finite"] for m in out["measures"].values())
    out["meets_goal"] = (status == 0 and out["all_finite"] and total <= GOAL_S and out["peak_rss_gib"] < GOAL_GIB)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--data", default="digits,planted")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--aux-n", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is stopped")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "models.json"))
    parser.add_argument("--note", default="")
    parser.add_argument("--one", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(one_run(spec)))
        return
    report = {"benchmark": "model matrix: jaxleak run with every default measure, 32x32x3, cold compile cache",
              "goals": {"seconds_per_run": GOAL_S, "peak_rss_gib": GOAL_GIB, "all_finite": True},
              "n": args.n, "aux_n": args.aux_n, "epochs": 1, "note": args.note, "machine": machine_info(),
              "runs": []}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if previous.get("n") == args.n and previous.get("aux_n") == args.aux_n:
            wanted = {(m, d) for m in args.models.split(",") for d in args.data.split(",")}
            report["runs"] = [r for r in previous.get("runs", []) if (r["model"], r["dataset"]) not in wanted]
    for dataset in args.data.split(","):
        for model in args.models.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                spec = {"model": model, "dataset": dataset, "n": args.n, "aux_n": args.aux_n,
                        "out": os.path.join(tmp, "run")}
                env = dict(os.environ, JAXLEAK_COMPILE_CACHE=os.path.join(tmp, "cache"))
                t0 = time.time()
                try:
                    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env,
                                          capture_output=True, text=True, timeout=args.timeout)
                    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
                    result = json.loads(lines[-1]) if lines else {
                        "exit": proc.returncode, "error": proc.stderr.strip().splitlines()[-3:], "measures": {},
                        "all_finite": False, "meets_goal": False}
                except subprocess.TimeoutExpired:
                    result = {"exit": None, "error": f"stopped after {args.timeout:.0f} s", "measures": {},
                              "all_finite": False, "meets_goal": False}
                result.update(model=model, dataset=dataset, wall_s=time.time() - t0)
            report["runs"].append(result)
            print(f"{dataset:8s} {model:9s} exit {result.get('exit')} {result['wall_s']:7.1f} s "
                  f"peak {result.get('peak_rss_gib') or float('nan'):.2f} GiB finite {result['all_finite']} "
                  f"{result.get('error') or ''}", flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
