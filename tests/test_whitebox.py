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
    victims, aux = ds.subset(slice(0, 16)), ds.subset(slice(16, 316))
    return task, victims, aux


def test_layers_that_inversion_breaks_are_detected(setting):
    """Where per-layer Inverting Gradients beats the attacker's mean image by 1 dB PSNR, original
    V-information (with the white-box family) is detected; and the family does no worse than the attack."""
    task, victims, aux = setting
    attack = invert_per_layer(task, layer_grads(task, victims.x, victims.y), victims.x[:, None], **IG)
    mean_image = np.broadcast_to(aux.x.mean(axis=0), victims.x.shape)
    mean_psnr = float(np.mean(np.asarray(metrics.psnr(mean_image, victims.x, 1.0))))
    broken = [name for name, s in attack.items() if s.value >= mean_psnr + 1.0]
    assert broken, ({k: s.value for k, s in attack.items()}, mean_psnr)  # the test must not be vacuous
    scores = v_information(task, victims.x, victims.y, "input", aux=(aux.x, aux.y), inversion_n=16,
                           inversion_steps=IG["steps"], steps=100, n_boot=500, seed=0)
    assert "inversion" in scores.meta["members"]
    info = scores.meta["inversion"]
    assert info["victims"] == 16 and info["labels"] == "recovered"
    missed = [name for name in broken if not scores[name]["detected"]]
    assert not missed, {name: (scores[name].value, scores[name].ci) for name in broken}
    for name in broken:
        if info["layers"][name]["selected"]:
            assert scores[name]["best_member"].startswith("inversion")
            assert 0.0 < scores[name]["shrink"] <= 1.0


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
        assert entry["selected"] == (entry["aux_loss_inversion"] < entry["aux_loss_learned"])
        assert scores[name].ci[0] < scores[name].ci[1]
    with pytest.raises(InputError, match="auxiliary data"):
        v_information(task, victims.x, victims.y, "input", family=("linear", "inversion"))
    with pytest.raises(InputError, match=r"\(x_aux, y_aux, z_aux\)"):
        v_information(task, victims.x, victims.y, z, aux=(aux.x, aux.y))
