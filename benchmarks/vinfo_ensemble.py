"""Benchmark: the parallel attack ensemble of jaxleak.ensemble against one-by-one fitting and scikit-learn.

64 members = 8 layers x 8 configurations (linear softmax attacks, 8 weight
decays) on 2,000 examples x 1,024 features, binary target, split as an
attacker has it: 400 victims and 1,600 auxiliary examples, cross-validated in
``--folds`` folds inside the auxiliary ones (so the ensemble fits
8 x 8 x folds models). Three ways, in one process, repetitions interleaved:

- ensemble: all members of all layers and folds in one jitted computation
  (``fit_ensemble``; linear classifiers are solved by L-BFGS);
- loop: the same code called 64 times with one layer and one member each
  (all folds, compiled once, reused);
- sklearn: ``LogisticRegression`` (lbfgs, C = 1 / (weight_decay * n_train),
  the same objective) fitted on every fold's training rows (the same
  8 x 8 x folds models), standardised with the auxiliary rows' statistics.

The victims' NLL (bits) of each layer's fold-0 member with the lowest
validation NLL is compared between the ensemble and scikit-learn, and per
member too; the ensemble's own estimate (one member chosen by the pooled
out-of-fold loss, victims scored by the folds' average) is recorded beside.

Usage: python benchmarks/vinfo_ensemble.py [--reps 3] [--folds 5]
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
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from jaxleak import ensemble

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

LAYERS, CONFIGS, N, WIDTH, VICTIMS = 8, 8, 2000, 1024, 400
WEIGHT_DECAYS = tuple(float(w) for w in np.logspace(-4, -0.5, CONFIGS))
LN2 = math.log(2.0)


def make_data(seed: int = 0, n: int = N, width: int = WIDTH, layers: int = LAYERS):
    """Gaussian features (layers, n, width); the label is logistic in 8 directions of every layer,
    with a layer-specific strength."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(layers, n, width)).astype(np.float32)
    latent = rng.normal(size=n)
    y = (latent + 0.3 * rng.normal(size=n) > 0).astype(np.int32)
    for layer in range(layers):
        strength = layer / (layers - 1)  # from no signal to a strong one
        x[layer, :, :8] += (strength * latent)[:, None]
    return x, y


def heldout_bits(fit: ensemble.EnsembleFit) -> np.ndarray:
    """(L, M) mean held-out NLL in bits of every member (fold 0 is the only fold)."""
    return fit.member_test_loss[:, 0, :] / LN2


def selected(val: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per layer, the held-out NLL of the member with the lowest validation NLL."""
    return test[np.arange(test.shape[0]), np.argmin(val, axis=1)]


def run_ensemble(x, y, split, members, steps):
    return ensemble.fit_ensemble(x, y, split, members, kind="classification", num_classes=2, steps=steps,
                                 patience=None)


def run_loop(x, y, split, members, steps):
    val = np.zeros((LAYERS, CONFIGS))
    test = np.zeros((LAYERS, CONFIGS))
    for layer in range(LAYERS):
        for m, member in enumerate(members):
            fit = run_ensemble(x[layer:layer + 1], y, split, [member], steps)
            val[layer, m] = fit.val_loss[0, 0, 0]
            test[layer, m] = fit.member_test_loss[0, 0, 0] / LN2
    return val, test


def run_sklearn(x, y, split):
    """Every fold's 64 fits; returns fold 0's validation and victim NLL (bits) and every fit's iterations."""
    val = np.zeros((LAYERS, CONFIGS))
    test = np.zeros((LAYERS, CONFIGS))
    iters = []
    keep = split.train[0] | split.val[0]  # the auxiliary rows: the same in every fold of the attacker's split
    for layer in range(LAYERS):
        xl = x[layer].astype(np.float64)
        mu, sd = xl[keep].mean(axis=0), xl[keep].std(axis=0)
        z = (xl - mu) / np.where(sd > 0, sd, 1.0)
        for fold in range(split.train.shape[0]):
            train, val_rows, test_rows = split.train[fold], split.val[fold], split.test[fold]
            for m, wd in enumerate(WEIGHT_DECAYS):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model = LogisticRegression(C=1.0 / (wd * int(train.sum())), max_iter=1000).fit(z[train],
                                                                                                  y[train])
                iters.append(int(model.n_iter_[0]))
                if fold == 0:
                    for rows, out in ((val_rows, val), (test_rows, test)):
                        p = model.predict_proba(z[rows])[np.arange(rows.sum()), y[rows]]
                        out[layer, m] = -np.mean(np.log(p)) / LN2
    return val, test, iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="Adam budget (read by MLP members only; the "
                        "linear members here are solved)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--note", default="", help="e.g. that other jobs shared the CPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vinfo_ensemble.json"))
    args = parser.parse_args()

    x, y = make_data()
    split = ensemble.attacker_split(VICTIMS, N - VICTIMS, args.folds, seed=0, strata=y[VICTIMS:])
    members = [ensemble.Member("linear", wd, 0) for wd in WEIGHT_DECAYS]

    # First calls include compilation; reported separately.
    t0 = time.perf_counter()
    run_ensemble(x, y, split, members, args.steps)
    first_ensemble = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_ensemble(x[:1], y, split, members[:1], args.steps)
    first_single = time.perf_counter() - t0

    times = {"ensemble": [], "loop": [], "sklearn": []}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fit = run_ensemble(x, y, split, members, args.steps)
        times["ensemble"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loop_val, loop_test = run_loop(x, y, split, members, args.steps)
        times["loop"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sk_val, sk_test, sk_iters = run_sklearn(x, y, split)
        times["sklearn"].append(time.perf_counter() - t0)

    med = {k: float(np.median(v)) for k, v in times.items()}
    one_member = med["loop"] / (LAYERS * CONFIGS)
    ens_test = heldout_bits(fit)
    ens_sel, sk_sel = selected(fit.val_loss[:, 0, :], ens_test), selected(sk_val, sk_test)
    null_bits = float(fit.null_loss.mean() / LN2)
    estimate = ((fit.null_loss[None] - fit.heldout_loss).mean(axis=1) / LN2).tolist()
    result = {
        "benchmark": "vinfo_ensemble",
        "setup": {"layers": LAYERS, "configurations": CONFIGS, "members": LAYERS * CONFIGS, "examples": N,
                  "features": WIDTH, "folds": args.folds,
                  "fold0 train/val/victims": [int(split.train[0].sum()), int(split.val[0].sum()),
                                              int(split.test[0].sum())],
                  "weight_decays": WEIGHT_DECAYS,
                  "optimizer": (f"L-BFGS (optax.scale_by_lbfgs) with an exact line search, stopped at max |gradient| "
                                f"<= {ensemble.SOLVER_TOL:g} or {ensemble.SOLVER_MAX_ITER} iterations; scikit-learn: "
                                "lbfgs, tol 1e-4, float64"),
                  "reps": args.reps},
        "machine": machine_info(),
        "note": args.note,
        "seconds": {"median": med, "all": times, "first_call_with_compile": {"ensemble": first_ensemble,
                                                                            "one_member": first_single}},
        "ratios": {
            "ensemble_over_one_member": med["ensemble"] / one_member,
            "loop_over_ensemble": med["loop"] / med["ensemble"],
            "sklearn_over_ensemble": med["sklearn"] / med["ensemble"],
            "sklearn_seconds_per_fit": med["sklearn"] / (LAYERS * CONFIGS * args.folds),
            "ensemble_seconds_per_fit": med["ensemble"] / (LAYERS * CONFIGS * args.folds),
        },
        "goal": {"sklearn_over_ensemble_at_least": 10.0, "selected_difference_at_most_bits": 0.01},
        "heldout_nll_bits": {
            "null": null_bits,
            "ensemble_vinfo_estimate_bits_per_layer": estimate,
            "ensemble_selected_per_layer": ens_sel.tolist(),
            "sklearn_selected_per_layer": sk_sel.tolist(),
            "selected_difference_max_abs": float(np.max(np.abs(ens_sel - sk_sel))),
            "selected_difference_mean": float(np.mean(ens_sel - sk_sel)),
            # None when some scikit-learn fit gave a held-out label probability 0 (infinite NLL);
            # strict JSON has no Infinity.
            "per_member_difference_max_abs": (float(np.max(np.abs(ens_test - sk_test)))
                                              if np.all(np.isfinite(sk_test)) else None),
            "sklearn_members_with_infinite_nll": int(np.sum(~np.isfinite(sk_test))),
            "per_member_difference_median_abs": float(np.median(np.abs(ens_test - sk_test))),
            "loop_equals_ensemble_max_abs": float(np.max(np.abs(loop_test - ens_test))),
            "sklearn_lbfgs_iterations_median": float(np.median(sk_iters)),
            "sklearn_lbfgs_iterations_max": int(np.max(sk_iters)),
            "ensemble_lbfgs_iterations_median": float(np.median(fit.solver_iterations)),
            "ensemble_lbfgs_iterations_max": int(np.max(fit.solver_iterations)),
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, allow_nan=False)
    print(json.dumps({"seconds": med, "ratios": result["ratios"], "heldout_nll_bits": result["heldout_nll_bits"]},
                     indent=2))


if __name__ == "__main__":
    main()
