"""`meshlet routes SERVICE[:PORT]`: the effective routes of a service, from the control
plane (what its clients' proxies apply), one row per route in match order."""

from __future__ import annotations

import argparse
import json
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["add_parser", "run_routes"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("routes", help="the effective HTTP routes of a service")
    p.add_argument("service", help="NAME[.NAMESPACE][:PORT]")
    p.add_argument("--state-dir", default=".meshlet/up",
                   help="`meshlet up`'s state (control address and trust anchors)")
    p.add_argument("--control", help="control plane HOST:PORT (instead of --state-dir)")
    p.add_argument("--anchors", help="trust anchors PEM (with --control)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")


def _fmt_match(m: dict[str, Any]) -> str:
    parts = []
    if "method" in m:
        parts.append(m["method"])
    for kind, path in (m.get("path") or {}).items():
        parts.append({"exact": "=", "prefix": "", "regex": "~"}[kind] + path
                     + ("*" if kind == "prefix" else ""))
    for k, v in (m.get("headers") or {}).items():
        parts.append(f"{k}={v}")
    return " ".join(parts) or "*"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def run_routes(args: argparse.Namespace) -> int:
    control, anchors = args.control, args.anchors
    if control is None:
        state = Path(args.state_dir) / "up.json"
        try:
            info = json.loads(state.read_text())
            control, anchors = info["control"]["addr"], info["control"]["anchors"]
        except (OSError, ValueError, KeyError) as e:
            print(f"meshlet routes: cannot read {state} ({e}); is `meshlet up` running? "
                  f"Or pass --control and --anchors.", file=sys.stderr)
            return 1
    if anchors is None:
        print("meshlet routes: --anchors is needed with --control", file=sys.stderr)
        return 64
    ctx = ssl.create_default_context(cafile=anchors)
    url = f"https://{control}/v1/routes?name={quote(args.service)}"
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
            data = json.loads(r.read())
    except urllib.error.HTTPError as e:
        print(f"meshlet routes: {json.loads(e.read()).get('error', e)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"meshlet routes: control plane {control}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for name, port in data["ports"].items():
        print(f"{name}: {len(port['endpoints'])} endpoint(s)")
        rows = [["ROUTE", "MATCH", "TIMEOUT", "RETRY", "HEADERS", "BACKENDS"]]
        for r in port.get("routes") or []:
            retry = r.get("retry")
            rtext = "-" if not retry else (
                f"{retry['attempts']}x on {','.join(map(str, retry['statuses'])) or 'conn'}"
                + (f", {retry['per_try_timeout'] * 1000:g}ms/try"
                   if retry.get("per_try_timeout") else ""))
            h = r.get("request_headers") or {}
            htext = " ".join([f"{k}={v}" for k, v in (h.get("set") or {}).items()]
                             + [f"+{k}={v}" for k, v in (h.get("add") or {}).items()]
                             + [f"-{k}" for k in h.get("remove") or []]) or "-"
            btext = " ".join(f"{b['service']}:{b['weight']}" for b in r.get("backends") or []
                             ) or "(this service)"
            rows.append([r["name"], " | ".join(_fmt_match(m) for m in r.get("match") or [])
                         or "*", f"{r['timeout'] * 1000:g}ms" if r.get("timeout") else "-",
                         rtext, htext, btext])
        if len(rows) == 1:
            rows.append(["(default)", "*", "-", "-", "-", "(this service)"])
        print(_table(rows))
        b = port.get("retry_budget")
        if b:
            print(f"retry budget: {b['ratio']:g} of requests + {b['min_per_second']:g}/s "
                  f"over {b['window']:g}s")
    return 0
