"""Running out of memory is one line ``jaxleak: error: out of memory in ...`` and exit 2, not a traceback.

The finished measures stay in the run directory, and ``--resume DIR`` (with a
smaller ``--chunk-size``, as the error suggests) finishes the run.
"""

import importlib
import json
import os

import jax
import pytest

from jaxleak import cli
from jaxleak import run as run_lib
from jaxleak.errors import JaxleakError, OutOfMemoryError

# tests/test_cli.py's small run, with a second measure to run out of memory in.
ARGS = ["--n", "24", "--epochs", "1", "--measures", "grad_norm,sensitivity", "--probes", "2", "--no-progress"]


def _xla_oom(nbytes=123):
    message = f"RESOURCE_EXHAUSTED: Out of memory allocating {nbytes} bytes"
    kind = getattr(jax.errors, "JaxRuntimeError", RuntimeError)
    try:
        return kind(message)
    except TypeError:
        return RuntimeError(message)


def _raise(err):
    def fn(*args, **kwargs):
        raise err

    return fn


def test_out_of_memory_is_one_line_and_resume_finishes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    monkeypatch.setattr(importlib.import_module("jaxleak.sensitivity"), "sensitivity", _raise(_xla_oom(249878995944)))
    assert cli.main(["run", "--out", str(out), *ARGS]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "RESOURCE_EXHAUSTED" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    line = lines[0]
    assert line.startswith("jaxleak: error: out of memory in sensitivity (")
    assert "on 24 victims" in line and "232.7 GiB" in line
    assert "try --chunk-size N" in line and "--inversion-n" not in line  # sensitivity has no inversion
    assert f"--resume {out}" in line
    # The finished measure is on disk; the one that ran out of memory left nothing.
    parts = out / "parts"
    assert sorted(os.listdir(parts)) == ["grad_norm.json"]
    assert (out / "config.json").is_file() and not (out / "results.json").exists()
    assert not [p for _, _, files in os.walk(out) for p in files if p.endswith(".tmp")]
    finished = json.loads((parts / "grad_norm.json").read_text())

    monkeypatch.undo()
    assert cli.main(["run", "--resume", str(out), *ARGS, "--chunk-size", "8"]) == 0
    assert json.loads((parts / "grad_norm.json").read_text()) == finished  # kept, not recomputed
    results = json.loads((out / "results.json").read_text())
    assert set(results["measures"]) == {"grad_norm", "sensitivity"}
    assert results["config"]["chunk_size"] == 8
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 8


@pytest.mark.parametrize("err", [RuntimeError("INTERNAL: something else broke"),
                                 getattr(jax.errors, "JaxRuntimeError", RuntimeError)("INVALID_ARGUMENT: bad")])
def test_other_runtime_errors_are_not_out_of_memory(tmp_path, monkeypatch, capsys, err):
    monkeypatch.setattr(importlib.import_module("jaxleak.gradnorm"), "grad_norms", _raise(err))
    with pytest.raises(type(err)) as caught:
        cli.main(["run", "--out", str(tmp_path / "r"), "--n", "24", "--epochs", "1", "--measures", "grad_norm",
                  "--no-progress"])
    assert caught.value is err and not isinstance(caught.value, JaxleakError)
    assert "out of memory" not in capsys.readouterr().err


@pytest.mark.parametrize("err,oom", [
    (_xla_oom(), True),
    (RuntimeError("RESOURCE_EXHAUSTED: while running replica 0"), True),
    (RuntimeError("Out of memory while trying to allocate 8.00GiB."), True),
    (MemoryError("Unable to allocate 232 GiB"), True),
    (RuntimeError("INTERNAL: Failed to launch kernel"), False),
    (ValueError("Out of memory"), False),  # not a runtime error
    (KeyError("RESOURCE_EXHAUSTED"), False),
])
def test_is_out_of_memory(err, oom):
    assert run_lib.is_out_of_memory(err) is oom


def test_out_of_memory_error_is_a_jaxleak_memory_error():
    err = OutOfMemoryError("out of memory in x")
    assert isinstance(err, JaxleakError) and isinstance(err, MemoryError)


def test_resume_may_change_inversion_n_only_while_no_finished_measure_used_it(tmp_path):
    """The error suggests --inversion-n; a resumed run takes it unless a finished V-information part used it."""
    out = tmp_path / "r"
    (out / "parts").mkdir(parents=True)
    saved = run_lib.RunConfig(measures=("grad_norm", "v_information.latent"), inversion_n=32)
    (out / "config.json").write_text(json.dumps(saved.to_dict()))
    (out / "parts" / "grad_norm.json").write_text("{}")
    smaller = run_lib.RunConfig(measures=("grad_norm", "v_information.latent"), inversion_n=8, chunk_size=4)
    run_lib.check_resume(str(out), run_lib._resume_expected(str(out), smaller))  # accepted
    (out / "parts" / "v_information.latent.json").write_text("{}")
    with pytest.raises(JaxleakError, match=r"differs in \['inversion_n'\]"):
        run_lib.check_resume(str(out), run_lib._resume_expected(str(out), smaller))
    other_seed = run_lib.RunConfig(measures=("grad_norm", "v_information.latent"), seed=3, chunk_size=4)
    with pytest.raises(JaxleakError, match=r"differs in \['seed'\]"):
        run_lib.check_resume(str(out), run_lib._resume_expected(str(out), other_seed))
