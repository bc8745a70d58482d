"""meshlet.api.endpoints.parse_endpoints_yaml: the static endpoints file."""

from __future__ import annotations

import pytest

from meshlet.api.endpoints import Endpoint, EndpointSet, EndpointsFileError

try:  # the YAML form moved to its own module (PyYAML is imported only when needed)
    from meshlet.api.endpoints_file import load_endpoints_file, parse_endpoints_yaml
except ImportError:  # pragma: no cover - before the move
    from meshlet.api.endpoints import (  # type: ignore[attr-defined,no-redef]
        load_endpoints_file,
        parse_endpoints_yaml,
    )

P = "eps.yaml"

GOOD = """\
services:
  - name: web
    port: 80
    endpoints:
      - addr: 10.0.0.1:8080
      - addr: 10.0.0.2:8080
        weight: 3
        identity: spiffe://mesh/ns/default/sa/web
      - addr: "[::1]:8081"
        weight: 0
  - name: db
    port: 5432
    protocol: opaque
    endpoints:
      - addr: db.internal:5432
  - name: web
    port: 8443
    protocol: http
  - name: empty
    port: 1
    endpoints: []
"""


def errors(text: str) -> list[str]:
    with pytest.raises(EndpointsFileError) as ei:
        parse_endpoints_yaml(text, P)
    assert str(ei.value) == "\n".join(ei.value.errors)
    return ei.value.errors


def test_valid_file() -> None:
    sets = parse_endpoints_yaml(GOOD, P)
    assert list(sets) == ["web:80", "db:5432", "web:8443", "empty:1"]
    web = sets["web:80"]
    assert web == EndpointSet.make("web:80", (
        Endpoint("10.0.0.1", 8080),
        Endpoint("10.0.0.2", 8080, 3, "spiffe://mesh/ns/default/sa/web"),
        Endpoint("::1", 8081, 0),
    ), opaque=False)
    # The version is the content's hash: same content, same version; round trip.
    assert web.version == parse_endpoints_yaml(GOOD, P)["web:80"].version
    assert web.version != sets["web:8443"].version
    assert EndpointSet.from_json(web.to_json()) == web
    assert web.endpoints[2].addr == "[::1]:8081"
    assert sets["db:5432"].opaque is True
    assert sets["db:5432"].endpoints == (Endpoint("db.internal", 5432),)
    assert sets["web:8443"].opaque is False
    assert sets["web:8443"].endpoints == ()
    assert sets["empty:1"].endpoints == ()
    j = web.to_json()
    assert j["service"] == "web:80" and j["kind"] == "EndpointSet"
    assert j["endpoints"][1] == {"addr": "10.0.0.2:8080", "weight": 3,
                                 "identity": "spiffe://mesh/ns/default/sa/web"}


@pytest.mark.parametrize("text", ["", "# nothing\n", "services: []\n"])
def test_empty_files(text: str) -> None:
    assert parse_endpoints_yaml(text, P) == {}


def test_unknown_field_line() -> None:
    text = "services:\n  - name: web\n    port: 80\n    prot: http\n"
    assert errors(text) == [f"{P}:4: services[0].prot: unknown field "
                            "(allowed: endpoints, name, port, protocol)"]


def test_unknown_top_and_endpoint_fields() -> None:
    text = ("servics: []\n"
            "services:\n"
            "  - name: a\n"
            "    port: 1\n"
            "    endpoints:\n"
            "      - addr: 1.2.3.4:5\n"
            "        wieght: 2\n")
    errs = errors(text)
    assert len(errs) == 2
    assert errs[0].startswith(f"{P}:1: (top).servics: unknown field")
    assert errs[1].startswith(f"{P}:7: services[0].endpoints[0].wieght: unknown field")


@pytest.mark.parametrize("addr", ["10.0.0.1", "10.0.0.1:", ":80", "::1:80", "h:0", "h:65536",
                                  "h:http", "[::1:80", "h:-1"])
def test_bad_addr(addr: str) -> None:
    text = f"services:\n  - name: a\n    port: 1\n    endpoints:\n      - addr: '{addr}'\n"
    errs = errors(text)
    assert len(errs) == 1
    assert errs[0].startswith(f"{P}:5: services[0].endpoints[0].addr: ")


@pytest.mark.parametrize("weight", ["-1", "1.5", "heavy", "1000001", "[1]"])
def test_bad_weight(weight: str) -> None:
    text = ("services:\n  - name: a\n    port: 1\n    endpoints:\n"
            f"      - addr: 1.2.3.4:5\n        weight: {weight}\n")
    errs = errors(text)
    assert len(errs) == 1
    assert errs[0].startswith(f"{P}:6: services[0].endpoints[0].weight: ")


def test_missing_name_and_port() -> None:
    text = "services:\n  - protocol: http\n  - name: b\n    port: 2\n  - name: c\n"
    errs = errors(text)
    assert errs == [
        f"{P}:2: services[0].name: required",
        f"{P}:2: services[0].port: required",
        f"{P}:5: services[2].port: required",
    ]


def test_missing_addr() -> None:
    text = "services:\n  - name: a\n    port: 1\n    endpoints:\n      - weight: 2\n"
    assert errors(text) == [f"{P}:5: services[0].endpoints[0].addr: required"]


@pytest.mark.parametrize("port", ["0", "65536", "http", "-1"])
def test_bad_service_port(port: str) -> None:
    errs = errors(f"services:\n  - name: a\n    port: {port}\n")
    assert len(errs) == 1 and errs[0].startswith(f"{P}:3: services[0].port: ")


def test_bad_protocol() -> None:
    errs = errors("services:\n  - name: a\n    port: 1\n    protocol: grpc\n")
    assert errs == [f"{P}:4: services[0].protocol: must be detect, http or opaque"]


def test_duplicate_service() -> None:
    text = ("services:\n"
            "  - name: web\n    port: 80\n"
            "  - name: api\n    port: 80\n"
            "  - name: web\n    port: 80\n")
    errs = errors(text)
    assert len(errs) == 1
    assert errs[0].startswith(f"{P}:6: services[2]: duplicate service web:80")


def test_duplicate_key() -> None:
    errs = errors("services:\n  - name: web\n    port: 80\n    name: api\n")
    assert errs[0].startswith(f"{P}:4: services[0].name: duplicate key")


@pytest.mark.parametrize(("text", "line"), [
    ("services:\n  - name: [unclosed\n    port: 80\n", 3),
    ("services:\n  - name: a\n   port: 1\n", 3),
    ("services:\n\t- name: a\n", 2),
    ("a: b\na: {\n", 3),
])
def test_yaml_syntax_error(text: str, line: int) -> None:
    errs = errors(text)
    assert len(errs) == 1
    assert errs[0].startswith(f"{P}:{line}: (yaml): ")


@pytest.mark.parametrize(("text", "prefix"), [
    ("- a\n- b\n", f"{P}:1: (top): expected a mapping"),
    ("services: 3\n", f"{P}:1: services: expected a list"),
    ("services:\n  - just-a-string\n", f"{P}:2: services[0]: expected a mapping"),
    ("services:\n  - name: a\n    port: 1\n    endpoints: {}\n",
     f"{P}:4: services[0].endpoints: expected a list"),
])
def test_wrong_shapes(text: str, prefix: str) -> None:
    errs = errors(text)
    assert errs[0].startswith(prefix)


def test_all_errors_at_once_with_lines() -> None:
    text = (
        "services:\n"                       # 1
        "  - name: web\n"                   # 2
        "    port: 80\n"                    # 3
        "    colour: blue\n"                # 4
        "    endpoints:\n"                  # 5
        "      - addr: nowhere\n"           # 6
        "      - addr: 10.0.0.1:80\n"       # 7
        "        weight: lots\n"            # 8
        "  - port: 81\n"                    # 9
        "  - name: db\n"                    # 10
        "    port: 99999\n"                 # 11
        "  - name: ok\n"                    # 12
        "    port: 1\n"                     # 13
        "    endpoints:\n"                  # 14
        "      - addr: 1.1.1.1:1\n"         # 15
    )
    errs = errors(text)
    lines = [(e.split(":")[1], e.split(":")[2].strip()) for e in errs]
    assert lines == [
        ("4", "services[0].colour"),
        ("6", "services[0].endpoints[0].addr"),
        ("8", "services[0].endpoints[1].weight"),
        ("9", "services[1].name"),
        ("11", "services[2].port"),
    ]
    for e in errs:
        assert e.startswith(P + ":")


def test_load_missing_file(tmp_path: object) -> None:
    path = f"{tmp_path}/nope.yaml"
    with pytest.raises(EndpointsFileError) as ei:
        load_endpoints_file(path)
    assert ei.value.errors[0].startswith(f"{path}:1: (file): ")


def test_load_file(tmp_path: object) -> None:
    path = f"{tmp_path}/eps.yaml"
    with open(path, "w", encoding="utf-8") as f:
        f.write(GOOD)
    assert set(load_endpoints_file(path)) == {"web:80", "db:5432", "web:8443", "empty:1"}
