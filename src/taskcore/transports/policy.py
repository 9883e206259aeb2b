"""What a listener allows its peers: how many connections, how long a handshake
or a stalled message may take, and how many bytes one message may declare.

Every limit refuses with a logged warning that names the peer and the setting,
so an operator sees why a connection was closed. The defaults keep a server
alive against careless or hostile peers without getting in the way of real
work; each can be set per server (`Scheduler(connection_policy=...)`, the
CLIs' options) or for a whole process through the environment:

    TASKCORE_MAX_CONNECTIONS     connections one listener accepts at once
                                 (default: the open-file limit less an eighth,
                                 at least 64, for the server's own files)
    TASKCORE_HANDSHAKE_TIMEOUT   seconds a new connection has to send its handshake (10)
    TASKCORE_STALL_TIMEOUT       seconds a partly received message may go without a
                                 byte before the connection is closed (60)
    TASKCORE_MAX_MESSAGE_BYTES   the in-flight budget of one connection: the bytes
                                 one message may declare (8 GiB). Memory is committed
                                 as bytes arrive (core/wire.pyx), so a declaration
                                 alone costs nothing.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import time

from taskcore.core.wire import Limits

_ENV = {
    "max_connections": ("TASKCORE_MAX_CONNECTIONS", int),
    "handshake_timeout": ("TASKCORE_HANDSHAKE_TIMEOUT", float),
    "stall_timeout": ("TASKCORE_STALL_TIMEOUT", float),
    "max_message_bytes": ("TASKCORE_MAX_MESSAGE_BYTES", int),
}


@dataclasses.dataclass(frozen=True)
class ConnectionPolicy:
    max_connections: int | None = None       # None: from the open-file limit
    handshake_timeout: float = 10.0
    stall_timeout: float = 60.0
    max_message_bytes: int = 8 * 1024 ** 3

    def __post_init__(self):
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {self.max_connections}")
        for name in ("handshake_timeout", "stall_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, "
                                 f"got {getattr(self, name)!r}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got "
                             f"{self.max_message_bytes}")

    @classmethod
    def from_env(cls, **overrides) -> "ConnectionPolicy":
        """The defaults, then the environment, then `overrides` (None: not given)."""
        values = {}
        for field, (var, kind) in _ENV.items():
            raw = os.environ.get(var)
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ValueError(f"{var}={raw!r} is not a valid {kind.__name__}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - set(_ENV)
        if unknown:
            raise TypeError(f"unknown connection policy options: {sorted(unknown)}")
        return cls(**values)

    def connection_limit(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return max(16, soft - max(64, soft // 8))

    def limits(self) -> Limits:
        """Decoder limits for authenticated traffic under this budget."""
        return Limits(max_frame_size=min(4 * 1024 ** 3, self.max_message_bytes),
                      max_message_size=self.max_message_bytes)


DEFAULT_POLICY = ConnectionPolicy()


class RefusalLog:
    """Logs refused connections of one kind, at most `burst` every 10 s, then a
    count of those not logged, so a flood is reported without flooding the log."""

    def __init__(self, logger, what, burst=5, action="refusing connection from"):
        self.logger = logger
        self.what = what
        self.action = action
        self.burst = burst
        self.count = 0
        self.window_start = -1e9
        self.in_window = 0
        self.unlogged = 0

    def __call__(self, peer, reason):
        self.count += 1
        now = time.monotonic()
        if now - self.window_start >= 10:
            self.window_start = now
            self.in_window = 0
        if self.in_window >= self.burst:
            self.unlogged += 1
            return
        self.in_window += 1
        more, self.unlogged = self.unlogged, 0
        self.logger.warning("%s %s: %s%s", self.action, peer, reason,
                            f" ({more} more {self.what} were not logged)" if more else "")


async def sweep_stalled(listener, progress, unit):
    """Close the listener's connections whose partly received message went quiet for the
    policy's `stall_timeout`; runs until cancelled. `progress(comm)` counts what arrived
    (bytes, frames: `unit` names them in the log); a count that has not moved while the
    comm is `mid_message` is a stall. Nothing is added per message: once an interval
    (a second at most) the counts are compared."""
    timeout = listener.policy.stall_timeout
    interval = min(1.0, timeout / 4)
    seen = {}
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        still = {}
        for comm in list(listener.comms):
            if not comm.mid_message:
                continue
            n = progress(comm)
            prev = seen.get(comm)
            if prev is None or prev[0] != n:
                still[comm] = (n, now)
            elif now - prev[1] >= timeout:
                listener.closed_stalled += 1
                listener.stalls(comm.peer_address,
                                f"a message was begun and no {unit} of it arrived for "
                                f"{now - prev[1]:.0f} s (stall_timeout, TASKCORE_STALL_TIMEOUT)")
                comm.abort()
            else:
                still[comm] = prev
        seen = still
