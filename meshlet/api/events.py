"""Watch events: what the control plane streams to proxies (newline-delimited JSON).

One event per line (see docs/api.md):

    {"v": 1, "type": "snapshot", "resource": "endpoints", "name": "web:8080",
     "version": "3f9a...", "data": {EndpointSet JSON}}
    {"v": 1, "type": "unchanged", "resource": "endpoints", "name": "web:8080",
     "version": "3f9a..."}
    {"v": 1, "type": "not_found", "resource": "endpoints", "name": "example.com:80",
     "version": "none"}
    {"v": 1, "type": "heartbeat"}

`snapshot` carries the whole resource (an endpoint set is small); `unchanged` answers a
resuming watch whose version is still current; `not_found` says the mesh does not know
the name (a proxy then resolves it by DNS and proxies it unmeshed).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["EVENT_HEARTBEAT", "EVENT_NOT_FOUND", "EVENT_SNAPSHOT", "EVENT_UNCHANGED",
           "RESOURCE_ENDPOINTS", "RESOURCE_POLICY", "SCHEMA_VERSION", "event",
           "parse_event"]

SCHEMA_VERSION = 1
RESOURCE_ENDPOINTS = "endpoints"
RESOURCE_POLICY = "policy"
EVENT_SNAPSHOT = "snapshot"
EVENT_UNCHANGED = "unchanged"
EVENT_NOT_FOUND = "not_found"
EVENT_HEARTBEAT = "heartbeat"
HEARTBEAT = b'{"v":1,"type":"heartbeat"}\n'


def event(kind: str, key: tuple[str, str], version: str,
          data: dict[str, Any] | None = None) -> bytes:
    e: dict[str, Any] = {"v": SCHEMA_VERSION, "type": kind, "resource": key[0],
                         "name": key[1], "version": version}
    if data is not None:
        e["data"] = data
    return json.dumps(e, separators=(",", ":")).encode() + b"\n"


def parse_event(line: bytes) -> dict[str, Any]:
    """One event; ValueError if it is not a v1 event."""
    e = json.loads(line)
    if not isinstance(e, dict) or e.get("v") != SCHEMA_VERSION or "type" not in e:
        raise ValueError(f"not a v{SCHEMA_VERSION} watch event: {line[:100]!r}")
    return e
