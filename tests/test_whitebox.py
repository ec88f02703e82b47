"""The white-box inversion family of V-information (jaxleak/whitebox.py) against the inversion attack itself."""

import numpy as np
import pytest

from jaxleak import data, metrics
from jaxleak.attacks import invert_per_layer
from jaxleak.errors import InputError
from jaxleak.grads import layer_grads
from jaxleak.task import Task
from jaxleak.vinfo import v_information

IG = dict(steps=100, restarts=1, seed=0)


@pytest.fixture(scope="module")
def setting():
    ds = data.load("digits")
    task = Task.init("mlp", ds, seed=0)
    victims, aux = ds.subset(slice(0, 40)), ds.subset(slice(40, 340))
    return task, victims, aux


@pytest.fixture(scope="module")
def input_scores(setting):
    task, victims, aux = setting
    return v_information(task, victims.x, victims.y, "input", aux=(aux.x, aux.y), inversion_n=32,
                         inversion_steps=IG["steps"], steps=100, n_boot=500, seed=0)


def test_layers_that_inversion_breaks_are_detected(setting, input_scores):
    """Where per-layer Inverting Gradients beats the attacker's mean image by 1 dB PSNR, original
    V-information (with the white-box family) is detected; and the family does no worse than the attack.

    40 victims, 32 of them inverted: every layer is still scored on all 40 (the composite attack)."""
    task, victims, aux = setting
    attack = invert_per_layer(task, layer_grads(task, victims.x[:16], victims.y[:16]), victims.x[:16, None], **IG)
    mean_image = np.broadcast_to(aux.x.mean(axis=0), victims.x.shape)
    mean_psnr = float(np.mean(np.asarray(metrics.psnr(mean_image[:16], victims.x[:16], 1.0))))
    broken = [name for name, s in attack.items() if s.value >= mean_psnr + 1.0]
    assert broken, ({k: s.value for k, s in attack.items()}, mean_psnr)  # the test must not be vacuous
    scores = input_scores
    assert "inversion" in scores.meta["members"]
    info = scores.meta["inversion"]
    assert info["victims"] == 32 and len(info["victim_rows"]) == 32 and scores.meta["victims"] == 40
    # each layer's reconstruction from its own gradient: the first Dense layer in closed form, the label
    # optimised jointly with the input elsewhere (never read off another layer)
    assert info["labels"] == {**{n: "optimized" for n in task.layer_names}, task.layer_names[0]: "closed form"}
    missed = [name for name in broken if not scores[name]["detected"]]
    assert not missed, {name: (scores[name].value, scores[name].ci) for name in broken}
    assert any(info["layers"][name]["selected"] for name in broken)
    # the first Dense layer gives every victim's input exactly: a textbook break, scored as one
    first = task.layer_names[0]
    assert info["layers"][first]["selected"] and scores[first]["mse"] < 1e-8
    assert scores[first].value > 5 * scores[first]["learned_alone"]["value"]
    # the victims' subsample is inverted only for selected layers (the closed form reads them anyway)
    assert info["victims_inverted"] == any(entry["selected"] and info["labels"][name] != "closed form"
                                           for name, entry in info["layers"].items())
    for name, entry in info["layers"].items():
        assert scores[name]["scored"] == 40  # every layer on every victim
        if not entry["selected"]:
            assert entry["victims"] == 0
        # selected only with a paired margin on aux: the family does no worse on aux than the learned attack
        assert entry["selected"] == (entry["aux_gain_ci"][0] > 0)
        if entry["selected"]:
            assert entry["aux_loss_inversion"] < entry["aux_loss_learned"]
            # Inverting Gradients on the 32 inverted victims; the free closed form on every victim
            expected = 40 if info["labels"][name] == "closed form" else 32
            assert scores[name]["best_member"].startswith("inversion") and entry["victims"] == expected
            assert scores[name]["white_box_victims"] == expected
            assert 0.0 <= scores[name]["shrink"] <= 1.0
            # the learned attack alone, on all victims, is reported too; detected alone => detected
            alone = scores[name]["learned_alone"]
            if alone["ci"][0] > 0:
                assert scores[name]["detected"]


def test_white_box_selection_reads_no_victim_target(setting, input_scores):
    """Other victims, the same attacker: the shrinkage and the selection's aux comparison are unchanged, so
    neither is fitted on the victims (a shrinkage fitted on the victims' own errors would move)."""
    task, victims, aux = setting
    others = data.load("digits").subset(slice(400, 440))
    again = v_information(task, others.x, others.y, "input", aux=(aux.x, aux.y), inversion_n=32,
                          inversion_steps=IG["steps"], steps=100, n_boot=500, seed=0)
    first, second = input_scores.meta["inversion"]["layers"], again.meta["inversion"]["layers"]
    for name in first:
        assert second[name]["shrink"] == pytest.approx(first[name]["shrink"], rel=1e-4), name
        assert second[name]["aux_loss_inversion"] == pytest.approx(first[name]["aux_loss_inversion"], rel=1e-4)


def test_latent_inversion_family_and_its_errors(setting):
    task, victims, aux = setting
    z, za = victims.latent["thickness"], aux.latent["thickness"]
    scores = v_information(task, victims.x, victims.y, z, aux=(aux.x, aux.y, za),
                           family=("linear", "inversion"), inversion_n=12, inversion_steps=50, steps=60,
                           n_boot=200, seed=0)
    info = scores.meta["inversion"]
    assert set(info["layers"]) == set(scores)
    for name, entry in info["layers"].items():
        assert np.isfinite(entry["aux_loss_inversion"]) and np.isfinite(entry["aux_loss_learned"])
        assert entry["selected"] == (entry["aux_gain_ci"][0] > 0)
        assert scores[name].ci[0] < scores[name].ci[1]
    # flipping the victims' attribute changes no selection (no victim target reaches it)
    flipped = v_information(task, victims.x, victims.y, 1 - z, aux=(aux.x, aux.y, za),
                            family=("linear", "inversion"), inversion_n=12, inversion_steps=50, steps=60,
                            n_boot=200, seed=0)
    for name, entry in info["layers"].items():
        other = flipped.meta["inversion"]["layers"][name]
        assert other["selected"] == entry["selected"] and other["prior_weight"] == entry["prior_weight"]
    with pytest.raises(InputError, match="auxiliary data"):
        v_information(task, victims.x, victims.y, "input", family=("linear", "inversion"))
    with pytest.raises(InputError, match=r"\(x_aux, y_aux, z_aux\)"):
        v_information(task, victims.x, victims.y, z, aux=(aux.x, aux.y))


def test_first_dense_layer_gives_its_input_in_closed_form(setting):
    """The MLP's first layer: kernel gradient over bias gradient is the input itself, exactly."""
    from jaxleak.whitebox import _reconstruct, closed_form_layer

    task, victims, aux = setting
    assert closed_form_layer(task) == "Dense_0"
    recon, how = _reconstruct(task, ["Dense_0"], victims.x[:8], victims.y[:8], steps=2, restarts=1, seed=0,
                              progress=False)
    assert how == {"Dense_0": "closed form"}
    np.testing.assert_allclose(recon["Dense_0"], victims.x[:8].reshape(8, -1), atol=1e-4)
    assert closed_form_layer(Task.init("lenet", data.load("digits"), seed=0)) is None  # a conv first layer


def test_white_box_gradients_are_formed_a_few_layers_at_a_time(setting, monkeypatch):
    """Under a small gradient cap every layer's per-example gradients are formed and attacked on their own,
    and the reconstructions equal those of one group of all layers (same starts, own gradient each)."""
    from jaxleak import grads, whitebox

    task, victims, aux = setting
    names = [layer.name for layer in task.layers]
    kwargs = dict(steps=10, restarts=2, seed=0, progress=False)
    whole, _ = whitebox._reconstruct(task, names, victims.x[:6], victims.y[:6], **kwargs)
    asked, layer_grads = [], grads.layer_grads

    def spy(task_, x, y, *, layers=None, **k):
        asked.append(list(layers))
        return layer_grads(task_, x, y, layers=layers, **k)

    monkeypatch.setattr(grads, "layer_grads", spy)
    monkeypatch.setattr(whitebox, "_GRADIENT_FLOATS", 1)
    split, _ = whitebox._reconstruct(task, names, victims.x[:6], victims.y[:6], **kwargs)
    assert asked == [[name] for name in names]
    for name in names:
        np.testing.assert_array_equal(split[name], whole[name], err_msg=name)


def test_white_box_budget_cuts_the_family_short_and_says_so(setting, monkeypatch):
    from jaxleak import attacks

    task, victims, aux = setting
    # one call per layer (as for layers too large to share one), so that the budget can stop between them
    monkeypatch.setattr(attacks, "_attack_plan", lambda task, names, victims, runs, budget: [
        ([name], [np.arange(victims)]) for name in names])
    run = lambda budget: v_information(task, victims.x[:24], victims.y[:24], "input",  # noqa: E731
                                       aux=(aux.x, aux.y), inversion_n=8, inversion_steps=20, steps=40, n_boot=200,
                                       seed=0, inversion_budget_s=budget)
    # the cost estimate prices the first optimised call above the budget: nothing optimised starts
    info = run(1e-6).meta["inversion"]
    assert info["labels"]["Dense_0"] == "closed form" and info["skipped"] == ["Dense_1", "Dense_2"]
    # an estimate that says it fits: the first optimised call starts, and its pace check stops it (compiling
    # alone takes longer than 0.3 s): no layer is attacked on part of the steps
    monkeypatch.setattr(attacks, "estimated_call_seconds", lambda *a, **k: 0.0)
    calls, run_call = [], attacks._run

    def spy(pace_check: bool):
        def wrapped(*args, **kwargs):
            out = run_call(*args, **(kwargs if pace_check else {**kwargs, "deadline": None}))
            calls.append(out[1])
            return out
        return wrapped

    monkeypatch.setattr(attacks, "_run", spy(True))
    info = run(0.3).meta["inversion"]
    assert calls == [None] and info["skipped"] == ["Dense_1", "Dense_2"]
    # without the pace check the first call finishes; its measured time stops the second
    calls.clear()
    monkeypatch.setattr(attacks, "_run", spy(False))
    scores = run(0.3)
    info = scores.meta["inversion"]
    assert len(calls) == 1 and calls[0] is not None
    assert info["labels"]["Dense_0"] == "closed form" and info["skipped"] == ["Dense_2"]
    assert info["layers"]["Dense_2"]["selected"] is False and "budget" in info["layers"]["Dense_2"]["skipped"]
    assert "cut short" in scores.verdict()["text"]
    assert scores["Dense_2"]["scored"] == 24  # still scored, by the learned member, on every victim
    with pytest.raises(InputError, match="inversion_budget_s"):
        v_information(task, victims.x[:24], victims.y[:24], "input", aux=(aux.x, aux.y), inversion_budget_s=-1)


def test_white_box_reads_the_features_program_for_the_layers_it_holds_whole():
    """The white-box family's gradients: layers the features hold whole come from the features' compiled
    program (rows padded to its chunk: nothing is traced again), wider ones from layer_grads; all equal the
    exact per-example gradients."""
    from jaxleak import grads
    from jaxleak.vinfo import _exact_gradients

    ds = data.load("digits")
    task = Task.init("lenet", ds, seed=0)
    names = task.layer_names
    width = 1000  # Conv_0 (156) and Dense_2 (850) whole; the others sketched in the features
    whole = [name for name in names if task.layer(name).size <= width]
    assert 0 < len(whole) < len(names)
    grads.sketch_grads(task, ds.x[:40], ds.y[:40], dim=width, seed=0, chunk_size=16)  # the features' program
    key = ("sketch_grads", tuple(names), width, 0, "auto")
    traced = grads.TRACE_COUNTS[key]
    assert traced >= 1
    gradients = _exact_gradients(task, None, width, 0, 16)
    got = gradients(ds.x[50:57], ds.y[50:57], names)
    assert grads.TRACE_COUNTS[key] == traced  # the same program, not traced again
    want = grads.layer_grads(task, ds.x[50:57], ds.y[50:57])
    assert list(got) == names
    for name in names:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
