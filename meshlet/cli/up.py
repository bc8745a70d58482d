"""`meshlet up [FILE]`: a whole mesh on one machine from one mesh file.

It starts, in this order: the control plane (its mesh file is one `up` derives from
yours: every replica's sidecar address filled in), one sidecar per app replica (and an
ingress sidecar per `expose`d service), then the apps. No root: every listener is on
127.0.0.1 (explicit mode).

How apps find each other: each app gets `HTTP_PROXY` (and `http_proxy`) pointing at its
sidecar's outbound HTTP proxy listener, so `http://reviews:8080/...` from any HTTP client
that honours the variable (urllib, requests, curl, Go's net/http, ...) goes through the
mesh: discovery, balancing, mTLS. `NO_PROXY` keeps localhost direct. For opaque (TCP)
service ports, which no proxy variable covers, the sidecar gets one local listener per
port and the app gets its address the way Kubernetes names it:
`<NAME>_SERVICE_HOST` and `<NAME>_SERVICE_PORT` (and `<NAME>_SERVICE_PORT_<PORT>`).
The app listens on 127.0.0.1:$PORT; `$REPLICA` is its replica number.

Rules:
1. Apps and sidecars that exit are restarted with backoff (1 s doubling to 30 s; reset
   after 10 s of running). A replica is in its service's endpoints only while its app
   runs and accepts connections; the derived mesh file is rewritten on every change and
   the control plane pushes it.
2. Ctrl-C or SIGTERM stops everything in order: apps, then sidecars, then the control
   plane. Children run in their own process group (a terminal's Ctrl-C reaches only
   `up`) and get SIGTERM if `up` dies.
3. Your mesh file is watched: an edit is checked (errors printed with file:line) and,
   if valid, applied to the derived file (policies, workloads of services without `run`).
   Changes to `run` sections need a restart of `up`.
4. State lives in `--state-dir` (default `.meshlet/up`): the CA, tokens, the derived
   mesh file and `up.json` (addresses and pids, for `meshlet stat` and `meshlet check`).
5. `--netns` (root): each replica in its own network namespace (`meshlet.netfilter.pods`)
   with `meshlet init` rules, its sidecar in transparent mode (ports 4143/4140/4191,
   group `PROXY_GID` exempt from the rules) and its app, started in that order. Every
   service with ports gets a virtual address; pods resolve service names to it through
   their hosts file, and apps dial names or addresses directly (no proxy variable).
   The control plane and ingresses run on the host, on the bridge's address. On exit
   the pods are removed; `meshlet down --netns` removes what a crash left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from meshlet.api.mesh import Mesh, MeshFileError, Service, load_mesh_file
from meshlet.ports import free_port

if TYPE_CHECKING:
    from meshlet.netfilter.pods import Network

__all__ = ["run_up"]

RESTART_MIN = 1.0
RESTART_MAX = 30.0
HEALTHY_AFTER = 10.0
STOP_APPS = 5.0
STOP_PROXIES = 10.0
# --netns: every pod has its own ports, so the sidecars use Linkerd's numbers.
INBOUND_PORT = 4143
OUTBOUND_PORT = 4140
ADMIN_PORT = 4191
PROXY_GID = 2102  # the sidecars' group: `meshlet init --proxy-gid` exempts its traffic
COLORS = ["36", "33", "35", "32", "34", "31", "96", "93", "95", "92", "94", "91"]


def _free_port() -> int:
    return free_port("127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _set_pdeathsig() -> None:
    """In the child, before exec: SIGTERM when `up` dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclasses.dataclass
class Child:
    """A supervised process."""

    label: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    color: str
    kind: str  # "control" | "proxy" | "app"
    gid: int | None = None  # run with this group (--netns sidecars: excluded by the rules)
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = RESTART_MIN
    restarts: int = 0
    stopping: bool = False
    pump: asyncio.Task[None] | None = None


@dataclasses.dataclass
class Replica:
    service: Service
    index: int
    identity: str
    app_port: int | None
    inbound_port: int | None
    admin_port: int
    http_proxy_port: int
    proxy: Child | None = None
    app: Child | None = None
    ready: bool = False
    tcp: dict[str, int] = dataclasses.field(default_factory=dict)  # "svc.ns:port" -> local
    pod: str | None = None  # --netns: the network namespace, and its address
    ip: str = "127.0.0.1"

    @property
    def name(self) -> str:
        return f"{self.service.name}-{self.index}"


@dataclasses.dataclass
class Ingress:
    service: Service
    listen: int
    admin_port: int
    proxy: Child | None = None


class Up:
    def __init__(self, mesh_path: Path, state_dir: Path, color: bool, proxy_log_level: str,
                 netns: bool = False) -> None:
        self.netns = netns
        self.network: Network | None = None
        self.vips: dict[str, str] = {}  # service fqn -> virtual address (--netns)
        self.mesh_path = mesh_path
        self.cwd = str(mesh_path.parent)
        self.state = state_dir
        self.color = color
        self.proxy_log_level = proxy_log_level
        self.mesh: Mesh = load_mesh_file(str(mesh_path))
        self.td = self.mesh.trust_domain or "cluster.local"
        self.control_dir = state_dir / f"control-{self.td}"
        self.derived = state_dir / "mesh.yaml"
        self.tokens = state_dir / "tokens"
        self.control_port = _free_port()
        self.replicas: list[Replica] = []
        self.ingresses: list[Ingress] = []
        self.children: list[Child] = []
        self.control: Child | None = None
        self.stopping = False
        self.stop_event = asyncio.Event()
        self._colors = iter(COLORS * 100)
        self._mesh_stamp: tuple[int, int] | None = None
        self._derived_text = b""
        self._width = 10

    # --- output ---------------------------------------------------------------------

    def say(self, label: str, color: str, line: str) -> None:
        pad = label.ljust(self._width)
        if self.color:
            sys.stdout.write(f"\x1b[{color}m{pad} |\x1b[0m {line}\n")
        else:
            sys.stdout.write(f"{pad} | {line}\n")
        sys.stdout.flush()

    def note(self, line: str) -> None:
        self.say("up", "1", line)

    # --- plan -----------------------------------------------------------------------

    def plan(self) -> None:
        if self.netns:
            from meshlet.netfilter.pods import Network, choose_network

            self.network = net = Network(choose_network())
            for s in self.mesh.services:
                if s.ports:
                    self.vips[s.fqn] = s.address or net.next_vip()
        for s in self.mesh.services:
            if s.run is None:
                continue
            ident = s.identity(self.td) or ""
            for i in range(s.run.replicas):
                has_port = bool(s.ports)
                if self.network is not None:
                    # Each replica in its own pod: fixed ports, its own address.
                    r = Replica(s, i, ident, s.ports[0].port if has_port else None,
                                INBOUND_PORT if has_port else None, ADMIN_PORT, 0)
                    r.pod = f"{s.name}-{i}"
                    r.ip = self.network.next_pod_ip()
                    self.replicas.append(r)
                    continue
                self.replicas.append(Replica(
                    s, i, ident, _free_port() if has_port else None,
                    _free_port() if has_port else None, _free_port(), _free_port()))
            if s.expose is not None:
                if not _port_free(s.expose):
                    raise UpError(f"{s.name}: expose port {s.expose} is in use")
                self.ingresses.append(Ingress(s, s.expose, _free_port()))
        if not self.replicas:
            raise UpError(f"{self.mesh_path}: no service has a `run` section: nothing to run")
        labels = [f"{r.name}/proxy" for r in self.replicas] + ["control"]
        self._width = max(len(x) for x in labels)

    def derived_mesh(self) -> bytes:
        """Your mesh file with each `run` service's workloads: its ready replicas."""
        raw = yaml.safe_load(self.mesh_path.read_text(encoding="utf-8")) or {}
        raw["trust_domain"] = self.td
        for entry in raw.get("services") or []:
            if not isinstance(entry, dict) or "run" not in entry:
                continue
            reps = [r for r in self.replicas if r.service.name == entry.get("name")
                    and r.service.namespace == entry.get("namespace", "default")]
            if self.netns:
                wl = [{"address": r.ip, "ready": r.ready} for r in reps
                      if r.inbound_port is not None]
            else:
                wl = [{"address": f"127.0.0.1:{r.inbound_port}", "ready": r.ready}
                      for r in reps if r.inbound_port is not None]
            if wl:
                entry["workloads"] = wl
            else:
                entry.pop("workloads", None)
            entry.pop("expose", None)
        for entry in raw.get("services") or []:
            if isinstance(entry, dict) and self.vips:
                fqn = f"{entry.get('name')}.{entry.get('namespace', 'default')}"
                if fqn in self.vips:
                    entry["address"] = self.vips[fqn]
        header = (f"# Derived by `meshlet up` from {self.mesh_path}; rewritten on every "
                  f"change. Do not edit.\n").encode()
        return header + yaml.safe_dump(raw, sort_keys=False).encode()

    def sync_mesh(self) -> None:
        text = self.derived_mesh()
        if text != self._derived_text:
            _write_atomic(self.derived, text)
            self._derived_text = text

    # --- processes ------------------------------------------------------------------

    def child(self, label: str, argv: list[str], env: dict[str, str], kind: str,
              color: str | None = None) -> Child:
        c = Child(label, argv, env, self.cwd, color or next(self._colors), kind)
        self.children.append(c)
        return c

    async def start(self, c: Child) -> None:
        if c.kind == "proxy" and "MESHLET_JOIN_TOKEN_FILE" in c.env:
            self.write_token(c)
        c.proc = await asyncio.create_subprocess_exec(
            *c.argv, cwd=c.cwd, env=c.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_set_pdeathsig, group=c.gid,
            extra_groups=[] if c.gid is not None else None)
        c.started_at = time.monotonic()
        c.pump = asyncio.get_running_loop().create_task(self.pump(c, c.proc))

    async def pump(self, c: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the stream limit
                continue
            if not line:
                break
            self.say(c.label, c.color, line.decode(errors="replace").rstrip())
        rc = await proc.wait()
        if self.stopping or c.stopping:
            return
        ran = time.monotonic() - c.started_at
        if ran >= HEALTHY_AFTER:
            c.backoff = RESTART_MIN
        self.say(c.label, c.color, f"exited with status {rc}; restarting in {c.backoff:.0f}s")
        self.on_exit(c)
        delay = c.backoff
        c.backoff = min(c.backoff * 2, RESTART_MAX)
        await asyncio.sleep(delay)
        if self.stopping:
            return
        c.restarts += 1
        await self.start(c)
        self.write_state()

    def on_exit(self, c: Child) -> None:
        for r in self.replicas:
            if (r.app is c or r.proxy is c) and r.ready:
                r.ready = False
                self.say(r.name, c.color, "out of the endpoints until it is back")
                self.sync_mesh()

    def write_token(self, c: Child) -> None:
        from meshlet.control.server import load_token_secret
        from meshlet.identity.spiffe import parse_identity
        from meshlet.identity.tokens import create_token

        ident = parse_identity(c.env["MESHLET_IDENTITY"])
        token = create_token(load_token_secret(self.control_dir), ident, 3600.0)
        _write_atomic(Path(c.env["MESHLET_JOIN_TOKEN_FILE"]), token.encode(), 0o600)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("MESHLET_") and k.lower() not in (
                   "http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        return env

    @property
    def control_host(self) -> str:
        return self.network.gateway if self.network is not None else "127.0.0.1"

    def proxy_env(self, identity: str, token_name: str, admin: int) -> dict[str, str]:
        return {**self.base_env(),
                "MESHLET_CONTROL_ADDR": f"{self.control_host}:{self.control_port}",
                "MESHLET_TRUST_ANCHORS": str(self.control_dir / "ca" / "root.crt"),
                "MESHLET_IDENTITY": identity,
                "MESHLET_JOIN_TOKEN_FILE": str(self.tokens / token_name),
                "MESHLET_ADMIN_LISTEN_ADDR": f"127.0.0.1:{admin}",
                "MESHLET_LOG_LEVEL": self.proxy_log_level,
                "MESHLET_SHUTDOWN_GRACE": "5s"}

    def replica_env(self, r: Replica) -> dict[str, str]:
        """A replica's sidecar: `proxy_env`, plus TLS to its app when the service says
        `app_tls`."""
        env = self.proxy_env(r.identity, f"{r.name}.token", r.admin_port)
        if r.service.app_tls:
            env["MESHLET_APP_TLS"] = "true"
        return env

    def make_children(self) -> None:
        me = [sys.executable, "-m", "meshlet"]
        self.control = self.child("control", [*me, "control"], {
            **self.base_env(),
            "MESHLET_CONTROL_LISTEN_ADDR": f"{self.control_host}:{self.control_port}",
            "MESHLET_CONTROL_SERVER_NAMES": f"localhost,127.0.0.1,{self.control_host}",
            "MESHLET_CONTROL_STATE_DIR": str(self.control_dir),
            "MESHLET_TRUST_DOMAIN": self.td,
            "MESHLET_MESH_FILE": str(self.derived),
            "MESHLET_LOG_LEVEL": "warning" if self.proxy_log_level == "warning" else "info",
        }, "control", "1")
        for r in self.replicas:
            if r.pod is not None:
                self.make_pod_children(r, me)
                continue
            color = next(self._colors)
            env = self.replica_env(r)
            env["MESHLET_OUTBOUND_PROXY_LISTEN_ADDR"] = f"127.0.0.1:{r.http_proxy_port}"
            tcp_env: dict[str, str] = {}
            binds = []
            for s in self.mesh.services:
                oports = [p.port for p in s.ports if p.protocol == "opaque"]
                var = s.name.upper().replace("-", "_")
                for port in oports:
                    local = _free_port()
                    r.tcp[f"{s.fqn}:{port}"] = local
                    binds.append(f"127.0.0.1:{local}={s.fqn}:{port}/opaque")
                    tcp_env[f"{var}_SERVICE_PORT_{port}"] = str(local)
                    if port == oports[0]:
                        tcp_env[f"{var}_SERVICE_HOST"] = "127.0.0.1"
                        tcp_env[f"{var}_SERVICE_PORT"] = str(local)
            if binds:
                env["MESHLET_OUTBOUND_LISTENERS"] = ",".join(binds)
            if r.inbound_port is not None:
                env["MESHLET_INBOUND_LISTEN_ADDR"] = f"127.0.0.1:{r.inbound_port}"
                env["MESHLET_APP_ADDR"] = f"127.0.0.1:{r.app_port}"
                opaque = [p for p in r.service.ports if p.protocol == "opaque"]
                if opaque and len(r.service.ports) == 1:
                    env["MESHLET_OPAQUE_PORTS"] = str(r.app_port)
            else:
                env["MESHLET_INBOUND_LISTEN_ADDR"] = ""
            r.proxy = self.child(f"{r.name}/proxy", [*me, "proxy"], env, "proxy", color)
            run = r.service.run
            assert run is not None
            argv = list(run.command)
            if argv[0] in ("python", "python3"):
                argv[0] = sys.executable
            hp = f"http://127.0.0.1:{r.http_proxy_port}"
            app_env = {**self.base_env(), "HTTP_PROXY": hp, "http_proxy": hp,
                       "NO_PROXY": "localhost,127.0.0.1,::1",
                       "no_proxy": "localhost,127.0.0.1,::1",
                       "REPLICA": str(r.index), **tcp_env, **dict(run.env)}
            if r.app_port is not None:
                app_env["PORT"] = str(r.app_port)
            r.app = self.child(r.name, argv, app_env, "app", color)
        for g in self.ingresses:
            s = g.service
            ident = f"spiffe://{self.td}/ns/{s.namespace}/sa/{s.account}-ingress"
            env = self.proxy_env(ident, f"{s.name}-ingress.token", g.admin_port)
            env["MESHLET_INBOUND_LISTEN_ADDR"] = ""
            env["MESHLET_OUTBOUND_LISTENERS"] = \
                f"127.0.0.1:{g.listen}={s.name}.{s.namespace}:{s.ports[0].port}"
            g.proxy = self.child(f"{s.name}/ingress", [*me, "proxy"], env, "proxy")

    def make_pod_children(self, r: Replica, me: list[str]) -> None:
        """--netns: the replica's sidecar (transparent mode, the proxy group) and its app
        inside its pod; the app dials services by name (the pod's hosts file) and port."""
        from meshlet.netfilter.pods import NS_PREFIX

        color = next(self._colors)
        ns = ["ip", "netns", "exec", NS_PREFIX + (r.pod or "")]
        env = self.replica_env(r)
        env.update({"MESHLET_TRANSPARENT": "true",
                    "MESHLET_INBOUND_LISTEN_ADDR": f"0.0.0.0:{INBOUND_PORT}",
                    "MESHLET_OUTBOUND_LISTEN_ADDR": f"127.0.0.1:{OUTBOUND_PORT}",
                    "MESHLET_ADMIN_LISTEN_ADDR": f"{r.ip}:{ADMIN_PORT}"})
        opaque = sorted({p.port for s in self.mesh.services for p in s.ports
                         if p.protocol == "opaque"})
        if opaque:
            env["MESHLET_OPAQUE_PORTS"] = ",".join(map(str, opaque))
        r.proxy = self.child(f"{r.name}/proxy", [*ns, *me, "proxy"], env, "proxy", color)
        r.proxy.gid = PROXY_GID
        run = r.service.run
        assert run is not None
        argv = list(run.command)
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        app_env = {**self.base_env(), "REPLICA": str(r.index), "POD_IP": r.ip}
        for s in self.mesh.services:
            vip = self.vips.get(s.fqn)
            if vip is None:
                continue
            var = s.name.upper().replace("-", "_")
            app_env[f"{var}_SERVICE_HOST"] = vip
            app_env[f"{var}_SERVICE_PORT"] = str(s.ports[0].port)
            for p in s.ports:
                app_env[f"{var}_SERVICE_PORT_{p.port}"] = str(p.port)
        app_env.update(dict(run.env))
        if r.app_port is not None:
            app_env["PORT"] = str(r.app_port)
        r.app = self.child(r.name, [*ns, *argv], app_env, "app", color)

    # --- readiness ------------------------------------------------------------------

    async def _accepts(self, port: int, pod: str | None = None,
                       host: str = "127.0.0.1") -> bool:
        """Whether 127.0.0.1:`port` accepts a connection (in `pod`'s namespace if set:
        an app in a pod listens on its own loopback)."""
        if pod is not None:
            from meshlet.netfilter.pods import NS_PREFIX, socket_in

            loop = asyncio.get_running_loop()
            try:
                s = socket_in(NS_PREFIX + pod)
            except OSError:
                return False
            s.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 0.5)
                return True
            except (OSError, TimeoutError):
                return False
            finally:
                s.close()
        try:
            _r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
        except (OSError, TimeoutError):
            return False
        w.close()
        return True

    async def _http_ok(self, port: int, path: str, host: str = "127.0.0.1") -> bool:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            line = await asyncio.wait_for(r.readline(), 1.0)
            w.close()
            return line.split(b" ")[1:2] == [b"200"]
        except (OSError, TimeoutError, IndexError):
            return False

    async def watch_readiness(self) -> None:
        """A replica is ready while its app runs and has accepted a connection since it
        (re)started; each change rewrites the derived mesh file."""
        while not self.stopping:
            changed = False
            for r in self.replicas:
                app = r.app
                alive = app is not None and app.proc is not None and \
                    app.proc.returncode is None
                proxy_alive = r.proxy is not None and r.proxy.proc is not None and \
                    r.proxy.proc.returncode is None
                if r.ready and not (alive and proxy_alive):
                    r.ready = False
                    changed = True
                elif not r.ready and alive and proxy_alive and r.app_port is not None \
                        and await self._accepts(r.app_port, r.pod):
                    r.ready = True
                    changed = True
                    if app is not None and app.restarts:
                        self.say(r.name, app.color, "back in the endpoints")
            if changed:
                self.sync_mesh()
            await asyncio.sleep(0.25)

    async def watch_mesh_file(self) -> None:
        """Your mesh file: edits checked and applied (not `run` changes)."""
        def stamp() -> tuple[int, int] | None:
            try:
                st = self.mesh_path.stat()
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_size)

        self._mesh_stamp = stamp()
        while not self.stopping:
            await asyncio.sleep(0.5)
            st = stamp()
            if st is None or st == self._mesh_stamp:
                continue
            self._mesh_stamp = st
            try:
                new = load_mesh_file(str(self.mesh_path))
            except MeshFileError as e:
                self.note(f"mesh file edit refused (the mesh keeps running as it was):\n"
                          f"{e}")
                continue
            if [(s.fqn, s.run, s.expose) for s in new.services] != \
                    [(s.fqn, s.run, s.expose) for s in self.mesh.services] or \
                    (new.trust_domain or "cluster.local") != self.td:
                self.note("mesh file changed `run`, `expose` or services with `run`: "
                          "restart `meshlet up` to apply those; applying the rest")
            self.mesh = new
            self.sync_mesh()
            self.note("mesh file edit applied")

    # --- state for stat / check -----------------------------------------------------

    def write_state(self) -> None:
        def pid(c: Child | None) -> int | None:
            return c.proc.pid if c is not None and c.proc is not None else None

        state = {
            "version": 1, "pid": os.getpid(), "mesh_file": str(self.mesh_path),
            "state_dir": str(self.state), "trust_domain": self.td,
            "netns": self.netns,
            "control": {"addr": f"{self.control_host}:{self.control_port}",
                        "anchors": str(self.control_dir / "ca" / "root.crt"),
                        "pid": pid(self.control)},
            "replicas": [{
                "service": r.service.name, "namespace": r.service.namespace,
                "replica": r.index, "identity": r.identity,
                "app_addr": f"127.0.0.1:{r.app_port}" if r.app_port else None,
                "inbound": f"{r.ip}:{r.inbound_port}" if r.inbound_port else None,
                "admin": f"{r.ip}:{r.admin_port}",
                "http_proxy": f"127.0.0.1:{r.http_proxy_port}" if r.pod is None else None,
                "netns": None if r.pod is None else "mshl-" + r.pod, "ip": r.ip,
                "tcp": {k: f"127.0.0.1:{v}" for k, v in r.tcp.items()},
                "app_pid": pid(r.app), "proxy_pid": pid(r.proxy)} for r in self.replicas],
            "ingress": [{"service": g.service.name, "listen": f"127.0.0.1:{g.listen}",
                         "admin": f"127.0.0.1:{g.admin_port}", "proxy_pid": pid(g.proxy)}
                        for g in self.ingresses],
        }
        _write_atomic(self.state / "up.json", json.dumps(state, indent=2).encode())

    def table(self) -> str:
        if self.netns:
            rows = [("SERVICE", "REPLICA", "IDENTITY", "POD", "ADDRESS", "ADMIN", "READY")]
            for r in self.replicas:
                rows.append((r.service.fqn, str(r.index), r.identity, f"mshl-{r.pod}",
                             f"{r.ip}:{r.app_port}" if r.app_port else r.ip,
                             f"{r.ip}:{r.admin_port}",
                             "yes" if r.ready or not r.app_port else "no"))
        else:
            rows = [("SERVICE", "REPLICA", "IDENTITY", "APP", "SIDECAR", "ADMIN", "READY")]
            for r in self.replicas:
                rows.append((r.service.fqn, str(r.index), r.identity,
                             f"127.0.0.1:{r.app_port}" if r.app_port else "-",
                             f"127.0.0.1:{r.inbound_port}" if r.inbound_port else "(client)",
                             f"127.0.0.1:{r.admin_port}", "yes" if r.ready or not r.app_port
                             else "no"))
        for s in self.mesh.services:
            if s.run is None:
                eps = len([w for w in s.workloads if w.ready])
                rows.append((s.fqn, "-", s.identity(self.td) or "(unmeshed)",
                             f"{eps} workload(s)", "-", "-", "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in rows]
        for g in self.ingresses:
            lines.append(f"-> {g.service.name}: http://127.0.0.1:{g.listen}/  "
                         f"(ingress sidecar, mTLS inside the mesh)")
        for fqn, vip in self.vips.items():
            lines.append(f"   {fqn} = {vip} (virtual address; pods resolve the name to it)")
        return "\n".join(lines)

    # --- the whole run --------------------------------------------------------------

    async def wait_for(self, what: str, check: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            if self.stop_event.is_set():
                raise UpError("interrupted")
            if time.monotonic() > deadline:
                raise UpError(f"{what} not up after {timeout:.0f}s (see its log above)")
            await asyncio.sleep(0.1)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop_event.set)
        self.state.mkdir(parents=True, exist_ok=True)
        self.tokens.mkdir(mode=0o700, exist_ok=True)
        self.plan()
        if self.network is not None:
            from meshlet.netfilter.pods import PodError

            try:
                self.make_pods()
            except PodError as e:
                self.note(f"error: {e}")
                self.remove_pods()
                return 1
        self.control_port = free_port(self.control_host)
        self.sync_mesh()
        self.make_children()
        self.note(f"mesh {self.mesh_path} (trust domain {self.td}); state in {self.state}")
        try:
            assert self.control is not None
            await self.start(self.control)
            root = self.control_dir / "ca" / "root.crt"

            async def control_up() -> bool:
                return root.exists() and await self._accepts(self.control_port, None,
                                                             self.control_host)

            await self.wait_for("the control plane", control_up, 30)
            # --netns: the rules first (like an init container), so the sidecar's own
            # connections are born under them; nothing else runs in the pod yet.
            for r in self.replicas:
                if r.pod is not None:
                    await self.intercept(r)
            proxies = [c for c in self.children if c.kind == "proxy"]
            for c in proxies:
                await self.start(c)
            for r in self.replicas:
                await self.wait_for(f"{r.name}'s sidecar",
                                    lambda r=r: self._http_ok(r.admin_port, "/ready", r.ip),
                                    30)
            for r in self.replicas:
                assert r.app is not None
                await self.start(r.app)
            self.write_state()
            tasks = [loop.create_task(self.watch_readiness()),
                     loop.create_task(self.watch_mesh_file())]
            with contextlib.suppress(UpError):
                await self.wait_for("the apps", self._all_ready, 15)
            self.sync_mesh()
            print(self.table(), flush=True)
            self.note("mesh up; `meshlet stat` and `meshlet check` in another shell; "
                      "Ctrl-C stops")
            await self.stop_event.wait()
            for t in tasks:
                t.cancel()
        except UpError as e:
            self.note(f"error: {e}")
            await self.shutdown()
            return 1
        await self.shutdown()
        return 0

    # --- pods (--netns) -------------------------------------------------------------

    def make_pods(self) -> None:
        from meshlet.netfilter.pods import PodError, busy_pods, cleanup

        assert self.network is not None
        busy = busy_pods()
        if busy:
            raise PodError(f"pods of another `meshlet up --netns` are running "
                           f"({', '.join(busy)}): stop it, or `meshlet down --netns`")
        gone = cleanup()  # what a crashed `up` left
        if gone:
            self.note(f"removed leftovers of an earlier run: {', '.join(gone)}")
        self.network.create_bridge()
        names: list[tuple[str, list[str]]] = []
        for s in self.mesh.services:
            vip = self.vips.get(s.fqn)
            if vip is not None:
                names.append((vip, [s.name, s.fqn, f"{s.fqn}.svc",
                                    f"{s.fqn}.svc.cluster.local"]))
        names += [(r.ip, [r.name]) for r in self.replicas]
        for r in self.replicas:
            assert r.pod is not None
            self.network.add_pod(r.pod, r.ip, [x for x in names if x[0] != r.ip])
        self.note(f"pods on bridge mshlbr0 ({self.network.net}, host side "
                  f"{self.network.gateway}): {len(self.replicas)}")

    async def intercept(self, r: Replica) -> None:
        """`meshlet init` in the replica's pod, before its sidecar and app start.
        Connections opened in a network namespace before its first nat rule existed
        stall once the rules come (seen: the sidecar's control-plane watches went
        silent), so the rules come first; the app starts only once the sidecar is
        ready, so nothing reaches the app around it, and until then connections to
        the pod are refused, not lost."""
        argv = [sys.executable, "-m", "meshlet", "init", "--netns", f"mshl-{r.pod}",
                "--proxy-gid", str(PROXY_GID), "--inbound-port", str(INBOUND_PORT),
                "--outbound-port", str(OUTBOUND_PORT),
                "--skip-inbound-ports", str(ADMIN_PORT)]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise UpError(f"meshlet init in mshl-{r.pod} failed:\n"
                          f"{out.decode(errors='replace').strip()}")

    def remove_pods(self) -> None:
        from meshlet.netfilter.pods import cleanup

        gone = cleanup()
        self.note(f"pods removed ({len([g for g in gone if g.startswith('netns')])})")

    async def _all_ready(self) -> bool:
        return all(r.ready for r in self.replicas if r.app_port is not None)

    async def shutdown(self) -> None:
        self.stopping = True
        self.note("stopping: apps, then sidecars, then the control plane")
        for kind, grace, what in (("app", STOP_APPS, "apps"),
                                  ("proxy", STOP_PROXIES, "sidecars"),
                                  ("control", STOP_APPS, "control plane")):
            group = [c for c in self.children if c.kind == kind]
            await self._stop(group, grace)
            self.note(f"{what} stopped ({len(group)})")
        with contextlib.suppress(OSError):
            (self.state / "up.json").unlink()
        if self.network is not None:
            self.remove_pods()
        shutil.rmtree(self.tokens, ignore_errors=True)
        self.note("stopped")

    async def _stop(self, group: list[Child], grace: float) -> None:
        live = [c for c in group if c.proc is not None and c.proc.returncode is None]
        for c in live:
            c.stopping = True
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for c in live:
            assert c.proc is not None
            try:
                await asyncio.wait_for(c.proc.wait(), grace)
            except TimeoutError:
                self.say(c.label, c.color, f"did not stop in {grace:.0f}s: killed")
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
            if c.pump is not None:
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(c.pump, 2.0)


class UpError(Exception):
    pass


def run_down(state_dir: str) -> int:
    """`meshlet down --netns`: stop a running `up` of `state_dir` (if any), then remove
    every pod, link and hosts file meshlet made (what a crash left behind)."""
    if os.geteuid() != 0:
        print("meshlet down --netns: needs root", file=sys.stderr)
        return 1
    from meshlet.netfilter.pods import cleanup

    state_file = Path(state_dir) / "up.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads(state_file.read_text())["pid"])
        os.kill(pid, signal.SIGTERM)
        print(f"stopping meshlet up (pid {pid})")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
    gone = cleanup()
    print("removed: " + ", ".join(gone) if gone else "nothing to remove")
    return 0


def run_up(mesh_file: str, state_dir: str, color: bool | None, proxy_log_level: str,
           netns: bool = False) -> int:
    path = Path(mesh_file).resolve()
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    if netns:
        if os.geteuid() != 0:
            print("meshlet up --netns: needs root (it makes network namespaces, a bridge "
                  "and iptables rules); without --netns nothing needs root",
                  file=sys.stderr)
            return 1
        missing = [t for t in ("ip", "iptables") if shutil.which(t) is None]
        if missing:
            print(f"meshlet up --netns: {' and '.join(missing)} not found (Debian: apt-get "
                  f"install iproute2 iptables)", file=sys.stderr)
            return 1
    try:
        up = Up(path, Path(state_dir).resolve(), color, proxy_log_level, netns)
    except MeshFileError as e:
        print(f"meshlet up: invalid mesh file:\n{e}", file=sys.stderr)
        return 64
    state_file = up.state / "up.json"
    if state_file.exists():
        try:
            other = json.loads(state_file.read_text())["pid"]
            os.kill(int(other), 0)
            print(f"meshlet up: another `meshlet up` (pid {other}) uses {up.state}; stop it "
                  f"or pass --state-dir", file=sys.stderr)
            return 1
        except (OSError, ValueError, KeyError):
            pass  # stale
    try:
        return asyncio.run(up.run())
    except UpError as e:
        print(f"meshlet up: {e}", file=sys.stderr)
        return 1
