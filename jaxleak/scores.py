"""One result type for every measure: :class:`LayerScores`.

A measure returns, per layer in forward order, a :class:`Score` with the
headline ``value``, a 95% confidence interval where one exists, and
measure-specific extras. ``to_dict()`` is exactly what goes into
results.json; reports read it and never recompute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Iterator


def _plain(value: Any) -> Any:
    """JSON-ready copy: NumPy/JAX scalars and arrays to Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclasses.dataclass(frozen=True)
class Score:
    """One layer's result: ``value``, optional 95% ``ci`` (low, high), and ``extras``."""

    value: float
    ci: tuple[float, float] | None = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        if key == "value":
            return self.value
        if key == "ci":
            return self.ci
        return self.extras[key]


class LayerScores(Mapping):
    """Ordered mapping layer name -> :class:`Score` for one measure.

    Attributes:
      measure: e.g. ``"sensitivity"``.
      unit: unit of ``value`` (e.g. ``"bits"``, ``"dimensionless"``).
      meta: measure-level facts (method, probes, whether the value is a lower
        bound or a surrogate, ...), copied into ``to_dict()``.
    """

    def __init__(self, measure: str, scores: Mapping[str, Score], *, unit: str = "", meta: Mapping | None = None,
                 rank_by: str = "value"):
        self.measure = measure
        self.unit = unit
        self.meta = dict(meta or {})
        self._scores = dict(scores)
        # The field that localizes: "value" by default; the subspace distance
        # ranks by its permutation excess, since D_l alone is not leakage.
        self.rank_by = rank_by
        if rank_by != "value":
            self.meta["rank_by"] = rank_by

    def __getitem__(self, layer: str) -> Score:
        return self._scores[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._scores)

    def __len__(self) -> int:
        return len(self._scores)

    def values_array(self) -> list[float]:
        return [float(s.value) for s in self._scores.values()]

    def headline(self, layer: str) -> float:
        """The field that ranks layers (``rank_by``) for one layer."""
        s = self._scores[layer]
        return s.value if self.rank_by == "value" else s.extras.get(self.rank_by, float("nan"))

    def top(self) -> str:
        """The layer with the largest ``rank_by`` field (first in forward order on ties)."""
        if not self._scores:
            raise ValueError(f"measure {self.measure!r} has no layers")
        return max(self._scores, key=lambda k: _finite(self.headline(k)))

    def shares(self) -> dict[str, float]:
        """Each layer's share of the total ``rank_by`` field, with negative values counted as 0."""
        pos = {k: max(_finite(self.headline(k)), 0.0) for k in self._scores}
        total = sum(pos.values())
        return {k: (v / total if total > 0 else 0.0) for k, v in pos.items()}

    def ranks(self) -> dict[str, int]:
        """Rank of each layer, 1 = largest ``rank_by`` field."""
        order = sorted(self._scores, key=lambda k: -_finite(self.headline(k)))
        return {k: i + 1 for i, k in enumerate(order)}

    def verdict(self) -> dict:
        """What a reader is told about this measure: see :func:`verdict`."""
        return verdict(self.to_dict())

    def to_dict(self) -> dict:
        shares, ranks = self.shares(), self.ranks()
        layers = {}
        for name, s in self._scores.items():
            entry = {"value": s.value, "ci": list(s.ci) if s.ci is not None else None,
                     "share": shares[name], "rank": ranks[name]}
            entry.update(s.extras)
            layers[name] = entry
        out = _plain({"measure": self.measure, "unit": self.unit, "meta": self.meta, "layers": layers})
        v = verdict(out)
        out["top"], out["verdict"] = v["top"], v
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> "LayerScores":
        """Inverse of :meth:`to_dict` (share and rank are recomputed, not stored)."""
        scores = {}
        for name, entry in d["layers"].items():
            extras = {k: v for k, v in entry.items() if k not in ("value", "ci", "share", "rank")}
            ci = tuple(entry["ci"]) if entry.get("ci") is not None else None
            value = entry["value"] if entry["value"] is not None else float("nan")
            scores[name] = Score(value, ci, extras)
        meta = dict(d.get("meta") or {})
        return cls(d["measure"], scores, unit=d.get("unit", ""), meta=meta, rank_by=meta.get("rank_by", "value"))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={s.value:.4g}" for k, s in self._scores.items())
        return f"LayerScores({self.measure!r}, {body})"


def _finite(v: float) -> float:
    v = float(v)
    return v if math.isfinite(v) else -math.inf


# ---------------------------------------------------------------- verdicts (docs/method.md section 7)

def max_t(observed: Mapping[str, float], nulls: Mapping[str, Any], alpha: float = 0.05) -> tuple[dict, float]:
    """Westfall-Young single-step max-T over layers: ``({layer: p_adjusted}, critical)``.

    ``nulls[l]`` holds layer l's statistic under the SAME R permutations for
    every layer (larger = more evidence). Each layer is standardised by the
    mean and standard deviation of its R + 1 values (the observed one and
    the permutations': a symmetric function of them, so under the null the
    observed labelling stays exchangeable with the permutations),
    t_l = (S_l - m_l) / s_l; permutation r gives M_r = max_l t_l^r, and
    p_adjusted_l = (1 + #{r: M_r >= t_l}) / (R + 1), which controls the
    family-wise error over the layers for any number of layers at a fixed R.
    ``critical``: the standardised value a layer must exceed to be rejected
    at ``alpha`` (NaN when R is too small for any rejection). Layers with a
    non-finite observed value or no spread get no p-value (absent).
    """
    import numpy as np

    names, columns, t_obs = [], [], {}
    for name, value in observed.items():
        null = np.asarray(nulls[name], np.float64)
        every = np.append(null[np.isfinite(null)], value)
        if not math.isfinite(value) or every.size < 2:
            continue
        m, sd = float(every.mean()), float(every.std(ddof=1))
        if not sd > 0:
            continue
        v = (null - m) / sd
        names.append(name)
        columns.append(np.where(np.isfinite(v), v, -np.inf))
        t_obs[name] = (value - m) / sd
    if not names:
        return {}, math.nan
    max_null = np.max(np.stack(columns, axis=1), axis=1)
    r = max_null.size
    allowed = math.ceil(alpha * (r + 1) - 1) - 1  # exceedances a rejection may have
    critical = float(np.sort(max_null)[::-1][allowed]) if 0 <= allowed < r else math.nan
    return {name: float((1 + np.sum(max_null >= t_obs[name])) / (r + 1)) for name in names}, critical


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def verdict(entry: Mapping) -> dict:
    """Which layers leak, by one measure's results (a ``LayerScores.to_dict()`` entry).

    A measure whose layers carry ``detected`` is a test (family-wise over
    its layers): the top layers are named only when some layer is
    detected, as the detected layer with the largest headline (``rank_by``)
    and every detected layer that the measure's paired comparison could not
    tell from it (``tied_with_top``); with nothing detected ``top`` is None
    and the smallest effect the run could have detected (``detectable``, per
    layer) is reported, or, where the test cannot reject at all
    (``meta.cannot_reject``), why. A measure without ``detected``
    (sensitivity, gradient norm) is a scale: its largest layer is named as
    such, and nothing is claimed as detected.
    """
    layers = entry.get("layers") or {}
    meta = entry.get("meta") or {}
    rank_by = meta.get("rank_by", "value")
    unit = entry.get("unit", "")

    def head(name):
        v = layers[name].get(rank_by)
        return -math.inf if v is None or not math.isfinite(float(v)) else float(v)

    if not layers:
        return {"kind": "empty", "top": None, "detected": [], "reason": "no layers"}
    if not any(layer.get("detected") is not None for layer in layers.values()):
        top = max(layers, key=head)
        return {"kind": "scale", "top": [top], "detected": None,
                "reason": "a scale, not a test: the layer with the largest value is named; nothing is tested",
                "text": f"largest in {top} ({_fmt(head(top))} {unit})".strip()}
    undefined = {name: layer.get("undefined") for name, layer in layers.items() if layer.get("undefined")}
    detected = [name for name, layer in layers.items() if layer.get("detected")]
    detectable = {name: layer.get("detectable") for name, layer in layers.items()}
    suffix = f"; undefined in {', '.join(undefined)}" if undefined else ""
    if meta.get("verdict_note"):
        suffix += f"; note: {meta['verdict_note']}"
    if not detected:
        sizes = [v for v in detectable.values() if v is not None and math.isfinite(v)]
        what = meta.get("detectable_what", "an effect")
        if meta.get("cannot_reject"):
            text = f"none detected; this run cannot detect anything: {meta['cannot_reject']}"
        elif sizes:
            low, high = min(sizes), max(sizes)
            span = _fmt(low) if _fmt(low) == _fmt(high) else f"{_fmt(low)} to {_fmt(high)}"
            text = (f"none detected; this run would detect {what} of {span} {unit} or more "
                    f"(80% power, family-wise over {len(layers)} layers)")
        else:
            text = "none detected; no detectable size could be computed"
        return {"kind": "test", "top": None, "detected": [], "reason": "no layer detected",
                "detectable": detectable, "undefined": undefined or None, "text": text + suffix}
    best = max(detected, key=head)
    tied = [name for name in detected if name != best and layers[name].get("tied_with_top")]
    top = [best] + tied
    amounts = ", ".join(f"{name} {_fmt(head(name))}" for name in detected)
    text = f"detected in {len(detected)} of {len(layers)} layers ({amounts} {unit})".rstrip()
    if tied:
        text += f"; top {best}, tied with {', '.join(tied)}"
    else:
        text += f"; top {best}"
    return {"kind": "test", "top": top, "detected": detected, "reason": None, "detectable": detectable,
            "undefined": undefined or None, "text": text + suffix}
