"""The model matrix (benchmarks/models.py) at tiny sizes: two zoo models through a default `jaxleak run`
with every measure, in a fresh process each; every value finite, memory bounded."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "models.py")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_zoo_model_runs_end_to_end_with_finite_values(model, tmp_path):
    spec = {"model": model, "dataset": "digits", "n": 16, "aux_n": 32, "out": str(tmp_path / "run"),
            "data_opts": ["resize=12", "channels=3"],
            "extra": ["--probes", "2", "--permutations", "20", "--vinfo-steps", "20", "--inversion-n", "4",
                      "--inversion-steps", "10"]}
    env = dict(os.environ, JAXLEAK_COMPILE_CACHE="off")
    proc = subprocess.run([sys.executable, BENCH, "--one", json.dumps(spec)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["exit"] == 0, result["error"]
    assert set(result["measures"]) == {"grad_norm", "sensitivity", "subspace_distance", "v_information.latent",
                                       "v_information.original"}
    assert result["all_finite"], {k: m["not_finite"] for k, m in result["measures"].items()}
    assert result["peak_rss_gib"] < 4.0
