"""Comm and Listener interfaces, the connection handshake, and connect()/listen().

Every transport delivers *messages* (msgpack-able structures, with numpy arrays
and other objects out of band), not bytes. A Comm's API:

    await comm.read()          next message (raises CommClosedError when closed)
    await comm.write(msg)      queue, then wait if the transport is over its high-water mark
    comm.send(msg)             queue without waiting (batched per loop tick)
    comm.set_message_handler(fn)   fast path: fn(msg) is called as messages arrive
    await comm.close(), comm.abort(), comm.closed, comm.local_address, comm.peer_address

The handshake
-------------
Right after connecting, each side sends one message
``{"op": "handshake", "protocol": N, "role": ..., "compression": [...],
"pickle_protocol": 5, "token": ...}``. The listening side checks the protocol
version and the auth token and answers with its own handshake, or with
``{"op": "handshake-refused", "reason": ...}`` before closing; the connecting
side raises `HandshakeError` with that reason. A comm's first message (the
handshake) is read under small limits (`HANDSHAKE_LIMITS`); the decoder switches
to the configured limits exactly at the end of that message.
"""
from __future__ import annotations

import abc
import asyncio
import hmac
import logging
import random
import time

from taskcore.core.wire import Limits
from taskcore.errors import CommClosedError, HandshakeError, ProtocolError
from taskcore.security import resolve_token
from taskcore.transports.addressing import get_address_host, is_local_host, parse_address
from taskcore.transports.policy import ConnectionPolicy, RefusalLog
from taskcore.transports.registry import get_backend

logger = logging.getLogger("taskcore.transports")

PROTOCOL_VERSION = 1
HANDSHAKE_LIMITS = Limits(max_frames=16, max_frame_size=64 * 1024, max_message_size=64 * 1024)
DEFAULT_LIMITS = Limits()


class Comm(abc.ABC):
    """A message connection. Concrete comms register themselves as virtual subclasses."""

    @abc.abstractmethod
    async def read(self): ...

    @abc.abstractmethod
    async def write(self, msg): ...

    @abc.abstractmethod
    def send(self, msg): ...

    def flush(self):
        """Write what `send` queued now (optional; comms batch per tick anyway)."""

    @abc.abstractmethod
    async def close(self): ...

    @abc.abstractmethod
    def abort(self): ...


class Listener(abc.ABC):
    """A started server. `contact_address` is where peers reach it (real port)."""

    listen_address: str
    contact_address: str

    @abc.abstractmethod
    async def start(self): ...

    @abc.abstractmethod
    async def stop(self): ...

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.stop()


class Backend(abc.ABC):
    """One transport scheme. `connect` and `listen` return raw comms; handshakes are done here."""

    @abc.abstractmethod
    async def connect(self, loc: str, **options) -> Comm: ...

    @abc.abstractmethod
    async def listen(self, loc: str, on_comm, **options) -> Listener: ...


def _local_handshake(role, token, compression):
    return {
        "op": "handshake",
        "protocol": PROTOCOL_VERSION,
        "role": role,
        "compression": ["lz4"] if compression else [],
        "pickle_protocol": 5,
        "token": token,
    }


def _check_peer(msg, expected_token, check_token):
    """Return a refusal reason, or None if the peer's handshake is acceptable."""
    if not isinstance(msg, dict) or msg.get("op") != "handshake":
        return f"expected a handshake message, got {str(msg)[:80]!r}"
    if msg.get("protocol") != PROTOCOL_VERSION:
        return (f"protocol version mismatch: peer speaks {str(msg.get('protocol'))[:40]!r}, "
                f"this side speaks {PROTOCOL_VERSION}")
    compression = msg.get("compression")
    if compression is not None and not (isinstance(compression, list)
                                        and all(isinstance(c, str) for c in compression)):
        return "malformed handshake: 'compression' must be a list of names"
    if not isinstance(msg.get("role", ""), str):
        return "malformed handshake: 'role' must be a string"
    if not isinstance(msg.get("token"), (str, type(None))):
        return "malformed handshake: 'token' must be a string"
    if check_token and expected_token is not None:
        token = msg.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(),
                                                                 expected_token.encode()):
            return "authentication failed: bad or missing token"
    return None


def _negotiate(comm, ours, theirs):
    comm.handshake_info = theirs
    offer = set(ours["compression"]) & set(theirs.get("compression") or ())
    same_host = True
    try:
        same_host = is_local_host(get_address_host(comm.peer_address))
    except Exception:
        pass
    # Compression only pays over a real network: never on loopback or same host.
    comm.compression = bool("lz4" in offer and not same_host)


async def _read_within(comm, timeout):
    """The next message, or TimeoutError with the comm aborted after `timeout`.

    A timer rather than `asyncio.wait_for`: wait_for's inner task keeps the
    exception, whose traceback holds the comm, in a reference cycle."""
    expired = False

    def expire():
        nonlocal expired
        expired = True
        comm.abort()

    timer = asyncio.get_running_loop().call_later(timeout, expire)
    try:
        return await comm.read()
    except CommClosedError:
        if expired:
            raise asyncio.TimeoutError(f"no message within {timeout:g} s") from None
        raise
    finally:
        timer.cancel()


async def client_handshake(comm, role, token=None, compression=True, timeout=10):
    ours = _local_handshake(role, token, compression)
    try:
        await comm.write(ours)
        theirs = await _read_within(comm, timeout)
    except (CommClosedError, ProtocolError, asyncio.TimeoutError) as e:
        comm.abort()
        hint = ""
        if isinstance(e, CommClosedError) and str(comm.peer_address).startswith("tcp://"):
            hint = (" (the server closed the connection before answering: if it listens "
                    "on tls://, connect with tls:// and a Security; else it may be "
                    "refusing connections, see its log)")
        raise HandshakeError(f"handshake with {comm.peer_address} failed: {e}{hint}") from None
    if isinstance(theirs, dict) and theirs.get("op") == "handshake-refused":
        comm.abort()
        raise HandshakeError(f"connection refused by {comm.peer_address}: {theirs.get('reason')}")
    reason = _check_peer(theirs, None, False)
    if reason:
        comm.abort()
        raise HandshakeError(f"handshake with {comm.peer_address} failed: {reason}")
    _negotiate(comm, ours, theirs)
    return theirs


async def server_handshake(comm, role, token=None, compression=True, timeout=10, refusals=None):
    """Returns the peer's handshake, or None after refusing (the comm is then closed).

    `refusals` logs the refusals (a listener's own `RefusalLog`)."""
    refusals = refusals or RefusalLog(logger, "refused handshakes")
    try:
        theirs = await _read_within(comm, timeout)
    except asyncio.TimeoutError:
        refusals(comm.peer_address, f"no handshake within {timeout:g} s (handshake_timeout)")
        comm.abort()
        return None
    except (CommClosedError, ProtocolError) as e:
        refusals(comm.peer_address, f"handshake failed: {e or type(e).__name__}")
        comm.abort()
        return None
    reason = _check_peer(theirs, token, True)
    if reason:
        refusals(comm.peer_address, reason)
        try:
            await comm.write({"op": "handshake-refused", "reason": reason})
            await comm.close()
        except Exception:
            comm.abort()
        return None
    ours = _local_handshake(role, None, compression)
    _negotiate(comm, ours, theirs)
    try:
        await comm.write(ours)
    except (CommClosedError, ProtocolError) as e:     # gone, or garbage right behind it
        refusals(comm.peer_address, f"connection lost right after the handshake: {e}")
        comm.abort()
        return None
    return theirs


async def connect(address, timeout=10.0, *, role="client", token=None, compression=True,
                  limits=None, handshake=True, retry_refused=True, **options):
    """Connect to `address`, retrying with jittered backoff until `timeout`, then handshake.

    `retry_refused=False`: a refused connection fails at once. For peers whose
    address is known only because they already listen (a worker's): refused means
    gone, and waiting out the timeout would stall whoever needs its data."""
    scheme, loc = parse_address(address)
    backend = get_backend(scheme)
    token = resolve_token(token, options.get("security"))
    deadline = time.monotonic() + timeout
    delay = 0.005
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            comm = await asyncio.wait_for(
                backend.connect(loc, limits=limits or DEFAULT_LIMITS, handshake=handshake,
                                **options),
                max(remaining, 0.001))
            break
        except HandshakeError:
            raise                           # refused, not unreachable: retrying cannot help
        except (OSError, asyncio.TimeoutError) as e:
            if not retry_refused and isinstance(e, ConnectionRefusedError):
                raise OSError(f"connection to {address} refused: the peer is gone") from e
            last = e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(
                    f"timed out connecting to {address} after {timeout} s "
                    f"({attempt} attempts): {type(last).__name__}: {last}") from last
            # Full jitter keeps many workers from reconnecting in lock-step.
            await asyncio.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 1.0)
    if handshake:
        await client_handshake(comm, role, token=token, compression=compression,
                               timeout=max(deadline - time.monotonic(), 1.0))
    return comm


async def listen(address, handler, *, role="server", token=None, compression=True,
                 limits=None, handshake=True, handshake_timeout=None, policy=None, **options):
    """Start a listener on `address`; `await handler(comm)` runs per accepted connection.

    `policy` (a `ConnectionPolicy`, default from the environment) bounds what
    peers may do; `handshake_timeout` and `limits` override its parts."""
    scheme, loc = parse_address(address)
    backend = get_backend(scheme)
    policy = policy or ConnectionPolicy.from_env()
    token = resolve_token(token, options.get("security"))
    if handshake_timeout is None:
        handshake_timeout = policy.handshake_timeout
    limits = limits or policy.limits()

    refusals = RefusalLog(logger, "refused handshakes")

    async def on_comm(comm):
        if handshake:
            peer = await server_handshake(comm, role, token=token, compression=compression,
                                          timeout=handshake_timeout, refusals=refusals)
            if peer is None:
                return
        try:
            await handler(comm)
        except (CommClosedError, ProtocolError):
            pass
        except Exception:
            logger.exception("connection handler failed for %s", comm.peer_address)
            comm.abort()

    listener = await backend.listen(
        loc, on_comm, limits=limits, handshake=handshake, policy=policy, **options)
    return listener
