"""What a benchmark ran on: the header of every report, and the load on the machine meanwhile.

The header names the CPU model and the ISA variant the CPU kernel dispatched to, the thread
counts, the GPU, and the torch / m3kernels / Triton / Python versions. :class:`LoadMeter` measures
the CPU time *other* processes used while a measurement ran (all CPU time the kernel counted in
/proc/stat as busy, minus this process's own user + system time): a value well above zero means
the timing shared the cores with something else.
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from datetime import datetime, timezone


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else the platform's processor string)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def busy_cpu_seconds() -> float | None:
    """CPU time spent not idle (all processes, all cores) since boot; None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()[1:]
        ticks = [int(x) for x in fields[:8]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class LoadMeter:
    """``with LoadMeter() as m: ...`` then ``m.other_cpu_s``: other processes' CPU seconds
    meanwhile (None where /proc/stat is missing), ``m.wall_s`` and ``m.own_cpu_s``."""

    def __enter__(self):
        import time

        self._t = time.perf_counter()
        self._busy = busy_cpu_seconds()
        self._own = own_cpu_seconds()
        return self

    def __exit__(self, *exc):
        import time

        self.wall_s = time.perf_counter() - self._t
        self.own_cpu_s = own_cpu_seconds() - self._own
        busy = busy_cpu_seconds()
        if busy is None or self._busy is None:
            self.other_cpu_s = None
        else:  # the /proc/stat tick (10 ms) makes small negative values: clip at 0
            self.other_cpu_s = max(0.0, (busy - self._busy) - self.own_cpu_s)
        return False


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            import importlib

            mod = importlib.import_module(module)
        except Exception:  # absent or broken: reported as such
            return None
    return getattr(mod, "__version__", None)


def source_revision() -> str | None:
    """'<commit> (+ local changes)' when the package runs from a git checkout, else None."""
    import subprocess
    from pathlib import Path

    import m3kernels

    root = Path(m3kernels.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        run = lambda *a: subprocess.run(
            ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10
        )  # noqa: E731
        head = run("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", "m3kernels", "csrc").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (" (+ local changes)" if dirty else "")


def machine_info() -> dict:
    """The report header (see the module docstring)."""
    import torch

    import m3kernels

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_isa": None,
        "cpu_isa_available": None,
        "kernel_threads": None,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "m3kernels": m3kernels.__version__,
        "source": source_revision(),
        "triton": _version("triton"),
        "load_avg_1m": load_average(),
    }
    try:
        from m3kernels.backends import cpu

        if cpu.available():
            info["cpu_isa"] = cpu.simd_level()
            info["cpu_isa_available"] = cpu.simd_levels()
            info["kernel_threads"] = cpu._C.get_num_threads()
    except Exception:  # an extension without the queries: left as None
        pass
    return info


def set_threads(threads: int) -> None:
    """Use ``threads`` threads in the CPU kernel (OpenMP) and in torch (eager, copies)."""
    import torch

    torch.set_num_threads(threads)
    from m3kernels.backends import cpu

    if cpu.available():
        cpu._C.set_num_threads(threads)


def header_lines(info: dict) -> list:
    """The header as text lines."""
    cpu = f"CPU: {info['cpu']}, {info['cores']} cores"
    if info.get("cpu_isa"):
        cpu += f"; CPU kernel variant {info['cpu_isa']} (supported: {', '.join(info['cpu_isa_available'])})"
    threads = f"threads: kernel {info.get('kernel_threads')}, torch {info.get('torch_threads')}"
    gpu = f"GPU: {info['gpu']} (CUDA {info['cuda']})" if info.get("gpu") else "GPU: none"
    src = f" (git {info['source']})" if info.get("source") else ""
    versions = (
        f"m3kernels {info['m3kernels']}{src}, torch {info['torch']}, triton {info.get('triton') or 'absent'}, "
        f"Python {info['python']}"
    )
    return [f"{info['date']} on {info['hostname']}", cpu, threads, gpu, versions]


__all__ = [
    "LoadMeter",
    "busy_cpu_seconds",
    "own_cpu_seconds",
    "cpu_model",
    "machine_info",
    "header_lines",
    "load_average",
    "set_threads",
]
