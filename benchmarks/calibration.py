"""Does "detected" keep its promises? Family-wise error, power against scikit-learn and top-layer stability.

Synthetic data with a known answer (no model): L = 5 "layers" of features of widths (24, 48, 96, 160, 256)
for ``n`` victims (default 200) and ``n_aux`` auxiliary examples of the attacker (default 400), a binary
latent z, exactly balanced in both sets and shuffled. Layer l's features are

    F_l = strength_l * (2z - 1) * u_l + noise,

u_l a random unit direction in layer l's feature space (drawn once per replicate from the data seed,
the same for every example) and the noise standard normal. V-information runs as
``v_information_from_features(victims, z, aux_features=aux, aux_target=z_aux, family=("linear",),
folds=3, steps=60, sketch_dim=64, n_boot=1000, seed=s)``: layers wider than 64 (96, 160, 256) are
read as their top 64 principal components over the victims' and aux rows (in a basis seeded by s). Every replicate draws fresh data (data seed) and a fresh
estimator seed s, both from ``numpy.random.SeedSequence([--seed, part, planted layer, level, replicate])``.

1. **Null** (all strengths 0), ``--replicates`` times: the family-wise false-detection rate (some layer
   ``detected``) of V-information, and of the subspace distance computed from the victims' Grams
   F_l F_l^T (raw features, every layer), z balanced by ``balanced_groups``, R = ``--permutations``
   (100) shuffles with the same seed for every layer (as ``subspace_distance`` does), verdicts by
   ``with_verdicts`` (Westfall-Young max-T). Goal: at most 5%.
2. **Power against scikit-learn**: a signal planted in one layer at each of ``--strengths`` (0.3, 0.4,
   0.5: scikit-learn finds layer 2 in about 1/9, 2/5 and 5/6 of the replicates), ``--power-replicates`` times
   each. ``--planted 2 1`` (default) runs this twice: layer 2 (width 96, reduced to 64 principal components:
   the goal's layer) and, to tell the reduction's loss from the estimator's, layer 1 (width 48, read whole). The
   reference attacker is scikit-learn ``LogisticRegressionCV(Cs=8, cv=5)`` trained on that layer's
   auxiliary features (the raw, whole features, standardised by a ``StandardScaler`` fitted on the
   aux rows) and scored by accuracy on the victims; it *found* the layer when its accuracy is at least 3
   standard errors above chance, se = sqrt(c (1 - c) / n), c the victims' majority rate. Goal: jaxleak detects
   the planted layer in at least 95% of the replicates where scikit-learn found it. Also recorded:
   jaxleak's detection rate over all replicates, replicates with a false detection among the 4 other
   layers, the planted layer's own pairing p-value (``p_pairing``, before the max-T adjustment over the 5
   layers) below 0.05, its bootstrap p-value of a positive gain below 0.05, and (for
   diagnosis only) the same reference on the reduced features that jaxleak reads.
3. **Top-layer stability**: in every power replicate where something is detected, V-information is
   rerun on the same data with seed s + 1000 (another basis, folds and bootstrap) and the sets of
   top layers (``to_dict()["top"]``) are compared. Goal: the same set in at least 90% of them.

Rates come with exact (Clopper-Pearson) 95% binomial intervals (``scipy.stats.binomtest``).

Cost on the 2-core CPU under load 4-5: about 3.5 s per null replicate (mostly the subspace
permutations, BLAS limited to one thread) and 0.9 s per power replicate, after 10 s of compiling.

Usage: ``python benchmarks/calibration.py [--replicates 200] [--power-replicates 60]
[--strengths 0.3 0.4 0.5] [--planted 2 1] [--seed 0] [--note TEXT]
[--out benchmarks/results/calibration.json]``. Development: ``--replicates 4 --power-replicates 3``.
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
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402

WIDTHS = (24, 48, 96, 160, 256)
NULL_PART, POWER_PART = 0, 1
STABILITY_OFFSET = 1000


def seeds_for(base: int, part: int, layer: int, level: int, rep: int) -> tuple[int, int]:
    """(data seed, estimator seed) of one replicate: fresh and independent for every replicate."""
    state = np.random.SeedSequence([base, part, layer, level, rep]).generate_state(2)
    return int(state[0]), int(state[1] % (2 ** 31 - STABILITY_OFFSET - 1))


def names() -> list[str]:
    return [f"layer{i}" for i in range(len(WIDTHS))]


def make_data(data_seed: int, n: int, n_aux: int, strengths) -> dict:
    """Victims' and aux features {layer: (rows, width)} and balanced binary z for both."""
    rng = np.random.default_rng(data_seed)

    def balanced(m):
        z = np.repeat(np.array([0, 1]), [m - m // 2, m // 2])
        return rng.permutation(z)

    z, z_aux = balanced(n), balanced(n_aux)
    dirs = []
    for w in WIDTHS:
        u = rng.standard_normal(w)
        dirs.append(u / np.linalg.norm(u))

    def features(zz):
        sign = (2.0 * zz - 1.0)[:, None]
        return {name: (s * sign * u + rng.standard_normal((zz.size, w))).astype(np.float32)
                for name, s, u, w in zip(names(), strengths, dirs, WIDTHS)}

    return {"victims": features(z), "z": z, "aux": features(z_aux), "z_aux": z_aux}


def v_info(data: dict, seed: int, args):
    from jaxleak.vinfo import v_information_from_features

    return v_information_from_features(
        data["victims"], data["z"], aux_features=data["aux"], aux_target=data["z_aux"], family=("linear",),
        folds=args.folds, steps=args.steps, sketch_dim=args.sketch_dim, seed=seed, n_boot=args.n_boot)


def subspace(data: dict, seed: int, permutations: int) -> dict:
    """Subspace distance of every layer from the victims' Grams, max-T verdicts (same shuffles for all)."""
    from jaxleak.scores import Score
    from jaxleak.subspace import balanced_groups, subspace_distance_from_grams, with_verdicts

    index, group = balanced_groups(data["z"], seed=seed)
    scores, nulls = {}, {}
    for name, f in data["victims"].items():
        g = np.asarray(f, np.float64)[index]
        with threadpool_limits(1, user_api="blas"):  # 100 x 100 eigh: threads only contend (5x slower)
            res = subspace_distance_from_grams(g @ g.T, group, permutations=permutations, seed=seed * 1000003)
        value = res.pop("value")
        nulls[name] = np.asarray(res.pop("null"), np.float64)
        scores[name] = Score(value, None, res)
    out = with_verdicts(scores, nulls)
    return {name: {"excess": s["excess"], "p_value": s["p_value"], "p_adjusted": s["p_adjusted"],
                   "detected": bool(s["detected"]), "k": s["k"]} for name, s in out.items()}


def reference(f_aux, z_aux, f_vic, z_vic) -> dict:
    """scikit-learn's attacker: LogisticRegressionCV on the aux rows (aux-standardised), accuracy on the victims."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(f_aux)
    chance = max(np.mean(z_vic), 1.0 - np.mean(z_vic))
    se = math.sqrt(chance * (1.0 - chance) / z_vic.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn 1.9's notices of changing defaults
        with threadpool_limits(1, user_api="blas"):
            model = LogisticRegressionCV(Cs=8, cv=5, max_iter=3000).fit(scaler.transform(f_aux), z_aux)
    acc = float(np.mean(model.predict(scaler.transform(f_vic)) == z_vic))
    return {"accuracy": acc, "se_above_chance": (acc - chance) / se, "found": bool(acc - chance >= 3.0 * se)}


def as_read(data: dict, layer: str, seed: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The planted layer's aux and victims' features as V-information reads them (its top ``dim`` principal
    components over the victims' and aux rows together, in the seeded basis)."""
    from jaxleak.vinfo import _reduce

    n_vic = data["victims"][layer].shape[0]
    both = np.concatenate([data["victims"][layer], data["aux"][layer]]).astype(np.float32)
    (f,), _ = _reduce([layer], [both], dim, seed)
    return np.asarray(f[n_vic:], np.float64), np.asarray(f[:n_vic], np.float64)


def rate(k: int, n: int) -> dict:
    from scipy.stats import binomtest

    if n == 0:
        return {"count": k, "of": n, "rate": None, "ci95": None}
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return {"count": int(k), "of": int(n), "rate": k / n, "ci95": [float(ci.low), float(ci.high)]}


def fmt(r: dict) -> str:
    if r["of"] == 0:
        return "0/0"
    return f"{r['count']}/{r['of']} = {r['rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def power_layer(args, index: int, bar) -> tuple[dict, list]:
    """Part 2 (and the replicates of part 3) for a signal planted in layer ``index``."""
    layers = names()
    planted = layers[index]
    is_reduced = WIDTHS[index] > args.sketch_dim
    levels, stable, started = [], [], time.time()
    for level, strength in enumerate(args.strengths):
        records = []
        for rep in range(args.power_replicates):
            data_seed, seed = seeds_for(args.seed, POWER_PART, index, level, rep)
            strengths = [0.0] * len(WIDTHS)
            strengths[index] = strength
            data = make_data(data_seed, args.n, args.n_aux, strengths)
            vi = v_info(data, seed, args)
            top = vi.to_dict()["top"]
            ref = reference(np.asarray(data["aux"][planted], np.float64), data["z_aux"],
                            np.asarray(data["victims"][planted], np.float64), data["z"])
            if is_reduced:
                s_aux, s_vic = as_read(data, planted, seed, args.sketch_dim)
                ref_reduced = reference(s_aux, data["z_aux"], s_vic, data["z"])
            else:
                ref_reduced = ref
            rec = {
                "data_seed": data_seed, "seed": seed,
                "sklearn": ref, "sklearn_on_reduced": ref_reduced,
                "vinfo_value": vi[planted].value, "vinfo_ci": list(vi[planted].ci),
                "vinfo_p_value": vi[planted]["p_value"], "vinfo_p_pairing": vi[planted]["p_pairing"],
                "vinfo_p_adjusted": vi[planted]["p_adjusted"],
                "vinfo_accuracy": vi[planted]["accuracy"], "vinfo_member": vi[planted]["best_member"],
                "vinfo_detected": bool(vi[planted]["detected"]),
                "false_detections": [name for name in layers if name != planted and vi[name]["detected"]],
                "top": top,
            }
            if top is not None:
                top2 = v_info(data, seed + STABILITY_OFFSET, args).to_dict()["top"]
                rec["top_rerun"] = top2
                rec["top_same"] = top2 is not None and set(top2) == set(top)
                stable.append(rec["top_same"])
            records.append(rec)
            bar.update()
        found = [r for r in records if r["sklearn"]["found"]]
        not_found = [r for r in records if not r["sklearn"]["found"]]
        found_red = [r for r in records if r["sklearn_on_reduced"]["found"]]
        given = rate(sum(r["vinfo_detected"] for r in found), len(found))
        levels.append({
            "strength": strength,
            "bayes_accuracy": float(0.5 * (1 + math.erf(strength / math.sqrt(2)))),
            "replicates": len(records),
            "sklearn_found": rate(len(found), len(records)),
            "jaxleak_detected_given_found": given,
            "goal_met": given["rate"] is not None and given["rate"] >= 0.95,
            "jaxleak_detected": rate(sum(r["vinfo_detected"] for r in records), len(records)),
            "jaxleak_detected_given_not_found": rate(sum(r["vinfo_detected"] for r in not_found), len(not_found)),
            "jaxleak_unadjusted_pairing_p_below_0.05_given_found": rate(
                sum(r["vinfo_p_pairing"] < 0.05 for r in found), len(found)),
            "jaxleak_bootstrap_gain_p_below_0.05_given_found": rate(sum(r["vinfo_p_value"] < 0.05 for r in found),
                                                                len(found)),
            "replicates_with_false_detection_in_other_layers": rate(
                sum(bool(r["false_detections"]) for r in records), len(records)),
            "false_layer_detections": sum(len(r["false_detections"]) for r in records),
            "sklearn_on_reduced_found": rate(len(found_red), len(records)),
            "jaxleak_detected_given_found_on_reduced": rate(sum(r["vinfo_detected"] for r in found_red),
                                                            len(found_red)),
            "mean_sklearn_accuracy": float(np.mean([r["sklearn"]["accuracy"] for r in records])),
            "mean_sklearn_on_reduced_accuracy": float(np.mean([r["sklearn_on_reduced"]["accuracy"]
                                                               for r in records])),
            "mean_jaxleak_accuracy": float(np.mean([r["vinfo_accuracy"] for r in records])),
            "records": records,
        })
    found_all = [r for lv in levels for r in lv["records"] if r["sklearn"]["found"]]
    pooled = rate(sum(r["vinfo_detected"] for r in found_all), len(found_all))
    out = {
        "planted_layer": planted, "planted_width": WIDTHS[index], "reduced": is_reduced,
        "goal": "jaxleak detects the planted layer in >= 95% of the replicates where scikit-learn found it",
        "levels": levels,
        "pooled_detected_given_found": pooled,
        "pooled_goal_met": pooled["rate"] is not None and pooled["rate"] >= 0.95,
        "same_top": rate(sum(stable), len(stable)),
        "seconds": time.time() - started,
    }
    return out, stable


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=200, help="null replicates")
    parser.add_argument("--power-replicates", type=int, default=60, help="replicates per strength and planted layer")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    parser.add_argument("--planted", type=int, nargs="+", default=[2, 1],
                        help="layers (indices) with the signal, one power study each; the first is the goal's")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n-aux", type=int, default=400)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration.json"))
    args = parser.parse_args()

    from tqdm.auto import tqdm

    started = time.time()
    layers = names()
    total = args.replicates + len(args.planted) * len(args.strengths) * args.power_replicates
    bar = tqdm(total=total, desc="calibration", unit="rep")

    # 1. null
    null_records = []
    t0 = time.time()
    for rep in range(args.replicates):
        data_seed, seed = seeds_for(args.seed, NULL_PART, 0, 0, rep)
        data = make_data(data_seed, args.n, args.n_aux, [0.0] * len(WIDTHS))
        vi = v_info(data, seed, args)
        sd = subspace(data, seed, args.permutations)
        null_records.append({
            "data_seed": data_seed, "seed": seed,
            "vinfo_detected": [name for name in layers if vi[name]["detected"]],
            "vinfo_min_p_adjusted": min((vi[name]["p_adjusted"] for name in layers
                                         if vi[name]["p_adjusted"] is not None), default=None),
            "subspace_detected": [name for name in layers if sd[name]["detected"]],
            "subspace_min_p_adjusted": min((sd[name]["p_adjusted"] for name in layers
                                            if sd[name]["p_adjusted"] is not None), default=None),
        })
        bar.update()
    vi_fw = rate(sum(bool(r["vinfo_detected"]) for r in null_records), len(null_records))
    sd_fw = rate(sum(bool(r["subspace_detected"]) for r in null_records), len(null_records))
    null_part = {
        "replicates": len(null_records),
        "vinfo_family_wise": vi_fw,
        "vinfo_layer_detections": sum(len(r["vinfo_detected"]) for r in null_records),
        "subspace_family_wise": sd_fw,
        "subspace_layer_detections": sum(len(r["subspace_detected"]) for r in null_records),
        "goal": "family-wise false-detection rate <= 0.05",
        "vinfo_goal_met": vi_fw["rate"] is not None and vi_fw["rate"] <= 0.05,
        "subspace_goal_met": sd_fw["rate"] is not None and sd_fw["rate"] <= 0.05,
        "seconds": time.time() - t0,
        "records": null_records,
    }

    # 2. power and 3. stability
    power, stable = [], []
    for index in args.planted if args.power_replicates > 0 else ():  # 0: a null-only run
        part, same = power_layer(args, index, bar)
        power.append(part)
        stable += same
    bar.close()
    stability = rate(sum(stable), len(stable))
    stability_part = {
        "goal": "the same set of top layers with seed + 1000 in >= 90% of power replicates with a detection "
                "(pooled over the planted layers; per layer in power[i].same_top)",
        "same_top": stability,
        "goal_met": stability["rate"] is not None and stability["rate"] >= 0.90,
    }
    result = {
        "benchmark": "calibration",
        "settings": {"widths": list(WIDTHS), "n": args.n, "n_aux": args.n_aux, "family": ["linear"],
                     "folds": args.folds, "steps": args.steps, "sketch_dim": args.sketch_dim,
                     "n_boot": args.n_boot, "permutations": args.permutations, "replicates": args.replicates,
                     "power_replicates": args.power_replicates, "strengths": args.strengths,
                     "planted": [layers[i] for i in args.planted], "seed": args.seed,
                     "stability_seed_offset": STABILITY_OFFSET,
                     "found_rule": "LogisticRegressionCV(Cs=8, cv=5) on the raw aux features (StandardScaler on "
                                   "aux), victim accuracy >= c + 3 sqrt(c (1 - c) / n), c the majority rate",
                     "intervals": "exact Clopper-Pearson 95% (scipy.stats.binomtest)"},
        "null": null_part,
        "power": power,
        "power_goal_met": power[0]["pooled_goal_met"] if power else None,
        "stability": stability_part if power else None,
        "wall_seconds": time.time() - started,
        "machine": machine_info(),
        "note": args.note,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float, allow_nan=False)

    print(f"null ({args.replicates} replicates): V-information family-wise {fmt(vi_fw)}; "
          f"subspace distance {fmt(sd_fw)}  (goal <= 0.05: {null_part['vinfo_goal_met']} / "
          f"{null_part['subspace_goal_met']})")
    for part in power:
        print(f"planted {part['planted_layer']} (width {part['planted_width']}, "
              f"{'reduced to ' + str(args.sketch_dim) if part['reduced'] else 'read whole'}):")
        for lv in part["levels"]:
            print(f"  strength {lv['strength']:g} (Bayes acc {lv['bayes_accuracy']:.3f}), {lv['replicates']} reps: "
                  f"sklearn found {fmt(lv['sklearn_found'])}; jaxleak detected | found "
                  f"{fmt(lv['jaxleak_detected_given_found'])}; overall {fmt(lv['jaxleak_detected'])}; "
                  f"false detection in other layers {fmt(lv['replicates_with_false_detection_in_other_layers'])}; "
                  f"sklearn on the reduced layer found {fmt(lv['sklearn_on_reduced_found'])}, jaxleak | found there "
                  f"{fmt(lv['jaxleak_detected_given_found_on_reduced'])}; acc sklearn "
                  f"{lv['mean_sklearn_accuracy']:.3f} / reduced {lv['mean_sklearn_on_reduced_accuracy']:.3f} / "
                  f"jaxleak {lv['mean_jaxleak_accuracy']:.3f}")
        print(f"  pooled detected | found: {fmt(part['pooled_detected_given_found'])} "
              f"(goal >= 0.95: {part['pooled_goal_met']}); same top {fmt(part['same_top'])}; {part['seconds']:.0f} s")
    if power:
        print(f"top-layer stability: {fmt(stability)} (goal >= 0.90: {stability_part['goal_met']})")
    print(f"wall {result['wall_seconds']:.1f} s (null {null_part['seconds']:.1f}); wrote {args.out}")


if __name__ == "__main__":
    main()
