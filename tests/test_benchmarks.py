"""benchmarks/gpu_suite.py runs end to end at its --small sizes on the CPU and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_suite_small_writes_every_section(tmp_path):
    out = tmp_path / "suite.json"
    env = {k: v for k, v in os.environ.items() if k not in ("JAXLEAK_COMPILE_CACHE", "XLA_FLAGS")}
    # The suite turns the compile cache on as the CLI does; keep it in the test's folder.
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--small",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())

    assert record["benchmark"] == "gpu_suite" and record["small"] is True
    assert record["compile_cache"] == str(tmp_path / "cache" / "jaxleak" / "xla")
    machine = record["machine"]
    assert machine["device"]["platform"] == "cpu" and machine["device"]["kind"]
    assert {"jax", "jaxlib", "flax"} <= set(machine["versions"])
    assert "no accelerator" in record["note"]
    assert set(record["peers"]) >= {"device", "skipped"}
    assert record["peers"]["device"] in (None, "cpu")

    sections = record["sections"]
    assert set(sections) == {"per_example", "sensitivity", "ensemble", "inversion", "scaling", "floor"}
    assert not [k for k, v in sections.items() if "error" in v]
    assert set(sections["per_example"]) == {"lenet", "cifar_cnn", "resnet18"}
    for config in sections["per_example"].values():
        assert config["methods"]["jaxleak"]["examples_per_s"] > 0
        assert ("torch_func" in config["methods"]) == (record["peers"]["device"] is not None)
    sens = sections["sensitivity"]
    assert {"jaxleak_hutchinson", "jaxleak_exact", "jaxleak_ones_surrogate"} <= set(sens["examples_per_second"])
    assert sens["speedup_vs_jaxleak_exact"] > 0
    assert sections["ensemble"]["ensemble_over_one_member"] > 0
    assert all(case["cost_8_vs_1_restart"] > 0 for case in sections["inversion"].values())
    (point,) = sections["scaling"]["points"]
    assert point["sketch_grads"]["examples_per_s"] > 0 and point["sensitivity"]["examples_per_s"] > 0
    assert set(sections["floor"]) == {"lenet8", "lenet28"}
    for model in sections["floor"].values():
        assert {"sketch_grads", "grad_norm", "grams", "sensitivity", "sensitivity_floor"} <= set(model["cbg"])
        assert all(v > 0 for v in model["cbg"].values()) and set(model["goals"]) >= {"sketch_grads", "sensitivity"}
        assert ("torch_sketch" in model["cbg"]) == (record["peers"]["device"] is not None
                                                    and model["model"] == "lenet" and model["input_shape"][0] == 28)
