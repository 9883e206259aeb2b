"""tcp:// and tls:// on uvloop, sharing the compiled StreamProtocol.

TCP_NODELAY and keepalive are set on every socket. tls:// requires mutual
authentication: both ends present certificates signed by the CA in the
`Security` object.
"""
from __future__ import annotations

import asyncio
import logging

from taskcore.core.protocol import StreamProtocol
from taskcore.transports.addressing import (get_ip, parse_host_port, unparse_address,
                                            unparse_host_port)
from taskcore.transports.base import HANDSHAKE_LIMITS, Backend, Comm, Listener

logger = logging.getLogger("taskcore.transports.tcp")


class TCPComm(StreamProtocol, asyncio.BufferedProtocol):
    """A comm over a stream transport: the compiled core plus asyncio's protocol ABC."""

    on_accept = None  # set by TCPListener: called once the transport exists

    def connection_made(self, transport):
        StreamProtocol.connection_made(self, transport)
        if self.on_accept is not None:
            self.on_accept(self)

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<TCPComm {self.local_address} -> {self.peer_address} {state}>"


Comm.register(TCPComm)


def _addr(scheme, sockname):
    return unparse_address(scheme, unparse_host_port(sockname[0], sockname[1]))


def _set_addresses(comm, scheme):
    t = comm.transport
    comm.local_address = _addr(scheme, t.get_extra_info("sockname"))
    comm.peer_address = _addr(scheme, t.get_extra_info("peername"))


class TCPListener(Listener):
    def __init__(self, scheme, loc, on_comm, ssl_context=None, limits=None, handshake=True):
        self.scheme = scheme
        self.host, self.port = parse_host_port(loc, 0)
        self.on_comm = on_comm
        self.ssl_context = ssl_context
        self.limits = limits
        self.handshake_limits = HANDSHAKE_LIMITS if handshake else None
        self.server = None
        self._tasks = set()
        self.comms = set()

    def _factory(self):
        loop = asyncio.get_running_loop()
        comm = TCPComm(loop, self.limits, self.handshake_limits)
        comm.on_close = self._forget
        comm.on_accept = self._accepted
        return comm

    def _forget(self, comm):
        self.comms.discard(comm)

    def _accepted(self, comm):
        _set_addresses(comm, self.scheme)
        self.comms.add(comm)
        task = asyncio.ensure_future(self.on_comm(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._factory, self.host or None, self.port, ssl=self.ssl_context,
            reuse_address=True, backlog=1024)
        sock = self.server.sockets[0]
        self.bound = sock.getsockname()
        return self

    @property
    def listen_address(self):
        return unparse_address(self.scheme, unparse_host_port(self.bound[0], self.bound[1]))

    @property
    def contact_address(self):
        host = self.bound[0]
        if host in ("0.0.0.0", "::", ""):
            host = get_ip() if host != "::" else "::1"
        return unparse_address(self.scheme, unparse_host_port(host, self.bound[1]))

    async def stop(self):
        if self.server is not None:
            self.server.close()
            for comm in list(self.comms):
                comm.abort()
            for task in list(self._tasks):
                task.cancel()
            await self.server.wait_closed()
            self.server = None


class TCPBackend(Backend):
    scheme = "tcp"

    def _ssl(self, options, server_side):
        return None

    async def connect(self, loc, limits=None, handshake=True, **options):
        host, port = parse_host_port(loc)
        loop = asyncio.get_running_loop()
        ctx = self._ssl(options, server_side=False)
        kw = {"ssl": ctx, "server_hostname": options.get("server_hostname")} if ctx else {}
        if ctx and kw["server_hostname"] is None:
            kw.pop("server_hostname")
        transport, comm = await loop.create_connection(
            lambda: TCPComm(loop, limits, HANDSHAKE_LIMITS if handshake else None),
            host, port, **kw)
        _set_addresses(comm, self.scheme)
        return comm

    async def listen(self, loc, on_comm, limits=None, handshake=True, **options):
        ctx = self._ssl(options, server_side=True)
        listener = TCPListener(self.scheme, loc, on_comm, ssl_context=ctx, limits=limits,
                               handshake=handshake)
        return await listener.start()


class TLSBackend(TCPBackend):
    scheme = "tls"

    def _ssl(self, options, server_side):
        security = options.get("security")
        if security is None:
            from taskcore.errors import AddressError
            raise AddressError("tls:// needs security=Security(...) with a CA, certificate and key")
        return security.ssl_context(server_side=server_side)
