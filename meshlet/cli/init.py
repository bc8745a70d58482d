"""`meshlet init`: install (or remove) the iptables rules that send a workload's TCP
through its sidecar. Parsing only: the rules and their execution live in
`meshlet.netfilter.rules`."""

from __future__ import annotations

import argparse
import sys

from meshlet.config import EX_CONFIG, ConfigError
from meshlet.netfilter import rules

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init",
        help="install the iptables rules for transparent interception",
        description="Redirect inbound TCP to the proxy's inbound port and outbound TCP to "
        "its outbound port, in meshlet's own nat chains (MESHLET_INBOUND from PREROUTING, "
        "MESHLET_OUTPUT from OUTPUT), for IPv4 and IPv6. Idempotent. Install the rules "
        "after the proxy is ready and remove them before stopping it.",
    )
    p.add_argument("--inbound-port", default=str(rules.DEFAULT_INBOUND_PORT), metavar="PORT",
                   help=f"where inbound TCP goes (default {rules.DEFAULT_INBOUND_PORT})")
    p.add_argument("--outbound-port", default=str(rules.DEFAULT_OUTBOUND_PORT),
                   metavar="PORT",
                   help=f"where outbound TCP goes (default {rules.DEFAULT_OUTBOUND_PORT})")
    p.add_argument("--proxy-uid", action="append", default=[], metavar="UID",
                   help="the proxy's uid; its traffic is not redirected (repeatable)")
    p.add_argument("--proxy-gid", action="append", default=[], metavar="GID",
                   help="the proxy's gid; its traffic is not redirected (repeatable)")
    p.add_argument("--skip-inbound-ports", action="append", default=[], metavar="PORTS",
                   help="inbound ports not redirected, e.g. 22,9000-9100 (repeatable)")
    p.add_argument("--skip-outbound-ports", action="append", default=[], metavar="PORTS",
                   help="outbound ports not redirected, e.g. 25,4000-4100 (repeatable)")
    p.add_argument("--skip-subnets", action="append", default=[], metavar="CIDRS",
                   help="outbound destinations not redirected, IPv4 or IPv6 (repeatable)")
    p.add_argument("--mode", choices=rules.MODES, default="auto",
                   help="iptables-nft or iptables-legacy (default: the one already holding "
                   "rules, else what `iptables --version` says)")
    p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=None,
                   help="also install the ip6tables rules (default: when ip6tables works)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the iptables-restore scripts and change nothing")
    p.add_argument("--uninstall", action="store_true",
                   help="remove meshlet's chains and the jumps to them, nothing else")
    p.add_argument("--netns", metavar="NAME",
                   help="work inside the network namespace NAME (`ip netns exec NAME`)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.uninstall:
            lines = rules.uninstall(mode=args.mode, ipv6=args.ipv6, netns=args.netns,
                                    dry_run=args.dry_run)
        else:
            opts = rules.make_options(
                inbound_port=args.inbound_port,
                outbound_port=args.outbound_port,
                proxy_uids=args.proxy_uid,
                proxy_gids=args.proxy_gid,
                skip_inbound_ports=args.skip_inbound_ports,
                skip_outbound_ports=args.skip_outbound_ports,
                skip_subnets=args.skip_subnets,
            )
            lines = rules.install(opts, mode=args.mode, ipv6=args.ipv6, netns=args.netns,
                                  dry_run=args.dry_run)
    except ConfigError as e:
        for err in e.errors:
            print(f"meshlet init: {err}", file=sys.stderr)
        return EX_CONFIG
    except rules.NetfilterError as e:
        print(f"meshlet init: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print("\n".join(lines))
    else:  # only the notes (IPv6 skipped, nothing to remove)
        for line in lines:
            if line.startswith("# "):
                print(f"meshlet init: {line[2:]}", file=sys.stderr)
    return 0
