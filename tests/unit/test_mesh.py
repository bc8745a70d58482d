"""The mesh file parser and the control plane's watch fan-out (pure, no I/O)."""

from __future__ import annotations

import json

import pytest

from meshlet.api.events import parse_event
from meshlet.api.mesh import MeshFileError, parse_mesh_yaml
from meshlet.control.discovery import Discovery, Subscriber

P = "mesh.yaml"
GOOD = """\
trust_domain: demo.local
services:
  - name: web
    ports: [8080, {port: 9000, protocol: opaque}]
    opaque_ports: [6379]
    workloads:
      - address: 127.0.0.1:41001
      - address: 10.0.0.7
        weight: 2
      - address: 10.0.0.8
        ready: false
    policy:
      default: all-authenticated
      rules:
        - name: fe
          identities: ["spiffe://demo.local/ns/default/sa/frontend"]
    run:
      command: python app.py --port 1
      env: {GREETING: hi}
      replicas: 2
    expose: 8080
  - name: db
    namespace: data
    account: postgres
    meshed: false
    ports: [5432]
    workloads: [{address: "[::1]:5432"}]
  - name: loadgen
"""


def errors(text: str) -> list[str]:
    with pytest.raises(MeshFileError) as ei:
        parse_mesh_yaml(text, P)
    return ei.value.errors


def test_valid_mesh() -> None:
    m = parse_mesh_yaml(GOOD, P)
    web = m.lookup("web")
    assert web is not None and web is m.lookup("web.default.svc.cluster.local")
    assert web is m.lookup("WEB.default")
    assert [(p.port, p.protocol) for p in web.ports] == [
        (8080, "detect"), (9000, "opaque"), (6379, "opaque")]
    assert web.identity("demo.local") == "spiffe://demo.local/ns/default/sa/web"
    assert web.policy.default == "all-authenticated" and web.policy.rules[0].name == "fe"
    assert web.run is not None and web.run.command == ("python", "app.py", "--port", "1")
    assert web.run.replicas == 2 and dict(web.run.env) == {"GREETING": "hi"}
    assert web.expose == 8080 and web.line == 3
    es = m.endpoint_set("web", 8080, "td")
    assert es is not None and es.service == "web.default:8080" and not es.opaque
    # HOST:PORT workloads keep their port; HOST ones get the service port; not-ready
    # ones are left out; the identity comes from namespace and account.
    assert [(e.host, e.port, e.weight) for e in es.endpoints] == [
        ("127.0.0.1", 41001, 1), ("10.0.0.7", 8080, 2)]
    assert {e.identity for e in es.endpoints} == {"spiffe://demo.local/ns/default/sa/web"}
    assert m.endpoint_set("web", 9000, "td").opaque  # type: ignore[union-attr]
    assert m.endpoint_set("web", 1234, "td") is None
    assert m.endpoint_set("nope", 80, "td") is None
    db = m.endpoint_set("db.data", 5432, "td")
    assert db is not None and db.endpoints[0].identity is None
    assert db.endpoints[0].addr == "[::1]:5432"
    assert m.lookup("loadgen") is not None  # a client-only workload
    # Versions are content hashes: stable across parses, different across content.
    assert es.version == parse_mesh_yaml(GOOD, P).endpoint_set("web", 8080, "td").version  # type: ignore[union-attr]
    assert es.version != parse_mesh_yaml(GOOD.replace("weight: 2", "weight: 3"), P
                                         ).endpoint_set("web", 8080, "td").version  # type: ignore[union-attr]


def test_errors_name_file_line_and_field() -> None:
    errs = errors("services:\n  - name: Web_1\n    ports: [0]\n    colour: red\n"
                  "    workloads:\n      - address: 1.2.3.4:99999\n"
                  "  - name: b\n    policy:\n      default: maybe\n"
                  "      rules:\n        - identities: [\"http://x\"]\n")
    assert f"{P}:2: services[0].name: 'Web_1' is not a DNS label (a-z, 0-9, '-', at most 63)" \
        in errs
    assert any(e.startswith(f"{P}:3: services[0].ports[0]: must be between 1 and 65535")
               for e in errs), errs
    assert any(e.startswith(f"{P}:4: services[0].colour: unknown field") for e in errs)
    assert any(e.startswith(f"{P}:6: services[0].workloads[0].address: invalid address")
               for e in errs), errs
    assert any(e.startswith(f"{P}:9: services[1].policy.default: must be one of")
               for e in errs), errs
    assert any(e.startswith(f"{P}:11: services[1].policy.rules[0].identities")
               for e in errs), errs


def test_more_errors() -> None:
    assert errors("services: {}\n") == [f"{P}:1: services: expected a list"]
    assert errors("services:\n  - name: a\n  - name: a\n")[0].startswith(
        f"{P}:3: services[1].name: duplicate service a.default")
    assert errors("services:\n  - name: a\n    run: {}\n") == [
        f"{P}:3: services[0].run.command: required"]
    assert errors("services:\n  - name: a\n    expose: 80\n") == [
        f"{P}:3: services[0].expose: needs `run` and a port"]
    assert errors("services:\n  - name: a\n    workloads: [{address: x}]\n") == [
        f"{P}:3: services[0].ports: a service with workloads needs at least one port"]
    assert errors("services: [\n")[0].startswith(f"{P}:2: (yaml):")
    assert errors("services:\n  - name: a\n    meshed: perhaps\n") == [
        f"{P}:3: services[0].meshed: expected true or false, got 'perhaps'"]


class Sink:
    def __init__(self) -> None:
        self.lines: list[dict[str, object]] = []
        self.closed = False

    def send(self, line: bytes) -> bool:
        self.lines.append(parse_event(line))
        return True

    def close(self) -> None:
        self.closed = True


def sub(d: Discovery, name: str, version: str = "", kind: str = "endpoints"
        ) -> tuple[Subscriber, Sink]:
    s = Sink()
    su = Subscriber((kind, name), version, s.send, s.close)
    d.subscribe(su)
    return su, s


def test_watch_fanout_only_what_changed() -> None:
    m1 = parse_mesh_yaml(GOOD, P)
    d = Discovery(m1, "td")
    _, web = sub(d, "web:8080")
    _, db = sub(d, "db.data:5432")
    _, other = sub(d, "example.com:80")
    assert web.lines[0]["type"] == "snapshot"
    assert other.lines[0]["type"] == "not_found"
    v = web.lines[0]["version"]
    # Resuming at the current version: a short "unchanged", no data.
    _, again = sub(d, "web:8080", str(v))
    assert again.lines == [{"v": 1, "type": "unchanged", "resource": "endpoints",
                            "name": "web:8080", "version": v}]
    assert d.resumed_unchanged == 1
    # A change to web only: web's subscribers get it, db's do not.
    sent = d.set_mesh(parse_mesh_yaml(GOOD.replace("weight: 2", "weight: 5"), P))
    assert sent == 2
    assert len(web.lines) == 2 and len(again.lines) == 2 and len(db.lines) == 1
    data = web.lines[1]["data"]
    assert isinstance(data, dict) and data["endpoints"][1]["weight"] == 5
    # The same mesh again: nothing is sent.
    assert d.set_mesh(parse_mesh_yaml(GOOD.replace("weight: 2", "weight: 5"), P)) == 0
    assert json.loads(json.dumps(d.status()))["subscriptions"] == 4


def test_policy_watch_by_identity() -> None:
    d = Discovery(parse_mesh_yaml(GOOD, P), "td")
    _, s = sub(d, "spiffe://demo.local/ns/default/sa/web", kind="policy")
    assert s.lines[0]["type"] == "snapshot"
    data = s.lines[0]["data"]
    assert isinstance(data, dict) and data["default"] == "all-authenticated"
    _, none = sub(d, "spiffe://demo.local/ns/x/sa/y", kind="policy")
    assert none.lines[0]["type"] == "not_found"


def test_slow_subscriber_is_cut_off() -> None:
    d = Discovery(parse_mesh_yaml(GOOD, P), "td")
    closed: list[bool] = []
    su = Subscriber(("endpoints", "web:8080"), "", lambda _line: False,
                    lambda: closed.append(True))
    d.subscribe(su)
    d.set_mesh(parse_mesh_yaml(GOOD.replace("weight: 2", "weight: 9"), P))
    assert closed == [True] and d.status()["subscriptions"] == 0


ADDRESSED = """
trust_domain: t.local
services:
  - name: web
    address: 10.9.1.5
    ports: [8080, {port: 9000, protocol: opaque}]
    workloads: [{address: 10.9.0.2}, {address: 10.9.0.3}, {address: "127.0.0.1:4143"}]
  - name: db
    address: "fd00::5"
    ports: [5432]
    workloads: [{address: 10.9.0.2}]
"""


def test_lookup_by_service_address_and_workload_ip() -> None:
    m = parse_mesh_yaml(ADDRESSED, "m.yaml")
    es = m.endpoint_set("10.9.1.5", 8080, "x")
    assert es is not None and es.service == "web.default:8080"
    assert [e.addr for e in es.endpoints] == ["10.9.0.2:8080", "10.9.0.3:8080",
                                              "127.0.0.1:4143"]
    es = m.endpoint_set("10.9.1.5", 9000, "x")
    assert es is not None and es.opaque
    assert m.endpoint_set("10.9.1.5", 1234, "x") is None  # no such port
    # One workload's own address: that workload alone, its service's identity.
    es = m.endpoint_set("10.9.0.3", 8080, "x")
    assert es is not None and [e.addr for e in es.endpoints] == ["10.9.0.3:8080"]
    assert es.endpoints[0].identity == "spiffe://t.local/ns/default/sa/web"
    # A pod serving two services: the port decides.
    es = m.endpoint_set("10.9.0.2", 5432, "x")
    assert es is not None and es.service == "db.default:5432"
    # IPv6 addresses are compared in normal form.
    assert m.endpoint_set("fd00:0:0::5", 5432, "x") is not None
    assert m.endpoint_set("10.9.9.9", 8080, "x") is None


def test_address_errors() -> None:
    bad = """
services:
  - name: a
    address: not-an-ip
    ports: [80]
  - name: b
    address: 10.0.0.1
  - name: c
    address: 10.0.0.2
    ports: [80]
  - name: d
    address: 10.0.0.2
    ports: [80]
"""
    with pytest.raises(MeshFileError) as e:
        parse_mesh_yaml(bad, "m.yaml")
    text = str(e.value)
    assert "m.yaml:4: services[0].address: 'not-an-ip' is not an IP address" in text
    assert "services[1].address: needs at least one port" in text
    assert "services[3].address: address 10.0.0.2 already used by the service on line 8" in text


def test_app_tls() -> None:
    m = parse_mesh_yaml("services:\n  - name: a\n    ports: [8443]\n    app_tls: true\n"
                        "  - name: b\n    ports: [80]\n", P)
    assert m.by_name["a.default"].app_tls is True
    assert m.by_name["b.default"].app_tls is False
    errs = errors("services:\n  - name: a\n    ports: [8443]\n    app_tls: sometimes\n")
    assert errs == [f"{P}:4: services[0].app_tls: expected true or false, got 'sometimes'"]
