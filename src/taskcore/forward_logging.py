"""`client.forward_logging()`: log records of task code, re-emitted in the client.

Three hops, each batched:

* Worker: one `LogForwarder` handler, attached to each forwarded logger, keeps the
  records that task code emits (on a task thread, or inline on the event loop: the
  thread-local `task_local.worker` is this worker) as plain dicts; a loop on the
  worker's event loop sends what was kept every `FLUSH_INTERVAL` seconds as one
  "diag-forward-logs" message. Nothing is attached, and nothing runs, while no
  client forwards.
* Scheduler (`Subscriptions`): which client forwards which logger at which level;
  it relays each batch to the clients whose loggers match, as one
  "forwarded-logs" message each, and tells every worker (and each new one) the
  union of what is forwarded.
* Client (`reemit`): each record is handled by the client's logger of the same
  name, with `record.worker` set to the worker's address.

As in dask.distributed, the worker-side logger's own level still decides whether a
record is made at all (a task's `logger.info` on a logger left at WARNING makes
none), and the client's handlers decide what is shown.
"""
from __future__ import annotations

import logging
import threading

FLUSH_INTERVAL = 0.1
#: Records kept per flush; beyond, records are counted and reported as dropped, so a
#: task logging in a tight loop cannot grow the worker's memory without bound.
MAX_BATCH = 10_000
_ROOT = ""          # the root logger's name in subscriptions

# Attributes every LogRecord has; other attributes (`extra=`) travel too when they
# are plain values.
_PLAIN = (str, int, float, bool, type(None))


def logger_key(name) -> str:
    """The subscription name of a logger: "" for the root (None, "", "root")."""
    if name in (None, "", "root"):
        return _ROOT
    if not isinstance(name, str):
        raise TypeError(f"logger_name must be a string or None, got {name!r}")
    return name


def parse_level(level) -> int:
    if isinstance(level, bool):
        raise ValueError(f"invalid logging level {level!r}")
    if isinstance(level, int):
        return level
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if isinstance(value, int):
            return value
    raise ValueError(f"invalid logging level {level!r} (use an int or a name like 'INFO')")


def matches(logger_name: str, record_name: str) -> bool:
    """Does a subscription to `logger_name` cover records of `record_name`?"""
    if logger_name == _ROOT:
        return True
    return record_name == logger_name or record_name.startswith(logger_name + ".")


def record_to_dict(record: logging.LogRecord, formatter: logging.Formatter) -> dict:
    """A record as plain values (the message formatted now, exception text included)."""
    d = {}
    for k, v in record.__dict__.items():
        if isinstance(v, _PLAIN):
            d[k] = v
    d["msg"] = record.getMessage()
    d["args"] = None
    d.pop("message", None)
    if record.exc_info:
        d["exc_text"] = formatter.formatException(record.exc_info)
    d["exc_info"] = None
    return d


# -- worker -----------------------------------------------------------------------------

class LogForwarder(logging.Handler):
    """The worker's handler (see the module doc). `configure(loggers)` sets what is
    forwarded ({logger name: minimum level}); `take()` returns the kept records."""

    def __init__(self, worker):
        super().__init__(logging.NOTSET)
        self.worker = worker
        self.loggers: dict = {}
        self.attached: list = []
        self.records: list = []
        self.dropped = 0
        self.lock_ = threading.Lock()
        self._seen = threading.local()     # a record reaches us once per attached logger
        self._formatter = logging.Formatter()

    def configure(self, loggers: dict) -> None:
        self.detach()
        self.loggers = {logger_key(k): int(v) for k, v in loggers.items()}
        for name in self.loggers:
            log = logging.getLogger(name or None)
            log.addHandler(self)
            self.attached.append(log)

    def detach(self) -> None:
        for log in self.attached:
            log.removeHandler(self)
        self.attached = []
        self.loggers = {}

    def emit(self, record: logging.LogRecord) -> None:
        from taskcore.core.worker_dispatch import task_local

        if getattr(task_local, "worker", None) is not self.worker:
            return                          # not task code of this worker
        if getattr(self._seen, "record", None) is record:
            return
        self._seen.record = record
        if not any(record.levelno >= lvl and matches(name, record.name)
                   for name, lvl in self.loggers.items()):
            return
        try:
            d = record_to_dict(record, self._formatter)
        except Exception:
            self.handleError(record)
            return
        with self.lock_:
            if len(self.records) >= MAX_BATCH:
                self.dropped += 1
            else:
                self.records.append(d)

    def take(self) -> list:
        with self.lock_:
            records, self.records = self.records, []
            dropped, self.dropped = self.dropped, 0
        if dropped:
            records.append({"name": "taskcore.forward_logging", "levelno": logging.WARNING,
                            "levelname": "WARNING", "msg": f"{dropped} log records of tasks "
                            f"were dropped (more than {MAX_BATCH} in {FLUSH_INTERVAL} s)",
                            "args": None})
        return records


# -- scheduler ------------------------------------------------------------------------------

class Subscriptions:
    """Which client forwards which logger: {client id: {logger name: level}}."""

    def __init__(self):
        self.by_client: dict = {}

    def add(self, client, logger_name, level) -> None:
        self.by_client.setdefault(client, {})[logger_key(logger_name)] = parse_level(level)

    def remove(self, client, logger_name=None, everything=False) -> None:
        subs = self.by_client.get(client)
        if subs is None:
            return
        if everything:
            subs.clear()
        else:
            subs.pop(logger_key(logger_name), None)
        if not subs:
            del self.by_client[client]

    def keep_only(self, clients) -> bool:
        """Forget clients not in `clients`; True if any was forgotten."""
        gone = [c for c in self.by_client if c not in clients]
        for c in gone:
            del self.by_client[c]
        return bool(gone)

    def union(self) -> dict:
        """{logger name: lowest level} over all clients: what workers forward."""
        out: dict = {}
        for subs in self.by_client.values():
            for name, lvl in subs.items():
                out[name] = min(lvl, out.get(name, lvl))
        return out

    def route(self, records: list) -> dict:
        """{client: [records it asked for]}."""
        out: dict = {}
        for client, subs in self.by_client.items():
            mine = [r for r in records
                    if any(r.get("levelno", 0) >= lvl and matches(name, r.get("name", ""))
                           for name, lvl in subs.items())]
            if mine:
                out[client] = mine
        return out


# -- client -----------------------------------------------------------------------------------

def reemit(worker: str, records: list) -> None:
    """Handle each forwarded record with the client's logger of the same name."""
    for d in records:
        d = dict(d)
        d["worker"] = worker
        record = logging.makeLogRecord(d)
        name = record.name
        log = logging.getLogger(None if name in ("root", "") else name)
        log.handle(record)
