"""Recent log records kept in memory, for `get_scheduler_logs`, `get_worker_logs` and the
dashboard's logs page.

Each server attaches one `LogBuffer` to the "taskcore" logger while it runs. The buffer is
bounded (a deque), so a chatty process costs a fixed amount of memory, and a record is
formatted once, when it is emitted, so a later reader never sees a message whose arguments
changed since.
"""
from __future__ import annotations

import collections
import logging

DEFAULT_LENGTH = 10_000
_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class LogBuffer(logging.Handler):
    """A logging handler that keeps the last `maxlen` records as
    `(created, levelname, logger name, formatted message)` tuples."""

    def __init__(self, maxlen: int = DEFAULT_LENGTH, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.records: collections.deque = collections.deque(maxlen=maxlen)
        self._attached: list = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.created, record.levelname, record.name,
                                 self.format(record)))
        except Exception:
            self.handleError(record)

    def recent(self, n: int | None = None) -> list[tuple]:
        """The last `n` records (all kept ones when None), oldest first."""
        records = list(self.records)
        if n is not None:
            n = max(int(n), 0)
            records = records[-n:] if n else []
        return records

    def attach(self, logger_name: str = "taskcore") -> "LogBuffer":
        """Start collecting the records of `logger_name` and its children.

        The logger's level is left alone: lowering it would also send the extra records
        to every handler above it (a root handler prints what propagates to it whatever
        the root's level). So the buffer keeps what the process logs: INFO and up in
        `core-scheduler`/`core-worker` (their `--log-level`), WARNING and up in a process
        whose logging is not configured."""
        log = logging.getLogger(logger_name)
        log.addHandler(self)
        self._attached.append(log)
        return self

    def detach(self) -> None:
        for log in self._attached:
            log.removeHandler(self)
        self._attached.clear()
