"""The object store of the Kubernetes API stand-in (a local stand-in for kube-apiserver + etcd).

One `Store` is the single authority for every object and every resourceVersion: one
global counter, like etcd's revision, so resourceVersions increase across all kinds and
a list's resourceVersion is the counter's current value. Every change is recorded as a
watch event in a bounded history (the last `history` events); a watch that asks for a
resourceVersion older than what the history still holds gets `Expired` (HTTP 410), which
is what a real API server does after etcd compaction.

Everything here runs on the stand-in's event loop thread, so no locking is needed.
Stored objects are never mutated in place: a write stores a fresh copy and readers get
copies, so an event can keep a reference to the object as it was.

This module also defines the API errors (`ApiError` and its subclasses), each of which
knows the `kind: Status` body a real API server returns for it.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import datetime
import uuid
from typing import Callable, Iterable


# ---------------------------------------------------------------------------------------------
# Errors, as `kind: Status` bodies
# ---------------------------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered with a `kind: Status` body (the reason and code of a real server)."""

    code = 500
    reason = "InternalError"

    def __init__(self, message: str, *, details: dict | None = None, code: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


class BadRequest(ApiError):
    code, reason = 400, "BadRequest"


class Unauthorized(ApiError):
    code, reason = 401, "Unauthorized"


class Forbidden(ApiError):
    code, reason = 403, "Forbidden"


class NotFound(ApiError):
    code, reason = 404, "NotFound"


class MethodNotAllowed(ApiError):
    code, reason = 405, "MethodNotAllowed"


class AlreadyExists(ApiError):
    code, reason = 409, "AlreadyExists"


class Conflict(ApiError):
    code, reason = 409, "Conflict"


class Expired(ApiError):
    code, reason = 410, "Expired"


class UnsupportedMediaType(ApiError):
    code, reason = 415, "UnsupportedMediaType"


class Invalid(ApiError):
    code, reason = 422, "Invalid"


# ---------------------------------------------------------------------------------------------
# Resource types
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ResourceType:
    """One kind of object the API serves: where (group, versions, plural) and how."""

    group: str                      # "" for the core group
    versions: tuple[str, ...]       # served versions, preferred first
    plural: str
    kind: str
    namespaced: bool = True
    singular: str = ""
    short_names: tuple[str, ...] = ()
    status: bool = False            # has a /status subresource (per version for CRDs: below)
    scale: bool = False             # has a /scale subresource (Deployments)
    custom: bool = False            # served from a CustomResourceDefinition
    # For custom resources: version -> {"schema": validation.CustomSchema | None, "status": bool}
    custom_versions: dict = dataclasses.field(default_factory=dict)
    name_rule: str = "subdomain"    # validation.check_name's rule for metadata.name

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def resource(self) -> str:
        """The name errors use, e.g. "pods" or "deployments.apps"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str | None = None) -> str:
        version = version or self.versions[0]
        return f"{self.group}/{version}" if self.group else version

    def has_status(self, version: str | None = None) -> bool:
        if self.custom:
            info = self.custom_versions.get(version or self.versions[0]) or {}
            return bool(info.get("status"))
        return self.status

    def details(self, name: str | None = None) -> dict:
        d = {"kind": self.plural}
        if name is not None:
            d = {"name": name, **d}
        if self.group:
            d["group"] = self.group
        return d


def now_rfc3339(offset_seconds: float = 0) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset_seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# Events and watchers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Event:
    rv: int
    type: str                       # ADDED, MODIFIED or DELETED
    key: tuple[str, str]            # ResourceType.key
    obj: dict                       # the object after the change (DELETED: as removed)
    old: dict | None = None         # the object before the change (MODIFIED, DELETED)
    options: dict = dataclasses.field(default_factory=dict)   # e.g. the delete's propagationPolicy

    @property
    def namespace(self) -> str | None:
        return self.obj["metadata"].get("namespace")


_CLOSED = object()


class Watcher:
    """Events of one resource type, in one namespace or all, filtered by a predicate.

    The delivered type follows the real server's rule for selector watches: an object
    that starts to match is ADDED, one that stops matching is DELETED.
    """

    def __init__(self, store: "Store", key, namespace: str | None,
                 predicate: Callable[[dict], bool] | None):
        self._store = store
        self.key = key
        self.namespace = namespace
        self.predicate = predicate or (lambda obj: True)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    def translate(self, ev: Event) -> tuple[str, dict] | None:
        if ev.key != self.key:
            return None
        if self.namespace is not None and ev.namespace != self.namespace:
            return None
        now = self.predicate(ev.obj)
        before = ev.old is not None and self.predicate(ev.old)
        if ev.type == "ADDED":
            return ("ADDED", ev.obj) if now else None
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if (now or before) else None
        if now and before:
            return ("MODIFIED", ev.obj)
        if now:
            return ("ADDED", ev.obj)
        if before:
            return ("DELETED", ev.obj)
        return None

    def offer(self, ev: Event) -> None:
        if not self.closed:
            item = self.translate(ev)
            if item is not None:
                self.queue.put_nowait(item)

    def push(self, item) -> None:
        self.queue.put_nowait(item)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(_CLOSED)
            self._store._watchers.discard(self)

    async def next(self, timeout: float | None = None) -> tuple[str, dict] | None:
        """The next (type, object); None once closed. asyncio.TimeoutError after `timeout`."""
        if timeout is None:
            item = await self.queue.get()
        else:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        if item is _CLOSED:
            self.queue.put_nowait(_CLOSED)
            return None
        return item


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

class Store:
    def __init__(self, history: int = 1000):
        self._rv = 0
        self._types: dict[tuple[str, str], ResourceType] = {}
        self._objects: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self._uids: dict[str, tuple[tuple[str, str], str, str]] = {}
        self._history: collections.deque[Event] = collections.deque(maxlen=max(1, history))
        # Watches from a resourceVersion below this are answered with Expired: the events
        # after it are no longer all in the history.
        self._oldest = 0
        self._watchers: set[Watcher] = set()
        self._subscribers: list[Callable[[Event], None]] = []

    # -- resource types ---------------------------------------------------------------------

    def register(self, rt: ResourceType) -> None:
        self._types[rt.key] = rt
        self._objects.setdefault(rt.key, {})

    def unregister(self, key) -> None:
        """Forget a type (its objects must have been removed); its watches end."""
        self._types.pop(key, None)
        self._objects.pop(key, None)
        for w in [w for w in self._watchers if w.key == key]:
            w.close()

    def resource_type(self, group: str, version: str | None, plural: str) -> ResourceType | None:
        rt = self._types.get((group, plural))
        if rt is None or (version is not None and version not in rt.versions):
            return None
        return rt

    def type_for(self, key) -> ResourceType | None:
        return self._types.get(key)

    def types(self) -> list[ResourceType]:
        return list(self._types.values())

    # -- reads ------------------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def get(self, key, namespace: str | None, name: str) -> dict | None:
        obj = self._objects.get(key, {}).get((namespace or "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def exists(self, key, namespace: str | None, name: str) -> bool:
        return (namespace or "", name) in self._objects.get(key, {})

    def list(self, key, namespace: str | None = None) -> list[dict]:
        """Objects of one type, sorted by namespace and name (etcd's key order)."""
        objs = self._objects.get(key, {})
        keys = sorted(k for k in objs if namespace is None or k[0] == namespace)
        return [copy.deepcopy(objs[k]) for k in keys]

    def by_uid(self, uid: str) -> tuple[ResourceType, dict] | None:
        where = self._uids.get(uid)
        if where is None:
            return None
        key, ns, name = where
        obj = self.get(key, ns, name)
        return (self._types[key], obj) if obj is not None else None

    def all_objects(self) -> Iterable[tuple[ResourceType, dict]]:
        """Every stored object, as (type, object) with the object *not* copied: read only."""
        for key, objs in list(self._objects.items()):
            rt = self._types.get(key)
            for obj in list(objs.values()):
                yield rt, obj

    # -- writes -----------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def add(self, key, obj: dict) -> dict:
        """Store a new object: uid, creationTimestamp and resourceVersion are set here."""
        meta = obj["metadata"]
        where = (meta.get("namespace") or "", meta["name"])
        objs = self._objects[key]
        if where in objs:
            rt = self._types[key]
            raise AlreadyExists(f'{rt.resource} "{meta["name"]}" already exists',
                                details=rt.details(meta["name"]))
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["resourceVersion"] = str(self._next_rv())
        objs[where] = obj
        self._uids[meta["uid"]] = (key, where[0], where[1])
        self._emit(Event(self._rv, "ADDED", key, obj))
        return copy.deepcopy(obj)

    def put(self, key, obj: dict) -> dict:
        """Replace an existing object (same namespace and name) with a new resourceVersion."""
        meta = obj["metadata"]
        where = (meta.get("namespace") or "", meta["name"])
        old = self._objects[key][where]
        obj = copy.deepcopy(obj)
        obj["metadata"]["uid"] = old["metadata"]["uid"]
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._objects[key][where] = obj
        self._emit(Event(self._rv, "MODIFIED", key, obj, old))
        return copy.deepcopy(obj)

    def remove(self, key, namespace: str | None, name: str, options: dict | None = None) -> dict:
        """Remove an object; the DELETED event carries it with the deletion's resourceVersion."""
        where = (namespace or "", name)
        old = self._objects[key].pop(where)
        self._uids.pop(old["metadata"]["uid"], None)
        obj = copy.deepcopy(old)
        obj["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(Event(self._rv, "DELETED", key, obj, old, dict(options or {})))
        return copy.deepcopy(obj)

    def _emit(self, ev: Event) -> None:
        if len(self._history) == self._history.maxlen:
            self._oldest = self._history[0].rv
        self._history.append(ev)
        for w in list(self._watchers):
            w.offer(ev)
        for fn in list(self._subscribers):
            fn(ev)

    # -- watches ----------------------------------------------------------------------------

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        """Call `fn(event)` synchronously after every change (the controllers' informers)."""
        self._subscribers.append(fn)

    def unsubscribe(self, fn) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)

    def watch(self, key, namespace: str | None, predicate=None, since: int | None = None,
              initial: Iterable[dict] = ()) -> Watcher:
        """A watcher that first yields `initial` objects as ADDED (the synthetic events of a
        watch without resourceVersion) or, with `since`, the recorded events after it; then
        live events. Raises Expired if `since` is older than the history holds."""
        if since is not None and since < self._oldest:
            raise Expired(f"too old resource version: {since} ({self._oldest})")
        w = Watcher(self, key, namespace, predicate)
        for obj in initial:
            w.push(("ADDED", obj))
        if since is not None:
            for ev in self._history:
                if ev.rv > since:
                    w.offer(ev)
        self._watchers.add(w)
        return w

    def compact(self) -> None:
        """Drop the whole event history, like an etcd compaction at the current revision."""
        self._history.clear()
        self._oldest = self._rv

    def close_watchers(self) -> None:
        for w in list(self._watchers):
            w.close()
