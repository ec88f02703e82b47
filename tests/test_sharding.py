"""Results on 1 and 4 (fake CPU) devices agree; the flag must be set before jax is imported."""

import json
import os
import subprocess
import sys

import numpy as np

CHILD = r"""
import json, sys
import numpy as np
import jax
import jaxleak as jl
from jaxleak.sharding import make_mesh, use_mesh
assert len(jax.devices()) == 4, jax.devices()
ds = jl.data.load("digits")
x, y, z = ds.x[:22], ds.y[:22], ds.latent["thickness"][:22]
task = jl.Task.init("lenet", ds, 0)
out = {}
for devices in (1, 4):
    mesh = make_mesh(devices) if devices > 1 else None
    g = jl.layer_grads(task, x, y, chunk_size=9, mesh=mesh)
    s = jl.sketch_grads(task, x, y, dim=64, chunk_size=9, mesh=mesh)
    u = jl.client_updates(task, x, y, batch_size=4, local_steps=2, lr=0.1, num_updates=6, mesh=mesh).updates
    with use_mesh(mesh):
        sens = jl.sensitivity(task, x, y, probes=4, chunk_size=9)
    out[devices] = {"g": {k: v.tolist() for k, v in g.items()}, "s": {k: v.tolist() for k, v in s.items()},
                    "u": {k: v.tolist() for k, v in u.items()}, "sens": sens.values_array()}
try:
    make_mesh(8)
except jl.InputError as err:
    out["error"] = str(err)
print("RESULT " + json.dumps(out))
"""


def test_one_and_four_devices_agree():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    one, four = out["1"], out["4"]
    for kind in ("g", "s", "u"):
        for layer in one[kind]:
            np.testing.assert_allclose(np.array(four[kind][layer]), np.array(one[kind][layer]), rtol=1e-5, atol=1e-7,
                                       err_msg=f"{kind} {layer}")
    np.testing.assert_allclose(four["sens"], one["sens"], rtol=1e-5)
    assert "xla_force_host_platform_device_count=8" in out["error"]
