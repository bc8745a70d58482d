"""The `meshlet` command. Parsing only: the work lives in the packages it calls."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

from meshlet import __version__
from meshlet.config import (
    EX_CONFIG,
    ConfigError,
    control_settings_help,
    parse_control_config,
    parse_duration,
    parse_proxy_config,
    proxy_settings_help,
)

__all__ = ["main"]


def _proxy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import argparse
    p = sub.add_parser(
        "proxy",
        help="run the sidecar proxy",
        description="Run the meshlet sidecar proxy. Every flag has a MESHLET_* variable; "
        "a flag wins over its variable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, var, default, text in proxy_settings_help():
        dest = var.removeprefix("MESHLET_").lower()
        p.add_argument(flag, dest=dest, default=None, metavar="VALUE",
                       help=f"{text} [{var}; default: {default or 'unset'}]")


def _control_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "control",
        help="run the control plane (identity, discovery, policy), or manage it",
        description="Run the meshlet control plane. Every flag has a MESHLET_* variable.",
    )
    for flag, var, default, text in control_settings_help():
        c.add_argument(flag, dest="c_" + flag[2:].replace("-", "_"), default=None,
                       metavar="VALUE", help=f"{text} [{var}; default: {default}]")
    csub = c.add_subparsers(dest="control_command")
    tok = csub.add_parser("token", help="join tokens").add_subparsers(
        dest="token_command", required=True)
    create = tok.add_parser("create", help="print a join token for one identity")
    create.add_argument("--namespace", required=True)
    create.add_argument("--account", required=True)
    create.add_argument("--ttl", default="1h", help="validity (default 1h)")


def _lean_restart(given: list[str]) -> None:
    """Run `meshlet proxy` in a fresh interpreter started with `-S`: no `site`, so none
    of the installation's `.pth` hooks (editable-install finders, setuptools' distutils
    shim, certificate patchers) are imported into every sidecar, ~1.4 MiB of RSS each.

    The module path is this process's own, in its order (plus meshlet's own directory,
    last, when only a finder knew it), passed as PYTHONPATH; `-P` keeps the working
    directory out of it, and this interpreter's other flags are kept. The process keeps
    its pid (exec). The user's PYTHONPATH is put back in the new process before anything
    else (`_lean_restored`), so the processes it starts see the environment they would
    have. Skipped when already lean, for frozen or isolated interpreters, when the
    environment is ignored (-E), or with MESHLET_LEAN=0."""
    if sys.flags.no_site or sys.flags.isolated or sys.flags.ignore_environment \
            or getattr(sys, "frozen", False) or not sys.executable \
            or os.environ.get("MESHLET_LEAN") == "0":
        return
    import subprocess

    import meshlet

    here = os.path.dirname(os.path.dirname(os.path.abspath(meshlet.__file__)))
    path = [p for p in sys.path if p and os.path.exists(p)]
    if here not in path:
        path.append(here)
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["MESHLET_LEAN_PYTHONPATH"] = "" if old is None else "=" + old
    env["PYTHONPATH"] = os.pathsep.join(path)
    interp_flags = getattr(subprocess, "_args_from_interpreter_flags", list)  # -O, -W, -X
    flags = [f for f in interp_flags() if f not in ("-S", "-P")]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable,
                  [sys.executable, *flags, "-S", "-P", "-m", "meshlet", *given], env)
    except OSError:
        return  # run here, with site, as before


def _lean_restored() -> None:
    """In the re-executed proxy: the user's PYTHONPATH back (see `_lean_restart`)."""
    saved = os.environ.pop("MESHLET_LEAN_PYTHONPATH", None)
    if saved is None:
        return
    if saved.startswith("="):
        os.environ["PYTHONPATH"] = saved[1:]
    else:
        os.environ.pop("PYTHONPATH", None)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    if argv is None and given and given[0] == "proxy":
        _lean_restored()
        _lean_restart(given)
    if given == ["proxy"]:
        # The sidecar configured by its environment alone (the usual case): no argparse,
        # whose import costs every proxy ~400 KB of RSS.
        return _run_proxy(None)
    import argparse

    parser = argparse.ArgumentParser(prog="meshlet", description="A small, fast service mesh.")
    parser.add_argument("--version", action="version", version=f"meshlet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _proxy_parser(sub)
    _control_parser(sub)
    u = sub.add_parser("up", help="run a whole mesh on this machine from a mesh file",
                       description="Start the control plane, one sidecar per app replica and "
                       "the apps of a mesh file; Ctrl-C stops them in order.")
    u.add_argument("mesh_file", nargs="?", default="meshlet.yaml",
                   help="the mesh file (default: meshlet.yaml)")
    _up_flags(u)
    d = sub.add_parser("demo", help="`meshlet up` on the bundled example (examples/shop)")
    _up_flags(d)
    dn = sub.add_parser("down", help="remove what `meshlet up --netns` made (after a crash)")
    dn.add_argument("--netns", action="store_true", required=True,
                    help="pods (network namespaces), the bridge, hosts files")
    dn.add_argument("--state-dir", default=".meshlet/up")
    if given[:1] != ["proxy"]:  # the sidecar does not pay for the stat module (RSS)
        from meshlet.cli.routes import add_parser as _routes_parser
        from meshlet.cli.stat import add_parsers as _stat_parsers

        _stat_parsers(sub)
        _routes_parser(sub)
        from meshlet.cli.init import add_parser as _init_parser

        _init_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "proxy":
        return _run_proxy(args)
    if args.command == "control":
        return _run_control(args)
    if args.command in ("up", "demo"):
        from meshlet.cli.up import run_up

        path = args.mesh_file if args.command == "up" else _bundled_example()
        color = True if args.color == "always" else False if args.color == "never" else None
        return run_up(path, args.state_dir, color, args.proxy_log_level, args.netns)
    if args.command == "down":
        from meshlet.cli.up import run_down

        return run_down(args.state_dir)
    if args.command == "routes":
        from meshlet.cli.routes import run_routes

        return run_routes(args)
    if args.command == "init":
        from meshlet.cli.init import run as run_init

        return run_init(args)
    if args.command in ("stat", "check"):
        from meshlet.cli.stat import run as run_stat

        return run_stat(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2  # pragma: no cover


def _up_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=".meshlet/up",
                   help="CA, tokens, derived mesh file, up.json (default .meshlet/up)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    p.add_argument("--proxy-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="sidecars' log level (default warning)")
    p.add_argument("--netns", action="store_true",
                   help="transparent mode, as root: each replica in its own network "
                   "namespace with `meshlet init` rules; apps dial services by name and "
                   "port")


def _bundled_example() -> str:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.join(here, "examples", "shop", "mesh.yaml")


def _run_proxy(args: argparse.Namespace | None) -> int:
    from meshlet.config import _SETTINGS, env_name

    flags = {} if args is None else {
        f: getattr(args, env_name(f).removeprefix("MESHLET_").lower()) for f in _SETTINGS}
    try:
        cfg = parse_proxy_config(os.environ, flags)
    except ConfigError as e:
        print("meshlet proxy: invalid configuration:", file=sys.stderr)
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return EX_CONFIG
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from meshlet.proxy.server import run_proxy

    return run_proxy(cfg)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def _run_control(args: argparse.Namespace) -> int:
    flags = {k[2:]: v for k, v in vars(args).items() if k.startswith("c_")}
    try:
        cfg = parse_control_config(os.environ, flags)
        ttl = parse_duration(args.ttl) if args.control_command == "token" else 0.0
    except (ConfigError, ValueError) as e:
        print("meshlet control: invalid configuration:", file=sys.stderr)
        for line in getattr(e, "errors", [str(e)]):
            print(f"  {line}", file=sys.stderr)
        return EX_CONFIG
    if args.control_command == "token":
        from pathlib import Path

        from meshlet.control.server import load_token_secret
        from meshlet.identity.spiffe import Identity
        from meshlet.identity.tokens import create_token

        try:
            ident = Identity(cfg.trust_domain, args.namespace, args.account)
        except ValueError as e:
            print(f"meshlet control token create: {e}", file=sys.stderr)
            return EX_CONFIG
        print(create_token(load_token_secret(Path(cfg.state_dir)), ident, ttl))
        return 0
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from meshlet.control.server import run_control

    return run_control(cfg)
