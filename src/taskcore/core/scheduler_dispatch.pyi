"""Type stub for the compiled taskcore.core.scheduler_dispatch (see scheduler_dispatch.pyx)."""
from typing import Any

from taskcore.core.protocol import MessageSink
from taskcore.core.scheduler_state import Instruction, SchedulerState, Stimulus

class Peer:
    """A connected worker, client or nanny."""

    comm: Any
    sink: MessageSink
    kind: str
    id: Any
    replies: dict
    info: dict
    closing: bool

    def __init__(self, comm: Any, kind: str, id: Any, info: dict | None = None) -> None: ...

class SchedulerDispatch:
    """Base of the Scheduler server: a round trip's messages compiled, hooks for the rest."""

    state: SchedulerState
    workers: dict[str, Peer]
    clients: dict[str, Peer]

    # hooks, overridden by the server
    def handle_client_message(self, peer: Peer, msg: Any) -> None: ...
    def handle_worker_message(self, peer: Peer, msg: Any) -> None: ...
    def execute_other(self, instruction: Instruction) -> None: ...

    def handle(self, ev: Stimulus) -> int: ...
    def client_update_graph(self, client: str, msg: list) -> int: ...
    def worker_tasks_finished(self, worker: str, msg: list) -> int: ...
    def execute(self, instructions: list[Instruction]) -> int: ...
    def send(self, peer: Peer | None, msg: Any) -> int: ...

class Route:
    """A comm's message handler: positional messages compiled, the rest to the hooks."""

    def __init__(self, server: SchedulerDispatch, peer: Peer, from_worker: bool) -> None: ...
    def __call__(self, msg: Any) -> None: ...
    def handle(self, msg: Any) -> None: ...
