"""All of meshlet's configuration, parsed in one place.

Rules:
1. Nothing else in meshlet reads `os.environ`: every setting is a `MESHLET_*` variable
   with a matching command-line flag (`MESHLET_CONNECT_TIMEOUT` <-> `--connect-timeout`);
   a flag wins over the variable.
2. Every bad value is collected and reported at once, each with its variable's name;
   the command then exits with status 64 (EX_USAGE).
3. The result is a frozen dataclass; defaults are the zero-config common case.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "EX_CONFIG",
    "Addr",
    "ConfigError",
    "ControlConfig",
    "OutboundBind",
    "ProxyConfig",
    "parse_control_config",
    "parse_proxy_config",
]

EX_CONFIG = 64


class ConfigError(Exception):
    """One or more settings are invalid; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclasses.dataclass(frozen=True, slots=True)
class Addr:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundBind:
    """A local listener bound to a named service (explicit outbound mode)."""

    listen: Addr
    service: str  # "name:port", the key of an endpoint set
    opaque: bool


class ProxyConfig:
    """The proxy's settings, read-only. A plain slotted class rather than a dataclass:
    generating a frozen dataclass of this many fields compiles code that leaves every
    proxy ~0.5 MB heavier."""

    inbound_listen: Addr | None
    app_addr: Addr | None
    admin_listen: Addr
    outbound: tuple[OutboundBind, ...]
    endpoints_file: str | None
    opaque_ports: frozenset[int]
    detect_timeout: float
    connect_timeout: float
    header_read_timeout: float
    idle_timeout: float
    response_timeout: float
    pool_idle_timeout: float
    pool_max_idle: int
    max_header_bytes: int
    max_request_line_bytes: int
    max_connections: int
    shutdown_grace: float
    log_level: str
    control_addr: Addr | None
    trust_anchors: str | None
    identity: str | None
    join_token_file: str | None
    inbound_policy: str
    outbound_proxy_listen: Addr | None
    balancer_default_rtt: float
    balancer_decay: float
    failure_accrual: int
    failure_backoff: float
    failure_backoff_max: float
    transparent: bool
    outbound_listen: Addr | None
    h2_keepalive: float
    mux: bool
    app_tls: bool
    app_tls_ca: str | None
    app_tls_name: str

    __slots__ = tuple(__annotations__)

    def __init__(self, **values: Any) -> None:
        missing = [f for f in self.__slots__ if f not in values]
        extra = [k for k in values if k not in self.__slots__]
        if missing or extra:
            raise TypeError(f"ProxyConfig: missing {missing}, unknown {extra}")
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ProxyConfig is read-only: {name}")

    def __repr__(self) -> str:
        return f"ProxyConfig({self.to_json()!r})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__slots__:
            v = getattr(self, name)
            if isinstance(v, Addr):
                v = str(v)
            elif isinstance(v, frozenset):
                v = sorted(v)
            elif isinstance(v, tuple):
                v = [{"listen": str(b.listen), "service": b.service, "opaque": b.opaque}
                     for b in v]
            out[name] = v
        return out


# --- value parsers: each returns the value or raises ValueError with a readable reason --

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")


def parse_duration(text: str) -> float:
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid duration {text!r} (use e.g. 500ms, 3s, 1m)")
    n = float(m.group(1))
    return n * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]


def parse_addr(text: str) -> Addr:
    text = text.strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if m is None:
        raise ValueError(f"invalid address {text!r} (use HOST:PORT or [IPv6]:PORT)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range in {text!r}")
    if m.group(1):
        import ipaddress  # IPv6 literals only: not loaded by every proxy

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {text!r}") from None
    return Addr(host, port)


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None
    if n <= 0:
        raise ValueError(f"must be positive, got {n}")
    return n


def _ports(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, dash, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"invalid port {part!r}") from None
        if not (1 <= a <= b <= 65535):
            raise ValueError(f"invalid port range {part!r}")
        if b - a > 65535:
            raise ValueError(f"port range too wide {part!r}")
        out.update(range(a, b + 1))
    return frozenset(out)


_SERVICE_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?:\d{1,5}")


def _outbound(text: str) -> tuple[OutboundBind, ...]:
    binds = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        listen, sep, service = part.partition("=")
        if not sep:
            raise ValueError(f"invalid binding {part!r} (use LISTEN_ADDR=SERVICE:PORT)")
        opaque = service.endswith("/opaque")
        service = service.removesuffix("/opaque")
        if not _SERVICE_RE.fullmatch(service) or not 0 < int(service.rpartition(":")[2]) < 65536:
            raise ValueError(f"invalid service {service!r} in {part!r} (use name:port)")
        binds.append(OutboundBind(parse_addr(listen), service, opaque))
    return tuple(binds)


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ValueError(f"invalid log level {text!r} (debug, info, warning, error)")
    return level


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"invalid boolean {text!r} (true or false)")


def _optional_addr(text: str) -> Addr | None:
    return parse_addr(text) if text.strip() else None


def _optional_str(text: str) -> str | None:
    return text.strip() or None


def _policy(text: str) -> str:
    from meshlet.policy.authz import DEFAULTS

    if text.strip() not in DEFAULTS:
        raise ValueError(f"invalid policy {text!r} (one of {', '.join(DEFAULTS)})")
    return text.strip()


def _optional_identity(text: str) -> str | None:
    if not text.strip():
        return None
    from meshlet.identity.spiffe import parse_identity

    return parse_identity(text.strip()).uri


# name -> (parser, default text, help)
_SETTINGS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "inbound_listen": (_optional_addr, "0.0.0.0:4143",
                       "inbound listener (empty: none)"),
    "app_addr": (_optional_addr, "", "the app the inbound listener forwards to"),
    "admin_listen": (parse_addr, "127.0.0.1:4191", "admin server: /metrics, /ready, ..."),
    "outbound": (_outbound, "",
                 "explicit outbound listeners: LISTEN=SERVICE:PORT[/opaque],..."),
    "endpoints_file": (_optional_str, "", "static endpoints file (YAML)"),
    "opaque_ports": (_ports, "", "ports proxied as raw TCP with no protocol detection"),
    "detect_timeout": (parse_duration, "10s", "protocol detection timeout"),
    "connect_timeout": (parse_duration, "1s", "upstream connect timeout"),
    "header_read_timeout": (parse_duration, "10s", "time to read a request head"),
    "idle_timeout": (parse_duration, "60s", "idle keep-alive client connection timeout"),
    "response_timeout": (parse_duration, "60s", "time from request to response head"),
    "pool_idle_timeout": (parse_duration, "4s", "idle pooled upstream connection timeout"),
    "pool_max_idle": (_positive_int, "100", "idle upstream connections kept per endpoint"),
    "max_header_bytes": (_positive_int, "65536", "largest request head (431 above)"),
    "max_request_line_bytes": (_positive_int, "16384", "longest request line (414 above)"),
    "max_connections": (_positive_int, "20000", "open client connections at most"),
    "shutdown_grace": (parse_duration, "30s", "time in-flight requests get on shutdown"),
    "log_level": (_log_level, "info", "debug, info, warning or error"),
    "control_addr": (_optional_addr, "",
                     "the control plane (HOST:PORT); unset: standalone, plaintext"),
    "trust_anchors": (_optional_str, "", "PEM file of the mesh's trust anchors"),
    "identity": (_optional_identity, "",
                 "this workload's identity, spiffe://TD/ns/NS/sa/ACCOUNT"),
    "join_token_file": (_optional_str, "", "file holding the join token for the identity"),
    "inbound_policy": (_policy, "all-unauthenticated",
                       "inbound default: all-unauthenticated, all-authenticated or deny"),
    "outbound_proxy_listen": (_optional_addr, "",
                              "outbound HTTP proxy listener (apps set HTTP_PROXY to it and "
                              "call services by name); needs a control plane"),
    "balancer_default_rtt": (parse_duration, "30ms",
                             "latency assumed for an endpoint's requests in flight before "
                             "it has answered"),
    "balancer_decay": (parse_duration, "10s", "time constant of the peak-EWMA latency"),
    "failure_accrual": (_positive_int, "5",
                        "consecutive failures (connect errors, 5xx) that eject an endpoint"),
    "failure_backoff": (parse_duration, "1s", "first ejection time (doubles per ejection)"),
    "failure_backoff_max": (parse_duration, "60s", "longest ejection time"),
    "transparent": (_bool, "false",
                    "transparent mode: `meshlet init` rules redirect the pod's TCP here; "
                    "each connection's original destination (SO_ORIGINAL_DST) decides "
                    "where it goes (inbound: that port on localhost)"),
    "h2_keepalive": (parse_duration, "20s",
                     "HTTP/2 upstream connections with streams open: PING after this much "
                     "silence, close after as much again"),
    "mux": (_bool, "true",
            "HTTP/1.1 and opaque TCP connections to a peer proxy travel as streams of one "
            "shared mesh TLS connection per peer (ALPN meshlet/mux) instead of one TLS "
            "connection each"),
    "app_tls": (_bool, "false",
                "the app serves TLS: the inbound proxy connects to it over TLS 1.2+, with "
                "ALPN h2 for HTTP/2 and http/1.1 for HTTP/1.1 (opaque TCP is passed as is)"),
    "app_tls_ca": (_optional_str, "",
                   "PEM file of the CA the app's certificate is checked against (unset: "
                   "not checked; the app is on this host, reached over loopback)"),
    "app_tls_name": (str, "localhost", "server name sent to the app (SNI) and, with "
                     "MESHLET_APP_TLS_CA, checked in its certificate"),
    "outbound_listen": (_optional_addr, "127.0.0.1:4140",
                        "transparent mode's outbound listener (`meshlet init "
                        "--outbound-port`)"),
}

# Variable names, where they differ from the field name.
_ENV_NAMES = {
    "inbound_listen": "MESHLET_INBOUND_LISTEN_ADDR",
    "admin_listen": "MESHLET_ADMIN_LISTEN_ADDR",
    "outbound": "MESHLET_OUTBOUND_LISTENERS",
    "outbound_proxy_listen": "MESHLET_OUTBOUND_PROXY_LISTEN_ADDR",
    "outbound_listen": "MESHLET_OUTBOUND_LISTEN_ADDR",
}


def env_name(field: str) -> str:
    return _ENV_NAMES.get(field, "MESHLET_" + field.upper())


def flag_name(field: str) -> str:
    return "--" + env_name(field).removeprefix("MESHLET_").lower().replace("_", "-")


def proxy_settings_help() -> list[tuple[str, str, str, str]]:
    """(flag, variable, default, help) for each setting, for the CLI."""
    return [(flag_name(k), env_name(k), d, h) for k, (_p, d, h) in _SETTINGS.items()]


Settings = dict[str, tuple[Callable[[str], Any], str, str]]


def _parse_settings(
    table: Settings,
    env_name_of: Callable[[str], str],
    flag_name_of: Callable[[str], str],
    env: Mapping[str, str],
    flags: Mapping[str, str | None],
) -> tuple[dict[str, Any], list[str]]:
    """Parse every setting of `table` (a flag wins over its variable); collect errors."""
    errors: list[str] = []
    values: dict[str, Any] = {}
    for field, (parser, default, _help) in table.items():
        given = flags.get(field)
        source = flag_name_of(field) if given is not None else env_name_of(field)
        text = given if given is not None else env.get(env_name_of(field), default)
        try:
            values[field] = parser(text)
        except ValueError as e:
            errors.append(f"{source}: {e}")
    return values, errors


def parse_proxy_config(
    env: Mapping[str, str], flags: Mapping[str, str | None] | None = None
) -> ProxyConfig:
    """Build the proxy's config from the environment and flags (flag values win).

    `flags` maps field names to the text given on the command line (None: not given).
    Raises ConfigError listing every invalid value.
    """
    values, errors = _parse_settings(_SETTINGS, env_name, flag_name, env, flags or {})
    known = {env_name(f) for f in _SETTINGS}
    for key in env:
        if key.startswith("MESHLET_") and key not in known and key not in _OTHER_VARS:
            errors.append(f"{key}: unknown setting (known: see `meshlet proxy --help`)")
    if not errors:
        if values["inbound_listen"] is not None and values["app_addr"] is None \
                and not values["transparent"]:
            values["inbound_listen"] = None  # no app to forward to: no inbound listener
        if not values["transparent"]:
            values["outbound_listen"] = None
        if values["outbound"] and not values["endpoints_file"] \
                and values["control_addr"] is None:
            errors.append(
                f"{env_name('endpoints_file')}: required when "
                f"{env_name('outbound')} is set without {env_name('control_addr')}"
            )
        if values["outbound_proxy_listen"] is not None and (
                values["control_addr"] is None or values["endpoints_file"]):
            errors.append(f"{env_name('outbound_proxy_listen')}: needs "
                          f"{env_name('control_addr')} (discovery), and no "
                          f"{env_name('endpoints_file')}")
        ca = values["app_tls_ca"]
        if ca is not None and not values["app_tls"]:
            errors.append(f"{env_name('app_tls_ca')}: needs {env_name('app_tls')}=true")
        elif ca is not None and not os.path.isfile(ca):
            errors.append(f"{env_name('app_tls_ca')}: {ca}: no such file")
        if values["control_addr"] is not None:
            for field in ("trust_anchors", "identity", "join_token_file"):
                if values[field] is None:
                    errors.append(f"{env_name(field)}: required when "
                                  f"{env_name('control_addr')} is set")
        if values["inbound_listen"] is None and not values["outbound"] \
                and values["outbound_proxy_listen"] is None:
            errors.append(
                f"{env_name('app_addr')}: nothing to proxy: set it (inbound) or "
                f"{env_name('outbound')} (outbound)"
            )
    if errors:
        raise ConfigError(errors)
    return ProxyConfig(**values)


# --- the control plane ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ControlConfig:
    listen: Addr
    state_dir: str
    trust_domain: str
    cert_lifetime: float  # seconds
    server_names: tuple[str, ...]
    log_level: str
    mesh_file: str | None

    def to_json(self) -> dict[str, Any]:
        return {f.name: str(getattr(self, f.name)) if isinstance(getattr(self, f.name), Addr)
                else getattr(self, f.name) for f in dataclasses.fields(self)}


_TD_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _trust_domain(text: str) -> str:
    td = text.strip()
    if not _TD_RE.fullmatch(td):
        raise ValueError(f"invalid trust domain {text!r} (a DNS-like name)")
    return td


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("at least one name or address is needed")
    return names


def _lifetime(text: str) -> float:
    secs = parse_duration(text)
    if not 10 <= secs <= 366 * 86400:
        raise ValueError(f"lifetime {text!r} must be between 10s and 366 days")
    return secs


_CONTROL_SETTINGS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "listen": (parse_addr, "127.0.0.1:9443", "control plane HTTPS listener"),
    "state_dir": (lambda t: t.strip() or ".meshlet/control", ".meshlet/control",
                  "where the CA, its keys and the token secret are kept"),
    "trust_domain": (_trust_domain, "cluster.local", "the mesh's trust domain"),
    "cert_lifetime": (_lifetime, "24h", "lifetime of workload certificates"),
    "server_names": (_names, "localhost,127.0.0.1",
                     "DNS names and IPs in the control plane's own certificate"),
    "log_level": (_log_level, "info", "debug, info, warning or error"),
    "mesh_file": (_optional_str, "", "the mesh file (YAML): services, workloads, policies; "
                  "watched for edits"),
}
_CONTROL_ENV_NAMES = {
    "listen": "MESHLET_CONTROL_LISTEN_ADDR",
    "state_dir": "MESHLET_CONTROL_STATE_DIR",
    "trust_domain": "MESHLET_TRUST_DOMAIN",
    "cert_lifetime": "MESHLET_CERT_LIFETIME",
    "server_names": "MESHLET_CONTROL_SERVER_NAMES",
    "log_level": "MESHLET_LOG_LEVEL",
    "mesh_file": "MESHLET_MESH_FILE",
}


def control_env_name(field: str) -> str:
    return _CONTROL_ENV_NAMES[field]


def control_flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def control_settings_help() -> list[tuple[str, str, str, str]]:
    return [(control_flag_name(k), control_env_name(k), d, h)
            for k, (_p, d, h) in _CONTROL_SETTINGS.items()]


def parse_control_config(
    env: Mapping[str, str], flags: Mapping[str, str | None] | None = None
) -> ControlConfig:
    """Build the control plane's config (flags win); ConfigError lists every bad value."""
    values, errors = _parse_settings(_CONTROL_SETTINGS, control_env_name, control_flag_name,
                                     env, flags or {})
    if errors:
        raise ConfigError(errors)
    return ControlConfig(**values)


# Variables read by other commands, so the proxy does not call them unknown.
_OTHER_VARS: frozenset[str] = frozenset((*_CONTROL_ENV_NAMES.values(), "MESHLET_LEAN",
                                                "MESHLET_LEAN_PYTHONPATH"))
