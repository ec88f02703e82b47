"""Reconstruction attacks: recovery on a tiny model, exact label recovery, Hungarian matching, no retrace.

The model is the zoo MLP with sigmoid activations on 8x8 digits: its first
layer's gradient determines the input (grad W_0 = delta x^T, grad b_0 =
delta), so a working attack must drive PSNR far above chance. Thresholds:
30 dB (chance, a random image against a digit, is about 6-10 dB).
"""

import itertools
import os

import numpy as np
import pytest

from jaxleak import attacks, grads, metrics
from jaxleak.errors import InputError, JaxleakError
from jaxleak.grads import TRACE_COUNTS
from jaxleak.task import Task

PSNR_THRESHOLD = 30.0
STEPS = 300


@pytest.fixture(scope="module")
def setup(digits):
    task = Task.init("mlp", digits, seed=0, activation="sigmoid")
    idx = np.arange(4)
    x, y = digits.x[idx], digits.y[idx]
    g = grads.layer_grads(task, x, y)
    return task, x, y, g


@pytest.fixture(scope="module")
def ig_result(setup):
    task, x, y, g = setup
    return attacks.invert(task, g, method="ig", restarts=2, steps=STEPS, seed=0)


def test_ig_recovers_inputs_and_labels(setup, ig_result):
    task, x, y, g = setup
    res = ig_result
    assert res.x.shape == (4, 1, 8, 8, 1)
    assert res.label_source == "recovered"
    np.testing.assert_array_equal(res.labels[:, 0], y)
    s = attacks.score(res, x)
    assert s.psnr.shape == (4, 1)
    assert np.all(s.psnr > PSNR_THRESHOLD), s.psnr
    assert np.all(s.ssim > 0.95), s.ssim
    assert res.x.min() >= 0.0 and res.x.max() <= 1.0
    # the chosen restart is the one with the lowest matching loss, not the best PSNR
    np.testing.assert_array_equal(res.best_restart, np.argmin(res.restart_losses, axis=1))
    np.testing.assert_allclose(res.loss, res.restart_losses.min(axis=1))
    assert res.trace.shape == (4, 2, STEPS)
    # a random image is far from the digit: the threshold is not trivially met
    rng = np.random.default_rng(0)
    chance = metrics.psnr(rng.random(x.shape).astype(np.float32), x)
    assert np.all(np.asarray(chance) < 15.0)


def test_ig_does_not_retrace(setup, ig_result):
    task, x, y, g = setup
    before = dict(TRACE_COUNTS)
    again = attacks.invert(task, g, method="ig", restarts=2, steps=STEPS, seed=0, lr=0.05, tv=1e-3)
    assert dict(TRACE_COUNTS) == before
    assert again.config["lr"] == 0.05 and again.config["tv"] == 1e-3
    same = attacks.invert(task, g, method="ig", restarts=2, steps=STEPS, seed=0)
    np.testing.assert_allclose(same.x, ig_result.x, atol=1e-6)
    assert dict(TRACE_COUNTS) == before


def test_single_update_first_layer_only_with_local_steps(setup):
    task, x, y, g = setup
    cu = grads.client_updates(task, x, y, batch_size=1, local_steps=3, lr=0.5, num_updates=1, seed=0)
    one = {name: v[0] for name, v in cu.updates.items()}
    res = attacks.invert(task, one, method="dlg", layers=["Dense_0"], restarts=1, steps=STEPS, local_steps=3,
                         local_lr=0.5)
    assert res.layers == ("Dense_0",)
    assert res.x.shape == (1, 1, 8, 8, 1)
    assert res.labels[0, 0] == y[cu.victims[0]]
    assert attacks.score(res, x[cu.victims]).psnr[0, 0] > PSNR_THRESHOLD


def test_soft_labels_optimised_jointly(setup):
    task, x, y, g = setup
    res = attacks.invert(task, g, method="ig", restarts=1, steps=STEPS, labels="optimize", progress=True)
    assert res.label_source == "optimized"
    np.testing.assert_array_equal(res.labels[:, 0], y)
    assert np.all(attacks.score(res, x).psnr > PSNR_THRESHOLD)
    assert res.trace.shape == (4, 1, STEPS)


def test_batched_and_local_step_paths_agree(setup):
    # K = 1 uses one batched per-example gradient over all runs; K > 1 vmaps each run's local steps.
    # With local_lr = 0 the K-step update is the plain gradient, so both optimise the same objective.
    task, x, y, g = setup
    kw = dict(method="dlg", restarts=2, steps=20, seed=1)
    one = attacks.invert(task, g, **kw)
    two = attacks.invert(task, g, local_steps=2, local_lr=0.0, **kw)
    np.testing.assert_allclose(two.trace, one.trace, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(two.x, one.x, atol=1e-4)


def _cosine_distance(task, result, targets, weights):
    """1 - cos of the weighted, concatenated layer updates, from gradients computed one victim at a time."""
    out = []
    for v in range(result.x.shape[0]):
        g = grads.layer_grads(task, result.x[v], result.labels[v])
        dot = uu = tt = 0.0
        for name, w in weights.items():
            u, t = g[name].astype(np.float64).mean(axis=0), targets[name][v].astype(np.float64)
            dot, uu, tt = dot + w * u @ t, uu + w * u @ u, tt + w * t @ t
        out.append(1.0 - dot / np.sqrt(uu * tt))
    return np.array(out)


@pytest.mark.parametrize("model,batch", [("mlp", 1), ("mlp", 2), ("mlp", 9), ("lenet", 1)])
def test_ig_matching_loss_is_the_cosine_distance_of_the_updates(digits, model, batch):
    # IG computes the Dense layers' <u, t> and ||u||^2 from factors (input, output cotangent)
    # without forming u (for B = 9 the last MLP layer's update is formed instead); the loss
    # it reports must equal the cosine distance of explicitly computed updates.
    task = Task.init(model, digits, seed=0, activation="sigmoid" if model == "mlp" else "relu")
    cu = grads.client_updates(task, digits.x[:60], digits.y[:60], batch_size=batch, num_updates=2, seed=2)
    labels = digits.y[:60][grads.client_batches(60, batch_size=batch, num_updates=2, seed=2)]
    res = attacks.invert(task, cu.updates, method="ig", restarts=2, steps=3, batch_size=batch, labels=labels)
    want = _cosine_distance(task, res, cu.updates, {name: 1.0 for name in task.layer_names})
    assert np.all(want > 1e-3)
    np.testing.assert_allclose(res.loss, want, rtol=2e-4)
    # One layer at a time the cosine can be within 1e-3 of 1, where a float32 cosine is only
    # good to a few units of 2^-24 in absolute terms: hence atol (8 such units) besides rtol.
    per_layer = attacks.invert_layers(task, cu.updates, restarts=2, steps=3, batch_size=batch, labels=labels)
    for name, r in per_layer.items():
        np.testing.assert_allclose(r.loss, _cosine_distance(task, r, cu.updates, {name: 1.0}), rtol=2e-4,
                                   atol=8 * 2.0 ** -24, err_msg=name)


def test_label_recovery_is_exact(setup, digits):
    task, *_ = setup
    n = 300
    x, y = digits.x[:n], digits.y[:n]
    relu = Task.init("mlp", digits, seed=1)
    np.testing.assert_array_equal(attacks.recover_labels(relu, grads.layer_grads(relu, x, y)), y)
    # client updates with K local steps: the mean of K bias gradients keeps the sign pattern
    cu = grads.client_updates(task, x, y, batch_size=1, local_steps=3, lr=0.5, num_updates=n, seed=0)
    np.testing.assert_array_equal(attacks.recover_labels(task, cu.updates), y[cu.victims])


def test_batch_reconstructions_are_matched_to_originals(setup, digits):
    task, *_ = setup
    x, y = digits.x[:40], digits.y[:40]
    b = grads.client_batches(40, batch_size=2, num_updates=2, seed=0)
    cu = grads.client_updates(task, x, y, batch_size=2, num_updates=2, seed=0)
    # labels given in reversed order: the reconstructions come out reversed
    res = attacks.invert(task, cu.updates, method="dlg", restarts=1, steps=STEPS, batch_size=2,
                         labels=y[b][:, ::-1])
    s = attacks.score(res, x[b])
    np.testing.assert_array_equal(s.assignment, [[1, 0], [1, 0]])
    assert np.all(s.psnr > PSNR_THRESHOLD), s.psnr


def test_hungarian_matching_on_permuted_batch():
    rng = np.random.default_rng(3)
    originals = rng.random((2, 5, 6, 6, 1)).astype(np.float32)
    perms = np.stack([rng.permutation(5) for _ in range(2)])
    noise = 0.01 * rng.standard_normal(originals.shape).astype(np.float32)
    recon = np.stack([originals[v][perms[v]] for v in range(2)]) + noise
    s = attacks.score(recon, originals)
    # recon[v][j] = originals[v][perms[v][j]], so original i sits at j = argsort(perms)[i]
    np.testing.assert_array_equal(s.assignment, np.argsort(perms, axis=1))
    expected = np.stack([metrics.psnr(recon[v][np.argsort(perms[v])], originals[v]) for v in range(2)])
    np.testing.assert_allclose(s.psnr, expected, rtol=1e-6)
    # brute force over all permutations gives the same minimum total MSE
    cost = lambda p: sum(np.mean((originals[0][i] - recon[0][p[i]]) ** 2) for i in range(5))
    best = min(itertools.permutations(range(5)), key=cost)
    np.testing.assert_array_equal(s.assignment[0], best)


def test_hungarian_matches_brute_force_on_random_images():
    rng = np.random.default_rng(4)
    a, b = rng.random((6, 3, 3, 1)), rng.random((6, 3, 3, 1))
    cost = lambda p: sum(np.mean((a[i] - b[p[i]]) ** 2) for i in range(6))
    best = min(itertools.permutations(range(6)), key=cost)
    assert cost(attacks.match_batch(a, b)) == pytest.approx(cost(best))


def test_per_layer_attack_scores(setup):
    task, x, y, g = setup
    sub = {name: v[:2] for name, v in g.items()}
    # the conditional attack (labels given to every layer), as DLG with known labels
    scores = attacks.invert_per_layer(task, sub, x[:2], method="dlg", restarts=1, steps=STEPS, labels=y[:2])
    assert scores.measure == "attack_psnr" and scores.unit == "dB"
    assert set(scores.meta["labels"].values()) == {"given"}
    assert list(scores) == task.layer_names
    assert scores["Dense_0"].value > PSNR_THRESHOLD
    assert scores["Dense_0"].ci is not None
    assert set(scores["Dense_0"].extras) >= {"mse", "ssim", "psnr_per_victim"}
    assert scores.to_dict()["layers"]["Dense_0"]["rank"] >= 1


def test_bad_inputs(setup):
    task, x, y, g = setup
    with pytest.raises(InputError, match="sketched"):
        attacks.invert(task, {"Dense_0": np.zeros(100)})
    with pytest.raises(JaxleakError, match="no layer 'Dense_9'"):
        attacks.invert(task, {"Dense_9": np.zeros(3)})
    with pytest.raises(InputError, match="method"):
        attacks.invert(task, g, method="gan")
    with pytest.raises(InputError, match="no entry"):
        attacks.invert(task, {"Dense_2": g["Dense_2"]}, layers=["Dense_0"])
    with pytest.raises(InputError, match="labels has shape"):
        attacks.invert(task, g, labels=np.zeros((3,), np.int32))
    with pytest.raises(InputError, match="restarts"):
        attacks.invert(task, g, restarts=0)
    with pytest.raises(InputError, match="originals"):
        attacks.score(np.zeros((2, 1, 8, 8, 1)), np.zeros((3, 8, 8, 1)))


def test_save_grid_writes_png(tmp_path, setup, ig_result):
    task, x, y, g = setup
    path = attacks.save_grid(x, ig_result.x, tmp_path / "grid.png", titles=["a", "b", "c", "d"])
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50
    assert os.listdir(tmp_path) == ["grid.png"]
    with pytest.raises(InputError):
        attacks.save_grid(x, x[:2], tmp_path / "bad.png")


def test_each_layer_attack_reads_its_own_gradient_only(setup):
    """Every other layer's gradient replaced by noise: layer l's reconstruction and label are unchanged.

    The label of a layer's attack comes from that layer alone (recovered from the last layer's own bias
    gradient, optimised jointly elsewhere), never from another layer's gradient."""
    task, x, y, g = setup
    sub = {name: v[:2] for name, v in g.items()}
    base = attacks.invert_layers(task, sub, restarts=1, steps=20, seed=0)
    assert {name: r.label_source for name, r in base.items()} == {
        **{name: "optimized" for name in task.layer_names[:-1]}, task.layer_names[-1]: "recovered"}
    rng = np.random.default_rng(0)
    for name in task.layer_names:
        noisy = {other: (v if other == name else rng.standard_normal(v.shape).astype(v.dtype))
                 for other, v in sub.items()}
        again = attacks.invert_layers(task, noisy, restarts=1, steps=20, seed=0)
        np.testing.assert_array_equal(again[name].x, base[name].x, err_msg=name)
        np.testing.assert_array_equal(again[name].labels, base[name].labels, err_msg=name)


def test_split_attack_equals_the_unsplit_one(setup):
    """A memory cap that splits layers and victims into several calls gives the unsplit results."""
    task, x, y, g = setup
    sub = {name: v[:3] for name, v in g.items()}
    whole = attacks.invert_layers(task, sub, restarts=2, steps=12, seed=1)
    smallest = min(layer.size for layer in task.layers) + 4 * x[0].size
    plan = attacks._attack_plan(task, task.layer_names, 3, 2, smallest * 2)
    assert len(plan) == len(task.layer_names) and any(len(rows) > 1 for _, rows in plan)
    split = attacks.invert_layers(task, sub, restarts=2, steps=12, seed=1, max_floats=smallest * 2)
    for name in task.layer_names:
        np.testing.assert_allclose(split[name].x, whole[name].x, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(split[name].best_restart, whole[name].best_restart)
        assert split[name].x.shape == whole[name].x.shape
