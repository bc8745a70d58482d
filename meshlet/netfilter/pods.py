"""Pods as network namespaces on one machine (`meshlet up --netns`, `meshlet down`).

One Linux bridge in the host's namespace joins every pod; each pod is a network
namespace with a veth pair to the bridge, its own address and a hosts file.

Rules:
1. Everything made here is named with `PREFIX` (namespaces `mshl-*`, links `mshlv*` and
   `mshlbr*`, files under /etc/netns/mshl-*), so `cleanup()` removes exactly what
   meshlet made, also after a crash, and nothing else.
2. Addresses come from a private /23 that overlaps no route or address of this machine:
   the bridge and the pods in its lower half, the services' virtual addresses in its
   upper half. Pods get a route for the /23 only (no default route): their traffic
   stays on this machine.
3. Names resolve through each pod's /etc/netns/<pod>/hosts (`ip netns exec` mounts it
   over /etc/hosts): every service's virtual address under NAME, NAME.NS, NAME.NS.svc
   and NAME.NS.svc.cluster.local.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable

from meshlet.procs import pid_alive

__all__ = ["NS_PREFIX", "Network", "PodError", "busy_pods", "cleanup", "leftovers",
           "socket_in"]

NS_PREFIX = "mshl-"
LINK_PREFIX = "mshlv"
BRIDGE = "mshlbr0"
_CLONE_NEWNET = 0x40000000
_setns_lock = threading.Lock()


class PodError(Exception):
    """A pod could not be made; the message names the command and its error."""


def _sh(*args: str, check: bool = True) -> str:
    try:
        r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PodError(f"{' '.join(args)}: {e}") from None
    if check and r.returncode != 0:
        raise PodError(f"{' '.join(args)} failed: {r.stderr.strip() or r.returncode}")
    return r.stdout


def _used_networks() -> list[ipaddress.IPv4Network]:
    out: list[ipaddress.IPv4Network] = []
    text = _sh("ip", "-4", "route", "show", "table", "all") + _sh("ip", "-4", "-o", "addr")
    for line in text.splitlines():
        for word in line.split():
            if word[:1].isdigit() and "." in word:
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(word, strict=False)
                    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen > 0:
                        out.append(net)
    return out


def choose_network() -> ipaddress.IPv4Network:
    """A /23 in 10.213.0.0/16 (else further up in 10.0.0.0/8) free on this machine."""
    used = _used_networks()
    for second in (213, *range(214, 256), *range(100, 213)):
        for third in range(0, 256, 2):
            net = ipaddress.IPv4Network(f"10.{second}.{third}.0/23")
            if not any(net.overlaps(u) for u in used):
                return net
    raise PodError("no free /23 in 10.0.0.0/8 for the pods")


class Network:
    """The bridge, the address plan and the pods made on it."""

    def __init__(self, net: ipaddress.IPv4Network) -> None:
        self.net = net
        hosts = list(net.hosts())
        self.gateway = str(hosts[0])
        # Lower /24: the bridge (.1) and pods (.2-.254); upper /24: virtual addresses
        # (.1-.254), so no address of either ends in .0 or .255.
        self._pod_ips = (str(h) for h in hosts[1:253])
        self._vips = (str(h) for h in hosts[256:509])
        self.pods: list[str] = []
        self._links = 0

    def create_bridge(self) -> None:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.gateway}/{self.net.prefixlen}", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")

    def next_vip(self) -> str:
        try:
            return next(self._vips)
        except StopIteration:
            raise PodError(f"too many services: no virtual address left in "
                           f"{self.net}") from None

    def next_pod_ip(self) -> str:
        try:
            return next(self._pod_ips)
        except StopIteration:
            raise PodError(f"too many pods: no address left in {self.net}") from None

    def add_pod(self, name: str, ip: str, hosts: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Namespace `name` joined to the bridge with address `ip`; `hosts` are the
        (address, names) lines of its hosts file."""
        ns = NS_PREFIX + name
        link = f"{LINK_PREFIX}{self._links}"
        self._links += 1
        _sh("ip", "netns", "add", ns)
        self.pods.append(ns)
        etc = f"/etc/netns/{ns}"
        os.makedirs(etc, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost", f"{ip} {name}"]
        lines += [f"{addr} {' '.join(names)}" for addr, names in hosts]
        with open(f"{etc}/hosts", "w") as f:
            f.write("# made by meshlet up --netns\n" + "\n".join(lines) + "\n")
        _sh("ip", "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", link, "master", BRIDGE, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{ip}/{self.net.prefixlen}", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")


def leftovers() -> tuple[list[str], list[str]]:
    """meshlet's namespaces and links that exist now."""
    ns = [x.split()[0] for x in _sh("ip", "netns", "list", check=False).splitlines()
          if x.startswith(NS_PREFIX)]
    links = []
    for line in _sh("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith((LINK_PREFIX, "mshlbr")):
                links.append(name)
    return ns, links


def busy_pods() -> list[str]:
    """meshlet's namespaces that have processes in them now."""
    return [ns for ns in leftovers()[0]
            if any(pid_alive(int(p)) for p in _sh("ip", "netns", "pids", ns,
                                                check=False).split())]


def cleanup() -> list[str]:
    """Remove every pod meshlet made: the processes in them (SIGTERM, then SIGKILL),
    their interception rules with them, the namespaces, links and hosts files. Returns
    what was removed."""
    removed: list[str] = []
    namespaces, links = leftovers()
    pids: list[int] = []
    for ns in namespaces:
        pids += [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if pid_alive(p)]
            time.sleep(0.05)
    for ns in namespaces:
        _sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
        removed.append(f"netns {ns}")
    for link in links:
        _sh("ip", "link", "del", link, check=False)  # a veth may be gone with its netns
        removed.append(f"link {link}")
    with contextlib.suppress(OSError):
        for d in os.listdir("/etc/netns"):
            if d.startswith(NS_PREFIX):
                shutil.rmtree(f"/etc/netns/{d}", ignore_errors=True)
    return removed


def socket_in(ns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket that lives in network namespace `ns` (usable from any thread):
    made while this thread is briefly switched into `ns`."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with _setns_lock:
        own = os.open(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net",
                      os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(target, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
                try:
                    return socket.socket(family, socket.SOCK_STREAM)
                finally:
                    if libc.setns(own, _CLONE_NEWNET) != 0:  # pragma: no cover
                        raise OSError(ctypes.get_errno(), "setns back failed")
            finally:
                os.close(target)
        finally:
            os.close(own)
