"""Helpers for the integration tests: ports, polling, a managed proxy process and
small backends (HTTP, raw TCP, WebSocket) that run in threads with bounded waits.

Rules:
1. No fixed sleeps in tests: wait for a condition with `eventually(...)`.
2. Everything started here is stopped by its context manager (or `close()`), even when
   the test fails; every blocking call has a timeout.
3. Backends record what they received so tests can assert on the exact bytes the proxy
   forwarded (or did not forward).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from meshlet.ports import free_port as _free_port

__all__ = [
    "BLOCK",
    "HttpBackend",
    "ProxyProcess",
    "Response",
    "ResponseReader",
    "TcpServer",
    "UpProcess",
    "WsEchoServer",
    "connect",
    "eventually",
    "free_port",
    "http_request",
    "metric",
    "parse_metrics",
    "parse_status",
    "pattern_sha256",
    "raw_exchange",
    "wait_port_closed",
]

HOST = "127.0.0.1"
BIG_BUF = 4 * 1024 * 1024
# A fixed 1 MiB pattern: big transfers are made of it, so both ends can hash them.
BLOCK = hashlib.shake_256(b"meshlet-test-pattern").digest(1 << 20)


def free_port() -> int:
    """A port that was free a moment ago, below the kernel's ephemeral range so no
    client socket takes it in between (the machine is shared: never assume a
    fixed port)."""
    return _free_port(HOST)


def eventually(fn: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Call `fn` until it returns a truthy value without raising AssertionError or
    OSError; return that value. On timeout, raise the last error (or an
    AssertionError naming the last falsy value)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: Any = None
    while True:
        try:
            v = fn()
            if v:
                return v
            last_val, last_exc = v, None
        except (AssertionError, OSError) as e:
            last_exc = e
        if time.monotonic() >= deadline:
            if last_exc is not None:
                raise AssertionError(f"not true within {timeout}s: {last_exc!r}") from last_exc
            raise AssertionError(f"not true within {timeout}s (last value {last_val!r})")
        time.sleep(interval)


def run_parallel(fn: Callable[[int], Any], n: int, timeout: float) -> None:
    """Run fn(0) .. fn(n - 1) in n threads at once; all must finish within `timeout`."""
    threads = [threading.Thread(target=fn, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(t.is_alive() for t in threads)
    assert not stuck, f"{stuck} of {n} threads still running after {timeout}s"


def pattern_sha256(n: int) -> str:
    """sha256 of the first `n` bytes of the repeated BLOCK pattern."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(BLOCK))
    for _ in range(full):
        h.update(BLOCK)
    h.update(BLOCK[:rest])
    return h.hexdigest()


def wait_port_closed(port: int, timeout: float = 5.0) -> None:
    def refused() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return False
        except ConnectionRefusedError:
            return True

    eventually(refused, timeout)


# --- HTTP client side ------------------------------------------------------------------


class Response:
    __slots__ = ("body", "headers", "raw_head", "reason", "status", "version")

    def __init__(self, version: str, status: int, reason: str,
                 headers: list[tuple[str, str]], body: bytes, raw_head: bytes) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.raw_head = raw_head

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers!r} body={self.body[:200]!r}>"


class ResponseReader:
    """Reads HTTP/1.1 responses one by one from a socket (keep-alive, pipelining)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False
        sock.settimeout(timeout)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read(self, method: str = "GET") -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed before a response head: {self.buf!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        raw_head = self.buf[:end]
        self.buf = self.buf[end:]
        lines = raw_head[:-4].split(b"\r\n")
        version, status, *reason = lines[0].decode("latin-1").split(" ", 2)
        headers = []
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            headers.append((k, v.strip()))
        resp = Response(version, int(status), reason[0] if reason else "", headers, b"",
                        raw_head)
        code = resp.status
        if code < 200 or code in (204, 304) or method == "HEAD":
            return resp
        te = (resp.header("transfer-encoding") or "").lower()
        cl = resp.header("content-length")
        if "chunked" in te:
            resp.body = self._chunked()
        elif cl is not None:
            n = int(cl)
            while len(self.buf) < n:
                if not self._fill():
                    raise EOFError(f"body cut short: {len(self.buf)} of {n}")
            resp.body, self.buf = self.buf[:n], self.buf[n:]
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def read_final(self, method: str = "GET") -> tuple[list[Response], Response]:
        """Interim responses (1xx) and the final one."""
        interim = []
        while True:
            r = self.read(method)
            if r.status >= 200 or r.status == 101:
                return interim, r
            interim.append(r)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("chunked body cut short")
        i = self.buf.index(b"\r\n")
        line, self.buf = self.buf[:i], self.buf[i + 2:]
        return line

    def _chunked(self) -> bytes:
        out = []
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():
                    pass
                return b"".join(out)
            while len(self.buf) < size + 2:
                if not self._fill():
                    raise EOFError("chunk cut short")
            out.append(self.buf[:size])
            self.buf = self.buf[size + 2:]

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the peer closes (EOF or reset) with no more bytes, within timeout."""
        self.sock.settimeout(timeout)
        if self.buf:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        if data:
            self.buf += data
            return False
        return True


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((HOST, port), timeout=timeout)


def raw_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send `data`, then read until the peer closes (or resets); return what came."""
    with connect(port, timeout) as s:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def http_request(port: int, method: str = "GET", path: str = "/", body: bytes = b"",
                 headers: Iterable[tuple[str, str]] = (), timeout: float = 10.0
                 ) -> Response:
    """One request on a fresh connection (Connection: close)."""
    head = [f"{method} {path} HTTP/1.1", "Host: test", "Connection: close"]
    if body or method in ("POST", "PUT"):
        head.append(f"Content-Length: {len(body)}")
    head += [f"{k}: {v}" for k, v in headers]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    with connect(port, timeout) as s:
        s.sendall(data)
        return ResponseReader(s, timeout).read(method)


def parse_status(raw: bytes) -> Response:
    """Parse a whole response read until close (for error responses)."""
    class _Fake:
        def settimeout(self, t: float) -> None:
            pass

        def recv(self, n: int) -> bytes:
            return b""

    r = ResponseReader(_Fake(), 1)  # type: ignore[arg-type]
    r.buf = raw
    return r.read()


# --- metrics ---------------------------------------------------------------------------

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')

Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Metrics:
    out: Metrics = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            raise ValueError(f"unparsable metrics line: {line!r}")
        labels = []
        if m.group(3):
            pos = 0
            inner = m.group(3)
            while pos < len(inner):
                lm = _LABEL_RE.match(inner, pos)
                if lm is None:
                    raise ValueError(f"bad labels in {line!r}")
                v = lm.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
                labels.append((lm.group(1), v))
                pos = lm.end()
        out[(m.group(1), frozenset(labels))] = float(m.group(4))
    return out


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)


# --- the proxy process -----------------------------------------------------------------


class ProxyProcess:
    """`python -m meshlet proxy` on free ports; a context manager.

    app:       the inbound listener forwards there (None: no inbound listener)
    outbound:  {"web:80": "" or "/opaque"}: one explicit outbound listener each
    endpoints: YAML text for the endpoints file (written to a temp file)
    env:       more MESHLET_* settings
    """

    def __init__(self, app: tuple[str, int] | int | None = None,
                 outbound: Mapping[str, str] | None = None, endpoints: str | None = None,
                 env: Mapping[str, str] | None = None, ready_timeout: float = 10.0) -> None:
        self.app = (HOST, app) if isinstance(app, int) else app
        self.outbound_spec = dict(outbound or {})
        self.endpoints_text = endpoints
        self.extra_env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.inbound_port: int | None = None
        self.admin_port = 0
        self.outbound: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="meshlet-it-")
        self.endpoints_path = os.path.join(self._tmp.name, "endpoints.yaml")
        self._stderr_path = os.path.join(self._tmp.name, "stderr.log")
        self._stderr_f: Any = None
        self.returncode: int | None = None

    # lifecycle

    def __enter__(self) -> ProxyProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
        self.admin_port = free_port()
        env["MESHLET_ADMIN_LISTEN_ADDR"] = f"{HOST}:{self.admin_port}"
        env["MESHLET_LOG_LEVEL"] = "info"
        env["MESHLET_SHUTDOWN_GRACE"] = "5s"  # bounded stop unless a test says otherwise
        if self.app is not None:
            self.inbound_port = free_port()
            env["MESHLET_INBOUND_LISTEN_ADDR"] = f"{HOST}:{self.inbound_port}"
            env["MESHLET_APP_ADDR"] = f"{self.app[0]}:{self.app[1]}"
        else:
            env["MESHLET_INBOUND_LISTEN_ADDR"] = ""
        if self.outbound_spec:
            binds = []
            for svc, suffix in self.outbound_spec.items():
                p = self.outbound[svc] = free_port()
                binds.append(f"{HOST}:{p}={svc}{suffix}")
            env["MESHLET_OUTBOUND_LISTENERS"] = ",".join(binds)
        if self.endpoints_text is not None:
            self.write_endpoints(self.endpoints_text)
            env["MESHLET_ENDPOINTS_FILE"] = self.endpoints_path
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        env = self.env()
        self._stderr_f = open(self._stderr_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshlet", "proxy"], env=env,
            stdin=subprocess.DEVNULL, stdout=self._stderr_f, stderr=self._stderr_f,
        )

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode} before "
                                   f"ready:\n{self.stderr()}")
            try:
                return http_request(self.admin_port, path="/ready", timeout=1).status == 200
            except (OSError, EOFError):
                return False

        try:
            eventually(ready, self.ready_timeout)
        except AssertionError:
            raise RuntimeError(f"proxy not ready in {self.ready_timeout}s:\n"
                               f"{self.stderr()}") from None

    def write_endpoints(self, text: str) -> None:
        """Replace the endpoints file atomically (the proxy never sees half a file)."""
        tmp = self.endpoints_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.endpoints_path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.inbound_port}"

    @property
    def admin(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    def stderr(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-20000:]
        except OSError:
            return ""

    def admin_get(self, path: str, method: str = "GET") -> Response:
        return http_request(self.admin_port, method, path, timeout=5)

    def metrics_text(self) -> str:
        r = self.admin_get("/metrics")
        assert r.status == 200, r
        return r.body.decode()

    def metrics(self) -> Metrics:
        return parse_metrics(self.metrics_text())

    def rss_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"proxy did not exit within {timeout}s:\n"
                                 f"{self.stderr()}") from None
        return self.returncode

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def close(self, check: bool = True) -> None:
        rc: int | None = None
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    try:
                        rc = self.stop()
                    except AssertionError:
                        self.proc.kill()
                        self.proc.wait(5)
                        raise
                else:
                    rc = self.proc.returncode
        finally:
            if self._stderr_f is not None:
                self._stderr_f.close()
            text = self.stderr()
            self._tmp.cleanup()
        if check and rc is not None:
            assert rc == 0, f"proxy exited {rc}:\n{text}"


# --- backends --------------------------------------------------------------------------


class _ThreadedServer:
    """Accept loop in a thread, one thread per connection; close() stops everything."""

    def __init__(self, bufsize: int | None = None) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bufsize:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        self.sock.bind((HOST, 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.addr = f"{HOST}:{self.port}"
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.n_connections = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept_loop, daemon=True,
                             name=f"{type(self).__name__}-accept")
        t.start()
        self._threads.append(t)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            c.settimeout(None)
            with self.lock:
                self.conns.append(c)
                self.n_connections += 1
                cid = self.n_connections
            t = threading.Thread(target=self._run, args=(c, cid), daemon=True,
                                 name=f"{type(self).__name__}-{cid}")
            t.start()
            self._threads.append(t)

    def _run(self, c: socket.socket, cid: int) -> None:
        try:
            self.handle(c, cid)
        except OSError:
            pass
        except Exception as e:  # recorded: a test may look
            self.errors.append(f"conn {cid}: {e!r}")
        finally:
            with contextlib.suppress(OSError):
                c.close()

    def handle(self, c: socket.socket, cid: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        for t in self._threads:
            t.join(5)


class _Conn:
    """Buffered reads on a backend connection, recording every byte received."""

    def __init__(self, server: HttpBackend, sock: socket.socket, cid: int) -> None:
        self.server = server
        self.sock = sock
        self.cid = cid
        self.buf = b""

    def fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.server._record(self.cid, data)
        self.buf += data
        return True

    def line(self) -> bytes | None:
        while b"\n" not in self.buf:
            if not self.fill():
                return None
        i = self.buf.index(b"\n")
        line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
        return line

    def exactly(self, n: int, sink: Callable[[bytes], None]) -> bool:
        """Read n body bytes, passing them to sink without keeping them."""
        while n > 0:
            if not self.buf and not self.fill():
                return False
            take = self.buf[:n]
            self.buf = self.buf[len(take):]
            n -= len(take)
            sink(take)
        return True


class HttpBackend(_ThreadedServer):
    """A keep-alive HTTP/1.1 server for tests, driven by the request path:

    /anything          200, JSON describing the request (method, path, headers, body
                       length and sha256, connection id, whether 100 was sent)
    /delay/MS          the same, after MS milliseconds
    /bytes/N           N bytes of the BLOCK pattern, streamed (Content-Length)
    /noanswer          read the request, never answer (until the server closes)
    /reset             close with a TCP reset, no answer
    /malformed/KIND    a broken response: cl_te, bad_chunk, bare_lf, dup_cl, garbage
    /untilclose/N      N pattern bytes with no length, delimited by closing
    /chunked/N         N pattern bytes, chunked, with a trailer
    /status/CODE       that status, no body, no length (for 204/304)
    (any)              with `extra_delay` set: answered that much later; with
                       `fail_rate`: that share answered 503 instead
    /closeafter        the usual answer, then close without `connection: close`
    HEAD               the usual head, no body

    It sends `100 Continue` itself when asked (Expect), before reading the body.
    Every byte received is recorded in arrival order (`received()`), up to a cap.
    """

    RECORD_CAP = 16 * 1024 * 1024

    def __init__(self, record: bool = True, bufsize: int | None = None) -> None:
        self.record = record
        self._log: list[tuple[int, bytes]] = []
        self._log_bytes = 0
        self.requests: list[dict[str, Any]] = []
        self.bufsize = bufsize
        self._release = threading.Event()
        # /slowsink: stop reading the body after `pause_after` bytes until `resume` is set.
        self.pause_after = 0
        self.resume = threading.Event()
        self.paused = threading.Event()
        self.body_bytes = 0  # body bytes read, all requests (progress, for stall checks)
        self.sent_bytes = 0  # /bytes/ body bytes sent (progress, for stall checks)
        self.extra_delay = 0.0  # seconds added before every answer (a slow replica)
        self.fail_rate = 0.0  # this share of requests answered 503 (a flaky replica)
        self.failures = 0
        super().__init__(bufsize)

    def _record(self, cid: int, data: bytes) -> None:
        if not self.record:
            return
        with self.lock:
            if self._log_bytes < self.RECORD_CAP:
                self._log.append((cid, data))
                self._log_bytes += len(data)

    def mark(self) -> int:
        with self.lock:
            return len(self._log)

    def received(self, since: int = 0) -> bytes:
        """All bytes received (every connection, arrival order) since `mark()`."""
        with self.lock:
            return b"".join(d for _c, d in self._log[since:])

    def paths(self) -> list[str]:
        with self.lock:
            return [r["path"] for r in self.requests]

    def close(self) -> None:
        self._release.set()
        self.resume.set()
        super().close()

    def handle(self, c: socket.socket, cid: int) -> None:
        if self.bufsize:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.bufsize)
        conn = _Conn(self, c, cid)
        while True:
            line = conn.line()
            if line is None:
                return
            if line in (b"\r\n", b"\n"):
                continue  # tolerated between requests
            parts = line.decode("latin-1").split()
            if len(parts) != 3:
                return  # garbage: drop the connection
            method, path, version = parts
            headers: list[tuple[str, str]] = []
            while True:
                hl = conn.line()
                if hl is None:
                    return
                if hl in (b"\r\n", b"\n"):
                    break
                k, _, v = hl.decode("latin-1").partition(":")
                headers.append((k, v.strip()))
            hmap: dict[str, str] = {}
            for k, v in headers:
                hmap.setdefault(k.lower(), v)
            sent_100 = False
            if hmap.get("expect", "").lower() == "100-continue":
                c.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                sent_100 = True
            h = hashlib.sha256()
            n_body = [0]

            slow = path.startswith("/slowsink")

            def sink(b: bytes, h: Any = h, n_body: list[int] = n_body, slow: bool = slow
                     ) -> None:
                h.update(b)
                before = n_body[0]
                n_body[0] += len(b)
                self.body_bytes += len(b)
                if slow and before < self.pause_after <= n_body[0]:
                    self.paused.set()
                    self.resume.wait(60)

            te = hmap.get("transfer-encoding", "").lower()
            if te.split(",")[-1].strip() == "chunked":
                while True:
                    sl = conn.line()
                    if sl is None:
                        return
                    try:
                        size = int(sl.split(b";")[0].strip(), 16)
                    except ValueError:
                        return
                    if size == 0:
                        while True:
                            tl = conn.line()
                            if tl is None:
                                return
                            if tl in (b"\r\n", b"\n"):
                                break
                        break
                    if not conn.exactly(size, sink):
                        return
                    if conn.line() is None:
                        return
            elif "content-length" in hmap:
                try:
                    n = int(hmap["content-length"].split(",")[0])
                except ValueError:
                    return
                if not conn.exactly(n, sink):
                    return
            info = {
                "conn": cid, "method": method, "path": path, "version": version,
                "headers": headers, "body_len": n_body[0], "body_sha256": h.hexdigest(),
                "sent_100": sent_100,
            }
            with self.lock:
                self.requests.append(info)
            close = hmap.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if not self.respond(c, conn, path, info, close):
                return
            if close:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_WR)
                return

    def respond(self, c: socket.socket, conn: _Conn, path: str, info: dict[str, Any],
                close: bool) -> bool:
        """Answer one request; False: the connection is finished."""
        conn_hdr = b"connection: close\r\n" if close else b""
        if self.extra_delay and self._release.wait(self.extra_delay):
            return False
        if self.fail_rate and random.random() < self.fail_rate:
            self.failures += 1
            c.sendall(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n%s\r\n"
                      % conn_hdr)
            return True
        if path.startswith("/delay/") and self._release.wait(int(path.split("/")[2]) / 1000):
            return False
        if path == "/noanswer":
            self._release.wait(60)
            return False
        if path == "/reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return False
        if path.startswith("/bytes/"):
            n = int(path.split("/")[2])
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
                      b"content-length: %d\r\n%s\r\n" % (n, conn_hdr))
            full, rest = divmod(n, len(BLOCK))
            for _ in range(full):
                c.sendall(BLOCK)
                self.sent_bytes += len(BLOCK)
            c.sendall(BLOCK[:rest])
            self.sent_bytes += rest
            return True
        if path.startswith("/malformed/"):
            kind = path.split("/")[2]
            bad = {
                "cl_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "bad_chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"0x5\r\nhello\r\n0\r\n\r\n",
                "bare_lf": b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-Foo: bar\r\n\r\nok",
                "dup_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n"
                          b"\r\nokk",
                "garbage": b"HTTP/1.1 2000 NOPE\r\n\r\n",
            }[kind]
            c.sendall(bad)
            self._release.wait(2)  # keep the connection; the proxy must give up on it
            return False
        if path.startswith("/untilclose/"):
            n = int(path.split("/")[2])
            c.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n"
                      + BLOCK[:n])
            return False
        if path.startswith("/chunked/"):
            n = int(path.split("/")[2])
            c.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n%s\r\n" % conn_hdr)
            for i in range(0, n, 65536):
                part = BLOCK[i:min(n, i + 65536)]
                c.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            c.sendall(b"0\r\nx-trailer: done\r\n\r\n")
            return True
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            c.sendall(b"HTTP/1.1 %d Whatever\r\n%s\r\n" % (code, conn_hdr))
            return True
        body = json.dumps(info).encode()
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n%s\r\n" % (len(body), conn_hdr))
        c.sendall(head if info["method"] == "HEAD" else head + body)
        return path != "/closeafter"  # that one closes without saying so


class TcpServer(_ThreadedServer):
    """Raw TCP backends.

    mode "half_close": read until EOF, then send b"got:" + data and close.
    mode "banner":     send `banner` at connect, then echo until EOF, then close.
    mode "hash":       read until EOF (stopping after `pause_after` bytes until `resume`
                       is set), then send b"<count> <sha256>" and close.
    """

    def __init__(self, mode: str = "half_close", banner: bytes = b"220 hello\r\n",
                 bufsize: int | None = None) -> None:
        self.mode = mode
        self.banner = banner
        self.eof_seen: list[bytes] = []  # data received before each EOF
        self.pause_after = 0
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.received_bytes = 0
        super().__init__(bufsize)

    def close(self) -> None:
        self.resume.set()
        super().close()

    def handle(self, c: socket.socket, cid: int) -> None:
        c.settimeout(30)
        if self.mode == "hash":
            h = hashlib.sha256()
            n = 0
            while True:
                d = c.recv(1 << 20)
                if not d:
                    break
                h.update(d)
                if n < self.pause_after <= n + len(d):
                    self.paused.set()
                    self.resume.wait(60)
                n += len(d)
                self.received_bytes = n
            c.sendall(b"%d %s" % (n, h.hexdigest().encode()))
            return
        if self.mode == "banner":
            c.sendall(self.banner)
            while True:
                d = c.recv(65536)
                if not d:
                    return
                c.sendall(d)
        data = b""
        while True:
            d = c.recv(65536)
            if not d:
                break
            data += d
        with self.lock:
            self.eof_seen.append(data)
        c.sendall(b"got:" + data)


class WsEchoServer:
    """A `websockets` echo server in a thread; sends a greeting first."""

    def __init__(self) -> None:
        from websockets.sync.server import serve

        def handler(ws: Any) -> None:
            ws.send("hello from server")
            for msg in ws:
                ws.send(msg)

        self.server = serve(handler, HOST, 0)
        self.port: int = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> WsEchoServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


# --- the control plane -------------------------------------------------------------------

TD = "mesh.test"


class Control:
    def __init__(self, state: Path, port: int, proc: subprocess.Popen[bytes],
                 host: str = "127.0.0.1") -> None:
        self.state = state
        self.port = port
        self.proc = proc
        self.host = host

    @property
    def anchors(self) -> bytes:
        return (self.state / "ca" / "root.crt").read_bytes()

    def token(self, ns: str, sa: str, ttl: str = "1h") -> str:
        out = subprocess.run(
            [sys.executable, "-m", "meshlet", "control", "token", "create",
             "--namespace", ns, "--account", sa, "--ttl", ttl],
            env=self.env(), capture_output=True, timeout=30, check=True)
        return out.stdout.decode().strip()

    def env(self) -> dict[str, str]:
        return {**os.environ, "MESHLET_CONTROL_STATE_DIR": str(self.state),
                "MESHLET_TRUST_DOMAIN": TD,
                "MESHLET_CONTROL_LISTEN_ADDR": f"{self.host}:{self.port}",
                "MESHLET_CONTROL_SERVER_NAMES": f"localhost,127.0.0.1,{self.host}"}


def start_control(state: Path, port: int | None = None, lifetime: str = "24h",
                  mesh_file: Path | None = None, host: str = "127.0.0.1"
                  ) -> Iterator[Control]:
    """A `meshlet control` process (a generator for contextlib / fixtures)."""
    port = port or free_port()
    c = Control(state, port, None, host)  # type: ignore[arg-type]
    env = {**c.env(), "MESHLET_CERT_LIFETIME": lifetime}
    if mesh_file is not None:
        env["MESHLET_MESH_FILE"] = str(mesh_file)
    state.mkdir(parents=True, exist_ok=True)
    log = open(state / "control.log", "ab")  # noqa: SIM115 - closed below
    c.proc = subprocess.Popen([sys.executable, "-m", "meshlet", "control"], env=env,
                              stdin=subprocess.DEVNULL, stderr=log)

    def up() -> bool:
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        except OSError:
            return False

    try:
        eventually(up, timeout=15)
        yield c
    finally:
        killed = c.proc.poll() is not None  # a test killed it on purpose
        c.proc.send_signal(signal.SIGTERM)
        try:
            assert c.proc.wait(timeout=10) == 0 or killed
        finally:
            if c.proc.poll() is None:
                c.proc.kill()
            log.close()


def write_mesh(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def proxy_env(control: Control, tmp: Path, account: str, **more: str) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "anchors.pem").write_bytes(control.anchors)
    (tmp / "token").write_text(control.token("default", account))
    return {"MESHLET_CONTROL_ADDR": f"{control.host}:{control.port}",
            "MESHLET_TRUST_ANCHORS": str(tmp / "anchors.pem"),
            "MESHLET_IDENTITY": f"spiffe://{TD}/ns/default/sa/{account}",
            "MESHLET_JOIN_TOKEN_FILE": str(tmp / "token"), **more}


def control_status(c: Control) -> dict[str, Any]:
    ctx = ssl.create_default_context(cadata=c.anchors.decode())
    with urllib.request.urlopen(f"https://127.0.0.1:{c.port}/v1/status", context=ctx,
                                timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


class UpProcess:
    """A `meshlet up` process (with `extra` flags) whose output is collected in `lines`."""

    def __init__(self, mesh: Path, state: Path, *extra: str, new_session: bool = False
                 ) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshlet", "up", str(mesh), "--state-dir", str(state),
             "--color", "never", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=new_session,
            env={k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def text(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (if still running), wait, and return `meshlet up`'s exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self.reader.join(5)
        return rc

    def wait_line(self, needle: str, timeout: float = 30) -> None:
        """Until a line contains `needle`; fails at once if `meshlet up` exited."""
        def seen() -> bool:
            if any(needle in x for x in self.lines):
                return True
            if self.proc.poll() is not None:  # not retried by `eventually`
                raise RuntimeError(f"meshlet up exited {self.proc.returncode}")
            return False

        try:
            eventually(seen, timeout=timeout, interval=0.1)
        except (AssertionError, RuntimeError) as e:
            raise AssertionError(f"no {needle!r} in meshlet up's output ({e}):\n"
                                 f"{self.text()}") from None
