"""The machine a benchmark ran on, recorded with every result."""

from __future__ import annotations

import datetime
import os
import platform


def machine_info() -> dict:
    """CPU model, cores, memory, accelerator, library versions, date and load (other jobs skew timings)."""
    import jax

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem_gib = round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    devices = jax.devices()
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in devices],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_at_start": list(os.getloadavg()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info
