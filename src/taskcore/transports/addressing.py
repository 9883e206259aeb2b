"""Address parsing: `scheme://location`, with IPv6 hosts in brackets.

`tcp://10.0.0.1:8786`, `tls://[::1]:0`, `inproc://host/1234/5`. A missing
scheme means tcp. Port 0 asks the OS for a free port; the listener's
`contact_address` reports the real one.
"""
from __future__ import annotations

import socket

from taskcore.errors import AddressError

DEFAULT_SCHEME = "tcp"


def parse_address(address: str, strict: bool = False) -> tuple[str, str]:
    """Split into (scheme, location). Without a scheme, tcp is assumed unless strict."""
    if not isinstance(address, str):
        raise AddressError(f"address must be a string, got {type(address).__name__}: {address!r}")
    scheme, sep, loc = address.rpartition("://")
    if not sep:
        if strict:
            raise AddressError(f"address {address!r} has no scheme (like tcp://)")
        scheme, loc = DEFAULT_SCHEME, address
    if not scheme or not scheme.isascii() or not scheme[0].isalpha() or not all(
            c.isalnum() or c in "+-." for c in scheme):
        raise AddressError(f"address {address!r} has an invalid scheme {scheme!r}")
    return scheme.lower(), loc


def unparse_address(scheme: str, loc: str) -> str:
    return f"{scheme}://{loc}"


def parse_host_port(loc: str, default_port: int | None = None) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port). Port 0 is allowed."""
    if loc.startswith("["):
        host, sep, rest = loc[1:].partition("]")
        if not sep:
            raise AddressError(f"unclosed '[' in {loc!r}")
        if rest.startswith(":"):
            port_s = rest[1:]
        elif rest == "":
            port_s = None
        else:
            raise AddressError(f"unexpected {rest!r} after IPv6 host in {loc!r}")
    else:
        if loc.count(":") > 1:
            raise AddressError(f"IPv6 addresses need brackets, like [::1]:8786; got {loc!r}")
        host, sep, port_s = loc.partition(":")
        if not sep:
            port_s = None
    if port_s is None or port_s == "":
        if default_port is None:
            raise AddressError(f"no port in address {loc!r}")
        port = default_port
    else:
        try:
            port = int(port_s)
        except ValueError:
            raise AddressError(f"invalid port {port_s!r} in {loc!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"port {port} out of range in {loc!r}")
    return host, port


def unparse_host_port(host: str, port: int | None = None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def get_ip(target: str = "8.8.8.8") -> str:
    """The local IP that routes towards `target` (no packet is sent); loopback if none."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((target, 80))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def get_address_host(address: str) -> str:
    """The host part of a full address (for locality decisions)."""
    scheme, loc = parse_address(address)
    if scheme == "inproc":
        return loc.split("/", 1)[0]
    return parse_host_port(loc, 0)[0]


_local_addresses = None


def _own_addresses() -> frozenset:
    """This machine's names and addresses, resolved once per process.

    Resolving the hostname can block for seconds where it does not resolve
    (a network namespace without DNS); it runs on the event loop during every
    handshake, so it is done once and cached.
    """
    global _local_addresses
    if _local_addresses is None:
        names = {get_ip(), socket.gethostname()}
        try:
            names.update(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
        _local_addresses = frozenset(names)
    return _local_addresses


def is_local_host(host: str) -> bool:
    """True for loopback names and this machine's own addresses."""
    if host in ("localhost", "", "0.0.0.0", "::", "::1") or host.startswith("127."):
        return True
    return host in _own_addresses()
