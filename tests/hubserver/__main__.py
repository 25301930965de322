"""Run the test Hub server: ``python -m tests.hubserver --storage DIR --token USER:TOKEN [options]``.

Binds a loopback address only (anything else is refused), then prints one line ``HUB_URL=http://127.0.0.1:PORT`` on
stdout once it is serving, so that a parent process can wait for it. ``--port 0`` (the default) picks a free port;
the address is bound with ``SO_REUSEADDR`` so the server can be restarted on the same port right after a stop.
Tokens can also be given as ``HUBSERVER_TOKENS="user:tok1,someone:tok2"`` (kept out of the process listing).
SIGTERM / Ctrl-C shut it down gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn


def loopback_address(host: str) -> str:
    """The IP address to bind for ``host``; exits with an error unless it is a loopback address or ``localhost``."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise SystemExit(f"error: --host must be a loopback IP address or 'localhost', got {host!r}") from None
    if not address.is_loopback:
        raise SystemExit(f"error: refusing to listen on {host!r}: the test Hub server only binds loopback addresses")
    return str(address)


def _split_pair(text: str, what: str) -> tuple[str, str]:
    left, sep, right = text.partition(":")
    if not sep or not left or not right:
        raise SystemExit(f"error: expected {what}, got {text!r}")
    return left, right


def parse_tokens(specs: list[str]) -> dict[str, str]:
    """``["user:tok", ...]`` -> ``{"tok": "user", ...}`` (a user may have several tokens)."""
    tokens: dict[str, str] = {}
    for spec in specs:
        user, token = _split_pair(spec, "USER:TOKEN")
        tokens[token] = user
    return tokens


def parse_orgs(specs: list[str]) -> dict[str, list[str]]:
    """``["org:alice,bob", ...]`` -> ``{"org": ["alice", "bob"], ...}``."""
    orgs: dict[str, list[str]] = {}
    for spec in specs:
        org, members = _split_pair(spec, "ORG:USER[,USER...]")
        orgs.setdefault(org, []).extend(m for m in members.split(",") if m)
    return orgs


async def _serve(server: uvicorn.Server, sock: socket.socket, url: str) -> None:
    """Serve on ``sock`` and announce ``url`` on stdout as soon as uvicorn has started."""
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task  # startup failed: propagate
            return
        await asyncio.sleep(0.01)
    print(f"HUB_URL={url}", flush=True)
    await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hubserver", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind, 0 for a free one (default: 0)")
    parser.add_argument("--storage", required=True, help="directory holding the repositories (created if missing)")
    parser.add_argument("--token", action="append", default=[], metavar="USER:TOKEN", help="a user's token (repeat)")
    parser.add_argument("--org", action="append", default=[], metavar="ORG:USER[,USER...]", help="an organization")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level; 'info' shows every request")
    args = parser.parse_args(argv)

    host = loopback_address(args.host)
    env_tokens = [t for t in os.environ.get("HUBSERVER_TOKENS", "").split(",") if t]
    tokens = parse_tokens(env_tokens + args.token)
    orgs = parse_orgs(args.org)

    import uvicorn  # imported late so that argument errors are quick

    from .app import create_app

    app = create_app(args.storage, tokens=tokens, orgs=orgs)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, args.port))
    except OSError as e:
        print(f"error: cannot bind {host}:{args.port}: {e}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    url = f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"

    config = uvicorn.Config(app, log_level=args.log_level, access_log=True, lifespan="off", timeout_graceful_shutdown=2)
    asyncio.run(_serve(uvicorn.Server(config), sock, url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
