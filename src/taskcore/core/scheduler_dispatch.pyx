# distutils: language = c++
# cython: language_level=3, boundscheck=True, wraparound=False
"""The scheduler's compiled dispatch: messages in, stimuli to the state machine,
instructions out as messages.

`SchedulerDispatch` is the base class of the `Scheduler` server
(scheduler.py), in the manner of asyncpg's protocol classes: this layer does
the per-message work of a round trip in C, and reaches the server only
through hook methods that the server overrides:

    handle_client_message(peer, msg)   a client's message other than update-graph
    handle_worker_message(peer, msg)   a worker's message other than tasks-finished
    execute_other(instruction)         an instruction other than ComputeTask/KeyInMemory

The two hot messages in (`update-graph`, `tasks-finished`) are decoded by
core/messages.pyx into stimuli and handed to `SchedulerState.handle`, the
machine's one entry; the instructions that come back are grouped per peer by
`messages.batch_instructions` and queued on each peer's `MessageSink` (a
comm's write capability, protocol.pxd). The machine decides everything,
including which clients learn of a finished task and whether its result rides
along (`KeyInMemory.data`); this layer only moves bytes.

Once the state machine was compiled, the Python dispatch around it was most
of a scheduler's CPU per round trip; compiled, it is a fraction of that
(docs/design.md).
"""
cimport cython
from taskcore.core.messages cimport batch_instructions, decode_tasks_finished, decode_update_graph
from taskcore.core.protocol cimport MessageSink, sink_of
from taskcore.core.scheduler_state cimport SchedulerState, Stimulus

import logging

from taskcore.errors import CommClosedError

_logger = logging.getLogger("taskcore.scheduler")

cdef object _CommClosedError = CommClosedError


cdef class Peer:
    """A connected worker, client or nanny: its comm, the comm's sink, its
    pending requests."""

    def __init__(self, comm, str kind, id, info=None):
        self.comm = comm
        self.sink = sink_of(comm)
        self.kind = kind
        self.id = id
        self.replies = {}
        self.info = info or {}
        self.closing = False


cdef class SchedulerDispatch:
    """See the module doc. `state`, `workers` (address -> Peer) and `clients`
    (client id -> Peer) are set by the server."""

    def __cinit__(self, *args, **kwargs):
        self.graphs = 0
        self.workers = {}
        self.clients = {}

    # -- hooks (the server overrides these) ------------------------------------------
    cpdef handle_client_message(self, Peer peer, object msg):
        _logger.warning("unhandled message from client %s: %r", peer.id, str(msg)[:200])

    cpdef handle_worker_message(self, Peer peer, object msg):
        _logger.warning("unhandled message from worker %s: %r", peer.id, str(msg)[:200])

    cpdef execute_other(self, object instruction):
        _logger.error("unhandled instruction %r", instruction)

    # -- stimuli -----------------------------------------------------------------------
    cpdef int handle(self, Stimulus ev) except -1:
        """Feed one stimulus to the state machine and carry out its instructions."""
        self.execute(self.state.handle(ev))
        return 0

    cpdef int client_update_graph(self, str client, list msg) except -1:
        """["update-graph", ...] from `client` (core/messages.pyx)."""
        self.graphs += 1
        self.handle(decode_update_graph(client, msg, f"update-graph-{self.graphs}"))
        return 0

    cpdef int worker_tasks_finished(self, str worker, list msg) except -1:
        """["tasks-finished", ...] from `worker` (core/messages.pyx)."""
        self.handle(decode_tasks_finished(worker, msg))
        return 0

    # -- instructions --------------------------------------------------------------------
    cpdef int execute(self, list instructions) except -1:
        """Carry out instructions: runs of ComputeTask/KeyInMemory as one message
        per peer (order kept), anything else through `execute_other`."""
        cdef dict compute, in_memory
        for item in batch_instructions(instructions):
            if type(item) is not tuple:
                self.execute_other(item)
                continue
            compute, in_memory = <tuple>item
            # The clients first, and written at once rather than at the end of this
            # read callback: the machine emits a task's KeyInMemory before the
            # instructions its report sets off, and a client's wait is the latency
            # of a round trip (the rest of the scheduler's work then overlaps the
            # client's).
            if in_memory:
                for cid, m in in_memory.items():
                    peer = self.clients.get(cid)
                    if peer is not None:
                        _queue(peer, m)
                        (<Peer>peer).sink.flush_now()
            for addr, m in compute.items():
                _queue(self.workers.get(addr), m)
        return 0

    cpdef int send(self, Peer peer, object msg) except -1:
        """Queue `msg` to `peer` (None: gone); a closed comm is ignored, its
        removal follows."""
        _queue(peer, msg)
        return 0


cdef inline int _queue(object peer, object msg) except -1:
    if peer is None:
        return 0
    try:
        (<Peer>peer).sink.queue(msg)
    except _CommClosedError:
        pass                           # the peer is gone; its removal follows
    return 0


@cython.final
cdef class Route:
    """A comm's message handler: a positional message to the compiled handlers,
    every other message to the server's hook. A malformed message is logged
    and dropped: the connection and the scheduler carry on."""
    cdef SchedulerDispatch server
    cdef Peer peer
    cdef bint from_worker

    def __init__(self, SchedulerDispatch server, Peer peer, bint from_worker):
        self.server = server
        self.peer = peer
        self.from_worker = from_worker

    def __call__(self, msg):
        self.handle(msg)

    def handle(self, msg):
        """The handler proper: `comm.set_message_handler(route.handle)` (a bound
        method is called with vectorcall; an instance's `__call__` is not)."""
        try:
            if type(msg) is not list:
                if self.from_worker:
                    self.server.handle_worker_message(self.peer, msg)
                else:
                    self.server.handle_client_message(self.peer, msg)
            elif self.from_worker:
                self.server.worker_tasks_finished(self.peer.id, <list>msg)
            else:
                self.server.client_update_graph(self.peer.id, <list>msg)
        except Exception:
            _logger.exception("error handling %r from %s %s", str(msg)[:200],
                              "worker" if self.from_worker else "client", self.peer.id)
