"""Small apps for the pod tests: `http PORT`, `echo PORT`, `banner PORT`.

http: answers every request with 200 and a body naming the app and the request's
      `meshlet-client-id` header (so a test sees who the mesh said called).
echo: sends back every byte it receives, per connection.
banner: a server-speaks-first protocol: sends "220 ready\\r\\n" at once, then echoes.
They listen on 127.0.0.1 (a transparent proxy forwards to localhost, so nothing
reaches them around the proxy), or on $BIND (e.g. "::" for every address, both
families: an app outside the mesh).
"""

from __future__ import annotations

import os
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        name = sys.argv[3] if len(sys.argv) > 3 else "app"
        if "REPLICA" in os.environ:
            name += "-" + os.environ["REPLICA"]
        body = (f"hello from {name} "
                f"client={self.headers.get('meshlet-client-id', '-')}\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Echo(socketserver.BaseRequestHandler):
    banner = b""

    def handle(self) -> None:
        s: socket.socket = self.request
        if self.banner:
            s.sendall(self.banner)
        while True:
            data = s.recv(65536)
            if not data:
                return
            s.sendall(data)


class Banner(Echo):
    banner = b"220 ready\r\n"


class TcpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    host = os.environ.get("BIND", "127.0.0.1")
    if ":" in host:
        ThreadingHTTPServer.address_family = TcpServer.address_family = socket.AF_INET6
    if kind == "http":
        srv: socketserver.TCPServer = ThreadingHTTPServer((host, port), Http)
    else:
        srv = TcpServer((host, port), Echo if kind == "echo" else Banner)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
