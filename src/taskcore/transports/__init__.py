"""Transports: connect(address) / listen(address, handler) chosen by URL scheme."""
from taskcore.transports.addressing import (get_address_host, parse_address, parse_host_port,
                                            unparse_address, unparse_host_port)
from taskcore.transports.base import PROTOCOL_VERSION, Backend, Comm, Listener, connect, listen
from taskcore.transports.registry import get_backend, register_backend

__all__ = [
    "connect", "listen", "Comm", "Listener", "Backend", "PROTOCOL_VERSION",
    "parse_address", "unparse_address", "parse_host_port", "unparse_host_port",
    "get_address_host", "get_backend", "register_backend",
]
