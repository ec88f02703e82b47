"""``report.html``: one self-contained page per run or study directory.

The page is built from results.json and the PNG figures already in the
directory (embedded as base64), so it opens offline and never recomputes a
measure. Every string that came from the user or the data (names, options,
descriptions) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import os
from typing import Any

from jaxleak import io

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.verdict{background:#eef6ee;border-left:4px solid #3a7;padding:0.4em 0.8em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.4em 0.8em;margin:0.6em 0}
img{max-width:100%;margin:0.5em 0;border:1px solid #eee}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}
table.meta td.text{text-align:left;max-width:900px}table.meta pre{max-height:20em;margin:0}
details{margin:0.6em 0}summary{cursor:pointer;color:#555}.wide{overflow-x:auto;max-width:100%}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(a, (int, float)) for a in v):
        return f"[{v[0]:.3g}, {v[1]:.3g}]"
    if isinstance(v, dict):  # e.g. a layer's reduction record: "size 2416, sketch -, kept 678, ..."
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _measure_tables(measures: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """All LayerScores dicts in a (possibly nested) measures mapping, with dotted keys."""
    found = []
    for key, value in measures.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "layers" in value and "measure" in value:
            found.append((name, value))
        elif isinstance(value, dict):
            found.extend(_measure_tables(value, name + "."))
    return found


def _layers_table(entry: dict) -> str:
    layers = entry["layers"]
    fields: list[str] = []
    for layer in layers.values():
        for k, v in layer.items():
            if k not in fields and not isinstance(v, (dict,)) and not (isinstance(v, list) and len(v) > 2):
                fields.append(k)
    head = "".join(f"<th>{_e(f)}</th>" for f in ["layer", *fields])
    rows = []
    for name, layer in layers.items():
        cells = "".join(f"<td>{_e(_fmt(layer.get(f)))}</td>" for f in fields)
        rows.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    return f"<div class=\"wide\"><table><tr>{head}</tr>{''.join(rows)}</table></div>"  # scrolls when wide


def _notes(entry: dict) -> str:
    meta = entry.get("meta", {})
    out = []
    for key in ("lower_bound", "surrogate", "note", "notes"):
        if meta.get(key):
            text = meta[key] if isinstance(meta[key], str) else f"{key.replace('_', ' ')}"
            out.append(f'<div class="note">{_e(text)}</div>')
    rest = {k: v for k, v in meta.items() if k not in ("note", "notes")}
    if rest:
        out.append(f"<details><summary>how it was measured (meta: {len(rest)} fields)</summary>"
                   f"{_meta_table(rest)}</details>")
    return "".join(out)


def _meta_table(meta: dict) -> str:
    """One row per field: numbers and short lists formatted, text as text, nested records as indented JSON."""
    rows = []
    for key, value in meta.items():
        if isinstance(value, (dict, list)) and not (isinstance(value, list) and len(value) <= 2):
            cell = f"<pre>{_e(json.dumps(value, indent=1, default=str))}</pre>"
        else:
            cell = _e(_fmt(value))
        rows.append(f'<tr><td>{_e(key)}</td><td class="text">{cell}</td></tr>')
    return f'<table class="meta">{"".join(rows)}</table>'



_MEASURE_WORDS = {
    "v_information.latent": "latent information ({latent}), V-information",
    "v_information.original": "original information (the input), V-information",
    "subspace_distance": "latent information ({latent}), subspace distance",
    "sensitivity": "original information, sensitivity (a scale)",
    "grad_norm": "gradient norm (a scale)",
}


def verdict_lines(results: dict) -> list[str]:
    """The plain verdict that opens a run's table and report: per measure, what leaks, where, how much."""
    cfg = results["config"]
    aux = results.get("aux") or {}
    who = (f"an attacker with {aux['n']} auxiliary examples" if aux.get("n")
           else "attack models cross-fitted over the victims")
    lines = [f"Verdict: {results['model']['name']} on {results['dataset']['name']}, "
             f"{results['dataset']['n_measured']} victims, {who}"]
    if aux.get("compromise"):
        lines.append(f"  note: {aux['compromise']}")
    for key in cfg["measures"]:
        v = (results.get("verdicts") or {}).get(key) or {}
        words = _MEASURE_WORDS.get(key, key).format(latent=cfg.get("latent"))
        lines.append(f"  {words}: {v.get('text', '-')}")
    return lines


def render(results: dict, folder: str, title: str | None = None) -> str:
    """The HTML text for one results.json (a run or a study)."""
    title = title or f"jaxleak report: {results.get('model', {}).get('name', '')} on {results.get('dataset', {}).get('name', '')}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    if results.get("verdicts"):
        head, *rest = verdict_lines(results)
        items = "".join(f"<li>{_e(line.strip())}</li>" for line in rest)
        parts.append(f"<div class='verdict'><p><b>{_e(head)}</b></p><ul>{items}</ul></div>")
    ds, model = results.get("dataset", {}), results.get("model", {})
    if ds:
        parts.append("<h2>Data and model</h2><table>")
        for k in ("name", "n", "n_measured", "input_shape", "num_classes", "latent"):
            if k in ds:
                parts.append(f"<tr><td>dataset {_e(k)}</td><td>{_e(_fmt(ds[k]))}</td></tr>")
        if model:
            parts.append(f"<tr><td>model</td><td>{_e(model.get('name'))}</td></tr>")
            parts.append(f"<tr><td>parameters</td><td>{_e(model.get('num_params'))}</td></tr>")
        training = results.get("training", {})
        if "test_accuracy" in training:
            parts.append(f"<tr><td>test accuracy</td><td>{training['test_accuracy']:.4f}</td></tr>")
        parts.append("</table>")
        for name, desc in ds.get("latent_descriptions", {}).items():
            parts.append(f"<p><b>{_e(name)}</b>: {_e(desc)}</p>")
    if results.get("top_layers"):
        parts.append("<h2>Localization: top layers per measure</h2><table><tr><th>measure</th><th>top layers</th>"
                     "<th>why</th></tr>")
        verdicts = results.get("verdicts") or {}
        for k, v in results["top_layers"].items():
            shown = ", ".join(v) if isinstance(v, list) else ("none detected" if v is None else v)
            why = (verdicts.get(k) or {}).get("text", "")
            parts.append(f"<tr><td>{_e(k)}</td><td>{_e(shown)}</td><td>{_e(why)}</td></tr>")
        parts.append("</table>")
    for extra in results.get("summary", []) if isinstance(results.get("summary"), list) else []:
        parts.append(f"<p>{_e(extra)}</p>")
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    for key, entry in _measure_tables(results.get("measures", {})):
        top = entry.get("top")
        top = ", ".join(top) if isinstance(top, list) else ("none detected" if top is None else top)
        why = (entry.get("verdict") or {}).get("text", "")
        parts.append(f"<h2>{_e(key)}</h2><p>unit: {_e(entry.get('unit', ''))}; top layers: "
                     f"<b>{_e(top)}</b>{'; ' + _e(why) if why else ''}</p>")
        parts.append(_notes(entry))
        png = f"{key}.png"
        if png in pngs:
            parts.append(_img(os.path.join(folder, png), key))
            pngs.remove(png)
        parts.append(_layers_table(entry))
    if pngs:
        parts.append("<h2>Figures</h2>")
        parts.extend(_img(os.path.join(folder, p), p) for p in pngs)
    for section in ("settings", "validation", "findings"):
        if section in results:
            parts.append(f"<h2>{_e(section)}</h2><pre>{_e(json.dumps(results[section], indent=2, default=str))}</pre>")
    parts.append("<h2>Configuration</h2>")
    parts.append(f"<pre>{_e(json.dumps(results.get('config', {}), indent=2, default=str))}</pre>")
    parts.append("<h2>Environment and timing</h2>")
    parts.append(f"<pre>{_e(json.dumps({'environment': results.get('environment', {}), 'timing': results.get('timing', {})}, indent=2, default=str))}</pre>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(folder: str, title: str | None = None) -> str:
    """Write ``folder/report.html`` from ``folder/results.json``; returns its path."""
    with open(os.path.join(folder, "results.json")) as f:
        results = json.load(f)
    path = os.path.join(folder, "report.html")
    io.write_text(path, render(results, folder, title))
    return path
