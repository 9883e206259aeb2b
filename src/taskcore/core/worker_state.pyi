"""Stubs for the compiled worker task-state machine (taskcore.core.worker_state)."""
from typing import Any, ClassVar, Hashable, Iterable, Sequence

from taskcore.errors import TaskcoreError

Key = Hashable  # str or tuple
# (dep id, dep key, nbytes (< 0: unknown), [holder addresses])
WhoHasEntry = tuple[int, Key, int | None, Sequence[str]]

STATES: tuple[str, ...]
TRANSITIONS: dict[tuple[str, str], str]

class InvalidTransition(TaskcoreError):
    key: Key
    start: str
    finish: str
    story: list[tuple]
    def __init__(self, key: Key, start: str, finish: str, story: list[tuple]) -> None: ...

class InvalidTaskState(TaskcoreError):
    key: Key
    state: str
    message: str
    story: list[tuple]
    def __init__(self, key: Key, state: str, message: str, story: list[tuple]) -> None: ...

class TaskState:
    @property
    def id(self) -> int: ...
    @property
    def key(self) -> Key: ...
    run_spec: Any
    @property
    def state(self) -> str: ...
    @property
    def previous(self) -> str | None: ...
    @property
    def next(self) -> str | None: ...
    @property
    def priority(self) -> tuple[int, ...] | None: ...
    @property
    def annotations(self) -> Any: ...
    @property
    def resource_restrictions(self) -> dict[str, float] | None: ...
    @property
    def exception(self) -> Any: ...
    @property
    def traceback(self) -> Any: ...
    @property
    def type_name(self) -> Any: ...
    @property
    def start(self) -> float: ...
    @property
    def stop(self) -> float: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def dependencies(self) -> list[int]: ...
    @property
    def dependents(self) -> list[int]: ...
    @property
    def who_has(self) -> list[str]: ...
    @property
    def coming_from(self) -> str | None: ...
    @property
    def waiting_for_data(self) -> int: ...
    @property
    def running(self) -> bool: ...

class PeerState:
    @property
    def address(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def local(self) -> bool: ...
    @property
    def busy(self) -> bool: ...
    @property
    def busy_count(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def transfer_nbytes(self) -> int: ...
    @property
    def keys(self) -> set[Key]: ...
    @property
    def in_transfer(self) -> bool: ...

# --- events ---------------------------------------------------------------
class StateMachineEvent:
    _fields: ClassVar[tuple[str, ...]]
    @property
    def stimulus_id(self) -> Any: ...

class ComputeTask(StateMachineEvent):
    id: int
    key: Key
    run_spec: Any
    priority: tuple[int, ...] | None
    who_has: Sequence[WhoHasEntry] | None
    resource_restrictions: dict[str, float] | None
    annotations: Any
    def __init__(self, id: int, key: Key, run_spec: Any, priority: tuple[int, ...] | None,
                 stimulus_id: Any, who_has: Sequence[WhoHasEntry] | None = ...,
                 resource_restrictions: dict[str, float] | None = ...,
                 annotations: Any = ...) -> None: ...

class FreeKeys(StateMachineEvent):
    ids: Iterable[int]
    def __init__(self, ids: Iterable[int], stimulus_id: Any) -> None: ...

class RemoveReplicas(StateMachineEvent):
    ids: Iterable[int]
    def __init__(self, ids: Iterable[int], stimulus_id: Any) -> None: ...

class AcquireReplicas(StateMachineEvent):
    who_has: Sequence[WhoHasEntry]
    def __init__(self, who_has: Sequence[WhoHasEntry], stimulus_id: Any) -> None: ...

class UpdateData(StateMachineEvent):
    data: Sequence[tuple[int, Key, int]]
    report: bool
    def __init__(self, data: Sequence[tuple[int, Key, int]], stimulus_id: Any,
                 report: bool = ...) -> None: ...

class ExecuteSuccess(StateMachineEvent):
    id: int
    nbytes: int
    type_name: Any
    start: float
    stop: float
    def __init__(self, id: int, nbytes: int, type_name: Any, start: float, stop: float,
                 stimulus_id: Any) -> None: ...

class ExecuteFailure(StateMachineEvent):
    id: int
    exception: Any
    traceback: Any
    start: float
    stop: float
    def __init__(self, id: int, exception: Any, traceback: Any, start: float, stop: float,
                 stimulus_id: Any) -> None: ...

class RescheduleEvent(StateMachineEvent):
    id: int
    def __init__(self, id: int, stimulus_id: Any) -> None: ...

class SecedeEvent(StateMachineEvent):
    id: int
    def __init__(self, id: int, stimulus_id: Any) -> None: ...

class GatherDepSuccess(StateMachineEvent):
    worker: str
    data: dict[int, int]
    def __init__(self, worker: str, data: dict[int, int], stimulus_id: Any) -> None: ...

class GatherDepBusy(StateMachineEvent):
    worker: str
    ids: Any
    def __init__(self, worker: str, stimulus_id: Any, ids: Any = ...) -> None: ...

class GatherDepNetworkFailure(StateMachineEvent):
    worker: str
    ids: Any
    def __init__(self, worker: str, stimulus_id: Any, ids: Any = ...) -> None: ...

class GatherDepFailure(StateMachineEvent):
    worker: str
    exception: Any
    traceback: Any
    ids: Any
    def __init__(self, worker: str, exception: Any, traceback: Any, stimulus_id: Any,
                 ids: Any = ...) -> None: ...

class StealRequest(StateMachineEvent):
    id: int
    def __init__(self, id: int, stimulus_id: Any) -> None: ...

class PauseEvent(StateMachineEvent):
    def __init__(self, stimulus_id: Any) -> None: ...

class UnpauseEvent(StateMachineEvent):
    def __init__(self, stimulus_id: Any) -> None: ...

class RetryBusyWorker(StateMachineEvent):
    worker: str
    def __init__(self, worker: str, stimulus_id: Any) -> None: ...

class FindMissing(StateMachineEvent):
    def __init__(self, stimulus_id: Any) -> None: ...

class FindMissingResult(StateMachineEvent):
    who_has: dict[int, Sequence[str]]
    def __init__(self, who_has: dict[int, Sequence[str]], stimulus_id: Any) -> None: ...

class RemoveWorker(StateMachineEvent):
    worker: str
    def __init__(self, worker: str, stimulus_id: Any) -> None: ...

# --- instructions ---------------------------------------------------------
class _InstructionMatch:
    def __eq__(self, other: object) -> bool: ...

class Instruction:
    _fields: ClassVar[tuple[str, ...]]
    op: ClassVar[str | None]
    @property
    def stimulus_id(self) -> Any: ...
    @classmethod
    def match(cls, **kwargs: Any) -> _InstructionMatch: ...
    def to_dict(self) -> dict[str, Any]: ...

class Execute(Instruction):
    id: int
    key: Key
    run_spec: Any
    def __init__(self, id: int, key: Key, run_spec: Any, stimulus_id: Any) -> None: ...

class GatherDep(Instruction):
    worker: str
    ids: list[int]
    keys: list[Key]
    total_nbytes: int
    def __init__(self, worker: str, ids: list[int], keys: list[Key], total_nbytes: int,
                 stimulus_id: Any) -> None: ...

class RetryBusyWorkerLater(Instruction):
    worker: str
    def __init__(self, worker: str, stimulus_id: Any) -> None: ...

class DropData(Instruction):
    id: int
    key: Key
    def __init__(self, id: int, key: Key, stimulus_id: Any) -> None: ...

class TaskFinishedMsg(Instruction):
    id: int
    key: Key
    nbytes: int
    type_name: Any
    start: float
    stop: float
    def __init__(self, id: int, key: Key, nbytes: int, type_name: Any, start: float,
                 stop: float, stimulus_id: Any) -> None: ...

class TaskErredMsg(Instruction):
    id: int
    key: Key
    exception: Any
    traceback: Any
    start: float
    stop: float
    def __init__(self, id: int, key: Key, exception: Any, traceback: Any, start: float,
                 stop: float, stimulus_id: Any) -> None: ...

class ReleaseWorkerDataMsg(Instruction):
    id: int
    key: Key
    def __init__(self, id: int, key: Key, stimulus_id: Any) -> None: ...

class MissingDataMsg(Instruction):
    id: int
    key: Key
    errant_worker: str
    def __init__(self, id: int, key: Key, errant_worker: str, stimulus_id: Any) -> None: ...

class RequestRefreshWhoHas(Instruction):
    ids: list[int]
    def __init__(self, ids: list[int], stimulus_id: Any) -> None: ...

class StealResponseMsg(Instruction):
    id: int
    key: Key | None
    state: str | None
    def __init__(self, id: int, key: Key | None, state: str | None, stimulus_id: Any) -> None: ...

class AddKeysMsg(Instruction):
    ids: list[int]
    def __init__(self, ids: list[int], stimulus_id: Any) -> None: ...

class RescheduleMsg(Instruction):
    id: int
    key: Key
    def __init__(self, id: int, key: Key, stimulus_id: Any) -> None: ...

class LongRunningMsg(Instruction):
    id: int
    key: Key
    def __init__(self, id: int, key: Key, stimulus_id: Any) -> None: ...

# --- the machine ----------------------------------------------------------
class WorkerState:
    nthreads: int
    address: str | None
    host: str | None
    validate: bool
    max_transfer_bytes: int
    max_concurrent_transfers: int
    max_in_flight_bytes: int
    default_nbytes: int
    max_transitions: int
    story_size: int
    paused: bool
    memory_bytes: int
    in_flight_bytes: int
    transfers_in_flight: int
    executing_count: int
    long_running_count: int
    transition_count: int
    def __init__(self, nthreads: int = ..., resources: dict[str, float] | None = ...,
                 address: str | None = ..., *, validate: bool = ...,
                 max_transfer_bytes: int = ..., max_concurrent_transfers: int = ...,
                 max_in_flight_bytes: int = ..., default_nbytes: int = ...,
                 story_size: int = ..., max_transitions: int = ...) -> None: ...
    def handle_stimulus(self, *events: StateMachineEvent) -> list[Instruction]: ...
    @property
    def tasks(self) -> dict[int, TaskState]: ...
    def get_task(self, id: int) -> TaskState | None: ...
    def state_of(self, id: int) -> str | None: ...
    def __len__(self) -> int: ...
    def __contains__(self, id: object) -> bool: ...
    @property
    def task_counts(self) -> dict[str, int]: ...
    @property
    def ready_count(self) -> int: ...
    @property
    def fetch_count(self) -> int: ...
    @property
    def in_memory_count(self) -> int: ...
    @property
    def memory_ids(self) -> list[int]: ...
    @property
    def missing_ids(self) -> list[int]: ...
    @property
    def has_what(self) -> dict[str, set[Key]]: ...
    @property
    def peers(self) -> dict[str, PeerState]: ...
    @property
    def in_flight_workers(self) -> dict[str, list[int]]: ...
    @property
    def busy_workers(self) -> set[str]: ...
    @property
    def total_resources(self) -> dict[str, float]: ...
    @property
    def available_resources(self) -> dict[str, float]: ...
    def dependency_keys(self, id: int) -> list[Key]: ...
    def heartbeat(self) -> dict[str, Any]: ...
    def story(self, *keys_or_ids: Any) -> list[tuple]: ...
    def debug_transition(self, id: int, finish: str, stimulus_id: Any = ...) -> list[Instruction]: ...
    def validate_state(self) -> None: ...
