"""The static endpoints file: YAML in, `EndpointSet` messages out.

Rules:
1. A bad file is refused whole with `file:line: field: reason` for every problem found;
   the caller keeps its last good state.
2. PyYAML is imported only here, and this module only when a file is configured: it
   costs about 1 MB of resident memory.
"""

from __future__ import annotations

import yaml

from meshlet.api.endpoints import Endpoint, EndpointSet, EndpointsFileError

__all__ = ["Checker", "EndpointsFileError", "compose", "load_endpoints_file",
           "parse_endpoints_yaml", "split_addr"]


class Checker:
    """Walks composed YAML nodes so every error can name its line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.errors: list[str] = []

    def err(self, node: yaml.Node | None, field: str, reason: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.errors.append(f"{self.path}:{line}: {field}: {reason}")

    def mapping(self, node: yaml.Node, field: str) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.err(node, field, "expected a mapping")
            return None
        out: dict[str, yaml.Node] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                self.err(k, field, "keys must be plain strings")
                continue
            if k.value in out:
                self.err(k, f"{field}.{k.value}", "duplicate key")
            out[k.value] = v
        return out

    def sequence(self, node: yaml.Node | None, field: str) -> list[yaml.Node]:
        """The items of a list node ([] if absent; an error if not a list)."""
        if node is None:
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.err(node, field, "expected a list")
            return []
        return list(node.value)

    def weight(self, m: dict[str, yaml.Node], field: str) -> int | None:
        """An endpoint's `weight` (default 1), or None after an error."""
        if "weight" not in m:
            return 1
        return self.integer(m["weight"], f"{field}.weight", 0, 1_000_000)

    def unknown(self, m: dict[str, yaml.Node], allowed: set[str], field: str) -> None:
        for k, v in m.items():
            if k not in allowed:
                known = ", ".join(sorted(allowed))
                self.err(v, f"{field}.{k}", f"unknown field (allowed: {known})")

    def scalar(self, node: yaml.Node | None, field: str) -> str | None:
        if node is None:
            return None
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, field, "expected a scalar")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node | None, field: str, lo: int, hi: int) -> int | None:
        text = self.scalar(node, field)
        if text is None:
            return None
        try:
            n = int(text)
        except ValueError:
            self.err(node, field, f"expected an integer, got {text!r}")
            return None
        if not lo <= n <= hi:
            self.err(node, field, f"must be between {lo} and {hi}, got {n}")
            return None
        return n


def split_addr(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        host = host[1:-1]
    elif ":" in host:
        return None
    p = int(port)
    return (host, p) if 0 < p < 65536 else None


def compose(text: str, path: str) -> yaml.Node | None:
    """The YAML node tree (libyaml when available), or EndpointsFileError naming the line."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.compose(text, Loader=loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise EndpointsFileError([f"{path}:{line}: (yaml): {getattr(e, 'problem', e)}"]) from None


def parse_endpoints_yaml(text: str, path: str = "<endpoints>") -> dict[str, EndpointSet]:
    """Parse the static endpoints file; returns sets keyed by "name:port"."""
    c = Checker(path)
    root = compose(text, path)
    out: dict[str, EndpointSet] = {}
    if root is None:
        return out
    top = c.mapping(root, "(top)")
    if top is not None:
        c.unknown(top, {"services"}, "(top)")
        services = top.get("services")
        if services is not None and not isinstance(services, yaml.SequenceNode):
            c.err(services, "services", "expected a list")
        elif services is not None:
            for i, snode in enumerate(services.value):
                es = _service(c, snode, f"services[{i}]")
                if es is not None:
                    if es.service in out:
                        c.err(snode, f"services[{i}]", f"duplicate service {es.service}")
                    out[es.service] = es
    if c.errors:
        raise EndpointsFileError(c.errors)
    return out


def _service(c: Checker, node: yaml.Node, field: str) -> EndpointSet | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"name", "port", "protocol", "endpoints"}, field)
    n_before = len(c.errors)
    name = c.scalar(m.get("name"), f"{field}.name")
    if name is None:
        c.err(node, f"{field}.name", "required")
    port = c.integer(m.get("port"), f"{field}.port", 1, 65535)
    if port is None and "port" not in m:
        c.err(node, f"{field}.port", "required")
    proto = c.scalar(m.get("protocol"), f"{field}.protocol") or "detect"
    if proto not in ("detect", "http", "opaque"):
        c.err(m.get("protocol"), f"{field}.protocol", "must be detect, http or opaque")
    eps: list[Endpoint] = []
    enode = m.get("endpoints")
    if enode is not None and not isinstance(enode, yaml.SequenceNode):
        c.err(enode, f"{field}.endpoints", "expected a list")
    elif enode is not None:
        for j, ep in enumerate(enode.value):
            e = _endpoint(c, ep, f"{field}.endpoints[{j}]")
            if e is not None:
                eps.append(e)
    if len(c.errors) != n_before or name is None or port is None:
        return None
    return EndpointSet.make(f"{name}:{port}", tuple(eps), proto == "opaque")


def _endpoint(c: Checker, node: yaml.Node, field: str) -> Endpoint | None:
    m = c.mapping(node, field)
    if m is None:
        return None
    c.unknown(m, {"addr", "weight", "identity"}, field)
    addr = c.scalar(m.get("addr"), f"{field}.addr")
    if addr is None:
        c.err(node, f"{field}.addr", "required")
        return None
    hp = split_addr(addr)
    if hp is None:
        c.err(m["addr"], f"{field}.addr", f"invalid address {addr!r} (use HOST:PORT)")
        return None
    weight = c.weight(m, field)
    if weight is None:
        return None
    identity = c.scalar(m.get("identity"), f"{field}.identity")
    return Endpoint(hp[0], hp[1], weight, identity)


def load_endpoints_file(path: str) -> dict[str, EndpointSet]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise EndpointsFileError([f"{path}:1: (file): {e.strerror}"]) from None
    return parse_endpoints_yaml(text, path)
