"""`meshlet stat` and `meshlet check` against real processes: a control plane, a meshed
server sidecar (web) and a client sidecar, described by an up.json as `meshlet up`
writes it; the CLI runs as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    TD,
    Control,
    HttpBackend,
    ProxyProcess,
    eventually,
    free_port,
    http_request,
    proxy_env,
    start_control,
)

OK, BAD = "\u2714", "\u2718"
WEB_ID = f"spiffe://{TD}/ns/default/sa/web"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mesh_text(web_addr: str) -> str:
    return ("services:\n"
            "  - name: web\n    ports: [80]\n"
            f"    workloads:\n      - address: {web_addr}\n"
            "  - name: client\n"
            "  - name: db\n    ports: [5432]\n")


def replica(service: str, proxy: ProxyProcess, app_port: int | None, app_pid: int | None
            ) -> dict[str, Any]:
    return {"service": service, "namespace": "default", "replica": 0,
            "identity": f"spiffe://{TD}/ns/default/sa/{service}",
            "app_addr": f"127.0.0.1:{app_port}" if app_port else None,
            "inbound": f"127.0.0.1:{proxy.inbound_port}" if proxy.inbound_port else None,
            "admin": f"127.0.0.1:{proxy.admin_port}",
            "http_proxy": f"127.0.0.1:{free_port()}",
            "app_pid": app_pid, "proxy_pid": proxy.pid}


def write_state(state_dir: Path, control: Control, mesh_file: Path,
                replicas: list[dict[str, Any]], ingress: list[dict[str, Any]] | None = None
                ) -> str:
    state_dir.mkdir(parents=True, exist_ok=True)
    doc = {"version": 1, "pid": os.getpid(), "mesh_file": str(mesh_file),
           "state_dir": str(state_dir), "trust_domain": TD,
           "control": {"addr": f"127.0.0.1:{control.port}",
                       "anchors": str(control.state / "ca" / "root.crt"),
                       "pid": control.proc.pid},
           "replicas": replicas, "ingress": ingress or []}
    write_atomic(state_dir / "up.json", json.dumps(doc, indent=2))
    return str(state_dir)


def meshlet(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    return subprocess.run([sys.executable, "-m", "meshlet", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@dataclass
class Mesh:
    control: Control
    mesh_file: Path
    web: ProxyProcess  # web's sidecar, in front of `backend`
    client: ProxyProcess  # a client-only sidecar: outbound listener for web:80
    backend: HttpBackend
    state_dir: str
    tmp: Path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("statcheck")
    mesh_file = tmp / "mesh.yaml"
    write_atomic(mesh_file, mesh_text("127.0.0.1:1"))
    gen = start_control(tmp / "control", mesh_file=mesh_file)
    control = next(gen)
    try:
        with contextlib.ExitStack() as stack:
            backend = stack.enter_context(HttpBackend(record=False))
            web = stack.enter_context(ProxyProcess(
                app=backend.port, ready_timeout=15, env=proxy_env(control, tmp / "w", "web")))
            write_atomic(mesh_file, mesh_text(f"127.0.0.1:{web.inbound_port}"))
            client = stack.enter_context(ProxyProcess(
                outbound={"web:80": ""}, ready_timeout=15,
                env=proxy_env(control, tmp / "c", "client")))
            state = write_state(tmp / "up", control, mesh_file, [
                replica("web", web, backend.port, os.getpid()),
                replica("client", client, None, os.getpid())])
            # Discovery has answered for web:80 before any test looks.
            eventually(lambda: http_request(client.outbound["web:80"]).status == 200,
                       timeout=5)
            yield Mesh(control, mesh_file, web, client, backend, state, tmp)
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)


@contextlib.contextmanager
def traffic(port: int, paths: tuple[str, ...] = ("/t",)) -> Iterator[list[int]]:
    """Requests to `port` back to back until the block ends; yields the statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def run() -> None:
        i = 0
        while not stop.is_set():
            with contextlib.suppress(OSError, EOFError):
                statuses.append(http_request(port, path=paths[i % len(paths)],
                                             timeout=5).status)
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        eventually(lambda: len(statuses) >= 5, timeout=5)
        yield statuses
    finally:
        stop.set()
        t.join(10)


def rows_by_key(doc: dict[str, Any]) -> dict[tuple[str, str, str | None], dict[str, Any]]:
    return {(r["service"], r["direction"], r["peer"]): r for r in doc["rows"]}


# --- stat ---------------------------------------------------------------------------------


def test_stat_meshed_pair(mesh: Mesh) -> None:
    with traffic(mesh.client.outbound["web:80"]) as statuses:
        r = meshlet("stat", "--state-dir", mesh.state_dir, "--window", "1", "--json")
        sent = len(statuses)
        table = meshlet("stat", "--state-dir", mesh.state_dir, "--window", "0.5")
    assert r.returncode == 0, r.stderr
    assert set(statuses) == {200}
    doc = json.loads(r.stdout)
    assert doc["warnings"] == []
    rows = rows_by_key(doc)
    out = rows[("client", "outbound", "web:80")]
    inb = rows[("web", "inbound", None)]
    for row in (out, inb):
        assert row["rps"] > 0, row
        assert 0 < row["requests"] <= sent, row
        assert row["success_pct"] == 100.0, row
        assert row["tls_pct"] == 100.0, row  # mTLS between the two sidecars
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] < 1000, row
        assert row["proxies"] == 1
    # Both ends saw (nearly) the same requests over the same window.
    assert abs(out["requests"] - inb["requests"]) <= max(3, out["requests"] * 0.2), (out, inb)
    # The client serves nothing: no inbound row; web calls nothing: no outbound row.
    assert ("client", "inbound", None) not in rows
    assert not [k for k in rows if k[:2] == ("web", "outbound")]

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "DIRECTION", "PEER", "SUCCESS", "RPS", "P50",
                                "P95", "P99", "TLS"]
    cells = {tuple(ln.split()[:3]): ln.split() for ln in lines[1:]}
    for key in (("client", "outbound", "web:80"), ("web", "inbound", "-")):
        c = cells[key]
        assert c[3] == "100.00%" and c[8] == "100.00%", lines
        assert float(c[4]) > 0 and all(x.endswith("ms") for x in c[5:8]), lines


def test_stat_by_admin_address_failures_and_unreachable(mesh: Mesh) -> None:
    dead = f"127.0.0.1:{free_port()}"
    web_admin = f"127.0.0.1:{mesh.web.admin_port}"
    # Half the requests reach an app that resets the connection: 502, a failure.
    with traffic(mesh.client.outbound["web:80"], ("/ok", "/reset")) as statuses:
        r = meshlet("stat", "--admin", f"{web_admin},{dead}", "--window", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert set(statuses) == {200, 502}
    doc = json.loads(r.stdout)
    row = rows_by_key(doc)[(web_admin, "inbound", None)]  # labelled by the address
    assert 25 <= row["success_pct"] <= 75, row
    assert row["rps"] > 0 and row["tls_pct"] == 100.0
    assert len(doc["warnings"]) == 1
    assert doc["warnings"][0].startswith(f"{dead} (admin {dead}): unreachable: "
                                         "connection refused"), doc
    # The table keeps the rows and lists the unreachable endpoint below them.
    r = meshlet("stat", "--admin", f"{dead},{web_admin}", "--window", "0.2")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("SERVICE") and lines[1].startswith(web_admin)
    assert lines[-1].startswith(f"warning: {dead} (admin {dead}): unreachable"), lines
    # Nothing reachable: exit 1, still no traceback.
    r = meshlet("stat", "--admin", dead, "--window", "0.1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unreachable" in r.stdout


def test_stat_watch_refreshes_until_ctrl_c(mesh: Mesh) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    p = subprocess.Popen([sys.executable, "-m", "meshlet", "stat", "--state-dir",
                          mesh.state_dir, "--window", "0.2", "--watch"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        eventually(lambda: sum(ln.startswith("SERVICE") for ln in lines) >= 3, timeout=10)
        p.send_signal(signal.SIGINT)
        assert p.wait(5) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        t.join(5)
    assert p.stderr is not None
    assert "Traceback" not in p.stderr.read()
    assert any(ln.startswith("web") and "inbound" in ln for ln in lines)


# --- check --------------------------------------------------------------------------------


def test_check_all_healthy(mesh: Mesh) -> None:
    r = meshlet("check", "--state-dir", mesh.state_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert BAD not in out, out
    assert f"{OK} up, TLS verified against {mesh.control.state / 'ca' / 'root.crt'}" in out
    assert f"{OK} {mesh.mesh_file} in force" in out
    assert out.count(f"{OK} ready") == 2
    assert out.count(f"{OK} live") == 2
    assert f"{OK} certified as {WEB_ID} until " in out
    assert f"{OK} certified as {CLIENT_ID} until " in out
    assert out.count(f"{OK} discovery in sync") == 2
    assert f"{OK} proxy process {mesh.web.pid} is running" in out
    assert f"{OK} meshlet up process {os.getpid()} is running" in out
    assert out.rstrip().splitlines()[-1].startswith(f"{OK} all ")


def test_check_reports_a_refused_mesh_file_edit(mesh: Mesh) -> None:
    good = mesh.mesh_file.read_text()
    write_atomic(mesh.mesh_file, "services:\n  - name: web\n    ports: [80]\n"
                                 "    workloads:\n      - address: 127.0.0.1:99999\n")
    try:
        r = eventually(lambda: (lambda r: r if r.returncode == 1 else None)(
            meshlet("check", "--state-dir", mesh.state_dir)), timeout=10)
        assert (f"{BAD} the last edit of {mesh.mesh_file} was refused; the last good mesh "
                "stays in force:") in r.stdout, r.stdout
        assert f"{mesh.mesh_file}:5: services[0].workloads[0].address" in r.stdout
        assert r.stdout.count(BAD) == 2, r.stdout  # that line, and the summary
    finally:
        write_atomic(mesh.mesh_file, good)
    eventually(lambda: meshlet("check", "--state-dir", mesh.state_dir).returncode == 0,
               timeout=10)


def test_check_dead_app_dead_pid_and_unreachable_admin(mesh: Mesh) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    app = HttpBackend(record=False)
    with ProxyProcess(app=app.port, ready_timeout=15,
                      env=proxy_env(mesh.control, mesh.tmp / "d", "db")) as db:
        state = write_state(mesh.tmp / "up-db", mesh.control, mesh.mesh_file, [
            replica("web", mesh.web, mesh.backend.port, os.getpid()),
            replica("db", db, app.port, dead.pid)],
            ingress=[{"service": "web", "listen": f"127.0.0.1:{free_port()}",
                      "admin": f"127.0.0.1:{free_port()}", "proxy_pid": dead.pid}])
        r = meshlet("check", "--state-dir", state)
        assert r.returncode == 1, r.stdout  # the ingress is down
        assert "app 127.0.0.1" not in r.stdout
        app.close()  # the db app dies; its sidecar notices on the next request
        assert db.inbound_port is not None
        assert http_request(db.inbound_port, path="/").status == 502
        r = meshlet("check", "--state-dir", state)
        assert r.returncode == 1
        out = r.stdout
        assert (f"{BAD} not ready: app 127.0.0.1:{app.port} unreachable: connection refused"
                in out), out
        assert f"{BAD} app process {dead.pid} is not running" in out
        ingress = out[out.index("ingress for web"):]
        assert f"{BAD} proxy process {dead.pid} is not running" in ingress
        assert f"{BAD} admin 127.0.0.1:" in ingress and "connection refused" in ingress
        # The healthy ones still pass; db's sidecar itself is live and certified.
        assert out.count(f"{OK} ready") == 1
        db_part = out[out.index("db replica 0"):out.index("ingress for web")]
        assert f"{OK} live" in db_part and f"{OK} certified as spiffe://{TD}/ns/default/sa/db" \
            in db_part
        assert out.rstrip().splitlines()[-1].startswith(f"{BAD} 4 problem(s)"), out


def test_check_without_state_file(tmp_path: Path) -> None:
    r = meshlet("check", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert f"no state file at {tmp_path / 'up.json'}" in r.stderr
