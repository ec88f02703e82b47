"""Inverting Gradients: jaxleak (8 restarts vmapped vs 1) against a plain PyTorch loop.

Same model (weights copied from the Flax parameters), same image, same
objective: 1 - cosine similarity of the dummy and target gradients over all
layers + tv * total variation, signed gradients, Adam with the learning rate
divided by 10 at 3/8, 5/8 and 7/8 of the steps, projection onto [0, 1],
known label. Before timing, the two objectives are evaluated at the same
random image and compared.

Timed in one process with interleaved repetitions (jaxleak R=1, jaxleak
R=8, PyTorch R=1 with and without oneDNN, and the first-order floor at 1
and 8 inputs in JAX (with the attack's convolutions and with XLA's only) and
PyTorch: forward pass + input gradient only, see ``jax_floor``); compilation is excluded (one warm-up call each).
Reported: median seconds per call, restart-iterations per second, the cost
of 8 restarts relative to 1 (goal <= 2.5x; from the jaxleak-only phase)
and the speed per restart-iteration of jaxleak (8 restarts) over the
faster PyTorch variant (goal >= 1.5x; from the phase with PyTorch; R=1's
ratio mixes the two phases).

    python benchmarks/inversion.py [--steps 100] [--reps 5] [--out benchmarks/results/inversion.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxleak import attacks, data, grads
from jaxleak.task import Task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import machine_info  # noqa: E402


# ---------------------------------------------------------------- the PyTorch peer

def torch_model(task: Task, name: str, activation: str):
    """The zoo model ``name`` in PyTorch with the task's weights (NHWC input, like Flax)."""
    import torch
    from torch import nn

    p = jax.tree.map(np.asarray, task.params)
    act = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[activation]
    t = lambda a: torch.tensor(np.array(a, dtype=np.float32))  # noqa: E731

    def dense(d):
        layer = nn.Linear(*d["kernel"].shape)
        layer.weight.data, layer.bias.data = t(d["kernel"].T), t(d["bias"])
        return layer

    def conv(d):
        kh, kw, cin, cout = d["kernel"].shape
        layer = nn.Conv2d(cin, cout, (kh, kw), padding="same")
        layer.weight.data, layer.bias.data = t(d["kernel"].transpose(3, 2, 0, 1)), t(d["bias"])
        return layer

    if name == "mlp":
        layers = nn.ModuleList([dense(p[f"Dense_{i}"]) for i in range(3)])

        def forward(x):
            h = x.reshape(x.shape[0], -1)
            h = act(layers[0](h))
            h = act(layers[1](h))
            return layers[2](h)

        return layers, forward
    if name == "lenet":
        convs = nn.ModuleList([conv(p["Conv_0"]), conv(p["Conv_1"])])
        denses = nn.ModuleList([dense(p[f"Dense_{i}"]) for i in range(3)])
        pool = lambda h: nn.functional.max_pool2d(h, 2) if min(h.shape[-2:]) >= 2 else h  # noqa: E731

        def forward(x):
            h = x.permute(0, 3, 1, 2)
            h = pool(act(convs[0](h)))
            h = pool(act(convs[1](h)))
            h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
            h = act(denses[0](h))
            h = act(denses[1](h))
            return denses[2](h)

        return nn.ModuleList([convs, denses]), forward
    raise ValueError(name)


def torch_objective(module, forward, target, label, tv):
    import torch

    params = [q for q in module.parameters()]
    loss_fn = torch.nn.CrossEntropyLoss()

    def objective(x):
        loss = loss_fn(forward(x), label)
        g = torch.autograd.grad(loss, params, create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, target))
        gg = sum((a * a).sum() for a in g)
        tt = sum((b * b).sum() for b in target)
        match = 1 - dot / (gg.sqrt() * tt.sqrt())
        dv = (x[:, 1:] - x[:, :-1]).abs().mean()
        dh = (x[:, :, 1:] - x[:, :, :-1]).abs().mean()
        return match + tv * (dv + dh), match

    return objective


def torch_ig(module, forward, x_true, y_true, *, steps, lr, tv, seed):
    """One Inverting-Gradients restart as a plain PyTorch loop; returns the reconstruction."""
    import torch

    params = list(module.parameters())
    label = torch.tensor(y_true, dtype=torch.long)
    loss = torch.nn.CrossEntropyLoss()(forward(torch.tensor(x_true)), label)
    target = [g.detach() for g in torch.autograd.grad(loss, params)]
    objective = torch_objective(module, forward, target, label, tv)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(x_true.shape, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    milestones = [int(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(steps):
        opt.zero_grad()
        value, _ = objective(x)
        (grad,) = torch.autograd.grad(value, [x])
        x.grad = grad.sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach().numpy()


def jax_floor(task: Task, x1: np.ndarray, y1: np.ndarray, steps: int, restarts: int, patch_floats: int):
    """The first-order floor: ``steps`` signed-gradient steps on the plain loss w.r.t. ``restarts`` inputs.

    One forward pass and one input gradient per step and restart, no
    parameter gradients and no second-order pass: a strict part of what
    any gradient-matching attack does, so its cost at 8 inputs over 1 bounds
    the restart-cost ratio an IG implementation on the same convolutions can reach.
    ``patch_floats``: as in the attack (small convolutions as patch products), or 0
    (XLA's convolutions only).
    """
    x = jnp.asarray(np.repeat(x1, restarts, axis=0))
    y = jnp.asarray(np.repeat(y1, restarts, axis=0))

    def loss(x):
        return jnp.sum(task.loss_fn(task.apply_fn(task.params, x), y))

    step_grad = grads.canonical_convs(jax.grad(loss), patch_floats=patch_floats)
    run = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c - 0.01 * jnp.sign(step_grad(c)), None), x, None,
                                         length=steps)[0])
    return lambda: run(x).block_until_ready()


def torch_floor(module, forward, x1: np.ndarray, y1: np.ndarray, steps: int, restarts: int):
    """The same first-order floor in PyTorch (default backend flags)."""
    import torch

    x = torch.tensor(np.repeat(x1, restarts, axis=0))
    y = torch.tensor(np.repeat(y1, restarts, axis=0), dtype=torch.long)

    def run():
        z = x.clone().requires_grad_(True)
        for _ in range(steps):
            (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(forward(z), y, reduction="sum"), [z])
            with torch.no_grad():
                z -= 0.01 * g.sign()
        return z

    return run


# ---------------------------------------------------------------- the benchmark

def case(name: str, model: str, activation: str, size: int, steps: int, reps: int, tv: float,
         peers: bool = True) -> dict:
    """One model's timings; ``peers=False`` (or no torch) times jaxleak and the JAX floor only (peer fields None)."""
    torch = None
    if peers:
        try:
            import torch
        except ImportError:
            pass

    ds = data.load("digits")
    x = ds.x[:1]
    if size != 8:
        x = np.repeat(np.asarray(jax.image.resize(x, (1, size, size, 1), "linear")), 3, axis=-1)
    x = np.clip(x, 0, 1).astype(np.float32)
    y = ds.y[:1]
    shaped = data.from_arrays(x, y, {}, name="bench", num_classes=10)
    task = Task.init(model, shaped, seed=0, activation=activation)
    target = {k: v[0] for k, v in grads.layer_grads(task, x, y).items()}

    # The two objectives agree at one random image.
    probe = np.random.default_rng(1).random(x.shape).astype(np.float32)
    g_probe = grads.layer_grads(task, probe, y)
    u = np.concatenate([g_probe[k][0] for k in target])
    t = np.concatenate([target[k] for k in target])
    j_obj = 1 - u @ t / (np.linalg.norm(u) * np.linalg.norm(t)) + tv * float(attacks.total_variation(jnp.asarray(probe)))
    t_obj = None
    if torch is not None:
        module, forward = torch_model(task, model, activation)
        label = torch.tensor(y, dtype=torch.long)
        tgt_t = [g.detach() for g in torch.autograd.grad(
            torch.nn.CrossEntropyLoss()(forward(torch.tensor(x)), label), list(module.parameters()))]
        t_obj = float(torch_objective(module, forward, tgt_t, label, tv)(torch.tensor(probe))[0].detach())
        flat_t = lambda gs: np.concatenate([g.numpy().ravel() for g in gs])  # noqa: E731
        assert abs(np.linalg.norm(flat_t(tgt_t)) - np.linalg.norm(t)) < 1e-4 * np.linalg.norm(t)

    def run_jax(restarts):
        return attacks.invert(task, target, method="ig", restarts=restarts, steps=steps, tv=tv, labels=y)

    def run_torch(mkldnn, n_steps):
        with torch.backends.mkldnn.flags(enabled=mkldnn):
            return torch_ig(module, forward, x, y, steps=n_steps, lr=0.1, tv=tv, seed=0)

    # PyTorch's oneDNN (mkldnn) convolutions are very slow in double backward on
    # this CPU, so the peer runs both with and without them and the faster one is
    # compared; the slow variant runs fewer steps (the cost per step is constant).
    slow_steps = min(steps, 20)
    runners = {
        "jaxleak_r1": (lambda: run_jax(1), 1, steps),
        "jaxleak_r8": (lambda: run_jax(8), 8, steps),
        "floor_jax_r1": (jax_floor(task, x, y, steps, 1, attacks._PATCH_FLOATS), 1, steps),
        "floor_jax_r8": (jax_floor(task, x, y, steps, 8, attacks._PATCH_FLOATS), 8, steps),
        "floor_xlaconv_r1": (jax_floor(task, x, y, steps, 1, 0), 1, steps),
        "floor_xlaconv_r8": (jax_floor(task, x, y, steps, 8, 0), 8, steps),
    }
    if torch is not None:
        runners.update({
            "torch_r1": (lambda: run_torch(False, steps), 1, steps),
            "torch_r1_mkldnn": (lambda: run_torch(True, slow_steps), 1, slow_steps),
            "floor_torch_r1": (torch_floor(module, forward, x, y, steps, 1), 1, steps),
            "floor_torch_r8": (torch_floor(module, forward, x, y, steps, 8), 8, steps),
        })
    outputs = {k: f() for k, (f, _, _) in runners.items()}  # warm-up (compiles)
    # Two interleaved phases: jaxleak against itself (the restart-cost goal; PyTorch's
    # threads, which spin for a while after each call, would otherwise slow whichever
    # jaxleak call follows), then jaxleak R=8 against PyTorch (the peer goal).
    phases = {
        "restarts": ["jaxleak_r1", "jaxleak_r8", "floor_jax_r1", "floor_jax_r8", "floor_xlaconv_r1",
                     "floor_xlaconv_r8"],
        "peer": ["jaxleak_r8", "torch_r1", "torch_r1_mkldnn", "floor_torch_r1", "floor_torch_r8"],
    }
    if torch is None:
        del phases["peer"]
    times, loads = {}, {}
    for phase, keys in phases.items():
        loads[phase] = []
        for k in keys:
            times[f"{phase}/{k}"] = []
        for _ in range(reps):
            for k in keys:
                start = time.perf_counter()
                out = runners[k][0]()
                if hasattr(out, "x"):
                    np.asarray(out.x)
                times[f"{phase}/{k}"].append(time.perf_counter() - start)
            loads[phase].append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: runners[k.split("/")[1]][1] * runners[k.split("/")[1]][2] / med[k] for k in med}
    best_torch = max(("torch_r1", "torch_r1_mkldnn"), key=lambda k: rate[f"peer/{k}"]) if torch else None
    psnr = {
        "jaxleak_r1": float(attacks.score(outputs["jaxleak_r1"], x).psnr.mean()),
        "jaxleak_r8": float(attacks.score(outputs["jaxleak_r8"], x).psnr.mean()),
        "torch_r1": float(attacks.score(outputs["torch_r1"][None], x).psnr.mean()) if torch else None,
    }
    return {
        "case": name, "model": model, "activation": activation, "image": list(x.shape[1:]),
        "params": task.num_params, "steps": {k: v[2] for k, v in runners.items()}, "reps": reps, "tv": tv,
        "objective_at_probe": {"jaxleak": float(j_obj), "torch": t_obj},
        "load_average_1min_after_each_rep": loads,
        "seconds": {k: sorted(v) for k, v in times.items()},
        "median_seconds": med,
        "restart_iterations_per_s": rate,
        "cost_8_vs_1_restart": med["restarts/jaxleak_r8"] / med["restarts/jaxleak_r1"],
        "first_order_floor_8_vs_1": {"jax": med["restarts/floor_jax_r8"] / med["restarts/floor_jax_r1"],
                                     "jax_xla_convolutions_only": (med["restarts/floor_xlaconv_r8"]
                                                                   / med["restarts/floor_xlaconv_r1"]),
                                     "torch": (med["peer/floor_torch_r8"] / med["peer/floor_torch_r1"]
                                               if torch else None)},
        "torch_compared": best_torch,
        "speedup_per_restart_iteration_vs_torch": {
            "jaxleak_r8": rate["peer/jaxleak_r8"] / rate[f"peer/{best_torch}"],
            "jaxleak_r1": rate["restarts/jaxleak_r1"] / rate[f"peer/{best_torch}"],
        } if torch else None,
        "psnr_db_after_warmup_run": psnr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "inversion.json"))
    parser.add_argument("--note", default="", help="e.g. that other jobs shared the CPU")
    args = parser.parse_args()
    info = machine_info()
    cases = [
        case("mlp-sigmoid-8x8", "mlp", "sigmoid", 8, args.steps, args.reps, 1e-4),
        case("lenet-relu-8x8", "lenet", "relu", 8, args.steps, args.reps, 1e-4),
        case("lenet-relu-32x32x3", "lenet", "relu", 32, args.steps, args.reps, 1e-4),
    ]
    info["load_average_at_end"] = os.getloadavg()
    result = {"benchmark": "inversion", "machine": info, "note": args.note,
              "goals": {"cost_8_vs_1_restart": "<= 2.5", "speedup_per_restart_iteration_vs_torch": ">= 1.5"},
              "cases": cases}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    for c in cases:
        print(f"{c['case']:20s} R8/R1 cost {c['cost_8_vs_1_restart']:.2f}x  "
              f"speed/restart-iter vs torch: R8 {c['speedup_per_restart_iteration_vs_torch']['jaxleak_r8']:.2f}x "
              f"R1 {c['speedup_per_restart_iteration_vs_torch']['jaxleak_r1']:.2f}x  "
              f"floor 8/1 jax {c['first_order_floor_8_vs_1']['jax']:.2f}x "
              f"(XLA convs {c['first_order_floor_8_vs_1']['jax_xla_convolutions_only']:.2f}x) "
              f"torch {c['first_order_floor_8_vs_1']['torch']:.2f}x  "
              f"objective jax {c['objective_at_probe']['jaxleak']:.6f} torch {c['objective_at_probe']['torch']:.6f}  "
              f"psnr {c['psnr_db_after_warmup_run']}")


if __name__ == "__main__":
    main()
