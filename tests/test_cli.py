"""The command line as a user calls it, in-process (main(argv)) to share compiled code."""

import json
import os

import numpy as np
import pytest

from jaxleak import cli
from jaxleak import run as run_lib

SMALL = ["--n", "24", "--epochs", "1", "--measures", "grad_norm", "--no-progress"]


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "run" in capsys.readouterr().out


@pytest.mark.parametrize("what,expected", [("models", "resnet18"), ("datasets", "tfds:celeb_a"),
                                           ("measures", "grad_norm")])
def test_list(capsys, what, expected):
    assert cli.main(["list", what]) == 0
    assert expected in capsys.readouterr().out.split()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    code = cli.main(["run", "--out", str(out), *SMALL])
    return code, out


def test_run_writes_run_directory(small_run, capsys):
    code, out = small_run
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "jaxleak.results/1"
    assert results["dataset"]["name"] == "digits" and results["dataset"]["n_measured"] == 24
    assert set(results["dataset"]["latent"]) == {"thickness", "slant"}
    names = [layer["name"] for layer in results["model"]["layers"]]
    assert names == ["Conv_0", "Conv_1", "Dense_0", "Dense_1", "Dense_2"]
    assert results["model"]["layers"][0]["params"] == 156
    norms = results["measures"]["grad_norm"]["layers"]
    assert list(norms) == names
    assert all(v["value"] > 0 and v["ci"][0] <= v["value"] <= v["ci"][1] for v in norms.values())
    for key in ("jax", "backend", "device_count"):
        assert key in results["environment"]
    assert results["timing"]["total_s"] > 0
    rows = (out / "layers.csv").read_text().strip().splitlines()
    assert rows[0].startswith("layer,params") and len(rows) == 6
    assert (out / "grad_norm.png").stat().st_size > 1000
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_run_with_attacker_data_gives_verdicts(tmp_path, capsys):
    """V-information trained on the attacker's auxiliary examples; verdicts open the table; no interval is [0, 0]."""
    out = tmp_path / "v"
    code = cli.main(["run", "--out", str(out), "--model", "mlp", "--n", "24", "--aux-n", "60", "--epochs", "1",
                     "--measures", "v_information.latent,v_information.original,subspace_distance",
                     "--vinfo-steps", "20", "--vinfo-folds", "3", "--inversion-n", "4", "--inversion-steps", "10",
                     "--permutations", "5", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.lstrip().startswith("Verdict: mlp on digits, 24 victims, an attacker with 60 auxiliary examples")
    results = json.loads((out / "results.json").read_text())
    assert results["aux"]["n"] == 60 and results["aux"]["compromise"] is None
    assert results["config"]["aux_n"] == 60
    for key in ("latent", "original"):
        entry = results["measures"]["v_information"][key]
        assert entry["meta"]["aux_examples"] == 60 and entry["meta"]["victims"] == 24
        for layer in entry["layers"].values():
            assert layer["ci"][0] < layer["ci"][1] and isinstance(layer["detected"], bool)
            assert layer["detectable"] > 0
        top = results["top_layers"][f"v_information.{key}"]
        verdict = results["verdicts"][f"v_information.{key}"]
        assert top == verdict["top"]
        if top is None:
            assert verdict["detected"] == [] and "this run would detect" in verdict["text"]
        else:
            assert set(top[:1]) <= set(verdict["detected"])
    assert "inversion" in results["measures"]["v_information"]["original"]["meta"]
    sub = results["measures"]["subspace_distance"]
    # 5 permutations: no p-value can be below 1/6, so the test cannot reject, and the verdict prints no size
    assert "cannot detect anything" in results["verdicts"]["subspace_distance"]["text"]
    assert "reach 0.05" in sub["meta"]["cannot_reject"]
    assert all(layer["detectable"] is None for layer in sub["layers"].values())
    assert results["top_layers"]["subspace_distance"] is None


def test_run_matches_independent_norms(small_run):
    """The table's gradient norms are the norms of a batch-of-one gradient loop."""
    import jax

    import jaxleak as jl
    from jaxleak.checkpoint import load_params

    _, out = small_run
    results = json.loads((out / "results.json").read_text())
    ds = jl.data.load("digits")
    _, eval_set = ds.split(results["config"]["train_fraction"], seed=0)
    task = jl.Task.init("lenet", ds, 0)
    task = task.with_params(load_params(str(out / "params.msgpack"), task.params))
    x, y = eval_set.x[:24], eval_set.y[:24]
    grad = jax.grad(task.loss)
    norms = {n: [] for n in task.layer_names}
    for i in range(24):
        for n, v in task.flatten(grad(task.params, x[i:i + 1], y[i:i + 1])).items():
            norms[n].append(float(np.linalg.norm(v)))
    for n in task.layer_names:
        np.testing.assert_allclose(results["measures"]["grad_norm"]["layers"][n]["value"], np.mean(norms[n]),
                                   rtol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--model", "lenet9"], "unknown model 'lenet9'"),
    (["--dataset", "mnistt"], "unknown data set 'mnistt'"),
    (["--measures", "grad_norm,sensitivty"], "unknown measure"),
    (["--n", "0"], "n must be >= 1"),
    (["--data-opt", "strength=-1", "--dataset", "planted"], "strength"),
])
def test_user_errors_exit_nonzero_without_directory(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    code = cli.main(["run", "--out", str(out), *SMALL, *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("jaxleak: error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_npz_input(tmp_path, capsys):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((5, 8, 8, 1)), y=np.zeros(4, int))
    code = cli.main(["run", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o"), *SMALL])
    assert code == 2
    assert "length mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(small_run, capsys):
    _, out = small_run
    before = (out / "results.json").read_bytes()
    assert cli.main(["run", "--out", str(out), *SMALL]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_debug_shows_traceback(tmp_path):
    from jaxleak.errors import UnknownNameError

    with pytest.raises(UnknownNameError):
        cli.main(["--debug", "run", "--out", str(tmp_path / "x"), "--model", "nope", *SMALL])


def test_config_file_and_override(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "mlp"\nn = 16\nepochs = 0\nmeasures = ["grad_norm"]\n')
    out = tmp_path / "c"
    assert cli.main(["run", "--config", str(cfg), "--n", "12", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == "mlp" and results["config"]["n"] == 12


def test_config_unknown_key_suggests(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('modle = "mlp"\n')
    assert cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
    assert "did you mean 'model'" in capsys.readouterr().err


def test_params_mismatch_names_path(tmp_path, capsys, small_run):
    from flax import serialization

    path = tmp_path / "p.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"Conv_0": {"kernel": np.zeros((5, 5, 1, 6))}}))
    assert cli.main(["run", "--params", str(path), "--out", str(tmp_path / "o"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "parameters" in err and "missing" in err


def test_resume_keeps_finished_parts(small_run, tmp_path):
    _, out = small_run
    copy = tmp_path / "resumed"
    import shutil

    shutil.copytree(out, copy)
    os.remove(copy / "results.json")
    part = copy / "parts" / "grad_norm.json"
    marker = json.loads(part.read_text())
    assert cli.main(["run", "--resume", str(copy), *SMALL]) == 0
    assert json.loads(part.read_text()) == marker
    a = json.loads((out / "results.json").read_text())
    b = json.loads((copy / "results.json").read_text())
    a.pop("timing"), b.pop("timing")
    assert a == b


def test_resume_with_other_options_is_refused(small_run, tmp_path, capsys):
    _, out = small_run
    assert cli.main(["run", "--resume", str(out), *SMALL, "--seed", "3"]) == 2
    assert "differs in ['seed']" in capsys.readouterr().err


def test_preset_fills_what_flags_and_config_leave(tmp_path, capsys):
    """--preset paper sets its options; a config key and a flag each override the preset."""
    cfg = tmp_path / "run.toml"
    cfg.write_text('preset = "paper"\nprobes = 4\n')
    args = cli.build_parser().parse_args(["run", "--config", str(cfg), "--n", "12"])
    config = cli._run_config(args)
    paper = run_lib.PRESETS["paper"]
    assert config.preset == "paper" and config.n == 12 and config.probes == 4
    assert config.aux_n == paper["aux_n"] and config.permutations == paper["permutations"]
    assert config.inversion_n == paper["inversion_n"]
    assert run_lib.preset_config("paper", n=5).n == 5 and run_lib.preset_config("paper").n == paper["n"]
    cfg.write_text('preset = "huge"\n')
    assert cli.main(["run", "--config", str(cfg), "--out", str(tmp_path / "c")]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_run_config_validation():
    with pytest.raises(Exception, match="integer"):
        run_lib.validate_options({"n": "many"})


def test_persistent_compile_cache_by_default(tmp_path):
    """Two runs in fresh processes: the second loads every program from the user's cache folder."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("JAXLEAK_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    cmd = [sys.executable, "-m", "jaxleak", "run", "--model", "mlp", "--epochs", "0", "--n", "8",
           "--measures", "grad_norm", "--no-progress"]
    timings, measures = [], []
    for name in ("a", "b"):
        proc = subprocess.run(cmd + ["--out", str(tmp_path / name)], capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results = json.loads((tmp_path / name / "results.json").read_text())
        timings.append(results["timing"])
        measures.append(results["measures"])
    cache = tmp_path / "xdg" / "jaxleak" / "xla"
    assert cache.is_dir() and any(cache.iterdir()), "compiled programs were not written to the cache"
    first, second = timings
    assert first["compilations"] > 0 and first["compile_cache_hits"] == 0
    assert second["compilations"] == first["compilations"]
    assert second["compile_cache_hits"] == second["compilations"]
    # the traced programs are stored next to the cache and read back instead of traced again
    stored = tmp_path / "xdg" / "jaxleak" / "xla-programs"
    assert first["programs_stored"] > 0 and first["programs_loaded"] == 0
    assert len(list(stored.glob("*.jaxexport"))) == first["programs_stored"]
    assert second["programs_loaded"] == first["programs_stored"] and second["programs_stored"] == 0
    assert measures[0] == measures[1]
