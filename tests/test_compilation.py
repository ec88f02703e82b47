"""The persistent compile cache and the compilation counter (jaxleak/compilation.py).

Cache tests that enable the cache run in subprocesses with the user's cache
folder moved to a temporary one, so neither this process's JAX configuration
nor the real ~/.cache is touched.
"""

import argparse
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from jaxleak import cli, compilation

# Enable the cache as the library does, compile one program, print the folder used.
_ENABLE_AND_JIT = """
import jax, jax.numpy as jnp, jaxleak
path = jaxleak.enable_compile_cache()
jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)(jnp.arange(5.0)).block_until_ready()
print(path)
"""


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (compilation.ENV, "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "xdg"), **extra)
    return env


def _python(code: str, env: dict) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_default_cache_is_written_after_a_jitted_call(tmp_path):
    printed = _python(_ENABLE_AND_JIT, _env(tmp_path))
    folder = tmp_path / "xdg" / "jaxleak" / "xla"
    assert printed == str(folder)
    assert any(folder.iterdir()), "the compiled program was not written to the cache"


def test_env_folder_is_used(tmp_path):
    folder = tmp_path / "chosen"
    assert _python(_ENABLE_AND_JIT, _env(tmp_path, JAXLEAK_COMPILE_CACHE=str(folder))) == str(folder)
    assert any(folder.iterdir())
    assert not (tmp_path / "xdg").exists()


@pytest.mark.parametrize("value", ["off", "OFF", "0", "false"])
def test_env_off_switches_the_cache_off(tmp_path, value):
    assert _python(_ENABLE_AND_JIT, _env(tmp_path, JAXLEAK_COMPILE_CACHE=value)) == "None"
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_default_folder_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.default_cache_dir() == os.path.join(str(tmp_path), "jaxleak", "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if sys.platform.startswith("linux"):
        assert compilation.default_cache_dir() == os.path.join(str(tmp_path), "home", ".cache", "jaxleak", "xla")


def test_unwritable_folder_is_a_warning(tmp_path):
    # A folder below a regular file cannot be created, even by root.
    blocker = tmp_path / "file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with pytest.warns(compilation.CompileCacheWarning, match="cannot be written"):
        assert compilation.enable_compile_cache(blocker / "xla") is None
    assert jax.config.jax_compilation_cache_dir == before
    assert float(jax.jit(lambda x: x + 1.0)(jnp.float32(1.0))) == 2.0


def test_cli_unwritable_folder_prints_a_warning_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    before = jax.config.jax_compilation_cache_dir
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape as a Python warning
        cli._start_compile_cache(argparse.Namespace(compile_cache=str(blocker / "xla"), no_compile_cache=False))
    assert capsys.readouterr().err.startswith("jaxleak: warning: the compile cache")
    assert jax.config.jax_compilation_cache_dir == before


def test_cli_flags():
    parser = cli.build_parser()
    for command in (["run"], ["study", "defenses"], ["attack"]):
        assert parser.parse_args([*command, "--no-compile-cache"]).no_compile_cache
        assert parser.parse_args([*command, "--compile-cache", "d"]).compile_cache == "d"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--no-compile-cache", "--compile-cache", "d"])


def test_cli_no_compile_cache_leaves_jax_alone(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    cli._start_compile_cache(argparse.Namespace(compile_cache=None, no_compile_cache=True))
    assert jax.config.jax_compilation_cache_dir == before
    assert not (tmp_path / "jaxleak").exists()


def test_count_compilations():
    f = jax.jit(lambda x: jnp.cos(x) * 3.0 - 7.0)
    x = jnp.arange(11.0)
    with compilation.count_compilations() as first:
        f(x).block_until_ready()
    with compilation.count_compilations() as second:
        f(x).block_until_ready()
    assert first.count == 1 and first.compile_s > 0 and first.cache_hits == 0
    assert second.count == 0 and second.compile_s == 0
    assert set(first.timing()) == {"compilations", "compile_cache_hits", "compile_s", "trace_s"}


def test_fast_compile_options_on_the_cpu_and_their_fallback(monkeypatch):
    assert compilation.fast_compile_options() == {"xla_cpu_use_fusion_emitters": False}
    # an XLA that does not know the option: compiled with its defaults, no error
    monkeypatch.setattr(compilation, "_FAST_COMPILE_CPU", {"xla_no_such_option_of_any_xla": True})
    compilation.fast_compile_options.cache_clear()
    try:
        assert compilation.fast_compile_options() == {}
    finally:
        monkeypatch.undo()
        compilation.fast_compile_options.cache_clear()
    assert compilation.jit(lambda x: x, key=None)._options == {"xla_cpu_use_fusion_emitters": False}
    assert compilation.jit(lambda x: x, key=None, fast_compile=False)._options is None
    given = compilation.jit(lambda x: x, key=None, compiler_options={"xla_backend_optimization_level": 0})
    assert given._options == {"xla_cpu_use_fusion_emitters": False, "xla_backend_optimization_level": 0}


def test_fast_compiled_program_gives_the_same_values_and_nests():
    def f(x, w):
        h = jnp.tanh(jnp.einsum("bi,ij->bj", x, w))
        return jnp.sum(jnp.exp(-h) * jnp.log1p(h * h), axis=1), jax.grad(lambda w_: jnp.sum(jnp.sin(x @ w_)))(w)

    x = jax.random.normal(jax.random.key(0), (64, 33))
    w = jax.random.normal(jax.random.key(1), (33, 17))
    fast = compilation.jit(f, key=None)
    plain = compilation.jit(f, key=None, fast_compile=False)
    for a, b in zip(fast(x, w), plain(x, w)):
        assert jnp.array_equal(a, b)
    # inside another jit the program is part of that one's (JAX takes no options on a nested jit)
    outer = jax.jit(lambda x, w: fast(x, w)[0] * 2.0)
    assert jnp.array_equal(outer(x, w), 2.0 * plain(x, w)[0])


def test_only_small_models_compile_with_the_fast_options(monkeypatch):
    from jaxleak import data, gradnorm, task as task_lib

    ds = data.load("digits")
    lenet = task_lib.Task.init("lenet", ds, seed=0)
    assert lenet.fast_compile and lenet.num_params <= task_lib.FAST_COMPILE_PARAMS
    monkeypatch.setattr(task_lib, "FAST_COMPILE_PARAMS", lenet.num_params - 1)
    large = task_lib.Task.init("lenet", ds, seed=1)
    assert not large.fast_compile
    gradnorm.per_example_norms(large, ds.x[:4], ds.y[:4])
    program = large.cached(("grad_norms", tuple(large.layer_names)), lambda: None)
    assert program._options is None  # XLA's default emitters for a large model's programs
