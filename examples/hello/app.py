"""A tiny stdlib HTTP app for the demo: GET / says hello, GET /slow waits, POST echoes.

Usage: python app.py PORT
"""

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/slow"):
            time.sleep(0.05)
        if self.path.startswith("/fail"):
            self._send(500, b"failing on purpose\n")
            return
        who = self.headers.get("meshlet-client-id", "unmeshed client")
        self._send(200, f"hello from the example app ({who})\n".encode())

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(n)
        self._send(200, b"echo: " + body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
