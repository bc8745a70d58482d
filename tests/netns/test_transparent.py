"""Transparent interception between pods (network namespaces), as root.

Pods: A (a client app, sidecar, `meshlet init` rules), B (apps on 8080 HTTP, 9000
echo and 2525 banner, sidecar, rules), C (an app outside the mesh: no sidecar, no
rules). The control plane runs on the host, on the lab bridge. Apps dial plain
addresses; the sidecars add mTLS, identities and metrics without the apps knowing.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TD, eventually, proxy_env, start_control, write_mesh

from netns.netlab import PROXY_GID, Lab, Pod, can_run, capture, stop_capture, tcp_payloads

pytestmark = [pytest.mark.timeout(180)]

why_not = can_run()
if why_not:
    pytest.skip(why_not, allow_module_level=True)

APPS = str(Path(__file__).with_name("apps.py"))
MARKER = b"meshlet-plaintext-marker-7f3a"


class Mesh:
    def __init__(self, lab: Lab, a: Pod, b: Pod, c: Pod, vip: str, tmp: Path) -> None:
        self.lab, self.a, self.b, self.c, self.vip, self.tmp = lab, a, b, c, vip, tmp


def metrics(pod: Pod) -> str:
    with urllib.request.urlopen(f"http://{pod.ip}:4191/metrics", timeout=5) as r:
        return r.read().decode()  # type: ignore[no-any-return]


def counter_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def tls_records(data: bytes) -> int:
    """How many whole TLS records `data` is made of (0: it is not only TLS records)."""
    n = off = 0
    while off < len(data):
        if off + 5 > len(data) or data[off] not in (20, 21, 22, 23) \
                or data[off + 1] != 3:
            return 0
        off += 5 + int.from_bytes(data[off + 3:off + 5], "big")
        n += 1
    return n if off == len(data) else 0


def start_sidecar(pod: Pod, control: object, tmp: Path, account: str) -> None:
    env = proxy_env(control, tmp / account, account,  # type: ignore[arg-type]
                    MESHLET_TRANSPARENT="true",
                    MESHLET_INBOUND_LISTEN_ADDR="0.0.0.0:4143",
                    MESHLET_ADMIN_LISTEN_ADDR=f"{pod.ip}:4191",
                    MESHLET_OPAQUE_PORTS="9000,2525",
                    MESHLET_DETECT_TIMEOUT="5s")
    pod.start(sys.executable, "-m", "meshlet", "proxy", env=env, gid=PROXY_GID,
              log=tmp / f"proxy-{account}.log")

    def ready() -> bool:
        with urllib.request.urlopen(f"http://{pod.ip}:4191/ready", timeout=1) as r:
            return r.status == 200

    try:
        eventually(ready, timeout=20)
    except AssertionError:
        raise AssertionError((tmp / f"proxy-{account}.log").read_text()) from None


def curl(pod: Pod, url: str, *extra: str) -> tuple[int, str, str]:
    r = pod.run("curl", "-sS", "-g", "-m", "5", "-D", "-", url, *extra, check=False)
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", head)
    return (int(m.group(1)) if m else 0), head, body or r.stderr


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("pods")
    lab = Lab()
    try:
        a, b, c = lab.pod("a"), lab.pod("b"), lab.pod("c")
        vip = str(lab.net[200])
        mesh_file = tmp / "mesh.yaml"
        write_mesh(mesh_file, f"""
trust_domain: {TD}
services:
  - name: b
    address: {vip}
    ports: [8080, {{port: 9000, protocol: opaque}}, {{port: 2525, protocol: opaque}}]
    workloads: [{{address: {b.ip}}}]
    policy: {{default: all-authenticated}}
""")
        with contextlib.contextmanager(start_control)(
                tmp / "control", mesh_file=mesh_file, host=lab.gateway) as control:
            for p in (a, b):  # the documented order: rules, sidecar, apps
                p.init("--skip-inbound-ports", "4191")
            start_sidecar(a, control, tmp, "a")
            start_sidecar(b, control, tmp, "b")
            b.python(APPS, "http", "8080", "b")
            b.python(APPS, "echo", "9000")
            b.python(APPS, "banner", "2525")
            c.python(APPS, "http", "7000", "c", env={"BIND": "::"})
            c.python(APPS, "http", "7100", "c", env={"BIND": "::"})
            eventually(lambda: curl(a, f"http://{b.ip}:8080/")[0] == 200, timeout=15)
            yield Mesh(lab, a, b, c, vip, tmp)
    finally:
        lab.close()


def tcp_exchange(pod: Pod, host: str, port: int, send: bytes, want: int,
                 first_read: bool = False) -> tuple[bytes, float]:
    """Connect from inside `pod`; return what came back and the seconds to the first
    byte."""
    code = (
        "import socket,sys,time\n"
        f"s=socket.create_connection(({host!r},{port}),timeout=5)\n"
        "t=time.monotonic()\n"
        f"first={first_read!r}\n"
        "got=b''\n"
        "if first:\n"
        "    got=s.recv(100); dt=time.monotonic()-t\n"
        f"s.sendall({send!r})\n"
        f"while len(got)<{want}:\n"
        "    d=s.recv(65536)\n"
        "    if not d: break\n"
        "    got+=d\n"
        "if not first: dt=time.monotonic()-t\n"
        "sys.stdout.write(repr((got,dt)))\n")
    r = pod.run(sys.executable, "-c", code)
    got, dt = ast.literal_eval(r.stdout)
    return got, dt


def test_pod_to_pod_by_ip_is_mtls_on_the_wire(mesh: Mesh) -> None:
    a, b = mesh.a, mesh.b
    pcap = mesh.tmp / "b.pcap"
    cap = capture(f"{mesh.lab.tag}v{mesh.lab.pods.index(b) + 2}", pcap)
    try:
        status, _h, body = curl(a, f"http://{b.ip}:8080/x", "-H", f"x-marker: {MARKER.decode()}")
        assert status == 200, body
        # B's app was told who called: the identity A's sidecar proved over mTLS.
        assert f"client=spiffe://{TD}/ns/default/sa/a" in body
        got, _ = tcp_exchange(a, b.ip, 9000, MARKER * 3, len(MARKER) * 3)
        assert got == MARKER * 3
        # By the service's address: the same, balanced over its workloads.
        status, _h, body = curl(a, f"http://{mesh.vip}:8080/")
        assert status == 200 and "hello from b" in body, body
    finally:
        stop_capture(cap)
    flows = tcp_payloads(pcap)
    to_b = {k: v for k, v in flows.items() if k[2] == b.ip and k[3] in (8080, 9000)}
    # Both ports (the HTTP requests share one pooled mTLS connection).
    assert {k[3] for k in to_b} == {8080, 9000}, flows.keys()
    for key, data in flows.items():
        assert MARKER not in data, f"plaintext on the wire in {key}"
        assert tls_records(data), f"{key} is not a sequence of TLS records"
    text = metrics(b)
    assert counter_sum(text, "request_total", direction="inbound",
                       client_id=f"spiffe://{TD}/ns/default/sa/a") >= 2
    assert counter_sum(text, "tcp_open_total", direction="inbound", tls="true",
                       client_id=f"spiffe://{TD}/ns/default/sa/a") >= 1
    # No connection came back into a proxy (the sidecars' own traffic is excluded).
    for p in (a, b):
        assert counter_sum(metrics(p), "tcp_no_destination_total") == 0


def test_server_speaks_first_on_an_opaque_port_has_no_delay(mesh: Mesh) -> None:
    got, dt = tcp_exchange(mesh.a, mesh.b.ip, 2525, b"ping\r\n", 17, first_read=True)
    assert got == b"220 ready\r\nping\r\n", got
    assert dt < 1.0, f"banner after {dt:.2f}s: detection waited"


def test_destination_outside_the_mesh_passes_through_unmeshed(mesh: Mesh) -> None:
    a, c = mesh.a, mesh.c
    before = counter_sum(metrics(a), "tcp_open_total", direction="outbound")
    status, _h, body = curl(a, f"http://{c.ip}:7000/")
    assert status == 200 and "hello from c client=-" in body, body
    after = counter_sum(metrics(a), "tcp_open_total", direction="outbound")
    assert after > before  # it went through A's sidecar (plaintext: C has none)


def test_skip_ports_and_subnets_bypass_the_proxy(mesh: Mesh) -> None:
    a, c = mesh.a, mesh.c

    def outbound() -> float:
        return counter_sum(metrics(a), "tcp_open_total", direction="outbound")

    try:
        a.init("--skip-inbound-ports", "4191", "--skip-outbound-ports", "7000")
        n = outbound()
        assert curl(a, f"http://{c.ip}:7000/")[0] == 200
        assert outbound() == n  # port 7000 bypassed the sidecar
        assert curl(a, f"http://{c.ip}:7100/")[0] == 200
        assert outbound() > n  # other ports still intercepted
        a.init("--skip-inbound-ports", "4191", "--skip-subnets", f"{c.ip}/32")
        n = outbound()
        assert curl(a, f"http://{c.ip}:7100/")[0] == 200
        assert outbound() == n  # the subnet bypassed the sidecar
        # The proxy's own traffic by uid: a process of that uid is not redirected.
        a.init("--skip-inbound-ports", "4191", "--proxy-uid", "2103")
        n = outbound()
        r = a.run("setpriv", "--reuid", "2103", "--regid", "2103", "--clear-groups",
                  "curl", "-sS", "-m", "5", f"http://{c.ip}:7100/")
        assert "hello from c" in r.stdout
        assert outbound() == n
        assert curl(a, f"http://{c.ip}:7100/")[0] == 200
        assert outbound() > n  # root's connections still go through the sidecar
    finally:
        a.init("--skip-inbound-ports", "4191")


def test_ipv6_is_intercepted_on_both_sides(mesh: Mesh) -> None:
    a, b, c = mesh.a, mesh.b, mesh.c
    n = counter_sum(metrics(a), "tcp_open_total", direction="outbound")
    status, _h, body = curl(a, f"http://[{c.ip6}]:7000/")
    assert status == 200 and "hello from c" in body, body
    assert counter_sum(metrics(a), "tcp_open_total", direction="outbound") > n
    # To B over IPv6: the mesh file knows B by its IPv4 address only, so A's sidecar
    # sends it unmeshed; B's sidecar intercepts it and its policy refuses plaintext.
    status, head, body = curl(a, f"http://[{b.ip6}]:8080/")
    assert status == 403, (head, body)
    assert "meshlet-proxy-error: unauthorized" in head.lower()


def test_config_view_says_transparent(mesh: Mesh) -> None:
    with urllib.request.urlopen(f"http://{mesh.a.ip}:4191/config", timeout=5) as r:
        cfg = json.loads(r.read())
    assert cfg["config"]["transparent"] is True
    listens = {x["listen"] for x in cfg["listeners"]}
    assert "127.0.0.1:4140" in listens and "0.0.0.0:4143" in listens
    with socket.create_connection((mesh.a.ip, 4191), timeout=5):
        pass  # the admin port is skipped by the rules: reachable from the host


def meshlet_check(ns: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "meshlet", "check", "--netns", ns],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr


def test_check_finds_rules_without_a_proxy_and_a_proxy_without_rules(mesh: Mesh) -> None:
    # Rules, no proxy: nothing is black-holed silently (refused at once), and check says
    # why.
    d = mesh.lab.pod("d")
    d.init()
    t0 = time.monotonic()
    r = d.run(sys.executable, "-c", f"import socket; socket.create_connection(("
              f"{mesh.c.ip!r}, 7000), timeout=5)", check=False)
    assert "ConnectionRefusedError" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 3
    rc, out = meshlet_check(d.name)
    assert rc == 1 and "nothing listens there" in out, out
    # A transparent proxy, no rules: bypassed; check says so.
    e = mesh.lab.pod("e")
    with contextlib.contextmanager(start_control)(
            mesh.tmp / "control-e", host=mesh.lab.gateway) as control:
        start_sidecar(e, control, mesh.tmp, "e")
        rc, out = meshlet_check(e.name)
        assert rc == 1 and "the transparent proxy is bypassed" in out, out
        e.init("--skip-inbound-ports", "4191")
        rc, out = meshlet_check(e.name)
        assert rc == 0 and "redirect to the proxy's ports 4143 and 4140" in out, out
    rc, out = meshlet_check(mesh.a.name)
    assert rc == 0, out
