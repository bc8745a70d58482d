"""Machine description and a pre-run check that the benchmark cores are idle."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from bench.procs import CLK_TCK, cpu_ticks

BUSY_WARN_PCT = 15.0
IDLE_SAMPLE_S = 1.0


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_full": sys.version,
        "loadavg_at_start": os.getloadavg(),
        "clk_tck": CLK_TCK,
    }


def _core_times() -> dict[str, tuple[int, int]]:
    """{cpuN: (busy ticks, total ticks)} from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *rest = line.split()
        if name.startswith("cpu") and name != "cpu":
            vals = [int(v) for v in rest]
            idle = vals[3] + vals[4]  # idle + iowait
            out[name] = (sum(vals) - idle, sum(vals))
    return out


def _all_pids() -> list[int]:
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def _comm_line(pid: int) -> str:
    with contextlib.suppress(OSError):
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    return "?"


def idle_check() -> dict[str, Any]:
    """Per-core busy % and the busiest processes over one second, before anything starts."""
    pids = _all_pids()
    before_cores = _core_times()
    before = {pid: cpu_ticks([pid]) for pid in pids}
    time.sleep(IDLE_SAMPLE_S)
    after_cores = _core_times()
    busy = {}
    for core, (b1, t1) in after_cores.items():
        b0, t0 = before_cores.get(core, (b1, t1))
        busy[core] = round(100 * (b1 - b0) / max(t1 - t0, 1), 1)
    hogs = []
    for pid in pids:
        pct = 100 * (cpu_ticks([pid]) - before[pid]) / CLK_TCK / IDLE_SAMPLE_S
        if pid != os.getpid() and pct >= BUSY_WARN_PCT:
            hogs.append({"pid": pid, "cpu_pct": round(pct), "cmdline": _comm_line(pid)})
    return {"core_busy_pct": busy, "busy_processes": hogs}


def idle_problems(check: dict[str, Any]) -> list[str]:
    """Warnings when the machine was not idle before the run."""
    out = [
        f"before the run {core} was {pct:.0f}% busy: figures are noisy"
        for core, pct in check["core_busy_pct"].items()
        if pct >= BUSY_WARN_PCT
    ]
    out += [
        f"foreign process pid {h['pid']} used {h['cpu_pct']}% CPU before the run: {h['cmdline']}"
        for h in check["busy_processes"]
    ]
    return out
