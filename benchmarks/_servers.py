"""Peer processes for the transport benchmarks (run as `python _servers.py KIND`).

Each prints its port on stdout, then serves until killed. Running the peer in
its own process puts the two ends on different cores, as in a real cluster.

    raw-echo   uvloop Protocol echoing bytes (the baseline for round trips)
    tc-echo    taskcore comm echoing messages
    raw-sink   socket server: recv_into one preallocated buffer of N bytes, ack 1 byte
    tc-sink    taskcore comm: read messages, ack each with a tiny message
    tc-count   taskcore comm: count messages until a "stop" message, then reply the count
    relay-sched PORT-less: a bare relay "scheduler": lines from a client go to the
               worker, lines from the worker go back to the client (raw uvloop)
    relay-worker PORT: connects to relay-sched, echoes every line (the bare "worker")
"""
import asyncio
import socket
import sys
import threading

import uvloop


class RawEcho(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data):
        self.t.write(data)


async def tc_server(kind):
    from taskcore.errors import CommClosedError
    from taskcore.transports import listen

    async def echo(comm):
        comm.set_message_handler(comm.send)
        await comm.lost

    async def sink(comm):
        while True:
            try:
                await comm.read()
            except CommClosedError:
                return
            comm.send(1)

    async def count(comm):
        n = 0

        def handler(msg):
            nonlocal n
            if msg == "stop":
                comm.send(n)
                n = 0
            else:
                n += 1

        comm.set_message_handler(handler)
        await comm.lost

    handler = {"tc-echo": echo, "tc-sink": sink, "tc-count": count}[kind]
    listener = await listen("tcp://127.0.0.1:0", handler)
    print(listener.contact_address.rsplit(":", 1)[1], flush=True)
    await asyncio.Event().wait()


class RelaySched(asyncio.Protocol):
    """Bare relay hop: no task logic, just forwarding, as the prototype's scheduler did."""

    worker = None
    client = None

    def connection_made(self, transport):
        self.t = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.role = None

    def data_received(self, data):
        if self.role is None:
            if data.startswith(b"WORKER\n"):
                self.role = "worker"
                RelaySched.worker = self
                data = data[7:]
            else:
                self.role = "client"
                RelaySched.client = self
        if not data:
            return
        if self.role == "client":
            RelaySched.worker.t.write(data)
        else:
            RelaySched.client.t.write(data)


async def relay_sched():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RelaySched, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


async def relay_worker(port):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(RawEcho, "127.0.0.1", port)
    transport.write(b"WORKER\n")
    await asyncio.Event().wait()


async def raw_echo():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawEcho, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def raw_sink(nbytes):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    print(srv.getsockname()[1], flush=True)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    while True:
        conn, _ = srv.accept()

        def serve(conn=conn):
            with conn:
                while True:
                    got = 0
                    while got < nbytes:
                        n = conn.recv_into(view[got:])
                        if n == 0:
                            return
                        got += n
                    conn.sendall(b"k")

        threading.Thread(target=serve, daemon=True).start()


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "raw-sink":
        raw_sink(int(sys.argv[2]))
    elif kind == "raw-echo":
        uvloop.run(raw_echo())
    elif kind == "relay-sched":
        uvloop.run(relay_sched())
    elif kind == "relay-worker":
        uvloop.run(relay_worker(int(sys.argv[2])))
    else:
        uvloop.run(tc_server(kind))
