"""The ``jaxleak`` command line.

User errors print one line ``jaxleak: error: ...`` and exit with status 2
(``--debug`` shows the traceback); no partial run directory is left behind,
except when a measure runs out of memory (``jaxleak: error: out of memory in
<measure> ...``): its finished measures are kept for ``--resume``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from jaxleak.errors import InputError, JaxleakError


def _data_option(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    if value.lower() == "none":
        return key, None
    return key, value


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    from jaxleak import run as run_lib

    p.add_argument("--config", metavar="FILE", help="TOML file with run options (flags override it)")
    p.add_argument("--preset", choices=sorted(run_lib.PRESETS),
                   help="a named set of options that the given flags and config keys override; 'paper': "
                        "MNIST-sized runs with the power to decide (n 1000, aux-n 2048, probes 32, "
                        "permutations 200, inversion-n 64)")
    p.add_argument("--dataset", help="data set name (see `jaxleak list datasets`); default digits")
    p.add_argument("--data-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="data set option, e.g. strength=1.0 (planted), data_dir=PATH, split=test, "
                        "max_examples=2048, resize=32 (tfds); repeatable")
    p.add_argument("--model", help="model name (see `jaxleak list models`); default lenet")
    p.add_argument("--model-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="model option, e.g. activation=tanh or dropout=0.25; repeatable")
    p.add_argument("--seed", type=int, help="seed of everything random; default 0")
    p.add_argument("--n", type=int, help="number of held-out examples measured (the victims); default 256")
    p.add_argument("--aux-n", type=int,
                   help="the attacker's auxiliary examples (held out, disjoint from victims and training data) "
                        "that train the V-information attack models; 0 = cross-fit over the victims; default 2048 "
                        "or all that are left")
    p.add_argument("--train-fraction", type=float, help="fraction of the data set that trains the model; default 0.4")
    p.add_argument("--epochs", type=int, help="training epochs before measuring (0 = at initialisation); default 5")
    p.add_argument("--lr", type=float, help="training learning rate (Adam); default 3e-3")
    p.add_argument("--batch-size", type=int, help="training batch size; default 64")
    p.add_argument("--latent", help="latent attribute for latent measures; default thickness")
    p.add_argument("--measures", help=f"comma-separated measures; default all of {run_lib.measure_names()}")
    p.add_argument("--probes", type=int, help="Hutchinson probes for sensitivity; default 16")
    p.add_argument("--permutations", type=int, help="permutations for the subspace null; default 100")
    p.add_argument("--sketch-dim", type=int, help="width of gradient sketches; default 1024")
    p.add_argument("--vinfo-steps", type=int, help="training steps of each V-information attack model; default 150")
    p.add_argument("--vinfo-folds", type=int,
                   help="V-information folds: cross-validation inside the auxiliary data, or cross-fitting over "
                        "the victims without it; default 3")
    p.add_argument("--inversion-n", type=int,
                   help="victims (and auxiliary rows) of the white-box inversion family of V-information; default 32")
    p.add_argument("--inversion-steps", type=int, help="Inverting Gradients steps of that family; default 200")
    p.add_argument("--inversion-budget", metavar="SECONDS|auto|none",
                   help="time for that family: no further group of layers starts once it would be overrun; "
                        "auto (default): half the time of the run's other measures, at least 60 s; none: no limit "
                        "(the same layers are inverted on any machine)")
    p.add_argument("--chunk-size", type=int, help="examples per compiled chunk (memory bound)")
    p.add_argument("--params", metavar="FILE", help="model parameters: flax msgpack file or orbax checkpoint folder")
    p.add_argument("--devices", type=int, help="shard examples over this many devices (jax.sharding.Mesh); default 1")
    p.add_argument("--out", metavar="DIR", help="run directory; default runs/<timestamp>")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted run in DIR (same options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_RUN_FLAGS = {
    "dataset": "dataset", "model": "model", "seed": "seed", "n": "n", "epochs": "epochs", "lr": "lr",
    "batch_size": "batch_size", "latent": "latent", "measures": "measures", "probes": "probes",
    "permutations": "permutations", "sketch_dim": "sketch_dim", "chunk_size": "chunk_size", "params": "params",
    "devices": "devices", "vinfo_steps": "vinfo_steps", "vinfo_folds": "vinfo_folds", "aux_n": "aux_n",
    "train_fraction": "train_fraction", "inversion_n": "inversion_n", "inversion_steps": "inversion_steps",
    "inversion_budget": "inversion_budget", "preset": "preset",
}


def _run_config(args):
    from jaxleak import run as run_lib

    options = run_lib.config_from_toml(args.config) if args.config else {}
    for attr, field in _RUN_FLAGS.items():
        value = getattr(args, attr)
        if value is not None:
            options[field] = value
    if args.data_opt:
        options["data_options"] = {**options.get("data_options", {}), **dict(args.data_opt)}
    if args.model_opt:
        options["model_options"] = {**options.get("model_options", {}), **dict(args.model_opt)}
    options = run_lib.validate_options(options, source="command line")
    return run_lib.RunConfig(**run_lib.apply_preset(options, source="command line"))


def _add_compile_cache_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--compile-cache", metavar="DIR",
                       help="persistent XLA compilation cache folder; default env JAXLEAK_COMPILE_CACHE, "
                            "else ~/.cache/jaxleak/xla (XDG_CACHE_HOME honoured); 'run' keeps its traced "
                            "programs beside it in DIR-programs (env JAXLEAK_PROGRAM_STORE=off: not)")
    group.add_argument("--no-compile-cache", action="store_true",
                       help="compile without the persistent cache (also env JAXLEAK_COMPILE_CACHE=off)")


def _start_compile_cache(args) -> None:
    """The persistent compile cache for commands that compile; an unusable folder is a warning line."""
    import warnings

    from jaxleak.compilation import CompileCacheWarning, enable_compile_cache

    if args.no_compile_cache:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CompileCacheWarning)
        enable_compile_cache(args.compile_cache)
    for w in caught:
        print(f"jaxleak: warning: {w.message}", file=sys.stderr)


def cmd_run(args) -> int:
    from jaxleak import run as run_lib

    config = _run_config(args)
    out = args.resume or args.out
    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise InputError("--out and --resume name different directories; give only --resume DIR")
    results = run_lib.run(config, out=out, resume=bool(args.resume), progress=not args.no_progress)
    print(run_lib.format_table(results))
    acc = results["training"]["test_accuracy"]
    print(f"\n{results['model']['name']} on {results['dataset']['name']}: test accuracy {acc:.3f} "
          f"after {config.epochs} epoch(s); {results['dataset']['n_measured']} examples measured")
    print(f"wrote {results['out']}/results.json ({results['timing']['total_s']:.1f} s)")
    return 0


def cmd_list(args) -> int:
    from jaxleak import data, models
    from jaxleak import run as run_lib

    if args.what == "models":
        for name in models.names():
            print(name)
    elif args.what == "datasets":
        for name in data.names():
            print(name)
    else:
        for name in run_lib.measure_names():
            print(name)
    return 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _add_study_arguments(p: argparse.ArgumentParser) -> None:
    from jaxleak import studies

    p.add_argument("study", choices=list(studies.STUDIES), help="which study")
    p.add_argument("--dataset", help="data set name; default digits")
    p.add_argument("--data-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="data set option, e.g. strength=1.0 (planted); repeatable")
    p.add_argument("--model", help="model name; default lenet")
    p.add_argument("--model-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="model option, e.g. activation=tanh; repeatable")
    p.add_argument("--seed", type=int, help="seed of everything random; default 0")
    p.add_argument("--n", type=int, help="held-out examples the victims and batches are drawn from; default 256")
    p.add_argument("--num-updates", type=int, help="client updates measured per setting; default n")
    p.add_argument("--aux-n", type=int,
                   help="the attacker's auxiliary examples, from which it simulates updates of the same B and K to "
                        "train the V-information attack models; 0 = cross-fit over the victims' updates; "
                        "default 2048 or all that are left")
    p.add_argument("--epochs", help="training epochs before measuring (default 5); for `study training` a "
                                    "comma-separated list of stages, default 0,1,5")
    p.add_argument("--lr", type=float, help="training learning rate (Adam); default 3e-3")
    p.add_argument("--batch-size", type=int, help="training batch size (also DP-SGD's); default 64")
    p.add_argument("--latent", help="latent attribute; default thickness")
    p.add_argument("--measures", help=f"comma-separated measures; default all of {list(studies.MEASURES)}")
    p.add_argument("--probes", type=int, help="Hutchinson probes for sensitivity; default 8")
    p.add_argument("--permutations", type=int, help="permutations for the subspace null; default 100")
    p.add_argument("--sketch-dim", type=int, help="width of update sketches; default 1024")
    p.add_argument("--vinfo-steps", type=int, help="V-information ensemble training steps; default 150")
    p.add_argument("--vinfo-folds", type=int,
                   help="V-information folds (inside the auxiliary data, or over the victims without it); default 3")
    p.add_argument("--vinfo-boot", type=int, help="V-information bootstrap resamples; default 200")
    p.add_argument("--local-lr", type=float, help="clients' SGD learning rate eta; default 0.01")
    p.add_argument("--batch-sizes", type=_int_list, help="aggregation: client batch sizes B; default 1,2,4,8,16,32")
    p.add_argument("--local-steps", type=_int_list, help="aggregation: local steps K; default 1,2,4")
    p.add_argument("--defense", action="append", default=[], metavar="SPEC",
                   help="defences: a SPEC is none, sign, dp:clip_norm=1,noise_multiplier=0.5, prune:fraction=0.1, "
                        "quantize:bits=4 or dropout:rate=0.5; repeatable; default a sweep of each")
    p.add_argument("--dp-delta", type=float, help="delta for the DP epsilon; default 1e-5")
    p.add_argument("--update-batch-size", type=int, help="defences/training: client batch size B; default 1")
    p.add_argument("--update-local-steps", type=int, help="defences/training: local steps K; default 1")
    p.add_argument("--attack-victims", type=int, help="validation: victims attacked per layer; default 4")
    p.add_argument("--attack-steps", type=int, help="validation: attack optimisation steps; default 300")
    p.add_argument("--attack-restarts", type=int, help="validation: attack restarts; default 4")
    p.add_argument("--out", metavar="DIR", help="study directory; default runs/study-<name>-<timestamp>")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted study in DIR (same options)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_STUDY_FLAGS = ("dataset", "model", "seed", "n", "aux_n", "num_updates", "lr", "batch_size", "latent", "measures", "probes",
                "permutations", "sketch_dim", "vinfo_steps", "vinfo_folds", "vinfo_boot", "local_lr", "batch_sizes",
                "local_steps", "dp_delta", "update_batch_size", "update_local_steps", "attack_victims",
                "attack_steps", "attack_restarts")


def _study_config(args):
    from jaxleak import studies

    options = {"study": args.study}
    for attr in _STUDY_FLAGS:
        value = getattr(args, attr)
        if value is not None:
            options[attr] = value
    if args.epochs is not None:
        epochs = _int_list(args.epochs) if "," in args.epochs or args.study == "training" else None
        if args.study == "training":
            options["epochs_list"] = epochs
        elif epochs is not None and len(epochs) != 1:
            raise InputError(f"--epochs takes one number for study {args.study!r}, got {args.epochs!r}")
        else:
            try:
                options["epochs"] = int(args.epochs)
            except ValueError as err:
                raise InputError(f"--epochs must be an integer, got {args.epochs!r}") from err
    if args.defense:
        options["defenses"] = tuple(args.defense)
    if args.data_opt:
        options["data_options"] = dict(args.data_opt)
    if args.model_opt:
        options["model_options"] = dict(args.model_opt)
    return studies.StudyConfig(**options)


def cmd_study(args) -> int:
    from jaxleak import studies

    config = _study_config(args)
    out = args.resume or args.out
    if args.resume and args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise InputError("--out and --resume name different directories; give only --resume DIR")
    results = studies.run_study(config, out=out, resume=bool(args.resume), progress=not args.no_progress)
    if config.study == "validation":
        print("\n".join(results["summary"]))
    else:
        print(studies.format_table(results))
    print(f"wrote {results['out']}/results.json and report.html ({results['timing']['total_s']:.1f} s)")
    return 0


def _add_attack_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["ig", "dlg"], default="ig",
                   help="ig: Inverting Gradients (cosine + TV); dlg: L2 gradient matching; default ig")
    p.add_argument("--dataset", default="digits", help="data set name; default digits")
    p.add_argument("--data-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="data set option; repeatable")
    p.add_argument("--model", default="lenet", help="model name; default lenet")
    p.add_argument("--model-opt", action="append", type=_data_option, default=[], metavar="KEY=VALUE",
                   help="model option; repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed; default 0")
    p.add_argument("--epochs", type=int, default=0, help="training epochs before the attack; default 0 (at init)")
    p.add_argument("--victims", type=int, default=4, help="client updates attacked in parallel; default 4")
    p.add_argument("--batch-size", type=int, default=1, help="examples behind each update (B); default 1")
    p.add_argument("--local-steps", type=int, default=1, help="client's local SGD steps (K); default 1")
    p.add_argument("--local-lr", type=float, default=0.1, help="client's SGD learning rate; default 0.1")
    p.add_argument("--layers", help="comma-separated layers to match; default all")
    p.add_argument("--restarts", type=int, default=8, help="random restarts per victim (parallel); default 8")
    p.add_argument("--steps", type=int, default=1000, help="optimisation steps; default 1000")
    p.add_argument("--labels", choices=["auto", "given"], default="auto",
                   help="auto: recovered from the last layer (B = 1) or optimised; given: the true labels")
    p.add_argument("--out", metavar="DIR", help="output folder; default runs/attack-<timestamp>")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_attack(args) -> int:
    from jaxleak import validation

    layers = [v.strip() for v in args.layers.split(",") if v.strip()] if args.layers else None
    record = validation.run_attack(
        dataset=args.dataset, model=args.model, seed=args.seed, epochs=args.epochs, method=args.method,
        victims=args.victims, batch_size=args.batch_size, local_steps=args.local_steps, local_lr=args.local_lr,
        layers=layers, restarts=args.restarts, steps=args.steps, labels=args.labels,
        data_options=dict(args.data_opt), model_options=dict(args.model_opt), out=args.out,
        progress=not args.no_progress)
    print(validation.format_attack(record))
    print(f"wrote {record['out']}/attack.png and attack.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jaxleak import __version__

    parser = argparse.ArgumentParser(
        prog="jaxleak",
        description="Quantify and localize private information leakage from neural network gradients, layer by layer.",
    )
    parser.add_argument("--version", action="version", version=f"jaxleak {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p_run = sub.add_parser("run", help="measure leakage per layer on a data set and model")
    _add_run_arguments(p_run)
    _add_compile_cache_arguments(p_run)
    p_run.set_defaults(func=cmd_run)
    p_study = sub.add_parser("study", help="every measure per layer across aggregation, defence or training settings")
    _add_study_arguments(p_study)
    _add_compile_cache_arguments(p_study)
    p_study.set_defaults(func=cmd_study)
    p_attack = sub.add_parser("attack", help="reconstruct inputs from shared updates (DLG / Inverting Gradients)")
    _add_attack_arguments(p_attack)
    _add_compile_cache_arguments(p_attack)
    p_attack.set_defaults(func=cmd_attack)
    p_list = sub.add_parser("list", help="list models, data sets or measures")
    p_list.add_argument("what", choices=["models", "datasets", "measures"])
    p_list.set_defaults(func=cmd_list)
    return parser


def _close_progress_bars() -> None:
    """Close the progress bars an error left open, so that its one line starts a clean line."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not hide the error
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "no_compile_cache"):
            _start_compile_cache(args)
        return args.func(args)
    except JaxleakError as err:
        if args.debug:
            raise
        _close_progress_bars()
        print(f"jaxleak: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `jaxleak list models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("jaxleak: interrupted; finished results are kept (continue with --resume DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
