"""The nat-table rules that send a workload's TCP through its sidecar, and a small
executor that installs, removes and reads them back.

Rules:
1. meshlet owns exactly two chains per family, `MESHLET_INBOUND` (jumped to from
   PREROUTING) and `MESHLET_OUTPUT` (jumped to from OUTPUT), both in the nat table, and
   one jump rule to each. It never changes another rule, chain or policy: install flushes
   and refills its own chains; uninstall deletes every rule that jumps to them, then them.
2. Everything is applied as one `iptables-restore --noflush` script per family, so a
   change is atomic (same with iptables-nft and iptables-legacy: both flush a declared
   user chain that already exists). The jump is added only when the current rules hold
   none (extra copies are deleted), so installing twice gives the same rules.
3. The builders are pure: `install_script` / `uninstall_script` take the parsed current
   rules (`NatState`) and return text. Only `Executor` runs commands.
4. Outbound exclusions come before the REDIRECT, in this order: the proxy's own uid/gid
   (else its outbound connections would loop back into itself), loopback (`-o lo`, which
   also covers connections to the workload's own addresses, and 127.0.0.0/8 / ::1/128),
   skipped ports, skipped subnets of the family.
5. Inbound: skipped ports RETURN, all other TCP is redirected to the inbound port. A
   connection to the inbound port itself is redirected to itself, which is harmless, so
   it is not special-cased.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence

from meshlet.config import ConfigError

__all__ = [
    "CHAINS",
    "DEFAULT_INBOUND_PORT",
    "DEFAULT_OUTBOUND_PORT",
    "FAMILIES",
    "INBOUND_CHAIN",
    "MODES",
    "MULTIPORT_LIMIT",
    "OUTPUT_CHAIN",
    "Executor",
    "FamilyState",
    "NatState",
    "NetfilterError",
    "Options",
    "PortRange",
    "chain_rules",
    "install",
    "install_script",
    "installed",
    "make_options",
    "multiport_chunks",
    "parse_nat",
    "parse_ports",
    "split_subnets",
    "uninstall",
    "uninstall_script",
]

INBOUND_CHAIN = "MESHLET_INBOUND"
OUTPUT_CHAIN = "MESHLET_OUTPUT"
CHAINS = (INBOUND_CHAIN, OUTPUT_CHAIN)
# (builtin chain, rule spec) of the two jumps; the spec is what iptables-save prints.
JUMPS = (("PREROUTING", f"-p tcp -j {INBOUND_CHAIN}"), ("OUTPUT", f"-p tcp -j {OUTPUT_CHAIN}"))
DEFAULT_INBOUND_PORT = 4143
DEFAULT_OUTBOUND_PORT = 4140
MULTIPORT_LIMIT = 15  # ports per `-m multiport` match; a range A:B counts as two
FAMILIES = ("ipv4", "ipv6")
MODES = ("auto", "nft", "legacy")
_LOOPBACK = {"ipv4": "127.0.0.0/8", "ipv6": "::1/128"}
_CMD = {"ipv4": "iptables", "ipv6": "ip6tables"}
_TIMEOUT = 30.0


class NetfilterError(Exception):
    """A command failed or cannot run; the message names it (exit status 1)."""


# ---------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    @property
    def weight(self) -> int:
        """What it costs in a multiport match: one port or two for a range."""
        return 1 if self.first == self.last else 2

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}:{self.last}"


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    inbound_port: int = DEFAULT_INBOUND_PORT
    outbound_port: int = DEFAULT_OUTBOUND_PORT
    proxy_uids: tuple[int, ...] = ()
    proxy_gids: tuple[int, ...] = ()
    skip_inbound_ports: tuple[PortRange, ...] = ()
    skip_outbound_ports: tuple[PortRange, ...] = ()
    skip_subnets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{text.strip()!r} is not a port (1-65535)")
    return int(text)


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """`"22,80,8000-8100"` -> port ranges, in the order given, duplicates dropped."""
    out: list[PortRange] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        first, sep, last = item.partition("-")
        r = PortRange(_port(first), _port(last)) if sep else PortRange(_port(first), _port(first))
        if r.first > r.last:
            raise ValueError(f"{item!r}: range start is after its end")
        if r not in out:
            out.append(r)
    return tuple(out)


def multiport_chunks(ports: Sequence[PortRange], limit: int = MULTIPORT_LIMIT) -> list[str]:
    """`--dports` values of at most `limit` ports each (a range counts as two)."""
    chunks: list[list[PortRange]] = []
    used = limit
    for r in ports:
        if used + r.weight > limit:
            chunks.append([])
            used = 0
        chunks[-1].append(r)
        used += r.weight
    return [",".join(str(r) for r in c) for c in chunks]


def split_subnets(
    nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> dict[str, list[str]]:
    """Subnets per family, as iptables-save prints them."""
    out: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for n in nets:
        out["ipv4" if n.version == 4 else "ipv6"].append(str(n))
    return out


def _ids(values: Sequence[str], what: str, errors: list[str]) -> tuple[int, ...]:
    out: list[int] = []
    for v in values:
        for item in v.split(","):
            if item.strip().isdigit():
                out.append(int(item))
            else:
                errors.append(f"--{what}: {item.strip()!r} is not a numeric id")
    return tuple(dict.fromkeys(out))


def make_options(
    *,
    inbound_port: str | int = DEFAULT_INBOUND_PORT,
    outbound_port: str | int = DEFAULT_OUTBOUND_PORT,
    proxy_uids: Sequence[str] = (),
    proxy_gids: Sequence[str] = (),
    skip_inbound_ports: Sequence[str] = (),
    skip_outbound_ports: Sequence[str] = (),
    skip_subnets: Sequence[str] = (),
    need_owner: bool = True,
) -> Options:
    """Options from flag strings (each list flag may repeat and hold comma lists).
    Every problem is collected into one ConfigError (exit status 64)."""
    errors: list[str] = []

    def port(flag: str, v: str | int) -> int:
        try:
            return _port(str(v))
        except ValueError as e:
            errors.append(f"--{flag}: {e}")
            return 0

    def ports(flag: str, vs: Sequence[str]) -> tuple[PortRange, ...]:
        try:
            return parse_ports(",".join(vs))
        except ValueError as e:
            errors.append(f"--{flag}: {e}")
            return ()

    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for v in skip_subnets:
        for item in (i.strip() for i in v.split(",")):
            if not item:
                continue
            try:
                n = ipaddress.ip_network(item, strict=False)
            except ValueError as e:
                errors.append(f"--skip-subnets: {e}")
                continue
            if n not in nets:
                nets.append(n)
    opts = Options(
        inbound_port=port("inbound-port", inbound_port),
        outbound_port=port("outbound-port", outbound_port),
        proxy_uids=_ids(proxy_uids, "proxy-uid", errors),
        proxy_gids=_ids(proxy_gids, "proxy-gid", errors),
        skip_inbound_ports=ports("skip-inbound-ports", skip_inbound_ports),
        skip_outbound_ports=ports("skip-outbound-ports", skip_outbound_ports),
        skip_subnets=tuple(nets),
    )
    if need_owner and not (proxy_uids or proxy_gids):
        errors.append("--proxy-uid or --proxy-gid is required: without it the proxy's own "
                      "outbound connections would be redirected back into the proxy (a loop)")
    if opts.inbound_port and opts.inbound_port == opts.outbound_port:
        errors.append("--inbound-port and --outbound-port must differ")
    if errors:
        raise ConfigError(errors)
    return opts


# ------------------------------------------------------------------------ pure builders


def chain_rules(opts: Options, family: str) -> list[str]:
    """The `-A` lines of meshlet's two chains for one family, in order."""
    rules: list[str] = []
    inb, out = f"-A {INBOUND_CHAIN}", f"-A {OUTPUT_CHAIN}"
    for dports in multiport_chunks(opts.skip_inbound_ports):
        rules.append(f"{inb} -p tcp -m multiport --dports {dports} -j RETURN")
    rules.append(f"{inb} -p tcp -j REDIRECT --to-ports {opts.inbound_port}")
    for uid in opts.proxy_uids:
        rules.append(f"{out} -m owner --uid-owner {uid} -j RETURN")
    for gid in opts.proxy_gids:
        rules.append(f"{out} -m owner --gid-owner {gid} -j RETURN")
    rules.append(f"{out} -o lo -j RETURN")
    rules.append(f"{out} -d {_LOOPBACK[family]} -j RETURN")
    for dports in multiport_chunks(opts.skip_outbound_ports):
        rules.append(f"{out} -p tcp -m multiport --dports {dports} -j RETURN")
    for net in split_subnets(opts.skip_subnets)[family]:
        rules.append(f"{out} -d {net} -j RETURN")
    rules.append(f"{out} -p tcp -j REDIRECT --to-ports {opts.outbound_port}")
    return rules


@dataclasses.dataclass(frozen=True, slots=True)
class NatState:
    """The nat table as iptables-save printed it: chain names and (chain, spec) rules."""

    chains: tuple[str, ...] = ()
    rules: tuple[tuple[str, str], ...] = ()

    def ours(self) -> tuple[str, ...]:
        return tuple(c for c in CHAINS if c in self.chains)

    def jumps(self) -> list[tuple[str, str]]:
        """Rules outside our chains whose target is one of them."""
        out = []
        for chain, spec in self.rules:
            words = spec.split()
            for i, w in enumerate(words[:-1]):
                if w in ("-j", "--jump", "-g", "--goto") and words[i + 1] in CHAINS:
                    if chain not in CHAINS:
                        out.append((chain, spec))
                    break
        return out

    def redirect_port(self, chain: str) -> int | None:
        """The `--to-ports` of the REDIRECT in one of our chains, if any."""
        for c, spec in self.rules:
            m = re.search(r"-j REDIRECT --to-ports (\d+)", spec)
            if c == chain and m:
                return int(m.group(1))
        return None


def parse_nat(save: str) -> NatState:
    """The nat section of `iptables-save` output (empty when there is none)."""
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    table = None
    for line in save.splitlines():
        line = line.strip()
        if line.startswith("*"):
            table = line[1:]
        elif table != "nat" or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            rules.append((chain, spec))
    return NatState(tuple(chains), tuple(rules))


def install_script(opts: Options, family: str, state: NatState) -> str:
    """An `iptables-restore --noflush` script that makes the rules what `opts` says."""
    lines = ["*nat"] + [f":{c} - [0:0]" for c in CHAINS] + chain_rules(opts, family)
    for builtin, spec in JUMPS:
        copies = [(c, s) for c, s in state.rules if c == builtin and s == spec]
        if not copies:
            lines.append(f"-A {builtin} {spec}")
        lines += [f"-D {builtin} {spec}"] * (len(copies) - 1)
    return "\n".join([*lines, "COMMIT", ""])


def uninstall_script(state: NatState) -> str:
    """A restore script deleting every jump to our chains, then them; "" if none."""
    lines = [f"-D {chain} {spec}" for chain, spec in state.jumps()]
    lines += [f"-F {c}" for c in state.ours()] + [f"-X {c}" for c in state.ours()]
    return "\n".join(["*nat", *lines, "COMMIT", ""]) if lines else ""


# ----------------------------------------------------------------------------- executor


@dataclasses.dataclass(frozen=True, slots=True)
class FamilyState:
    """What `installed` found for one family (and iptables mode)."""

    family: str
    mode: str
    chains: tuple[str, ...]  # which of meshlet's chains exist
    jumps: int  # rules jumping to them
    inbound_port: int | None  # where MESHLET_INBOUND redirects
    outbound_port: int | None  # where MESHLET_OUTPUT redirects

    @property
    def complete(self) -> bool:
        return self.chains == CHAINS and self.jumps >= len(JUMPS)


class Executor:
    """Runs iptables commands, inside `ip netns exec NETNS` when a netns is given."""

    __slots__ = ("netns",)

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + list(cmd)

    def describe(self, cmd: Sequence[str]) -> str:
        return shlex.join(self.argv(cmd))

    def run(self, cmd: Sequence[str], stdin: str | None = None) -> str:
        argv = self.argv(cmd)
        if shutil.which(argv[0]) is None:
            raise NetfilterError(f"`{argv[0]}` not found on PATH (install iptables / iproute2)")
        if self.netns and shutil.which(cmd[0]) is None:
            raise NetfilterError(f"`{cmd[0]}` not found on PATH (install iptables)")
        try:
            p = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                               timeout=_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise NetfilterError(f"`{shlex.join(argv)}` took more than {_TIMEOUT:g}s") from None
        except OSError as e:
            raise NetfilterError(f"`{shlex.join(argv)}` cannot run: {e}") from None
        if p.returncode != 0:
            raise NetfilterError(f"`{shlex.join(argv)}` failed (exit {p.returncode}): "
                                 f"{p.stderr.strip() or p.stdout.strip() or 'no output'}")
        return p.stdout

    def save(self, family: str, mode: str) -> NatState:
        # No `-t nat`: reading every loaded table never loads a kernel module.
        return parse_nat(self.run([f"{_CMD[family]}-{mode}-save"]))

    def count_rules(self, mode: str) -> int:
        """`-A` lines in the IPv4 tables of one mode; 0 when it cannot be read."""
        try:
            out = self.run([f"iptables-{mode}-save"])
        except NetfilterError:
            return 0
        return sum(1 for line in out.splitlines() if line.startswith("-A "))

    def detect_mode(self) -> str:
        """The mode already holding more rules, else what `iptables --version` says."""
        nft, legacy = self.count_rules("nft"), self.count_rules("legacy")
        if nft != legacy:
            return "nft" if nft > legacy else "legacy"
        try:
            version = self.run(["iptables", "--version"])
        except NetfilterError:
            version = ""
        if "legacy" in version:
            return "legacy"
        if "nf_tables" in version or shutil.which("iptables-nft"):
            return "nft"
        if shutil.which("iptables-legacy"):
            return "legacy"
        raise NetfilterError("neither iptables-nft nor iptables-legacy found (install iptables)")

    def ipv6_works(self, mode: str) -> bool:
        try:
            self.run([f"ip6tables-{mode}-save"])
        except NetfilterError:
            return False
        return True


def _check_root(dry_run: bool) -> None:
    if not dry_run and os.geteuid() != 0:
        raise NetfilterError("changing iptables rules needs root (CAP_NET_ADMIN); "
                             "try --dry-run to see them")


def _families(ex: Executor, mode: str, ipv6: bool | None, out: list[str]) -> list[str]:
    if ipv6 is False:
        return ["ipv4"]
    if ex.ipv6_works(mode):
        return list(FAMILIES)
    if ipv6:
        ex.run([f"ip6tables-{mode}-save"])  # raises with the command's own error
    out.append(f"# ip6tables-{mode} does not work here: IPv6 skipped")
    return ["ipv4"]


def install(
    opts: Options,
    *,
    mode: str = "auto",
    ipv6: bool | None = None,
    netns: str | None = None,
    dry_run: bool = False,
    executor: Executor | None = None,
) -> list[str]:
    """Install (or, with dry_run, describe) the rules. Returns what was (or
    would be) run as shell lines: each restore command with its script as a here-document,
    and `#` notes."""
    _check_root(dry_run)
    ex = executor or Executor(netns)
    mode = ex.detect_mode() if mode == "auto" else mode
    out: list[str] = []
    other = "legacy" if mode == "nft" else "nft"
    for family in FAMILIES:
        try:
            theirs = ex.save(family, other)
        except NetfilterError:
            continue
        if theirs.ours():
            raise NetfilterError(
                f"meshlet's chains are installed with {_CMD[family]}-{other}; both would "
                f"intercept. Run `meshlet init --uninstall --mode {other}` first")
    for family in _families(ex, mode, ipv6, out):
        restore = [f"{_CMD[family]}-{mode}-restore", "--noflush"]
        try:
            state = ex.save(family, mode)
        except NetfilterError:
            if not dry_run:
                raise
            state = NatState()
            out.append(f"# cannot read the current {family} rules: assuming none")
        script = install_script(opts, family, state)
        out += [f"{ex.describe(restore)} <<'EOF'", *script.splitlines(), "EOF"]
        if not dry_run:
            ex.run(restore, stdin=script)
    return out


def uninstall(
    *,
    mode: str = "auto",
    ipv6: bool | None = None,
    netns: str | None = None,
    dry_run: bool = False,
    executor: Executor | None = None,
) -> list[str]:
    """Delete meshlet's jumps and chains; with mode "auto", from both iptables modes."""
    _check_root(dry_run)
    ex = executor or Executor(netns)
    modes = [m for m in ("nft", "legacy") if shutil.which(f"iptables-{m}")]
    modes = modes if mode == "auto" else [mode]
    out: list[str] = []
    failed: list[NetfilterError] = []
    for m in modes:
        for family in ["ipv4"] if ipv6 is False else FAMILIES:
            try:
                state = ex.save(family, m)
            except NetfilterError as e:
                failed.append(e)
                if dry_run:
                    out.append(f"# cannot read the {family} rules of {m} mode")
                if dry_run or mode == "auto" or (family == "ipv6" and ipv6 is None):
                    continue
                raise
            script = uninstall_script(state)
            if not script:
                continue
            restore = [f"{_CMD[family]}-{m}-restore", "--noflush"]
            out += [f"{ex.describe(restore)} <<'EOF'", *script.splitlines(), "EOF"]
            if not dry_run:
                ex.run(restore, stdin=script)
    if failed and len(failed) == len(modes) * (1 if ipv6 is False else 2) and not dry_run:
        raise failed[0]  # nothing could be read at all (no such netns, not root, ...)
    if not out:
        out.append("# no meshlet rules installed: nothing to remove")
    return out


def installed(netns: str | None = None, mode: str = "auto") -> dict[str, FamilyState]:
    """What is installed, per family ("ipv4", "ipv6"); a family that cannot be read
    is left out. Needs root."""
    ex = Executor(netns)
    mode = ex.detect_mode() if mode == "auto" else mode
    found: dict[str, FamilyState] = {}
    for family in FAMILIES:
        try:
            s = ex.save(family, mode)
        except NetfilterError:
            continue
        found[family] = FamilyState(family, mode, s.ours(), len(s.jumps()),
                                    s.redirect_port(INBOUND_CHAIN), s.redirect_port(OUTPUT_CHAIN))
    return found
