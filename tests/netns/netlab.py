"""Pods as network namespaces, for the root-only tests.

A `Lab` is one Linux bridge in the root namespace with an IPv4 /24 (and an IPv6 /64)
chosen so that it overlaps nothing on this machine; each `Pod` is a network namespace
joined to the bridge by a veth pair, with loopback up. Everything a lab made (processes
it started, namespaces, links) is removed by `close()`.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PREFIX = "mshlt"
PROXY_GID = 2102


def sh(*args: str, check: bool = True, timeout: float = 20) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def can_run() -> str | None:
    """None if pods can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables", "ip6tables", "tcpdump"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True
                          ).returncode != 0:
            return f"{tool} not installed"
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_network(x.split()[0], strict=False)
            for x in sh("ip", "-4", "route", "show", "table", "all").splitlines()
            if x and x.split()[0][0].isdigit()]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{secrets.randbelow(40) + 200}."
                                   f"{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net  # type: ignore[return-value]
    raise RuntimeError("no free /24 in 10.200.0.0/13")


class Pod:
    def __init__(self, lab: Lab, name: str, index: int) -> None:
        self.lab = lab
        self.name = name  # the namespace
        self.ip = str(lab.net[index])
        self.ip6 = str(lab.net6[index])
        self.veth = f"{lab.tag}v{index}"  # host side, on the bridge
        sh("ip", "netns", "add", name)
        lab.netns.append(name)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
           "netns", name)
        sh("ip", "link", "set", self.veth, "master", lab.bridge, "up")
        self.ip_("addr", "add", f"{self.ip}/24", "dev", "eth0")
        self.ip_("-6", "addr", "add", f"{self.ip6}/64", "dev", "eth0", "nodad")
        self.ip_("link", "set", "lo", "up")
        self.ip_("link", "set", "eth0", "up")

    def ip_(self, *args: str) -> str:
        return sh("ip", "-n", self.name, *args)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, timeout: float = 20, check: bool = True,
            gid: int | None = None) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=timeout,
                           group=gid, extra_groups=[] if gid is not None else None)
        if check and r.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(args)} failed "
                               f"({r.returncode}): {r.stdout}{r.stderr}")
        return r

    def start(self, *args: str, env: Mapping[str, str] | None = None,
              gid: int | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        p = subprocess.Popen(self.cmd(*args), env={**os.environ, **(env or {})},
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, group=gid,
                             extra_groups=[] if gid is not None else None)
        self.lab.procs.append(p)
        return p

    def python(self, *args: str, **kw: object) -> subprocess.Popen[bytes]:
        return self.start(sys.executable, *args, **kw)  # type: ignore[arg-type]

    def init(self, *flags: str) -> str:
        """`meshlet init` in this pod (the proxy's traffic excluded by its gid)."""
        return self.run(sys.executable, "-m", "meshlet", "init",
                        "--proxy-gid", str(PROXY_GID), *flags).stdout


class Lab:
    def __init__(self) -> None:
        self.tag = PREFIX + secrets.token_hex(2)  # 9 chars: room for link suffixes
        self.bridge = self.tag + "br"
        self.net = _free_subnet()
        self.net6 = ipaddress.ip_network(f"fd00:6d73:{secrets.randbelow(65536):x}::/64")
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pods: list[Pod] = []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.gateway = str(self.net[1])
        self.gateway6 = str(self.net6[1])
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "-6", "addr", "add", f"{self.gateway6}/64", "dev", self.bridge, "nodad")
        sh("ip", "link", "set", self.bridge, "up")

    def pod(self, name: str) -> Pod:
        p = Pod(self, f"{self.tag}-{name}", len(self.pods) + 2)
        self.pods.append(p)
        return p

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns in self.netns:
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def capture(iface: str, path: Path, filt: Sequence[str] = ("tcp",)) -> subprocess.Popen[bytes]:
    """tcpdump on `iface` into `path` (whole packets); stop it with `stop_capture`."""
    p = subprocess.Popen(["tcpdump", "-i", iface, "-U", "--immediate-mode", "-s", "0", "-w",
                          str(path), *filt],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    # tcpdump says "listening on ..." once the capture runs.
    line = p.stderr.readline()
    assert b"listening" in line, line
    return p


def stop_capture(p: subprocess.Popen[bytes]) -> None:
    time.sleep(0.3)  # the last packets written (-U flushes per packet)
    p.send_signal(signal.SIGINT)
    p.wait(10)


def tcp_payloads(path: Path) -> dict[tuple[str, int, str, int], bytes]:
    """The TCP payload bytes of each direction of each connection in a pcap file (IPv4
    and IPv6 over Ethernet), concatenated in capture order."""
    import struct

    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    assert linktype == 1, f"not Ethernet: linktype {linktype}"
    off = 24
    flows: dict[tuple[str, int, str, int], bytes] = {}
    while off + 16 <= len(data):
        _s, _us, incl, _orig = struct.unpack(endian + "IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        etype = struct.unpack(">H", pkt[12:14])[0]
        if etype == 0x0800:
            ihl = (pkt[14] & 0x0F) * 4
            if pkt[23] != 6:
                continue
            total = struct.unpack(">H", pkt[16:18])[0]
            src = str(ipaddress.IPv4Address(pkt[26:30]))
            dst = str(ipaddress.IPv4Address(pkt[30:34]))
            tcp = pkt[14 + ihl:14 + total]
        elif etype == 0x86DD:
            if pkt[20] != 6:
                continue
            plen = struct.unpack(">H", pkt[18:20])[0]
            src = str(ipaddress.IPv6Address(pkt[22:38]))
            dst = str(ipaddress.IPv6Address(pkt[38:54]))
            tcp = pkt[54:54 + plen]
        else:
            continue
        sport, dport = struct.unpack(">HH", tcp[:4])
        doff = (tcp[12] >> 4) * 4
        payload = tcp[doff:]
        if payload:
            key = (src, sport, dst, dport)
            flows[key] = flows.get(key, b"") + payload
    return flows
