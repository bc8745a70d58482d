"""meshlet.config.parse_proxy_config: MESHLET_* variables and flags."""

from __future__ import annotations

import pytest

from meshlet.config import (
    Addr,
    ConfigError,
    OutboundBind,
    parse_addr,
    parse_duration,
    parse_proxy_config,
)

APP = {"MESHLET_APP_ADDR": "127.0.0.1:8080"}


def errors(env: dict[str, str], flags: dict[str, str | None] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_proxy_config(env, flags)
    assert str(ei.value) == "\n".join(ei.value.errors)
    return ei.value.errors


def test_defaults() -> None:
    c = parse_proxy_config(APP)
    assert c.inbound_listen == Addr("0.0.0.0", 4143)
    assert c.app_addr == Addr("127.0.0.1", 8080)
    assert c.admin_listen == Addr("127.0.0.1", 4191)
    assert c.outbound == ()
    assert c.endpoints_file is None
    assert c.opaque_ports == frozenset()
    assert (c.detect_timeout, c.connect_timeout, c.header_read_timeout) == (10.0, 1.0, 10.0)
    assert (c.idle_timeout, c.response_timeout, c.pool_idle_timeout) == (60.0, 60.0, 4.0)
    assert (c.pool_max_idle, c.max_header_bytes, c.max_request_line_bytes) == (100, 65536, 16384)
    assert (c.max_connections, c.shutdown_grace, c.log_level) == (20000, 30.0, "info")
    j = c.to_json()
    assert j["inbound_listen"] == "0.0.0.0:4143"
    assert j["opaque_ports"] == []


def test_config_is_frozen() -> None:
    c = parse_proxy_config(APP)
    with pytest.raises(AttributeError):
        c.log_level = "debug"  # type: ignore[misc]


def test_nothing_to_proxy() -> None:
    errs = errors({})
    assert len(errs) == 1 and errs[0].startswith("MESHLET_APP_ADDR:")


def test_flags_win_over_env() -> None:
    env = {**APP, "MESHLET_CONNECT_TIMEOUT": "5s", "MESHLET_LOG_LEVEL": "debug"}
    c = parse_proxy_config(env, {"connect_timeout": "250ms", "log_level": None})
    assert c.connect_timeout == 0.25
    assert c.log_level == "debug"  # None flag: not given, the variable applies
    c = parse_proxy_config({}, {"app_addr": "127.0.0.1:9", "admin_listen": "[::1]:9999"})
    assert c.app_addr == Addr("127.0.0.1", 9)
    assert c.admin_listen == Addr("::1", 9999)


def test_bad_flag_reported_by_flag_name() -> None:
    errs = errors(APP, {"connect_timeout": "soon", "max_request_line_bytes": "0"})
    assert len(errs) == 2
    assert errs[0].startswith("--connect-timeout: ")
    assert errs[1].startswith("--max-request-line-bytes: ")


def test_all_bad_values_reported_at_once() -> None:
    env = {
        **APP,
        "MESHLET_CONNECT_TIMEOUT": "fast",
        "MESHLET_MAX_CONNECTIONS": "-1",
        "MESHLET_POOL_MAX_IDLE": "many",
        "MESHLET_LOG_LEVEL": "loud",
        "MESHLET_ADMIN_LISTEN_ADDR": "nowhere",
        "MESHLET_OPAQUE_PORTS": "25,99999",
        "MESHLET_OUTBOUND_LISTENERS": "127.0.0.1:9000",
        "MESHLET_TYPO": "1",
    }
    errs = errors(env)
    prefixes = sorted(e.split(":", 1)[0] for e in errs)
    assert prefixes == sorted([
        "MESHLET_CONNECT_TIMEOUT", "MESHLET_MAX_CONNECTIONS", "MESHLET_POOL_MAX_IDLE",
        "MESHLET_LOG_LEVEL", "MESHLET_ADMIN_LISTEN_ADDR", "MESHLET_OPAQUE_PORTS",
        "MESHLET_OUTBOUND_LISTENERS", "MESHLET_TYPO",
    ])
    for e in errs:
        assert e.split(":", 1)[1].strip()  # each says why


def test_unknown_variable_reported_others_ignored() -> None:
    errs = errors({**APP, "MESHLET_CONECT_TIMEOUT": "1s", "PATH": "/bin", "meshlet_x": "1"})
    assert len(errs) == 1
    assert errs[0].startswith("MESHLET_CONECT_TIMEOUT: ")


@pytest.mark.parametrize(("text", "want"), [
    ("500ms", 0.5), ("3s", 3.0), ("1m", 60.0), ("2h", 7200.0), ("7", 7.0), ("1.5s", 1.5),
    ("0ms", 0.0), (" 10s ", 10.0),
])
def test_durations(text: str, want: float) -> None:
    assert parse_duration(text) == pytest.approx(want)
    assert parse_proxy_config({**APP, "MESHLET_IDLE_TIMEOUT": text}).idle_timeout == \
        pytest.approx(want)


@pytest.mark.parametrize("text", ["", "s", "-1s", "1d", "1 s", "1.s", "ms", "1e3", "1sec",
                                  "5mss", "0x10s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
    errs = errors({**APP, "MESHLET_DETECT_TIMEOUT": text})
    assert errs[0].startswith("MESHLET_DETECT_TIMEOUT: ")


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:80", Addr("127.0.0.1", 80)), ("[::1]:80", Addr("::1", 80)),
    ("[2001:db8::5]:443", Addr("2001:db8::5", 443)), ("localhost:0", Addr("localhost", 0)),
    ("web.default.svc:65535", Addr("web.default.svc", 65535)),
])
def test_addresses(text: str, want: Addr) -> None:
    assert parse_addr(text) == want
    assert str(parse_addr(str(want))) == str(want)


def test_ipv6_addr_str() -> None:
    assert str(Addr("::1", 80)) == "[::1]:80"
    assert str(Addr("10.0.0.1", 80)) == "10.0.0.1:80"


@pytest.mark.parametrize("text", ["127.0.0.1", "::1:80", "[::1]", "[::1]80", "[zz::1]:80",
                                  "[::1::2]:80", "host:65536", "host:-1", ":80", "host:",
                                  "[127.0.0.1]:80", "a:b:80", "host:http"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(text)
    errs = errors({**APP, "MESHLET_ADMIN_LISTEN_ADDR": text})
    assert len(errs) == 1 and errs[0].startswith("MESHLET_ADMIN_LISTEN_ADDR: ")


def test_port_lists_and_ranges() -> None:
    c = parse_proxy_config({**APP, "MESHLET_OPAQUE_PORTS": "25, 3306,5432-5434,,443"})
    assert c.opaque_ports == frozenset({25, 443, 3306, 5432, 5433, 5434})
    c = parse_proxy_config({**APP, "MESHLET_OPAQUE_PORTS": "1-65535"})
    assert len(c.opaque_ports) == 65535


@pytest.mark.parametrize("text", ["0", "65536", "10-5", "a", "80-x", "-80", "1-2-3", "80-"])
def test_bad_ports(text: str) -> None:
    errs = errors({**APP, "MESHLET_OPAQUE_PORTS": text})
    assert len(errs) == 1 and errs[0].startswith("MESHLET_OPAQUE_PORTS: ")


def test_outbound_listeners() -> None:
    env = {"MESHLET_OUTBOUND_LISTENERS": "127.0.0.1:9000=web:80, [::1]:9001=db.ns:5432/opaque",
           "MESHLET_ENDPOINTS_FILE": "/etc/meshlet/endpoints.yaml"}
    c = parse_proxy_config(env)
    assert c.outbound == (
        OutboundBind(Addr("127.0.0.1", 9000), "web:80", False),
        OutboundBind(Addr("::1", 9001), "db.ns:5432", True),
    )
    assert c.inbound_listen is None  # no app: no inbound listener
    assert c.endpoints_file == "/etc/meshlet/endpoints.yaml"
    assert c.to_json()["outbound"][1] == {"listen": "[::1]:9001", "service": "db.ns:5432",
                                          "opaque": True}


def test_outbound_needs_endpoints_file() -> None:
    errs = errors({"MESHLET_OUTBOUND_LISTENERS": "127.0.0.1:9000=web:80"})
    assert len(errs) == 1 and errs[0].startswith("MESHLET_ENDPOINTS_FILE: ")


@pytest.mark.parametrize("text", [
    "127.0.0.1:9000", "127.0.0.1:9000=web", "127.0.0.1:9000=Web:80", "127.0.0.1:9000=web:80/tcp",
    "nowhere=web:80", "127.0.0.1:9000=-web:80", "127.0.0.1:9000=web:", "=web:80",
    "127.0.0.1:9000=web:99999", "127.0.0.1:9000=web:0",
])
def test_bad_outbound(text: str) -> None:
    errs = errors({"MESHLET_OUTBOUND_LISTENERS": text, "MESHLET_ENDPOINTS_FILE": "f.yaml"})
    assert len(errs) == 1 and errs[0].startswith("MESHLET_OUTBOUND_LISTENERS: ")


@pytest.mark.parametrize(("text", "want"), [("DEBUG", "debug"), (" warning ", "warning")])
def test_log_level(text: str, want: str) -> None:
    assert parse_proxy_config({**APP, "MESHLET_LOG_LEVEL": text}).log_level == want


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "ten", ""])
def test_bad_positive_ints(text: str) -> None:
    errs = errors({**APP, "MESHLET_MAX_HEADER_BYTES": text})
    assert errs[0].startswith("MESHLET_MAX_HEADER_BYTES: ")


def test_empty_inbound_listen_disables_inbound() -> None:
    errs = errors({**APP, "MESHLET_INBOUND_LISTEN_ADDR": ""})
    assert errs[0].startswith("MESHLET_APP_ADDR: ")  # nothing left to proxy


def test_app_tls_settings(tmp_path: object) -> None:
    c = parse_proxy_config(APP)
    assert (c.app_tls, c.app_tls_ca, c.app_tls_name, c.mux) == (False, None, "localhost", True)
    assert errors({**APP, "MESHLET_APP_TLS_CA": "/etc/hostname"}) == [
        "MESHLET_APP_TLS_CA: needs MESHLET_APP_TLS=true"]
    assert errors({**APP, "MESHLET_APP_TLS": "true", "MESHLET_APP_TLS_CA": "/nonexistent.pem"}
                  ) == ["MESHLET_APP_TLS_CA: /nonexistent.pem: no such file"]
    c = parse_proxy_config({**APP, "MESHLET_APP_TLS": "yes", "MESHLET_APP_TLS_NAME": "app.local",
                            "MESHLET_MUX": "false"})
    assert (c.app_tls, c.app_tls_name, c.mux) == (True, "app.local", False)
