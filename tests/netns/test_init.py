"""`meshlet init` for real: rules installed with the real iptables binaries in a fresh
network namespace per test (root only), read back with iptables-save, and one behaviour
test with real TCP connections through the rules."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from meshlet.cli import init as init_cli
from meshlet.netfilter import rules

pytestmark = pytest.mark.timeout(60)


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


if not _netns_usable():
    pytest.skip("needs root, `ip netns` and iptables", allow_module_level=True)

MODES = [m for m in ("nft", "legacy") if shutil.which(f"iptables-{m}")]
GID = 4242  # the proxy's gid in these tests; no process here runs with it by chance


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"mshlt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def sh(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=check, timeout=20)


def save(ns: str, mode: str, family: str = "ipv4") -> str:
    """The nat table without comments and with counters zeroed."""
    cmd = "iptables" if family == "ipv4" else "ip6tables"
    text = sh(ns, f"{cmd}-{mode}-save", "-t", "nat").stdout
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                     if not line.startswith("#"))


def init(*argv: str) -> int:
    p = argparse.ArgumentParser()
    init_cli.add_parser(p.add_subparsers(dest="command"))
    return init_cli.run(p.parse_args(["init", *argv]))


@pytest.mark.parametrize("mode", MODES)
def test_install_is_idempotent(ns: str, mode: str) -> None:
    args = ("--netns", ns, "--mode", mode, "--proxy-uid", "1337", "--proxy-gid", str(GID),
            "--skip-outbound-ports", "25,4000-4010", "--skip-inbound-ports", "22",
            "--skip-subnets", "10.96.0.0/12,fd00:10::/64")
    assert init(*args) == 0
    v4, v6 = save(ns, mode), save(ns, mode, "ipv6")
    for line in ("-A PREROUTING -p tcp -j MESHLET_INBOUND",
                 "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
                 "-A MESHLET_INBOUND -p tcp -m multiport --dports 22 -j RETURN",
                 "-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports 4143",
                 "-A MESHLET_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                 f"-A MESHLET_OUTPUT -m owner --gid-owner {GID} -j RETURN",
                 "-A MESHLET_OUTPUT -p tcp -m multiport --dports 25,4000:4010 -j RETURN",
                 "-A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports 4140"):
        assert line in v4.splitlines() and line in v6.splitlines()
    assert "-A MESHLET_OUTPUT -d 10.96.0.0/12 -j RETURN" in v4
    assert "-A MESHLET_OUTPUT -d fd00:10::/64 -j RETURN" in v6
    assert "fd00" not in v4 and "10.96" not in v6
    assert init(*args) == 0
    assert (save(ns, mode), save(ns, mode, "ipv6")) == (v4, v6)
    other = "legacy" if mode == "nft" else "nft"
    if other in MODES:
        assert "MESHLET" not in save(ns, other)
    # changed options replace the rules rather than adding to them
    assert init("--netns", ns, "--mode", mode, "--proxy-uid", "7", "--outbound-port",
                "5140") == 0
    after = save(ns, mode).splitlines()
    assert [r for r in after if r.startswith("-A ")] == [
        "-A PREROUTING -p tcp -j MESHLET_INBOUND",
        "-A OUTPUT -p tcp -j MESHLET_OUTPUT",
        *chain_lines(rules.make_options(proxy_uids=["7"], outbound_port="5140"))]
    state = rules.installed(ns)
    assert set(state) == {"ipv4", "ipv6"}
    assert all(s.complete and s.mode == mode and (s.inbound_port, s.outbound_port)
               == (4143, 5140) for s in state.values())


def chain_lines(opts: rules.Options) -> list[str]:
    return rules.chain_rules(opts, "ipv4")


@pytest.mark.parametrize("mode", MODES)
def test_uninstall_removes_only_ours(ns: str, mode: str) -> None:
    ipt = f"iptables-{mode}"
    sh(ns, ipt, "-t", "nat", "-N", "FOREIGN")
    sh(ns, ipt, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "FOREIGN")
    sh(ns, ipt, "-t", "nat", "-A", "FOREIGN", "-j", "RETURN")
    before = save(ns, mode)
    assert init("--netns", ns, "--mode", mode, "--proxy-gid", str(GID)) == 0
    # a second copy of a jump, and one from a foreign chain: uninstall removes both
    sh(ns, ipt, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "MESHLET_OUTPUT")
    sh(ns, ipt, "-t", "nat", "-I", "FOREIGN", "-j", "MESHLET_OUTPUT")
    assert init("--netns", ns, "--uninstall") == 0  # auto mode finds them
    assert save(ns, mode) == before
    assert "MESHLET" not in save(ns, mode, "ipv6")
    assert rules.installed(ns, mode)["ipv4"].chains == ()
    assert init("--netns", ns, "--uninstall", "--mode", mode) == 0  # nothing installed


def test_auto_mode_follows_existing_rules(ns: str) -> None:
    if MODES != ["nft", "legacy"]:
        pytest.skip("needs both iptables-nft and iptables-legacy")
    sh(ns, "iptables-legacy", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN")
    assert init("--netns", ns, "--proxy-uid", "1") == 0
    assert "MESHLET_OUTPUT" in save(ns, "legacy")
    assert "MESHLET" not in save(ns, "nft")
    # and installing with the other mode while these exist is refused
    assert init("--netns", ns, "--mode", "nft", "--proxy-uid", "1") == 1
    assert "MESHLET" not in save(ns, "nft")


def test_dry_run_changes_nothing(ns: str, capsys: pytest.CaptureFixture[str]) -> None:
    mode = MODES[0]
    before = (save(ns, mode), save(ns, mode, "ipv6"))
    assert init("--netns", ns, "--mode", mode, "--proxy-uid", "1", "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"ip netns exec {ns} iptables-{mode}-restore --noflush <<'EOF'" in out
    assert "-A MESHLET_OUTPUT -m owner --uid-owner 1 -j RETURN" in out
    assert (save(ns, mode), save(ns, mode, "ipv6")) == before
    assert init("--netns", ns, "--mode", mode, "--proxy-uid", "1") == 0
    installed = (save(ns, mode), save(ns, mode, "ipv6"))
    assert init("--netns", ns, "--uninstall", "--dry-run") == 0
    assert "-X MESHLET_OUTPUT" in capsys.readouterr().out
    assert (save(ns, mode), save(ns, mode, "ipv6")) == installed


def test_errors_name_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"mshlt-missing-{uuid.uuid4().hex[:6]}"
    assert init("--netns", missing, "--proxy-uid", "1", "--mode", MODES[0]) == 1
    err = capsys.readouterr().err
    assert f"`ip netns exec {missing} iptables-{MODES[0]}-save` failed" in err
    assert "Cannot open network namespace" in err
    assert init("--netns", missing, "--uninstall") == 1
    assert init("--netns", missing) == 64


SERVER = r"""
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    dst = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, ip = struct.unpack("!H4s", dst[2:8])
    c.sendall(f"proxy saw {socket.inet_ntoa(ip)}:{port}\n".encode())
    c.close()
"""

CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.recv(100).decode().strip())
except OSError as e:
    print(type(e).__name__)
"""


def test_traffic_is_redirected_except_the_proxys(ns: str) -> None:
    mode = MODES[0]
    # A veth pair, both ends in the namespace (this kernel has no dummy links): the
    # workload's address is 10.250.0.1 and 10.250.0.2 is "another pod" on that link.
    sh(ns, "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
    sh(ns, "ip", "addr", "add", "10.250.0.1/24", "dev", "v0")
    sh(ns, "ip", "link", "set", "v0", "up")
    sh(ns, "ip", "link", "set", "v1", "up")
    # What is not redirected to 10.250.0.2 is refused (else it would wait for ARP).
    # The filter table runs after nat OUTPUT, so it sees redirected packets as 127.0.0.1.
    sh(ns, f"iptables-{mode}", "-A", "OUTPUT", "-d", "10.250.0.2", "-p", "tcp", "-j",
       "REJECT", "--reject-with", "tcp-reset")
    assert init("--netns", ns, "--mode", mode, "--proxy-gid", str(GID), "--no-ipv6",
                "--skip-outbound-ports", "81") == 0
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER,
                               "4140"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline() == "ready\n"

        def connect(host: str, port: int, gid: int | None = None) -> str:
            return subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port)],
                capture_output=True, text=True, check=True, timeout=20, group=gid,
            ).stdout.strip()

        assert connect("10.250.0.2", 80) == "proxy saw 10.250.0.2:80"
        assert connect("10.250.0.2", 80, gid=GID) == "ConnectionRefusedError"  # the proxy
        assert connect("10.250.0.2", 81) == "ConnectionRefusedError"  # skipped port
        # the workload's own address goes out through lo: not redirected
        assert connect("10.250.0.1", 80) == "ConnectionRefusedError"
        assert init("--netns", ns, "--uninstall") == 0
        assert connect("10.250.0.2", 80) == "ConnectionRefusedError"
    finally:
        server.kill()
        server.wait()
