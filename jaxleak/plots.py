"""Figures drawn from results (never from recomputed measures)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jaxleak import io  # noqa: E402


def save_figure(fig, path: str) -> None:
    """Save a figure as PNG atomically and close it."""
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def layer_bars(entry: dict, path: str, *, title: str, ylabel: str, value_key: str = "value") -> None:
    """Bar chart of one measure per layer (forward order) with its 95% CI when present.

    ``entry`` is a ``LayerScores.to_dict()``; the top layer is highlighted.
    """
    names = list(entry["layers"])
    values = [entry["layers"][n].get(value_key) for n in names]
    values = [float("nan") if v is None else float(v) for v in values]
    lows, highs = [], []
    for n, v in zip(names, values):
        ci = entry["layers"][n].get("ci") if value_key == "value" else None
        lows.append(v - ci[0] if ci and ci[0] is not None else 0.0)
        highs.append(ci[1] - v if ci and ci[1] is not None else 0.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(names) + 1.5), 3.4))
    colors = ["tab:red" if n == entry.get("top") else "tab:blue" for n in names]
    ax.bar(range(len(names)), values, color=colors, yerr=[lows, highs], capsize=3)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
