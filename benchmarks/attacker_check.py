"""Does V-information find what an outside attacker finds? A check against scikit-learn on the same data.

The setting: digits with the default LeNet trained on 539 examples (``--train-fraction 0.3``), the other
1,258 split into 449 victims and 809 auxiliary examples of the attacker (``--n 449 --aux-n 809``), latent
``thickness``. The reference attacker, written independently of jaxleak, is scikit-learn's logistic
regression on each layer's full per-example gradients (standardised with the auxiliary rows' statistics),
trained on the auxiliary gradients and scored on the victims: once with C = 1 and once with C chosen by
5-fold cross-validation on the auxiliary rows. Where either is at least 3 standard errors above chance
(the victims' majority rate), jaxleak's latent V-information must detect the layer. For original
information the reference is ridge regression (RidgeCV on the auxiliary rows) decoding the image; the
check is that V-information detects the first layer.

``--setting default`` checks the default ``jaxleak run`` instead (LeNet trained on 40% of digits, 256
victims, 822 auxiliary examples), where a layer's auxiliary log loss can favour a near-prior attack while
scikit-learn's logistic regression is accurate on the victims (the case that detection by every member's
pairing statistic covers).

Usage: ``python benchmarks/attacker_check.py [--setting holdout|default] [--seed 0] [--note TEXT]``; writes
``benchmarks/results/attacker_check.json`` (``attacker_check_default_seed<S>.json`` for the default
setting).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402


def reference_latent(f_aux, z_aux, f_vic, z_vic) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_aux)
    a, v = scaler.transform(f_aux), scaler.transform(f_vic)
    chance = max(np.mean(z_vic), 1.0 - np.mean(z_vic))
    se = math.sqrt(chance * (1.0 - chance) / z_vic.size)
    out = {"chance": float(chance), "se": se}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name, model in (("C=1", LogisticRegression(C=1.0, max_iter=3000)),
                            ("C by 5-fold CV on aux", LogisticRegressionCV(Cs=8, cv=5, max_iter=3000))):
            acc = float(np.mean(model.fit(a, z_aux).predict(v) == z_vic))
            out[name] = {"accuracy": acc, "se_above_chance": (acc - chance) / se}
    out["found"] = any(out[k]["se_above_chance"] >= 3.0 for k in ("C=1", "C by 5-fold CV on aux"))
    return out


def reference_input(f_aux, x_aux, f_vic, x_vic) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_aux)
    ta, tv = x_aux.reshape(len(x_aux), -1), x_vic.reshape(len(x_vic), -1)
    pred = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(scaler.transform(f_aux), ta).predict(scaler.transform(f_vic))
    mse0 = float(np.mean(np.square(tv - ta.mean(axis=0))))
    mse = float(np.mean(np.square(tv - np.clip(pred, ta.min(axis=0), ta.max(axis=0)))))
    return {"mse": mse, "mse_null": mse0, "bits_per_dim": 0.5 * math.log2(mse0 / mse)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--setting", choices=("holdout", "default"), default="holdout")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = os.path.join(os.path.dirname(__file__), "results")
    args.out = args.out or os.path.join(results, "attacker_check.json" if args.setting == "holdout"
                                        else f"attacker_check_default_seed{args.seed}.json")

    from jaxleak import measures as measures_lib
    from jaxleak import run as run_lib
    from jaxleak.grads import layer_grads

    measured = ("v_information.latent", "v_information.original")
    config = (run_lib.RunConfig(train_fraction=0.3, n=449, aux_n=809, seed=args.seed, measures=measured)
              if args.setting == "holdout" else run_lib.RunConfig(seed=args.seed, measures=measured))
    started = time.time()
    prep = run_lib.prepare(config, progress=False)
    opts = run_lib.measure_options(config)
    opts["aux"] = (prep.aux["x"], prep.aux["y"], prep.aux["z"])
    latent = measures_lib.get("v_information.latent").compute(prep.task, prep.x, prep.y, prep.z, opts, False)
    original = measures_lib.get("v_information.original").compute(prep.task, prep.x, prep.y, prep.z, opts, False)
    seconds = time.time() - started
    f_vic = layer_grads(prep.task, prep.x, prep.y)  # the reference reads every coordinate of every layer
    f_aux = layer_grads(prep.task, prep.aux["x"], prep.aux["y"])
    layers = {}
    for name in latent:
        ref = reference_latent(np.asarray(f_aux[name], np.float64), prep.aux["z"],
                               np.asarray(f_vic[name], np.float64), prep.z)
        ridge = reference_input(np.asarray(f_aux[name], np.float64), prep.aux["x"],
                                np.asarray(f_vic[name], np.float64), prep.x)
        s, o = latent[name], original[name]
        layers[name] = {
            "latent": {"reference": ref, "jaxleak": {"value": s.value, "ci": s.ci, "detected": s["detected"],
                                                     "p_adjusted": s["p_adjusted"], "detected_by": s["detected_by"],
                                                     "accuracy": s["accuracy"], "member": s["best_member"]},
                       "agrees": (not ref["found"]) or bool(s["detected"])},
            "original": {"ridge": ridge, "jaxleak": {"value": o.value, "ci": o.ci, "detected": o["detected"],
                                                     "member": o["best_member"], "scored": o["scored"]}},
        }
    first = next(iter(original))
    result = {
        "benchmark": "attacker_check",
        "setting": {"name": args.setting, "dataset": "digits", "model": "lenet",
                    "train_examples": prep.train_info["train_examples"],
                    "victims": int(prep.x.shape[0]), "aux": int(prep.aux["info"]["n"]), "latent": "thickness",
                    "seed": args.seed, "test_accuracy": prep.train_info["test_accuracy"]},
        "layers": layers,
        "latent_detected_wherever_reference_finds": all(v["latent"]["agrees"] for v in layers.values()),
        "original_detected_in_first_layer": bool(original[first]["detected"]),
        "vinfo_seconds": seconds,
        "machine": machine_info(),
        "note": args.note,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float)
    for name, v in layers.items():
        ref, jl = v["latent"]["reference"], v["latent"]["jaxleak"]
        print(f"{name:8s} latent: sklearn {ref['C=1']['accuracy']:.3f} ({ref['C=1']['se_above_chance']:+.1f} se) / "
              f"CV {ref['C by 5-fold CV on aux']['accuracy']:.3f} ({ref['C by 5-fold CV on aux']['se_above_chance']:+.1f}"
              f" se); jaxleak {jl['value']:+.4f} bits [{jl['ci'][0]:+.4f}, {jl['ci'][1]:+.4f}] "
              f"{'detected' if jl['detected'] else 'not detected'}   original: ridge "
              f"{v['original']['ridge']['bits_per_dim']:+.3f}, jaxleak {v['original']['jaxleak']['value']:+.3f} "
              f"[{v['original']['jaxleak']['ci'][0]:+.3f}, {v['original']['jaxleak']['ci'][1]:+.3f}] bits/dim")
    print("latent detected wherever the reference finds it:", result["latent_detected_wherever_reference_finds"])
    print("original detected in the first layer:", result["original_detected_in_first_layer"])


if __name__ == "__main__":
    main()
