# distutils: language = c++
# cython: language_level=3, boundscheck=True, wraparound=False
"""The scheduler's hot message handlers, compiled.

A tiny task's round trip makes the scheduler handle two messages (a client's
`update-graph`, a worker's `tasks-finished`) and send two (`compute-tasks`,
`keys-in-memory`). `Scheduler` (scheduler.py) owns every message and every
instruction; `HotPath` takes those four, with typed access to the state
machine (`_begin`/`_dispatch_event`/`_end`, `tasks_finished` as C calls), the
instruction records and the comms. ARCHITECTURE section 9 measured the
dispatch around the state machine as most of a scheduler's remaining CPU, and
it belongs in Cython with it; here it took the scheduler's share of a round
trip from ~89k to ~77k instructions (callgrind, benchmarks/callgrind_roundtrip.py).

Everything else (instructions other than the two per-task ones, messages
with per-task options) goes back to the Scheduler's Python, unchanged.
"""
cimport cython
from taskcore.core.protocol cimport StreamProtocol, check_positional
from cpython.ref cimport PyObject
from taskcore.core.scheduler_state cimport (TS_PROCESSING, ClientState, KeyInMemory,
                                            SchedulerState, TaskState, UpdateGraph, batch_list)

cdef extern from "Python.h":
    PyObject* PyDict_GetItem(object d, object key)

import logging

from taskcore.errors import CommClosedError

_logger = logging.getLogger("taskcore.scheduler")

cdef object _CommClosedError = CommClosedError


@cython.final
cdef class HotPath:
    """Compiled handlers for the round trip's four messages (see the module doc).

    `workers`, `clients` and `inline` are the Scheduler's own dicts (shared, not
    copied); `other(instruction)` carries out any instruction this class does
    not batch itself.
    """
    cdef SchedulerState state
    cdef dict workers             # address -> peer (with .comm)
    cdef dict clients             # client id -> peer
    cdef dict inline              # task id -> inline result, filled per tasks-finished
    cdef object other             # Scheduler._execute_one
    cdef object general_graph     # Scheduler._update_graph, for records with options
    cdef long long graphs         # update-graph stimuli handled here (their ids)

    def __init__(self, SchedulerState state, dict workers, dict clients, dict inline, other,
                 general_graph):
        self.state = state
        self.workers = workers
        self.clients = clients
        self.inline = inline
        self.other = other
        self.general_graph = general_graph
        self.graphs = 0

    cpdef bint update_graph(self, str client, object records, object wanted,
                            long long priority=0) except -1:
        """A graph whose records [key, spec, deps, None] carry no per-task options,
        straight to the state machine; returns False (nothing done) when one does,
        for the Scheduler's general path (`Scheduler._update_graph`)."""
        cdef SchedulerState st = self.state
        for rec in records:
            if type(rec) is not list or len(<list>rec) != 4 or (<list>rec)[3] is not None:
                return False
        self.graphs += 1
        sid = f"update-graph-h{self.graphs}"
        ev = UpdateGraph(client, records, wanted, priority=priority, stimulus_id=sid)
        st._begin(sid)
        st._dispatch_event(<UpdateGraph>ev)
        self.execute(st._end())
        return True

    cpdef int client_update_graph(self, str client, list msg) except -1:
        """["update-graph", records, wanted] from `client`."""
        check_positional(msg, "update-graph", 3)
        records = msg[1]
        wanted = msg[2]
        if type(wanted) is not list:          # one task: ["update-graph", record, key]
            records = [records]
            wanted = [wanted]
        if not self.update_graph(client, records, wanted, 0):
            self.general_graph(client, records, wanted, 0)   # per-task options
        return 0

    cpdef int tasks_finished(self, str worker, list msg) except -1:
        """["tasks-finished", ids, nbytes, types, durations, data] from `worker`
        (one task's fields as they are, rather than one-element columns, when it
        reports one task: see `_one_row`)."""
        cdef list ids, data
        cdef dict inline = self.inline
        cdef Py_ssize_t i, n
        check_positional(msg, "tasks-finished", 6)
        if type(msg[1]) is not list:                     # one task: its fields
            d = msg[5]
            told = False
            if d is not None:
                inline[msg[1]] = d
                told = self.tell_clients_now(worker, msg[1], d)
            try:
                instructions = self.state.task_finished(worker, msg[1], msg[2], msg[3],
                                                        msg[4], "task-finished")
                if told:                                 # they know: no second message
                    instructions = _without_key_in_memory(instructions, msg[1])
                self.execute(instructions)
            finally:
                if inline:
                    inline.clear()
            return 0
        ids = msg[1]
        data = msg[5]
        n = len(ids)
        if len(data) != n:
            raise ValueError("tasks-finished: columns of different lengths")
        for i in range(n):
            d = data[i]
            if d is not None:
                inline[ids[i]] = d
        try:
            self.execute(self.state.tasks_finished(worker, ids, msg[2], msg[3], msg[4],
                                                   "task-finished"))
        finally:
            if inline:
                inline.clear()
        return 0

    cdef bint tell_clients_now(self, str worker, object tid, object value) except -1:
        """A task's result came back inline: send it to the clients that want it
        now, before the state machine runs, so the client's wait does not include
        the transitions and the batching (the scheduler's second step of a round
        trip). Only when the machine will take the report as it is: the task is
        processing, on this worker. Returns whether it did (the machine's
        `KeyInMemory` for the task is then dropped)."""
        cdef SchedulerState st = self.state
        cdef PyObject* o = PyDict_GetItem(st._by_id, tid)
        cdef TaskState ts
        cdef StreamProtocol sp
        if o == NULL:
            return False
        ts = <TaskState>o
        if (ts.state != TS_PROCESSING or ts.processing_on is None
                or ts.processing_on.address != worker or ts.who_wants is None):
            return False
        if type(ts.who_wants) is ClientState:
            cids = ((<ClientState>ts.who_wants).client_id,)
        else:
            cids = [(<ClientState>c).client_id for c in <dict>ts.who_wants]
        for cid in cids:
            peer = self.clients.get(cid)
            if peer is None:
                continue
            _send(peer, ["keys-in-memory", ts.key, value])
            comm = peer.comm
            if isinstance(comm, StreamProtocol):
                sp = <StreamProtocol>comm
                sp._flush()                      # write now, not when this handler ends
        return True

    cpdef int execute(self, list instructions) except -1:
        """Carry out instructions: runs of `compute-tasks`/`keys-in-memory` batched
        per peer (order kept, see `batch_instructions`), anything else by `other`."""
        cdef dict compute, in_memory
        cdef list msg
        cdef dict inline = self.inline
        for item in batch_list(instructions):
            if type(item) is not tuple:
                self.other(item)
                continue
            compute, in_memory = <tuple>item
            for addr, m in compute.items():
                peer = self.workers.get(addr)
                if peer is not None:
                    _send(peer, <list>m)
            if in_memory:
                for cid, m in in_memory.items():
                    peer = self.clients.get(cid)
                    if peer is None:
                        continue
                    msg = <list>m           # ["keys-in-memory", keys, task ids]
                    tids = msg[2]
                    if type(tids) is not list:     # one key (its fields, no columns)
                        msg[2] = inline.get(tids) if inline else None
                    elif inline:
                        msg[2] = [inline.get(t) for t in <list>tids]
                    else:
                        msg[2] = [None] * len(<list>tids)
                    _send(peer, msg)
        return 0


cdef list _without_key_in_memory(list instructions, object tid):
    cdef Py_ssize_t t = tid
    return [i for i in instructions
            if not (type(i) is KeyInMemory and (<KeyInMemory>i).task_id == t)]


cdef inline int _send(object peer, list msg) except -1:
    comm = peer.comm
    try:
        if isinstance(comm, StreamProtocol):
            (<StreamProtocol>comm).queue(msg)
        else:                          # inproc:// and other transports
            comm.send(msg)
    except _CommClosedError:
        pass                           # the peer is gone; its removal follows
    return 0


@cython.final
cdef class Route:
    """A comm's message handler: positional messages to the compiled handlers,
    every other message to `fallback(peer, msg)` (the Scheduler's Python). A
    malformed positional message is logged and dropped, as the Scheduler does
    with any malformed message: the connection and the scheduler carry on."""
    cdef HotPath hot
    cdef object peer
    cdef object fallback
    cdef bint from_worker

    def __init__(self, HotPath hot, peer, fallback, bint from_worker):
        self.hot = hot
        self.peer = peer
        self.fallback = fallback
        self.from_worker = from_worker

    def __call__(self, msg):
        self.handle(msg)

    def handle(self, msg):
        """The handler proper: `comm.set_message_handler(route.handle)` (a bound
        method is called with vectorcall; an instance's `__call__` is not)."""
        if type(msg) is not list:
            self.fallback(self.peer, msg)
            return
        try:
            if self.from_worker:
                self.hot.tasks_finished(self.peer.id, <list>msg)
            else:
                self.hot.client_update_graph(self.peer.id, <list>msg)
        except Exception:
            _logger.exception("error handling %r from %s %s", str(msg)[:200],
                              "worker" if self.from_worker else "client", self.peer.id)
