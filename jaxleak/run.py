"""The main job behind ``jaxleak run``: every measure, per layer, into a run directory.

Data flows one way: data set -> task (trained for ``epochs``) -> measures ->
results. Each finished measure is written to ``<out>/parts/<measure>.json`` at
once (atomically), so an interrupted run can be resumed and loses nothing;
``results.json`` and ``layers.csv`` are assembled from the parts. A measure
that runs out of memory stops the run with :class:`OutOfMemoryError`, which
names the options that bound its memory; the finished parts stay for
``--resume``, which may change those options (``chunk_size``, and
``inversion_n`` while no finished measure used it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import json
import math
import os
import platform
import re
import time
import tomllib
from typing import Any, Callable

import jax
import numpy as np

from jaxleak import compilation, defaults
from jaxleak import data as data_lib
from jaxleak import io
from jaxleak import measures as measures_lib
from jaxleak.errors import ConfigError, InputError, JaxleakError, OutOfMemoryError, UnknownNameError
from jaxleak.scores import LayerScores
from jaxleak.task import Task

SCHEMA = "jaxleak.results/1"


@dataclasses.dataclass
class RunConfig:
    """Everything that decides a run's numbers (written to results.json as ``config``).

    ``preset`` records the name of the preset the options came from; the
    preset's values are filled in by :func:`apply_preset` (the CLI and
    config files do this) or :func:`preset_config`, not by this class.
    """

    dataset: str = "digits"
    model: str = "lenet"
    seed: int = 0
    n: int = 256
    aux_n: int = 2048
    epochs: int = 5
    train_fraction: float = 0.4
    batch_size: int = 64
    lr: float = 3e-3
    latent: str = "thickness"
    measures: tuple[str, ...] = ()
    chunk_size: int | None = None
    probes: int = defaults.PROBES
    permutations: int = defaults.PERMUTATIONS
    sketch_dim: int = defaults.SKETCH_DIM
    vinfo_steps: int = defaults.VINFO_STEPS
    vinfo_folds: int = defaults.VINFO_FOLDS
    vinfo_patience: int = defaults.VINFO_PATIENCE
    inversion_n: int = defaults.INVERSION_N
    inversion_steps: int = defaults.INVERSION_STEPS
    inversion_budget: str = "auto"
    params: str | None = None
    devices: int = 1
    preset: str | None = None
    data_options: dict = dataclasses.field(default_factory=dict)
    model_options: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.measures:
            self.measures = tuple(default_measures())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["measures"] = list(self.measures)
        return d


# Named sets of options (``--preset``, or ``preset = "..."`` in a config file); options given explicitly win.
PRESETS: dict[str, dict] = {
    # MNIST-sized runs with the power to decide the paper's findings (docs/method.md section 9): 1,000 victims,
    # the attacker's 2,048 auxiliary examples (or all that are left), 32 Hutchinson probes, 200 permutations
    # for the max-T test, 64 white-box inversion victims.
    "paper": {"n": 1000, "aux_n": 2048, "probes": 32, "permutations": 200, "inversion_n": 64},
}


def apply_preset(options: dict, source: str = "options") -> dict:
    """``options`` over the preset they name (if any): the preset's values for every option not given."""
    name = options.get("preset")
    if name is None:
        return dict(options)
    if name not in PRESETS:
        raise UnknownNameError(f"{source}: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **options}


def preset_config(name: str, **overrides) -> "RunConfig":
    """The :class:`RunConfig` of a preset, with ``overrides`` (library use of ``jaxleak run --preset NAME``)."""
    return RunConfig(**apply_preset({"preset": name, **overrides}))


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def config_from_toml(path: str) -> dict:
    """Options from a TOML file, validated against :class:`RunConfig`'s fields.

    An unknown key is a :class:`ConfigError` suggesting the closest valid one.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path!r} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from err
    return validate_options(raw, source=f"config file {path!r}")


def validate_options(raw: dict, source: str = "options") -> dict:
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(fields)}"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        expected = fields[key].type
        if key in ("data_options", "model_options") and not isinstance(value, dict):
            raise ConfigError(f"{source}: {key!r} must be a table, got {type(value).__name__}")
        if key == "measures":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: 'measures' must be a list of names")
            value = tuple(value)
        elif expected in ("int", "int | None") and value is not None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{source}: {key!r} must be an integer, got {value!r}")
        elif expected == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
        elif expected in ("str", "str | None") and value is not None and not isinstance(value, str):
            raise ConfigError(f"{source}: {key!r} must be a string, got {value!r}")
        out[key] = value
    return out


def default_measures() -> list[str]:
    return measures_lib.names()


def measure_names() -> list[str]:
    return measures_lib.names()


# ---------------------------------------------------------------- the run


def environment() -> dict:
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def default_out_dir() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", stamp)


@dataclasses.dataclass
class Prepared:
    """What a run measures on, built and validated before anything is written."""

    config: RunConfig
    dataset: data_lib.Dataset
    task: Task
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray | None
    train_info: dict
    aux: dict


def prepare(config: RunConfig, *, progress: bool = True) -> Prepared:
    """Load data, build and train the model, pick the measured examples; validate all options."""
    from jaxleak import models
    from jaxleak.train import accuracy, train

    unknown = [m for m in config.measures if m not in measures_lib.REGISTRY]
    if unknown:
        raise UnknownNameError(f"unknown measure(s) {unknown}; choose from {measure_names()}")
    for name in ("n", "probes", "sketch_dim", "batch_size", "vinfo_steps", "vinfo_patience", "inversion_n",
                 "inversion_steps"):
        if getattr(config, name) < 1:
            raise InputError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.permutations < 2:
        raise InputError(f"permutations must be >= 2, got {config.permutations}")
    inversion_budget(config, 0.0)
    if config.aux_n < 0:
        raise InputError(f"aux_n must be >= 0 (0: no auxiliary data, cross-fit over the victims), got {config.aux_n}")
    if config.epochs < 0:
        raise InputError(f"epochs must be >= 0, got {config.epochs}")
    if not 0.0 < config.train_fraction < 1.0:
        raise InputError(f"train_fraction must be in (0, 1), got {config.train_fraction}")
    if config.model not in models.names():
        raise UnknownNameError(f"unknown model {config.model!r}; choose one of {models.names()}")
    dataset = data_lib.load(config.dataset, **config.data_options)
    if compilation.active_store() is not None:
        compilation.extend_store_key("data", compilation.array_digest(dataset.x, dataset.y, dict(dataset.latent)))
    needs_latent = any(measures_lib.get(m).needs_latent for m in config.measures)
    if needs_latent and config.latent not in dataset.latent:
        raise UnknownNameError(
            f"data set {dataset.name!r} has no latent attribute {config.latent!r}; "
            f"choose one of {sorted(dataset.latent)}"
        )
    task = Task.init(config.model, dataset, config.seed, **config.model_options)
    if config.params:
        from jaxleak.checkpoint import load_params

        task = task.with_params(load_params(config.params, task.params))
    train_set, eval_set = dataset.split(config.train_fraction, seed=config.seed)
    if eval_set.n < 2 or train_set.n < 1:
        raise InputError(f"data set {dataset.name!r} has only {dataset.n} examples; too few to split")
    result = train(task, train_set.x, train_set.y, epochs=config.epochs, batch_size=config.batch_size,
                   lr=config.lr, seed=config.seed, progress=progress)
    task = result.task
    if compilation.active_store() is not None:
        compilation.extend_store_key("params", compilation.array_digest(task.params))
    n_victims, n_aux, compromise = split_victims_aux(eval_set.n, config.n, config.aux_n)
    measured = eval_set.subset(slice(0, n_victims))
    attacker = eval_set.subset(slice(n_victims, n_victims + n_aux))
    aux = {"x": attacker.x, "y": attacker.y, "z": attacker.latent.get(config.latent), "info": {
        "n": n_aux, "requested": config.aux_n, "compromise": compromise,
        "source": (f"held-out examples of {dataset.name!r}, disjoint from the {n_victims} victims and from the "
                   f"{train_set.n} training examples; their gradients at the measured parameters train and select "
                   f"the V-information attack models") if n_aux else
                  "none: V-information is cross-fitted over the victims"}}
    train_info = {
        "epochs": config.epochs,
        "train_examples": train_set.n,
        "eval_examples": eval_set.n,
        "train_loss": result.losses,
        "test_accuracy": accuracy(task, eval_set.x, eval_set.y),
    }
    z = measured.latent.get(config.latent)
    return Prepared(config, dataset, task, measured.x, measured.y, z, train_info, aux)


# Fewer auxiliary examples than this cannot train and validate an attack model.
MIN_AUX = 20


def split_victims_aux(available: int, n: int, aux_n: int) -> tuple[int, int, str | None]:
    """Victims and auxiliary examples out of the ``available`` held-out ones, and the compromise made, if any.

    Victims come first (up to ``n``), the attacker's examples after them (up
    to ``aux_n``). Where fewer than ``MIN_AUX`` would be left for the
    attacker, the held-out examples are halved between the two; where even
    that leaves fewer than ``MIN_AUX``, there is no auxiliary data and
    V-information is cross-fitted over the victims.
    """
    n_victims = min(n, available)
    if aux_n == 0:
        return n_victims, 0, None
    n_aux = min(aux_n, available - n_victims)
    if n_aux >= min(aux_n, MIN_AUX):
        note = (f"only {n_aux} of the {aux_n} auxiliary examples asked for are left after the training examples "
                f"and the {n_victims} victims") if n_aux < aux_n else None
        if n_victims < n:
            note = ((note + "; ") if note else "") + f"only {n_victims} victims are available, not {n}"
        return n_victims, n_aux, note
    if available // 2 >= MIN_AUX:
        n_aux = min(aux_n, available - available // 2)
        return available - n_aux, n_aux, (
            f"the data set is too small for {n} victims and an attacker's auxiliary set: its {available} held-out "
            f"examples are split into {available - n_aux} victims and {n_aux} auxiliary examples")
    return n_victims, 0, (f"the data set is too small for an auxiliary set ({available} held-out examples): "
                          f"V-information is cross-fitted over the {n_victims} victims")


def _set_nested(d: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _get_nested(d: dict, dotted: str):
    for p in dotted.split("."):
        d = d[p]
    return d


def _part_path(out: str, key: str) -> str:
    return os.path.join(out, "parts", f"{key}.json")


def check_resume(out: str, expected: dict, what: str = "run") -> None:
    """Refuse to resume ``out`` unless its saved config.json equals ``expected``."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"cannot resume {out!r}: it has no config.json (is it a jaxleak {what} directory?)")
    with open(path) as f:
        saved = json.load(f)
    if saved != expected:
        diff = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
        raise ConfigError(f"cannot resume {out!r}: its configuration differs in {diff}; "
                          f"resume with the same options (they are in {path})")


def run(config: RunConfig, *, out: str | None = None, resume: bool = False, progress: bool = True,
        on_measure: Callable[[str, LayerScores], None] | None = None) -> dict:
    """Run every configured measure and write the run directory; returns results.json's content.

    Files: ``config.json``, ``parts/<measure>.json`` (each written as soon as
    it is done), ``results.json`` (schema ``jaxleak.results/1``),
    ``layers.csv``, ``params.msgpack`` (the measured parameters) and one PNG
    bar chart per measure. With ``resume=True`` the finished parts of ``out``
    are kept and only the missing measures are computed.

    ``config.devices > 1`` shards the example axis of every measure over a
    mesh of that many devices (``jaxleak.sharding``). Invalid options fail
    before the directory is created. If a measure fails
    with a :class:`JaxleakError` in a fresh run, the directory is removed; an
    interruption (Ctrl-C) or running out of memory (:class:`OutOfMemoryError`)
    keeps it for ``resume``, which may change the options that bound memory
    (see :data:`RESUME_MAY_CHANGE`).
    """
    started = time.time()
    out = out or default_out_dir()
    if resume:
        check_resume(out, _resume_expected(out, config))
    elif os.path.exists(out) and os.listdir(out):
        raise InputError(f"output directory {out!r} exists and is not empty; choose another --out "
                         f"or continue it with --resume")
    from jaxleak.compilation import count_compilations, program_store
    from jaxleak.sharding import make_mesh, use_mesh

    mesh = make_mesh(config.devices) if config.devices != 1 else None
    # With the compile cache on, the run's programs are also kept traced (jaxleak.compilation.program_store),
    # keyed by the options and, once known, by digests of the data and of the trained parameters.
    store = program_store("jaxleak.run", config.to_dict()) if mesh is None else contextlib.nullcontext()
    with use_mesh(mesh), count_compilations() as compiles, store:
        return _run(config, out, resume, progress, on_measure, started, compiles)


def _run(config: RunConfig, out: str, resume: bool, progress: bool, on_measure, started: float,
         compiles) -> dict:
    t0 = time.time()
    prep = prepare(config, progress=progress)
    timing = {"prepare_s": time.time() - t0}
    with _run_directory(out, resume):
        # On resume config.json is rewritten: it may change the options that bound memory (RESUME_MAY_CHANGE).
        io.write_json(os.path.join(out, "config.json"), config.to_dict())
        from jaxleak.checkpoint import save_params

        save_params(os.path.join(out, "params.msgpack"), prep.task.params)
        opts = measure_options(config)
        if prep.aux["info"]["n"]:
            opts["aux"] = (prep.aux["x"], prep.aux["y"], prep.aux["z"])
        measures: dict[str, Any] = {}
        for key in config.measures:
            part = _part_path(out, key)
            if resume and os.path.isfile(part):
                with open(part) as f:
                    entry = json.load(f)
                timing[key + "_s"] = entry.get("seconds")
            else:
                t0 = time.time()
                others = sum(v for k, v in timing.items() if k.endswith("_s") and k != "prepare_s" and v)
                opts["inversion_budget_s"] = inversion_budget(config, others)
                scores = _compute(key, prep, opts, progress, out)
                entry = scores.to_dict()
                entry["seconds"] = time.time() - t0
                io.write_json(part, entry)
                timing[key + "_s"] = entry["seconds"]
                if on_measure is not None:
                    on_measure(key, scores)
            _set_nested(measures, key, {k: v for k, v in entry.items() if k != "seconds"})
        timing.update(compiles.timing())
        store = compilation.active_store()
        timing["programs_loaded"] = store.loaded if store is not None else 0
        timing["programs_stored"] = store.written if store is not None else 0
        timing["total_s"] = time.time() - started
        timing["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        results = {
            "schema": SCHEMA,
            "config": config.to_dict(),
            "dataset": {
                "name": prep.dataset.name,
                "n": prep.dataset.n,
                "n_measured": int(prep.x.shape[0]),
                "input_shape": list(prep.dataset.input_shape),
                "num_classes": prep.dataset.num_classes,
                "latent": sorted(prep.dataset.latent),
                "latent_descriptions": dict(prep.dataset.descriptions),
            },
            "model": {
                "name": config.model,
                "num_params": prep.task.num_params,
                "layers": [{"name": layer.name, "params": layer.size} for layer in prep.task.layers],
            },
            "training": prep.train_info,
            "aux": prep.aux["info"],
            "measures": measures,
            "verdicts": {key: _verdict_of(_get_nested(measures, key)) for key in config.measures},
            "environment": environment(),
            "timing": timing,
        }
        results["top_layers"] = {key: v["top"] for key, v in results["verdicts"].items()}
        io.write_json(os.path.join(out, "results.json"), results)
        write_layers_csv(os.path.join(out, "layers.csv"), results)
        draw_figures(out, results)
        from jaxleak.report import write_report

        write_report(out)
    results["out"] = out
    return results


# ---------------------------------------------------------------- out of memory

# Options a resumed run may change (the out-of-memory error suggests them), each with the measures whose numbers it
# decides: one of those that is already finished refuses the change. Chunking changes numbers by at most rtol 1e-5.
RESUME_MAY_CHANGE: dict[str, tuple[str, ...]] = {
    "chunk_size": (),
    "inversion_n": ("v_information.latent", "v_information.original"),
}

# The options that bound a measure's memory, in the order the out-of-memory error suggests them.
_MEMORY_FLAGS = (("chunk_size", "--chunk-size"), ("inversion_n", "--inversion-n"))


def _resume_expected(out: str, config: RunConfig) -> dict:
    """``config.to_dict()``, with each option of RESUME_MAY_CHANGE that may differ from ``out``'s taken from it."""
    expected = config.to_dict()
    try:
        with open(os.path.join(out, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return expected  # check_resume says what is wrong
    if not isinstance(saved, dict):
        return expected
    for key, used_by in RESUME_MAY_CHANGE.items():
        if key in saved and not any(os.path.isfile(_part_path(out, m)) for m in used_by):
            expected[key] = saved[key]
    return expected


@contextlib.contextmanager
def _run_directory(out: str, resume: bool):
    """:func:`io.run_directory`, except that running out of memory keeps it: its finished parts are for --resume."""
    failed = None
    with io.run_directory(out, resume=resume, cleanup=(JaxleakError,)):
        try:
            yield out
        except OutOfMemoryError as err:
            failed = err
    if failed is not None:
        raise failed


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is running out of memory: XLA's RESOURCE_EXHAUSTED / "Out of memory", or a MemoryError."""
    if isinstance(err, MemoryError):
        return True
    runtime = getattr(jax.errors, "JaxRuntimeError", None)
    kinds = (RuntimeError, runtime) if isinstance(runtime, type) else (RuntimeError,)
    if not isinstance(err, kinds):
        return False
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class _ReadOptions(dict):
    """The measure options, noting which ones the measure reads (the error names those that bound memory)."""

    def __init__(self, options: dict):
        super().__init__(options)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _compute(key: str, prep: Prepared, opts: dict, progress: bool, out: str) -> LayerScores:
    """One measure's scores; running out of memory becomes :class:`OutOfMemoryError` (nothing else is caught)."""
    read = _ReadOptions(opts)
    try:
        return measures_lib.get(key).compute(prep.task, prep.x, prep.y, prep.z, read, progress)
    except OutOfMemoryError:
        raise
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise OutOfMemoryError(_out_of_memory_message(key, prep, read.read, err, out)) from err


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _out_of_memory_message(key: str, prep: Prepared, read: set[str], err: BaseException, out: str) -> str:
    """``out of memory in <measure> (<what it computed>); try <the options that bound its memory>; ...``."""
    config = prep.config
    what = [f"{key} of {len(prep.task.layers)} layers of {config.model} on {int(prep.x.shape[0])} victims"]
    if "chunk_size" in read:
        what.append(f"chunks of {config.chunk_size} examples" if config.chunk_size else "automatic chunk size")
    if "inversion_n" in read:
        what.append(f"white-box inversion of {config.inversion_n} victims")
    allocating = re.search(r"allocating (\d+) bytes", str(err))
    if allocating:
        what.append(f"allocating {_size(int(allocating.group(1)))}")
    flags = [f"{flag} N" for option, flag in _MEMORY_FLAGS if option in read] or ["--n N (fewer victims)"]
    return (f"out of memory in {key} ({', '.join(what)}); try {' or '.join(flags)}; "
            f"the finished measures are kept: continue with --resume {out}")


def inversion_budget(config: RunConfig, others_s: float) -> float | None:
    """Seconds for the white-box family (None: no limit): ``auto`` is half the other measures' time, at least
    60 s."""
    text = str(config.inversion_budget).strip().lower()
    if text == "auto":
        return max(60.0, 0.5 * float(others_s))
    if text == "none":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"inversion_budget must be a positive number of seconds, 'auto' or 'none', "
                         f"got {config.inversion_budget!r}")
    return seconds


def measure_options(config: RunConfig) -> dict:
    """The run-level settings every measure may read."""
    return {"seed": config.seed, "chunk_size": config.chunk_size, "probes": config.probes,
            "permutations": config.permutations, "sketch_dim": config.sketch_dim,
            "vinfo_steps": config.vinfo_steps, "vinfo_folds": config.vinfo_folds,
            "vinfo_patience": config.vinfo_patience,
            "inversion_n": config.inversion_n, "inversion_steps": config.inversion_steps}


def _shown(key: str, layer_entry: dict) -> Any:
    m = measures_lib.REGISTRY.get(key)
    return layer_entry.get(m.show if m else "value")


def _verdict_of(entry: dict) -> dict:
    """The measure's verdict (stored with it; recomputed only for a part written without one)."""
    from jaxleak.scores import verdict

    return entry.get("verdict") or verdict(entry)


def _column_field(key: str) -> str:
    m = measures_lib.REGISTRY.get(key)
    return m.show if m else "value"


def write_layers_csv(path: str, results: dict) -> None:
    """One row per layer: name, parameter count, and each measure's shown value."""
    keys = [k for k in results["config"]["measures"]]
    header = ["layer", "params"] + [f"{k}.{_column_field(k)}" for k in keys]
    rows = []
    for layer in results["model"]["layers"]:
        row = [layer["name"], layer["params"]]
        for k in keys:
            row.append(_shown(k, _get_nested(results["measures"], k)["layers"].get(layer["name"], {})))
        rows.append(row)
    io.write_csv(path, header, rows)


def draw_figures(out: str, results: dict) -> None:
    from jaxleak.plots import layer_bars

    for key in results["config"]["measures"]:
        m = measures_lib.REGISTRY.get(key)
        if m is None:
            continue
        entry = _get_nested(results["measures"], key)
        layer_bars(entry, os.path.join(out, f"{key}.png"), value_key=m.show, ylabel=m.ylabel,
                   title=f"{key} per layer ({results['model']['name']} on {results['dataset']['name']})")


def format_table(results: dict) -> str:
    """The verdict and the per-layer table printed by ``jaxleak run`` (``*``: detected in that layer)."""
    keys = results["config"]["measures"]
    cols = ["layer", "params"] + [measures_lib.REGISTRY[k].column if k in measures_lib.REGISTRY else k
                                  for k in keys]
    rows = []
    for layer in results["model"]["layers"]:
        row = [layer["name"], f"{layer['params']:,}"]
        for k in keys:
            entry = _get_nested(results["measures"], k)["layers"].get(layer["name"], {})
            v = _shown(k, entry)
            row.append("-" if v is None else f"{v:.4g}" + ("*" if entry.get("detected") else ""))
        rows.append(row)
    tops = []
    for k in keys:
        v = (results.get("verdicts") or {}).get(k) or {}
        top = v.get("top")
        tops.append("none detected" if top is None else "/".join(top) + (" (largest)" if v.get("kind") == "scale"
                                                                         else ""))
    top = ["top layers", ""] + tops
    widths = [max(len(str(r[i])) for r in [cols, top, *rows]) for i in range(len(cols))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    from jaxleak.report import verdict_lines

    return "\n".join([*verdict_lines(results), "", line(cols), sep, *map(line, rows), sep, line(top),
                      "* detected at a family-wise error rate of 5% over the layers (max-T over permutations: of the victims' "
                      "targets against the attack models' predictions for V-information, of z for subspace distance)"])
