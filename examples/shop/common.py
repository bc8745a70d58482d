"""Tiny helpers shared by the example apps (plain stdlib; nothing here knows the mesh)."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Handler = Callable[[str], tuple[int, Any]]


def serve(name: str, route: Handler) -> None:
    """Serve JSON on 127.0.0.1:$PORT; `route(path)` returns (status, payload)."""
    port = int(os.environ["PORT"])

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            status, payload = route(self.path)
            body = json.dumps(payload).encode() + b"\n"
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            pass  # the sidecar's metrics tell the story

    srv = ThreadingHTTPServer(("127.0.0.1", port), H)
    srv.daemon_threads = True
    print(f"{name} listening on 127.0.0.1:{port} (replica {os.environ.get('REPLICA', '?')})",
          flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)
