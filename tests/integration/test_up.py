"""`meshlet up` end to end: the bundled example's apps, real sidecars, a real control
plane; balancing across replicas, mTLS and policy, a killed replica leaving and rejoining
the endpoints, a refused mesh-file edit, and an ordered stop."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import UpProcess, eventually, free_port, http_request, metric, parse_metrics

ROOT = Path(__file__).resolve().parents[2]
SHOP = ROOT / "examples" / "shop"


def mesh_text(expose: int) -> str:
    return f"""\
trust_domain: shop.test
services:
  - name: frontend
    ports: [8080]
    expose: {expose}
    run: {{command: "python {SHOP}/frontend.py"}}
  - name: catalog
    ports: [8080]
    policy:
      default: deny
      rules:
        - name: frontend
          identities: ["spiffe://shop.test/ns/default/sa/frontend"]
    run: {{command: "python {SHOP}/catalog.py"}}
  - name: reviews
    ports: [8080]
    policy: {{default: all-authenticated}}
    run:
      command: python {SHOP}/reviews.py
      replicas: 2
"""


def get(port: int, path: str = "/") -> tuple[int, Any]:
    r = http_request(port, path=path, timeout=10)
    return r.status, (json.loads(r.body) if r.status == 200 else r.body)


@pytest.mark.timeout(120)
def test_meshlet_up_example(tmp_path: Path) -> None:
    expose = free_port()
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(expose))
    state = tmp_path / "state"
    up = UpProcess(mesh, state)
    try:
        up.wait_line("mesh up;", timeout=60)
        out = up.text()
        # The table: every replica with its identity.
        for svc in ("frontend", "catalog", "reviews"):
            assert f"spiffe://shop.test/ns/default/sa/{svc}" in out
        assert f"http://127.0.0.1:{expose}/" in out
        info = json.loads((state / "up.json").read_text())
        reps = {(r["service"], r["replica"]): r for r in info["replicas"]}
        assert set(reps) == {("frontend", 0), ("catalog", 0), ("reviews", 0), ("reviews", 1)}

        # Through the ingress: the frontend calls both backends by name; requests to
        # reviews are balanced over its two replicas.
        seen = set()
        for _ in range(20):
            status, body = get(expose)
            assert status == 200, body
            assert body["catalog"]["served_by"] == "catalog-0"
            seen.add(body["reviews"]["served_by"])
        assert seen == {"reviews-0", "reviews-1"}

        # mTLS: reviews' sidecars saw the frontend's identity, over TLS.
        admin = int(reps[("reviews", 0)]["admin"].rpartition(":")[2])
        m = parse_metrics(http_request(admin, path="/metrics").body.decode())
        assert metric(m, "request_total", direction="inbound", tls="true",
                      client_id="spiffe://shop.test/ns/default/sa/frontend") > 0
        # Policy: plaintext straight to catalog's sidecar is refused.
        cat_in = int(reps[("catalog", 0)]["inbound"].rpartition(":")[2])
        assert http_request(cat_in, path="/items").status == 403

        # A replica killed: out of the endpoints, traffic goes on; restarted: back in.
        fe_admin = int(reps[("frontend", 0)]["admin"].rpartition(":")[2])

        def n_reviews() -> int:
            cfg = http_request(fe_admin, path="/config").json()
            d = cfg["discovery"]["destinations"].get("reviews:8080")
            return len(d["endpoints"]) if d else -1

        assert n_reviews() == 2
        os.kill(reps[("reviews", 1)]["app_pid"], signal.SIGKILL)
        eventually(lambda: n_reviews() == 1, timeout=5, interval=0.05)
        for _ in range(10):
            status, body = get(expose)
            assert status == 200 and body["reviews"]["served_by"] == "reviews-0", body
        up.wait_line("reviews-1", timeout=5)
        eventually(lambda: n_reviews() == 2, timeout=15, interval=0.1)
        up.wait_line("back in the endpoints")

        # A corrupt edit of the mesh file: refused with its line; the mesh keeps running.
        mesh.write_text(mesh_text(expose).replace("replicas: 2", "replicas: many"))
        up.wait_line("mesh file edit refused", timeout=5)
        assert f"{mesh}:20: services[2].run.replicas: expected an integer" in up.text()
        assert get(expose)[0] == 200
    finally:
        rc = up.stop()
    assert rc == 0, up.text()
    out = up.text()
    order = [out.index(f"{what} stopped") for what in ("apps", "sidecars", "control plane")]
    assert order == sorted(order), out
    assert not (state / "up.json").exists()
    pids = [info["control"]["pid"]] + [r[k] for r in info["replicas"]
                                        for k in ("app_pid", "proxy_pid")]
    pids += [g["proxy_pid"] for g in info["ingress"]]

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    assert all(gone(p) for p in pids)


def test_up_refuses_a_bad_mesh_file(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - name: a\n    run: {command: ''}\n")
    r = subprocess.run([sys.executable, "-m", "meshlet", "up", str(mesh), "--state-dir",
                        str(tmp_path / "s")], capture_output=True, timeout=30)
    assert r.returncode == 64
    assert f"{mesh}:3: services[0].run.command: must not be empty" in r.stderr.decode()


ECHO = """\
import os, socket
srv = socket.create_server(("127.0.0.1", int(os.environ["PORT"])))
while True:
    c, _ = srv.accept()
    with c:
        while data := c.recv(65536):
            c.sendall(data)
"""

CLIENT = """\
import os, socket, time
addr = (os.environ["ECHO_SERVICE_HOST"], int(os.environ["ECHO_SERVICE_PORT"]))
while True:
    try:
        with socket.create_connection(addr, timeout=5) as s:
            s.sendall(b"ping over tcp")
            print("got:", s.recv(100).decode(), flush=True)
    except OSError as e:
        print("error:", e, flush=True)
    time.sleep(0.5)
"""


@pytest.mark.timeout(90)
def test_up_opaque_tcp_service(tmp_path: Path) -> None:
    (tmp_path / "echo.py").write_text(ECHO)
    (tmp_path / "client.py").write_text(CLIENT)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n"
                    "  - name: echo\n    ports: [{port: 7000, protocol: opaque}]\n"
                    "    policy: {default: all-authenticated}\n"
                    "    run: {command: python echo.py}\n"
                    "  - name: client\n    run: {command: python client.py}\n")
    state = tmp_path / "state"
    up = UpProcess(mesh, state)
    try:
        up.wait_line("got: ping over tcp", timeout=60)
        info = json.loads((state / "up.json").read_text())
        echo = next(r for r in info["replicas"] if r["service"] == "echo")
        admin = int(echo["admin"].rpartition(":")[2])
        m = parse_metrics(http_request(admin, path="/metrics").body.decode())
        # Opaque TCP over mTLS, with the client's identity.
        assert metric(m, "tcp_open_total", direction="inbound", peer="src", tls="true",
                      client_id="spiffe://cluster.local/ns/default/sa/client") > 0
    finally:
        rc = up.stop()
    assert rc == 0, up.text()


@pytest.mark.timeout(120)
def test_grpc_example(tmp_path: Path) -> None:
    """examples/grpc as bundled: one gRPC channel from the caller, three greeter
    replicas; through the sidecars every call is balanced on its own, over mTLS."""
    pytest.importorskip("grpc")
    up = UpProcess(ROOT / "examples" / "grpc" / "mesh.yaml", tmp_path / "state")
    try:
        up.wait_line("caller: hello call 1 from greeter-", timeout=60)
        first = next(x for x in up.lines if "caller: hello call 1" in x)
        # The greeter saw the caller's verified identity.
        assert "(caller: spiffe://grpc.local/ns/default/sa/caller)" in first
        up.wait_line("answered by:", timeout=30)
        line = next(x for x in up.lines if "answered by:" in x)
        counts = ast.literal_eval(line.split("answered by:", 1)[1].strip())
        assert not [k for k in counts if k.startswith("error")], line
        # One connection from the app, yet more than one replica answered.
        assert len([k for k in counts if k.startswith("greeter-")]) >= 2, line
        info = json.loads((tmp_path / "state" / "up.json").read_text())
        caller = next(r for r in info["replicas"] if r["service"] == "caller")
        admin = int(caller["admin"].rpartition(":")[2])
        m = parse_metrics(http_request(admin, path="/metrics").body.decode())
        assert metric(m, "response_total", direction="outbound", tls="true",
                      grpc_status="0") >= sum(counts.values())
    finally:
        rc = up.stop()
    assert rc == 0, up.text()
