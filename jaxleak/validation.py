"""Validation of localization by real attacks (docs/method.md section 6), and the ``jaxleak attack`` job.

The attack-independent measures claim to predict, layer by layer, what an
attacker achieves. :func:`correlations` checks the claim across layers with
the Spearman rank correlation between

- sensitivity R_l (original information) and the PSNR of a reconstruction
  attack that matches layer l's gradient only
  (:func:`jaxleak.attacks.invert_per_layer`), and
- the subspace-distance excess (latent information) and the latent
  V-information (the attribute-inference attack of docs/method.md section 3).

The ``validation`` study (:func:`jaxleak.studies.run_study`) computes the
four per-layer measures on per-example gradients of the held-out pool and
writes the correlations under ``validation`` in results.json.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxleak import io
from jaxleak.errors import InputError
from jaxleak.scores import LayerScores, Score
from jaxleak.setting import Setting, load_part, part_path, trained
from jaxleak.task import Task

VALIDATION_MEASURES = ("sensitivity", "attack_psnr", "subspace_distance", "v_information.latent")


def excess_scores(subspace: LayerScores | Mapping) -> LayerScores:
    """The subspace-distance result with the excess over the permutation null as ``value``."""
    if not isinstance(subspace, LayerScores):
        subspace = LayerScores.from_dict(subspace)
    scores = {name: Score(float(s.extras["excess"]) if s.extras.get("excess") is not None else float("nan"), None,
                          {"distance": s.value}) for name, s in subspace.items()}
    return LayerScores("subspace_excess", scores, unit="dimensionless")


def correlations(sensitivity: LayerScores, attack_psnr: LayerScores, subspace: LayerScores | None = None,
                 latent_vinfo: LayerScores | None = None) -> dict:
    """Spearman rho across layers: sensitivity vs attack PSNR, and subspace excess vs latent V-information.

    Returns ``{"sensitivity_vs_attack_psnr": {rho, pvalue, n_layers, layers}, "subspace_excess_vs_latent_vinfo":
    {...}}``; rho is None where fewer than three layers have finite values or one side is constant.
    The p-values come from scipy's t approximation and are indicative only over a handful of layers.
    """
    from jaxleak.metrics import spearman

    def pack(c) -> dict:
        return {"rho": None if not np.isfinite(c.rho) else c.rho,
                "pvalue": None if not np.isfinite(c.pvalue) else c.pvalue,
                "n_layers": c.n, "layers": list(c.layers)}

    out = {"sensitivity_vs_attack_psnr": pack(spearman(sensitivity, attack_psnr))}
    if subspace is not None and latent_vinfo is not None:
        out["subspace_excess_vs_latent_vinfo"] = pack(spearman(excess_scores(subspace), latent_vinfo))
    return out


def _attack_scores(task: Task, x, y, config) -> dict:
    from jaxleak.attacks import invert_per_layer
    from jaxleak.grads import layer_grads

    v = int(min(config.attack_victims, x.shape[0]))
    g = layer_grads(task, x[:v], y[:v])
    scores = invert_per_layer(task, g, x[:v][:, None], restarts=config.attack_restarts, steps=config.attack_steps,
                              seed=config.seed)
    return scores.to_dict()


def _measure(ctx, task: Task, measure: str) -> dict:
    config = ctx.config
    x, y, z = ctx.pool_x, ctx.pool_y, ctx.pool_z
    if measure == "sensitivity":
        from jaxleak.sensitivity import sensitivity

        return sensitivity(task, x, y, probes=config.probes, seed=config.seed).to_dict()
    if measure == "attack_psnr":
        return _attack_scores(task, x, y, config)
    if measure == "subspace_distance":
        from jaxleak.subspace import subspace_distance

        return subspace_distance(task, x, y, z, permutations=config.permutations, seed=config.seed).to_dict()
    from jaxleak.vinfo import v_information

    aux = (ctx.aux_x, ctx.aux_y, ctx.aux_z) if ctx.aux_info["n"] else None
    return v_information(task, x, y, z, aux=aux, sketch_dim=config.sketch_dim, steps=config.vinfo_steps,
                         folds=config.vinfo_folds, n_boot=config.vinfo_boot, seed=config.seed,
                         patience=config.vinfo_patience).to_dict()


def run_validation(ctx, out: str, *, resume: bool, progress: bool,
                   on_part: Callable[[str, str], None] | None = None) -> dict:
    """The body of the ``validation`` study: per-example measures, per-layer attacks, correlations."""
    setting = Setting("default", {}, None, 1, 1)
    info_path = os.path.join(out, "parts", setting.key, "info.json")
    info = load_part(info_path) if resume else None
    task = None
    if info is None:
        task, info = trained(ctx, setting)
        io.write_json(info_path, info)
    measures, timing = {}, {}
    for measure in VALIDATION_MEASURES:
        path = part_path(out, setting.key, measure)
        entry = load_part(path) if resume else None
        if entry is None:
            if task is None:
                task, _ = trained(ctx, setting)
            t0 = time.time()
            entry = _measure(ctx, task, measure)
            entry["seconds"] = time.time() - t0
            io.write_json(path, entry)
            if on_part is not None:
                on_part(setting.key, measure)
        timing[f"{setting.key}/{measure}_s"] = entry.pop("seconds", None)
        measures[measure] = entry
    ls = {k: LayerScores.from_dict(v) for k, v in measures.items()}
    corr = correlations(ls["sensitivity"], ls["attack_psnr"], ls["subspace_distance"], ls["v_information.latent"])
    summary = [f"Spearman rho across layers, sensitivity vs per-layer attack PSNR: "
               f"{_fmt(corr['sensitivity_vs_attack_psnr']['rho'])}",
               f"Spearman rho across layers, subspace excess vs latent V-information: "
               f"{_fmt(corr['subspace_excess_vs_latent_vinfo']['rho'])}"]
    top = {k: (ls[k].top() if k != "subspace_distance" else excess_scores(ls[k]).top()) for k in ls}
    return {"settings": [{"key": setting.key, "params": {}, "batch_size": 1, "local_steps": 1, **info}],
            "measures": {setting.key: measures}, "validation": corr, "top_layers": top, "summary": summary,
            "timing": timing}


def _fmt(v) -> str:
    return "n/a (too few layers or a constant measure)" if v is None else f"{v:+.2f}"


def draw_validation(out: str, results: dict) -> None:
    """Two scatter plots across layers: sensitivity vs attack PSNR, subspace excess vs latent V-information."""
    import matplotlib.pyplot as plt

    from jaxleak.plots import save_figure

    m = results["measures"]["default"]
    pairs = [("sensitivity", "attack_psnr", "sensitivity R_l", "attack PSNR (dB), one layer matched"),
             ("subspace_distance", "v_information.latent", "subspace excess", "latent V-information (bits)")]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, (a, b, xl, yl) in zip(axes, pairs):
        field = "excess" if a == "subspace_distance" else "value"
        for name in m[a]["layers"]:
            xa = m[a]["layers"][name].get(field)
            yb = m[b]["layers"].get(name, {}).get("value")
            if xa is not None and yb is not None:
                ax.scatter([xa], [yb])
                ax.annotate(name, (xa, yb), fontsize=7, xytext=(3, 3), textcoords="offset points")
        key = "sensitivity_vs_attack_psnr" if a == "sensitivity" else "subspace_excess_vs_latent_vinfo"
        ax.set_title(f"Spearman rho = {_fmt(results['validation'][key]['rho'])}", fontsize=9)
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel(yl, fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "validation.png"))


# ---------------------------------------------------------------- jaxleak attack

def run_attack(*, dataset: str = "digits", model: str = "lenet", seed: int = 0, epochs: int = 0, lr: float = 3e-3,
               train_batch_size: int = 64, method: str = "ig", victims: int = 4, batch_size: int = 1,
               local_steps: int = 1, local_lr: float = 0.1, layers: Sequence[str] | None = None, restarts: int = 8,
               steps: int = 1000, labels: str = "auto", data_options: Mapping | None = None,
               model_options: Mapping | None = None, out: str | None = None, progress: bool = True) -> dict:
    """Attack the shared updates of ``victims`` clients and write ``attack.png`` and ``attack.json`` to ``out``.

    The model is trained for ``epochs`` on the training split; each victim's
    update u(S) (B = ``batch_size`` held-out examples, K = ``local_steps``
    SGD steps at ``local_lr``) is inverted with :func:`jaxleak.attacks.invert`
    (``method`` ig or dlg, ``restarts`` in parallel, matching ``layers`` or
    all). ``labels='auto'`` recovers them from the last layer (B = 1) or
    optimises them (B > 1); ``'given'`` passes the true labels. The PNG shows
    the originals above the reconstructions (matched by the Hungarian
    assignment for B > 1) with each image's PSNR; the JSON holds MSE, PSNR,
    SSIM per image, the label source and the configuration.
    """
    from jaxleak import attacks
    from jaxleak import data as data_lib
    from jaxleak.grads import client_batches, client_updates
    from jaxleak.run import environment
    from jaxleak.train import accuracy, train

    if labels not in ("auto", "given"):
        raise InputError(f"labels must be 'auto' or 'given', got {labels!r}")
    for name, value in (("victims", victims), ("batch_size", batch_size), ("local_steps", local_steps),
                        ("restarts", restarts), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    started = time.time()
    ds = data_lib.load(dataset, **dict(data_options or {}))
    task = Task.init(model, ds, seed, **dict(model_options or {}))
    train_set, eval_set = ds.split(0.7, seed=seed)
    task = train(task, train_set.x, train_set.y, epochs=epochs, batch_size=train_batch_size, lr=lr, seed=seed,
                 progress=progress).task
    pool = eval_set.subset(slice(0, max(victims * batch_size, batch_size + 1)))
    upd = client_updates(task, pool.x, pool.y, batch_size=batch_size, local_steps=local_steps, lr=local_lr,
                         num_updates=victims, seed=seed, layers=layers)
    members = client_batches(pool.n, batch_size=batch_size, num_updates=victims, seed=seed)
    originals = pool.x[members]  # (V, B, H, W, C)
    given = pool.y[members] if labels == "given" else None
    result = attacks.invert(task, upd.updates, method=method, layers=layers, restarts=restarts, steps=steps,
                            labels=given, batch_size=batch_size, local_steps=local_steps, local_lr=local_lr,
                            seed=seed, progress=progress)
    scores = attacks.score(result, originals)
    out = out or os.path.join("runs", "attack-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    matched = np.take_along_axis(result.x, scores.assignment.reshape(*scores.assignment.shape, 1, 1, 1), axis=1)
    titles = [f"{p:.1f} dB" for p in scores.psnr.reshape(-1)]
    attacks.save_grid(originals.reshape(-1, *originals.shape[2:]), matched.reshape(-1, *matched.shape[2:]),
                      os.path.join(out, "attack.png"), titles=titles)
    record = {
        "schema": "jaxleak.attack/1",
        "config": {"dataset": dataset, "model": model, "seed": seed, "epochs": epochs, "method": method,
                   "victims": victims, "batch_size": batch_size, "local_steps": local_steps, "local_lr": local_lr,
                   "layers": list(result.layers), "restarts": restarts, "steps": steps, "labels": labels,
                   "data_options": dict(data_options or {}), "model_options": dict(model_options or {})},
        "test_accuracy": accuracy(task, eval_set.x, eval_set.y),
        "label_source": result.label_source,
        "labels_correct": float(np.mean(result.labels == pool.y[members])),
        "summary": scores.summary(),
        "per_image": {"mse": scores.mse.tolist(), "psnr": scores.psnr.tolist(), "ssim": scores.ssim.tolist()},
        "matching_loss": result.loss.tolist(),
        "environment": environment(),
        "timing": {"total_s": time.time() - started},
    }
    io.write_json(os.path.join(out, "attack.json"), record)
    record["out"] = out
    return record


def format_attack(record: Mapping[str, Any]) -> str:
    s = record["summary"]
    c = record["config"]
    return (f"{c['method']} on {c['victims']} update(s) of B={c['batch_size']}, K={c['local_steps']} "
            f"({c['model']} on {c['dataset']}, layers {', '.join(c['layers'])}): "
            f"PSNR {s['psnr']:.2f} dB, SSIM {s['ssim']:.3f}, MSE {s['mse']:.4f}; labels {record['label_source']} "
            f"({100 * record['labels_correct']:.0f}% correct)")


__all__ = ["VALIDATION_MEASURES", "correlations", "excess_scores", "run_validation", "draw_validation", "run_attack",
           "format_attack"]
