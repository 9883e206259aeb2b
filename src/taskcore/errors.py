"""Exception types shared by every layer.

They live in a plain Python module (not a Cython one) so that pure-Python
layers, the compiled core and user code all import the same classes, and so
that they pickle by reference across processes.
"""


class TaskcoreError(Exception):
    """Base class of taskcore's own errors."""


class ProtocolError(TaskcoreError):
    """A peer sent bytes that violate the wire format or a configured limit.

    Raised by the frame decoder and the deserializer. It always names what was
    wrong; the comm it happened on is closed, other comms are unaffected.
    """


class CommClosedError(TaskcoreError, ConnectionError):
    """The comm was closed, locally or by the peer."""


class HandshakeError(TaskcoreError, ConnectionError):
    """The connection handshake was refused (version, role or auth token)."""


class AddressError(TaskcoreError, ValueError):
    """An address is malformed or names an unknown scheme."""


class KilledWorker(TaskcoreError):
    """A task was running on too many workers that died; it is not retried again.

    `reason` says how the last of them died when its nanny said so (None otherwise):
    "killed by its nanny: memory limit exceeded (rss ... > 95% of ...)" for a worker
    killed at the memory limit."""

    def __init__(self, key, last_worker, allowed_failures, reason=None):
        self.key = key
        self.last_worker = last_worker
        self.allowed_failures = allowed_failures
        self.reason = reason
        super().__init__(key, last_worker, allowed_failures, reason)

    def __str__(self):
        text = (
            f"Attempted to run task {self.key!r} on {self.allowed_failures + 1} different "
            f"workers, but all those workers died while running it. The last worker was "
            f"{self.last_worker}"
        )
        return f"{text}: {self.reason}." if self.reason else f"{text}."


class CancelledError(TaskcoreError):
    """The future's key was cancelled."""


class FutureLostError(TaskcoreError):
    """The scheduler forgot a key that a future still waited on."""
