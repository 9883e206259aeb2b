"""The dashboard's listen address: parsing it and binding its socket.

Binding is a plain synchronous socket bind (microseconds), so a scheduler's start is not
slowed by the HTTP stack; the app that serves the socket comes up afterwards (server.py).
A busy port falls back to a free one with a warning naming both, as dask's dashboard does:
a second scheduler on one machine should still get a dashboard, not fail to start.
"""
from __future__ import annotations

import errno
import logging
import socket

logger = logging.getLogger("taskcore.dashboard")

BACKLOG = 128


def parse_address(address) -> tuple[str, int]:
    """`(host, port)` from ":8787", "0.0.0.0:8787", "127.0.0.1:0", "[::1]:8787", "8787" or
    8787. The host is "" for all interfaces."""
    if isinstance(address, bool) or not isinstance(address, (str, int)):
        raise TypeError(f"dashboard address must be a string like ':8787', got {address!r}")
    text = str(address).strip()
    if text.startswith("["):                       # [IPv6]:port
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise ValueError(f"dashboard address {address!r}: expected '[host]:port'")
        host, port = text[1:end], text[end + 2:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.isdigit():
        host, port = "", text
    else:
        raise ValueError(f"dashboard address {address!r}: expected 'host:port', ':port' or "
                         f"'[ipv6]:port'")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"dashboard address {address!r}: the port must be a number from 0 "
                         f"to 65535")
    return host.strip(), int(port)


def dashboard_on_host(address, host: str):
    """A dashboard address with its host filled in: ":8787" (or 8787) listens on `host`, the
    scheduler's interface, as core-scheduler's --dashboard-address does; None stays None (no
    dashboard). A bad address is an error here, before anything starts."""
    if address is None:
        return None
    bind_host, port = parse_address(address)
    if bind_host or not host:
        return address if isinstance(address, str) else f":{port}"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    if host in ("", "*"):
        # All interfaces: both IPv4 and IPv6 where the kernel can, else IPv4 only.
        if socket.has_dualstack_ipv6():
            try:
                return socket.create_server(("::", port), family=socket.AF_INET6,
                                            dualstack_ipv6=True, backlog=BACKLOG)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise
        return socket.create_server(("0.0.0.0", port), backlog=BACKLOG)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return socket.create_server(sockaddr[:2], family=family, backlog=BACKLOG)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on (host, port), or on a free port of `host` when
    `port` is taken (logged as a warning naming both ports)."""
    try:
        sock = _bind(host, port)
    except OSError as e:
        if e.errno != errno.EADDRINUSE or port == 0:
            raise OSError(e.errno, f"cannot bind the dashboard to {host or '*'}:{port}: "
                                   f"{e.strerror}") from e
        sock = _bind(host, 0)
        logger.warning("port %d is already in use; the dashboard is served on port %d "
                       "instead", port, sock.getsockname()[1])
    sock.setblocking(False)
    return sock
