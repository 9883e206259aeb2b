"""tcp:// and tls:// on uvloop, sharing the compiled StreamProtocol.

TCP_NODELAY and keepalive are set on every socket. tls:// requires mutual
authentication: both ends present certificates signed by the CA in the
`Security` object.

A listener enforces its `ConnectionPolicy` (transports/policy.py): past
`max_connections` a new connection is closed at once, and a sweep once a
second closes connections whose partly received message has had no byte for
`stall_timeout`. A connection reset before it was accepted (no peer address
any more) is closed and forgotten on the spot.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl

from taskcore.core.protocol import StreamProtocol
from taskcore.errors import HandshakeError
from taskcore.transports.addressing import (get_ip, parse_host_port, unparse_address,
                                            unparse_host_port)
from taskcore.transports.base import HANDSHAKE_LIMITS, Backend, Comm, Listener
from taskcore.transports.policy import DEFAULT_POLICY, RefusalLog, sweep_stalled

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
    """False when the socket has no addresses any more (reset before it was accepted)."""
    t = comm.transport
    sockname, peername = t.get_extra_info("sockname"), t.get_extra_info("peername")
    if not sockname or not peername:
        return False
    comm.local_address = _addr(scheme, sockname)
    comm.peer_address = _addr(scheme, peername)
    return True


class TCPListener(Listener):
    def __init__(self, scheme, loc, on_comm, ssl_context=None, limits=None, handshake=True,
                 policy=None, sock=None):
        self.scheme = scheme
        self.host, self.port = parse_host_port(loc, 0)
        # A socket bound and listening already (a parent process made it, so that its
        # address was known before this process started): served instead of binding.
        self.sock = sock
        self.on_comm = on_comm
        self.ssl_context = ssl_context
        self.limits = limits
        self.policy = policy or DEFAULT_POLICY
        self.max_connections = self.policy.connection_limit()
        self.handshake_limits = HANDSHAKE_LIMITS if handshake else None
        self.server = None
        self._tasks = set()
        self.comms = set()
        self.refused_full = RefusalLog(logger, "connections over max_connections")
        self.tls_refusals = RefusalLog(logger, "failed TLS handshakes")
        self.stalls = RefusalLog(logger, "stalled connections closed",
                                 action="closing connection from")
        self.closed_stalled = 0
        self.resets = 0
        self._sweeper = None
        self._tls_acceptor = None
        self._tls_socket = None
        self._tls_pending = set()

    def _factory(self):
        loop = asyncio.get_running_loop()
        comm = TCPComm(loop, self.limits, self.handshake_limits)
        comm.on_close = self._forget
        comm.on_accept = self._accepted
        return comm

    def _forget(self, comm):
        self.comms.discard(comm)

    def _accepted(self, comm):
        try:
            if not _set_addresses(comm, self.scheme):
                self.resets += 1
                comm.abort()
                return
            if len(self.comms) >= self.max_connections:
                self.refused_full(comm.peer_address,
                                  f"{len(self.comms)} connections are open, the limit "
                                  f"(max_connections, TASKCORE_MAX_CONNECTIONS)")
                comm.abort()
                return
            self.comms.add(comm)
            task = asyncio.ensure_future(self.on_comm(comm))
        except Exception:
            logger.exception("could not accept a connection on %s", self.listen_address)
            self.comms.discard(comm)
            comm.abort()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- tls:// accepts each connection itself -------------------------------------------
    # so that a plain-tcp peer gets a plain answer, and every refused TLS handshake is
    # logged with its peer and reason (a server made by create_server(ssl=...) drops
    # both without a word).

    async def _accept_tls(self, sock):
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(sock)
            except OSError as e:            # EMFILE and the like: wait, then try again
                self.tls_refusals(self.listen_address, f"accept failed: {e}")
                await asyncio.sleep(0.1)
                continue
            if len(self.comms) + len(self._tls_pending) >= self.max_connections:
                self.refused_full(_addr(self.scheme, addr),
                                  f"{len(self.comms) + len(self._tls_pending)} connections are "
                                  f"open, the limit (max_connections, TASKCORE_MAX_CONNECTIONS)")
                conn.close()
                continue
            task = asyncio.ensure_future(self._tls_handshake(conn, _addr(self.scheme, addr)))
            self._tls_pending.add(task)
            task.add_done_callback(self._tls_pending.discard)

    async def _tls_handshake(self, conn, peer):
        loop = asyncio.get_running_loop()
        timeout = self.policy.handshake_timeout
        conn.setblocking(False)
        try:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
            try:
                await asyncio.wait_for(readable, timeout)
            finally:
                loop.remove_reader(conn.fileno())
            first = conn.recv(1, socket.MSG_PEEK)
            if not first:
                # A port probe (a readiness check, tcp_answers): nothing to report.
                logger.debug("connection from %s closed before sending anything", peer)
                conn.close()
                return
            if first[0] != 0x16:                # not a TLS handshake record: say so, plainly
                self.tls_refusals(peer, "the peer speaks plain tcp:// to a tls:// address")
                conn.send(_plain_refusal("this address speaks tls://: connect with tls:// "
                                         "and a Security (taskcore.security)"))
                conn.close()
                return
            await loop.connect_accepted_socket(self._factory, sock=conn, ssl=self.ssl_context,
                                               ssl_handshake_timeout=timeout)
        except (OSError, asyncio.TimeoutError) as e:
            self.tls_refusals(peer, f"TLS handshake failed: {tls_failure(e)}")
            conn.close()

    async def start(self):
        loop = asyncio.get_running_loop()
        if self.ssl_context is None:
            if self.sock is not None:
                self.server = await loop.create_server(self._factory, sock=self.sock,
                                                       backlog=1024)
            else:
                self.server = await loop.create_server(
                    self._factory, self.host or None, self.port, reuse_address=True,
                    backlog=1024)
            self.bound = self.server.sockets[0].getsockname()
        else:
            sock = self.sock
            if sock is None:
                sock = socket.create_server((self.host or "", self.port), backlog=1024,
                                            reuse_port=False, dualstack_ipv6=False,
                                            family=_family(self.host))
            sock.setblocking(False)
            self._tls_socket = sock
            self.bound = sock.getsockname()
            self._tls_acceptor = asyncio.ensure_future(self._accept_tls(sock))
        self._sweeper = asyncio.ensure_future(
            sweep_stalled(self, lambda comm: comm.bytes_read, "byte"))
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._tls_acceptor is not None:
            self._tls_acceptor.cancel()
            self._tls_acceptor = None
            for task in list(self._tls_pending):
                task.cancel()
            self._tls_socket.close()
            for comm in list(self.comms):
                comm.abort()
            for task in list(self._tasks):
                task.cancel()
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
        if not _set_addresses(comm, self.scheme):
            comm.abort()
            raise ConnectionResetError(f"connection to {host}:{port} was reset at once")
        return comm

    async def listen(self, loc, on_comm, limits=None, handshake=True, policy=None, sock=None,
                     **options):
        ctx = self._ssl(options, server_side=True)
        listener = TCPListener(self.scheme, loc, on_comm, ssl_context=ctx, limits=limits,
                               handshake=handshake, policy=policy, sock=sock)
        return await listener.start()


def _family(host):
    return socket.AF_INET6 if host and ":" in host else socket.AF_INET


def _plain_refusal(reason):
    """A handshake-refused message as plain wire bytes, for a peer that is not
    speaking TLS to a tls:// address."""
    from taskcore.core.serialize import dumps
    from taskcore.core.wire import encode

    frames = dumps([{"op": "handshake-refused", "reason": reason}])
    return b"".join(bytes(f) for f in encode(frames))


def tls_failure(exc):
    """What a failed TLS handshake means, in words."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"certificate verification failed: {exc.verify_message or exc.reason} "
                f"(the certificate was not signed by the CA in this side's Security)")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return f"{reason}: the peer does not speak TLS (a tcp:// peer?)"
        return reason
    if isinstance(exc, asyncio.TimeoutError):
        return "no TLS handshake within the handshake timeout"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return (f"the peer closed the connection during the TLS handshake ({exc}): it does "
                f"not speak TLS (a tcp:// address?) or it refused this side's certificate")
    return f"{type(exc).__name__}: {exc}"


class TLSBackend(TCPBackend):
    scheme = "tls"

    async def connect(self, loc, limits=None, handshake=True, **options):
        try:
            return await super().connect(loc, limits=limits, handshake=handshake, **options)
        except (ConnectionRefusedError, asyncio.TimeoutError):
            raise                        # nobody listens (yet): connect() retries these
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError,
                ConnectionAbortedError) as e:
            # A TLS failure is not cured by retrying: fail now, saying why.
            raise HandshakeError(f"TLS handshake with tls://{loc} failed: "
                                 f"{tls_failure(e)}") from None

    def _ssl(self, options, server_side):
        security = options.get("security")
        if security is None:
            from taskcore.errors import AddressError
            raise AddressError("tls:// needs security=Security(...) with a CA, certificate and key")
        return security.ssl_context(server_side=server_side)
