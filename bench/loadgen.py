"""Load generators (wrk, hey, bulk client) and parsers of their output."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bench.common import BenchError

_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    non_2xx: int
    socket_errors: int


@dataclass
class HeyResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    responses: int
    non_2xx: int
    errors: int
    status_counts: dict[str, int]


def wrk_argv(port: int, seconds: int) -> list[str]:
    return ["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://127.0.0.1:{port}/"]


def hey_argv(port: int, seconds: int) -> list[str]:
    return ["hey", "-z", f"{seconds}s", "-c", "20", "-q", "100", f"http://127.0.0.1:{port}/"]


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise BenchError(f"cannot find {what} in output: {text.strip()[-300:]!r}")
    return match


def parse_wrk(text: str) -> WrkResult:
    done = _search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", text, "wrk request count")
    rps = _search(r"^Requests/sec:\s+([\d.]+)", text, "wrk Requests/sec")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=float(done.group(2)) * _UNIT_S[done.group(3)],
        rps=float(rps.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


def _section(text: str, title: str) -> str:
    """Lines of a hey output section (from its title up to the next blank line)."""
    match = re.search(rf"^{re.escape(title)}:\n((?:[ \t]+\S.*\n?)*)", text, re.MULTILINE)
    return match.group(1) if match else ""


def parse_hey(text: str) -> HeyResult:
    rps = _search(r"^\s*Requests/sec:\s+([\d.]+)", text, "hey Requests/sec")
    slowest = _search(r"^\s*Slowest:\s+([\d.]+) secs", text, "hey Slowest")
    p50 = _search(r"^\s*50%+ in ([\d.]+) secs", text, "hey p50 (no successful responses?)")
    p99 = _search(r"^\s*99%+ in ([\d.]+) secs", text, "hey p99")
    statuses = {
        m.group(1): int(m.group(2))
        for m in re.finditer(
            r"\[(\d+)\]\s+(\d+) responses", _section(text, "Status code distribution")
        )
    }
    errors = sum(
        int(m.group(1)) for m in re.finditer(r"\[(\d+)\]", _section(text, "Error distribution"))
    )
    return HeyResult(
        rps=float(rps.group(1)),
        p50_ms=float(p50.group(1)) * 1e3,
        p99_ms=float(p99.group(1)) * 1e3,
        max_ms=float(slowest.group(1)) * 1e3,
        responses=sum(statuses.values()),
        non_2xx=sum(n for code, n in statuses.items() if not code.startswith("2")),
        errors=errors,
        status_counts=statuses,
    )


def parse_bulk(text: str) -> dict[str, Any]:
    """The bulk client's JSON line (the last line that parses as a JSON object)."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise BenchError(f"bulk client printed no result: {text.strip()[-300:]!r}")
