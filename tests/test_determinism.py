"""Same seed, same machine: same numbers; chunk size changes results by at most rtol 1e-5."""

import json
import os
import subprocess
import sys

import numpy as np

from jaxleak import cli

ARGS = ["--n", "40", "--epochs", "1", "--probes", "4", "--permutations", "5", "--vinfo-steps", "30",
        "--vinfo-folds", "2", "--no-progress"]


def _strip(results):
    results = dict(results)
    results.pop("timing")
    for entry in _entries(results["measures"]):
        entry.pop("seconds", None)
    return results


def _entries(measures):
    for value in measures.values():
        if "layers" in value:
            yield value
        else:
            yield from _entries(value)


def test_two_processes_give_identical_results(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, "-m", "jaxleak", "run", "--out", str(out), *ARGS, "--measures",
                               "grad_norm,sensitivity,subspace_distance,v_information.latent"],
                              capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(_strip(json.loads((out / "results.json").read_text())))
    assert outs[0] == outs[1]
    assert (tmp_path / "run0" / "layers.csv").read_text() == (tmp_path / "run1" / "layers.csv").read_text()


def _values(results):
    out = {}
    for key, entry in (("grad_norm", results["measures"]["grad_norm"]),
                       ("sensitivity", results["measures"]["sensitivity"]),
                       ("subspace", results["measures"]["subspace_distance"])):
        for layer, v in entry["layers"].items():
            out[f"{key}/{layer}"] = v["value"]
    return out


def test_chunk_size_changes_results_at_most_rtol(tmp_path):
    measures = ["--measures", "grad_norm,sensitivity,subspace_distance"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["run", "--out", str(a), *ARGS, *measures]) == 0
    assert cli.main(["run", "--out", str(b), "--chunk-size", "7", *ARGS, *measures]) == 0
    va = _values(json.loads((a / "results.json").read_text()))
    vb = _values(json.loads((b / "results.json").read_text()))
    assert va.keys() == vb.keys()
    for key in va:
        np.testing.assert_allclose(vb[key], va[key], rtol=1e-5, err_msg=key)
