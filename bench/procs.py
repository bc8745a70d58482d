"""Child processes: pinned spawning in own process groups, /proc sampling, cleanup."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench.common import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 5.0

_LIVE: list[Proc] = []


@dataclass
class Proc:
    """A child started in its own session (so its whole group can be signalled)."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.alive():
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=timeout)
        _signal_group(self.pid, signal.SIGKILL)  # stragglers left in the group
        _forget(self)
        return self.popen.returncode


def _forget(proc: Proc) -> None:
    if proc in _LIVE:
        _LIVE.remove(proc)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def pinned(argv: list[str], core: int | None) -> list[str]:
    """Prefix argv with taskset when a core is given (taskset execs: same PID)."""
    return argv if core is None else ["taskset", "-c", str(core), *argv]


def spawn(
    name: str,
    argv: list[str],
    log_dir: Path,
    *,
    core: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start argv (stdout+stderr to log_dir/name.log) in a new session."""
    full = pinned(argv, core)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        try:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise BenchError(f"cannot start {name}: {exc}") from exc
    proc = Proc(name, full, popen, log_path)
    _LIVE.append(proc)
    return proc


def wait_sampling(
    proc: Proc, timeout: float, on_tick: Callable[[], None], every: float = 0.25
) -> int:
    """Wait for proc to exit, calling on_tick periodically; kill it on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rc = proc.popen.wait(timeout=every)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.stop()
                raise BenchError(f"{proc.name} did not finish within {timeout:.0f}s") from None
            on_tick()
            continue
        _forget(proc)
        return rc


def run_to_completion(
    name: str,
    argv: list[str],
    log_dir: Path,
    timeout: float,
    core: int | None = None,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a short helper command, return its combined output; error on rc != 0."""
    proc = spawn(name, argv, log_dir, core=core, env=env, cwd=cwd)
    rc = wait_sampling(proc, timeout, lambda: None)
    out = proc.log_path.read_text(errors="replace")
    if rc != 0:
        raise BenchError(f"{name} exited with {rc}: {out.strip()[-400:]}")
    return out


def stop_all() -> None:
    """Stop every child still running, newest first."""
    for proc in reversed(list(_LIVE)):
        try:
            proc.stop()
        except Exception:
            _signal_group(proc.pid, signal.SIGKILL)


# ---- /proc sampling -------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields after comm: state is [0]


def process_tree(root: int) -> list[int]:
    """root and all of its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_ticks(pids: Iterable[int]) -> int:
    """Sum of utime+stime (clock ticks) over pids that still exist."""
    total = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total


def rss_kib(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) over pids that still exist."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@dataclass
class TreeMeter:
    """CPU and RSS of a process tree; keeps the max RSS seen by sample()."""

    root: int
    rss_max_kib: int = 0
    samples: list[int] = field(default_factory=list)

    def ticks(self) -> int:
        return cpu_ticks(process_tree(self.root))

    def rss(self) -> int:
        return rss_kib(process_tree(self.root))

    def sample(self) -> None:
        value = self.rss()
        self.samples.append(value)
        self.rss_max_kib = max(self.rss_max_kib, value)


class Meter(Protocol):
    """What a load run samples: a CPU tick counter and a periodic RSS sample."""

    def ticks(self) -> int: ...

    def sample(self) -> None: ...


@dataclass
class PairMeter:
    """Two proxies measured as one: ticks and RSS are sums (max RSS of the sum kept)."""

    a: TreeMeter
    b: TreeMeter
    rss_max_kib: int = 0

    def ticks(self) -> int:
        return self.a.ticks() + self.b.ticks()

    def rss(self) -> int:
        return self.a.rss() + self.b.rss()

    def sample(self) -> None:
        self.a.sample()
        self.b.sample()
        self.rss_max_kib = max(self.rss_max_kib, self.a.samples[-1] + self.b.samples[-1])


def ticks_to_us(ticks: int) -> float:
    return ticks * 1_000_000 / CLK_TCK
