"""Studies (aggregation, defences, training, validation), update sensitivity, attack CLI, kill-and-resume."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxleak import cli, defenses, studies
from jaxleak.errors import InputError, UnknownNameError
from jaxleak.grads import client_batches, client_updates
from jaxleak.sensitivity import per_example_terms, rademacher_probes, sensitivity
from jaxleak.task import Task

TINY_VINFO = {"vinfo_steps": 60, "vinfo_folds": 2, "vinfo_boot": 50}


@pytest.fixture(scope="module")
def lenet(digits):
    from jaxleak.train import train

    task = Task.init("lenet", digits, 0)
    task = train(task, digits.x[:256], digits.y[:256], epochs=1, batch_size=32, lr=3e-3).task
    return task, digits.x[1000:1032], digits.y[1000:1032]


# ---------------------------------------------------------------- the update function and its Jacobian

@pytest.mark.parametrize("defense", [None, defenses.DP(clip_norm=0.5, noise_multiplier=0.3), defenses.Prune(0.2)])
def test_update_fn_matches_defended_client_updates(lenet, defense):
    task, x, y = lenet
    feats, g2, batches, victims = studies.study_updates(task, x, y, defense=defense, batch_size=4, local_steps=2,
                                                        lr=0.05, num_updates=6, seed=3, sketch_dim=10 ** 6)
    ref, _ = defenses.defended_client_updates(task, x, y, defense, batch_size=4, local_steps=2, lr=0.05,
                                              num_updates=6, seed=3)
    np.testing.assert_array_equal(victims, ref.victims)
    for name in ref.updates:
        np.testing.assert_allclose(feats[name], ref.updates[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g2[name], np.sum(np.square(ref.updates[name].astype(np.float64)), 1), rtol=1e-4)
    if defense is None:
        plain = client_updates(task, x, y, batch_size=4, local_steps=2, lr=0.05, num_updates=6, seed=3)
        for name in plain.updates:
            np.testing.assert_allclose(feats[name], plain.updates[name], rtol=1e-5, atol=1e-7)


def test_update_sensitivity_k1_is_per_example_over_b(lenet):
    """K = 1: u = (1/B) sum_i g(x_i), so ||d u / d x_0 v||^2 = ||J_g(x_0) v||^2 / B^2, probe by probe."""
    task, x, y = lenet
    b, m = 4, 8
    sq_u, _ = studies.update_sensitivity_terms(task, x, y, batch_size=b, local_steps=1, lr=0.1, num_updates=m,
                                               seed=5, probes=3)
    victims = client_batches(x.shape[0], batch_size=b, num_updates=m, seed=5)[:, 0]
    sq_g, _ = per_example_terms(task, x[victims], y[victims], probes=3, seed=5)
    for name in sq_g:
        np.testing.assert_allclose(sq_u[name] * b * b, sq_g[name], rtol=2e-4)
    scores = studies.update_sensitivity(task, x, y, batch_size=b, local_steps=1, lr=0.1, num_updates=m, seed=5,
                                        probes=3)
    ref = sensitivity(task, x[victims], y[victims], probes=3, seed=5)
    for name in ref:
        np.testing.assert_allclose(scores[name]["raw"] * b, ref[name]["raw"], rtol=1e-4)
    # B = 1 and K = 1: the update is the per-example gradient, so R is the per-example R.
    one = studies.update_sensitivity(task, x, y, batch_size=1, local_steps=1, lr=0.1, num_updates=m, seed=5,
                                     probes=3)
    v1 = client_batches(x.shape[0], batch_size=1, num_updates=m, seed=5)[:, 0]
    ref1 = sensitivity(task, x[v1], y[v1], probes=3, seed=5)
    for name in ref1:
        np.testing.assert_allclose(one[name].value, ref1[name].value, rtol=1e-4)


def test_update_sensitivity_k2_matches_direct_jvp(lenet):
    """K = 2: reference by a hand-written two-step SGD loop and jax.jvp with the same probes."""
    task, x, y = lenet
    b, k, lr, m, probes, seed = 3, 2, 0.05, 2, 2, 1
    sq, _ = studies.update_sensitivity_terms(task, x, y, batch_size=b, local_steps=k, lr=lr, num_updates=m, seed=seed,
                                             probes=probes)
    batches = client_batches(x.shape[0], batch_size=b, num_updates=m, seed=seed)
    v = rademacher_probes(jax.random.key(seed), jnp.arange(m, dtype=jnp.int32), probes, x.shape[1:], jnp.float32)
    grad = jax.grad(task.loss)
    for c in range(m):
        xb, yb = jnp.asarray(x[batches[c]]), jnp.asarray(y[batches[c]])

        def update(x0):
            xs = xb.at[0].set(x0)
            p = task.params
            g1 = grad(p, xs, yb)
            p = jax.tree.map(lambda w, g: w - lr * g, p, g1)
            g2 = grad(p, xs, yb)
            return task.flatten(jax.tree.map(lambda a, b_: (a + b_) / 2, g1, g2))

        for j in range(probes):
            _, jv = jax.jvp(update, (xb[0],), (v[j, c],))
            for name, t in jv.items():
                np.testing.assert_allclose(sq[name][c, j], float(jnp.sum(t ** 2)), rtol=1e-4)


def test_sign_and_quantize_sensitivity_are_null_with_reason(lenet):
    task, x, y = lenet
    for d in (defenses.Sign(), defenses.Quantize(4)):
        reason = studies._undefined_reason("sensitivity", d)
        assert reason and "piecewise constant" in reason
        entry = studies.null_scores("sensitivity", task.layer_names, reason)
        assert all(layer["value"] is None and layer["reason"] == reason for layer in entry["layers"].values())
    assert studies._undefined_reason("sensitivity", defenses.Prune(0.1)) is None


def test_invalid_options_raise():
    with pytest.raises(UnknownNameError):
        studies.validate(studies.StudyConfig(study="nope"))
    with pytest.raises(UnknownNameError):
        studies.validate(studies.StudyConfig(measures=("nope",)))
    with pytest.raises(InputError):
        studies.validate(studies.StudyConfig(n=8, batch_sizes=(1, 16)))
    with pytest.raises(InputError):
        studies.parse_defense("dp:noise_multiplier")
    with pytest.raises(InputError):
        studies.parse_defense("prune:fraction=2")
    assert studies.parse_defense("dp:clip_norm=2,noise_multiplier=0.5") == defenses.DP(2.0, 0.5)
    assert studies.parse_defense("none") is None


# ---------------------------------------------------------------- studies end to end

@pytest.fixture(scope="module")
def planted_aggregation(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "agg"
    config = studies.StudyConfig(study="aggregation", dataset="planted", data_options={"strength": 10.0}, latent="z",
                                 n=192, epochs=1, batch_sizes=(1, 4, 16), local_steps=(1,), probes=2,
                                 measures=("grad_norm", "sensitivity", "v_information.latent"), **TINY_VINFO)
    return studies.run_study(config, out=str(out), progress=False), out


def test_aggregation_study_writes_directory(planted_aggregation):
    results, out = planted_aggregation
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["schema"] == "jaxleak.results/1" and on_disk["study"] == "aggregation"
    assert [s["key"] for s in on_disk["settings"]] == ["B1_K1", "B4_K1", "B16_K1"]
    assert set(on_disk["measures"]) == {"B1_K1", "B4_K1", "B16_K1"}
    for key in on_disk["measures"]:
        assert set(on_disk["measures"][key]) == {"grad_norm", "sensitivity", "v_information.latent"}
        assert (out / "parts" / key / "sensitivity.json").is_file()
    for m in ("grad_norm", "sensitivity", "v_information.latent"):
        assert (out / f"{m}_vs_B.png").stat().st_size > 1000
        assert (out / f"{m}_heatmap.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "B16_K1.sensitivity" in html and "data:image/png;base64" in html


def test_leakage_falls_with_batch_size_on_planted_data(planted_aggregation):
    """The study's own check (Spearman rho over B of the most-leaking layer), on a strong planted signal."""
    results, _ = planted_aggregation
    mono = results["monotonicity"]["measures"]
    for m in ("sensitivity", "v_information.latent"):
        trend = mono[m]["vs_batch_size"]["K=1"]
        assert trend["falls"] is True, (m, trend)
        assert mono[m]["falls_with_batch_size"] is True
    lat = {k: max(v["value"] for v in results["measures"][k]["v_information.latent"]["layers"].values())
           for k in ("B1_K1", "B16_K1")}
    assert lat["B1_K1"] > 0.3 > lat["B16_K1"], lat  # bits: strong at B = 1, mostly gone at B = 16


def test_defense_study_epsilon_fisher_and_null(tmp_path, digits):
    out = tmp_path / "def"
    config = studies.StudyConfig(study="defenses", model="mlp", n=16, epochs=1, probes=2, measures=("sensitivity",),
                                 defenses=("none", "dp:clip_norm=0.5,noise_multiplier=1.3", "sign"))
    results = studies.run_study(config, out=str(out), progress=False)
    by_key = {s["key"]: s for s in results["settings"]}
    dp = by_key["dp_clip_norm0.5_noise_multiplier1.3"]["dp"]
    train_n = by_key["none"]["train_examples"]
    steps = 1 * (train_n // 64)
    assert dp["steps"] == steps and dp["sampling_rate"] == 64 / train_n
    assert dp["epsilon"] == defenses.dp_epsilon(1.3, 64 / train_n, steps, 1e-5)
    sens = results["measures"]["dp_clip_norm0.5_noise_multiplier1.3"]["sensitivity"]
    s = 1.3 * 0.5  # noise std per coordinate of a B = 1, K = 1 update
    for layer in sens["layers"].values():
        assert layer["noise_std"] == pytest.approx(s)
        assert layer["value"] == pytest.approx(layer["raw"] ** 2 / s ** 2, rel=1e-9)
    assert all(v["value"] is None and "piecewise constant" in v["reason"]
               for v in results["measures"]["sign"]["sensitivity"]["layers"].values())
    for s_ in results["settings"]:
        assert 0.0 <= s_["test_accuracy"] <= 1.0
    assert (out / "sensitivity_vs_accuracy.png").is_file()


def test_validation_correlations_match_scipy():
    import scipy.stats

    from jaxleak.scores import LayerScores, Score
    from jaxleak.validation import correlations

    names = [f"L{i}" for i in range(5)]
    a = LayerScores("sensitivity", {n: Score(v) for n, v in zip(names, [3.0, 1.0, 2.0, 5.0, 4.0])})
    b = LayerScores("attack_psnr", {n: Score(v) for n, v in zip(names, [10.0, 9.0, 12.0, 14.0, 11.0])})
    sub = LayerScores("subspace_distance", {n: Score(0.9, None, {"excess": e})
                                            for n, e in zip(names, [0.1, 0.0, 0.3, 0.2, 0.05])})
    lat = LayerScores("v_information", {n: Score(v) for n, v in zip(names, [0.2, 0.1, 0.5, 0.4, 0.3])})
    c = correlations(a, b, sub, lat)
    assert c["sensitivity_vs_attack_psnr"]["rho"] == pytest.approx(
        scipy.stats.spearmanr([3, 1, 2, 5, 4], [10, 9, 12, 14, 11]).statistic)
    assert c["subspace_excess_vs_latent_vinfo"]["rho"] == pytest.approx(
        scipy.stats.spearmanr([0.1, 0.0, 0.3, 0.2, 0.05], [0.2, 0.1, 0.5, 0.4, 0.3]).statistic)


def test_validation_study_and_attack_cli(tmp_path, capsys):
    out = tmp_path / "val"
    code = cli.main(["study", "validation", "--model", "mlp", "--n", "32", "--epochs", "1", "--probes", "2", "--permutations", "3",
                     "--vinfo-steps", "30", "--vinfo-folds", "2", "--vinfo-boot", "20", "--attack-victims", "1",
                     "--attack-steps", "20", "--attack-restarts", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["study"] == "validation"
    assert set(results["validation"]) == {"sensitivity_vs_attack_psnr", "subspace_excess_vs_latent_vinfo"}
    assert set(results["measures"]["default"]["attack_psnr"]["layers"]) == {"Dense_0", "Dense_1", "Dense_2"}
    assert (out / "validation.png").is_file() and (out / "report.html").is_file()
    assert "Spearman" in capsys.readouterr().out

    att = tmp_path / "att"
    code = cli.main(["attack", "--model", "mlp", "--method", "ig", "--victims", "2", "--steps", "20", "--restarts", "1",
                     "--out", str(att), "--no-progress"])
    assert code == 0
    record = json.loads((att / "attack.json").read_text())
    assert np.asarray(record["per_image"]["psnr"]).shape == (2, 1)
    assert record["label_source"] == "recovered" and record["labels_correct"] == 1.0
    assert (att / "attack.png").stat().st_size > 1000
    assert "PSNR" in capsys.readouterr().out


def test_study_cli_errors(tmp_path, capsys):
    assert cli.main(["study", "aggregation", "--batch-sizes", "1,999", "--n", "16", "--out", str(tmp_path / "x")]) == 2
    assert "batch sizes" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert cli.main(["study", "defenses", "--defense", "bogus", "--out", str(tmp_path / "y")]) == 2
    assert "unknown defence" in capsys.readouterr().err


# ---------------------------------------------------------------- kill and resume (issue 7)

KILL_ARGS = ["study", "aggregation", "--model", "mlp", "--n", "32", "--epochs", "0", "--batch-sizes", "1,2,4",
             "--local-steps", "1", "--measures", "grad_norm,subspace_distance", "--permutations", "5", "--no-progress"]


def _strip(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("timing", "out")}


def test_kill_and_resume_gives_the_same_results(tmp_path):
    out = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-m", "jaxleak", *KILL_ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        parts = [p for p in out.glob("parts/*/*.json") if p.name != "info.json"] if out.exists() else []
        if parts:
            first = parts[0]
            break
        time.sleep(0.02)
    assert first is not None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (out / "results.json").exists(), "the study finished before it could be killed"
    kept = {p: p.stat().st_mtime_ns for p in out.glob("parts/*/*.json")}
    for p in kept:
        json.loads(p.read_text())  # atomic writes: never a truncated part
    resumed = subprocess.run([sys.executable, "-m", "jaxleak", *KILL_ARGS, "--resume", str(out)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for p, mtime in kept.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was recomputed on resume"

    fresh = tmp_path / "fresh"
    assert cli.main([*KILL_ARGS, "--out", str(fresh)]) == 0
    a = json.loads((out / "results.json").read_text())
    b = json.loads((fresh / "results.json").read_text())
    assert _strip(a) == _strip(b)
