# Framed, batched message protocol over an asyncio stream transport (see protocol.pyx).
from cpython.pythread cimport PyThread_type_lock
from taskcore.core.wire cimport FrameDecoder, Limits

cdef class LoopFlusher:
    cdef int depth      # nesting of I/O callbacks running on this loop
    cdef list dirty     # comms whose outbox is flushed when depth returns to 0
    cdef inline void enter(self)
    cdef void leave(self)

cdef class MessageSink:
    # What compiled senders write through: a comm's `sink` (see sink_of). The
    # methods are virtual C calls: StreamProtocol overrides them in C, and
    # CallSink carries them to any other comm's Python methods.
    cdef int queue(self, object msg) except -1          # send(msg): batched, no wait
    cdef int begin_batch(self) except -1                # queue() until end_batch()...
    cdef int end_batch(self) except -1                  # ...then write them at once
    cdef int flush_now(self) except -1                  # write what is queued, now
    cdef bint write_now(self, object msg) except -1     # from a thread other than the
                                                        # loop's; False: not done

cdef class CallSink(MessageSink):
    cdef object comm
    cdef object _send
    cdef object _write_now

cpdef MessageSink sink_of(object comm)

cdef class StreamProtocol(MessageSink):
    cdef object loop
    cdef LoopFlusher flusher          # this loop's "inside an I/O callback" record
    cdef readonly object transport
    cdef FrameDecoder decoder
    cdef readonly Limits limits
    cdef list outbox                  # messages sent since the last flush
    cdef bint flush_scheduled         # invariant: True iff a flush is pending for outbox
    cdef bint paused                  # transport above its high-water mark
    cdef public bint closed
    cdef object drain_waiter          # future resolved by resume_writing/close
    cdef object flushed               # future resolved when the pending outbox is flushed
    cdef object inbox                 # deque of received messages (no handler set)
    cdef Py_ssize_t inbox_bytes       # wire bytes behind the messages in inbox (approx.)
    cdef bint reading_paused          # socket reads paused until the inbox drains
    cdef object read_waiter
    cdef public object on_message     # fast path: handler(msg) called from buffer_updated
    cdef public object on_close       # callback(comm) when the connection is lost
    cdef public object exc            # why the comm closed
    cdef public bint compression      # lz4 negotiated in the handshake
    cdef Py_ssize_t high_water
    cdef readonly object connected    # future: connection_made happened
    cdef readonly object lost         # future: connection_lost happened
    cdef public object local_address
    cdef public object peer_address
    cdef public object handshake_info # the peer's handshake message
    cdef readonly long long bytes_read
    cdef readonly long long bytes_written
    # write_now: a blocking caller thread writes to the socket itself
    cdef PyThread_type_lock wlock     # held around every write to the socket
    cdef int wfd                      # our dup of the socket, or -1: no write_now
    cdef bytes tail                   # what a write_now left unwritten; the loop writes it next
    cdef int rawfd                    # the transport's own socket (plain TCP), or -1
    cdef readonly long long direct_writes

    cdef object _deliver(self, tuple item)
    cdef void _protocol_error(self, exc)
    cdef void _tell_peer(self, str reason)
    cdef void _wake_all(self)
    cpdef flush(self)
    cdef int _flush(self) except -1
    cdef object _dumps_each(self, list batch)
    cdef int _write_frames(self, list frames) except -1
    cdef int _lock_writes(self) except -1
    cdef int _send_small(self, bytes data) except -1
