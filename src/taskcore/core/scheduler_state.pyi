"""Type stubs for the compiled scheduler state machine (scheduler_state.pyx)."""
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from taskcore.errors import TaskcoreError

Key = Hashable
#: State names, indexed by the internal state code.
STATES: tuple[str, ...]
#: Victim states ("ready", "waiting", ...) in which a steal goes ahead.
STEALABLE_WORKER_STATES: frozenset[str | None]

def transition_table() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(direct legal pairs, pairs routed through 'released')."""

class InvalidTransition(TaskcoreError):
    key: Key
    start: str
    finish: str
    story: list[tuple[Key, str, str, str, str | None]]
    def __init__(self, key: Key, start: str, finish: str, story: Iterable[tuple] = ...) -> None: ...

class MissingDependencyError(TaskcoreError):
    key: Key
    missing: tuple[Key, ...]
    def __init__(self, key: Key, missing: Iterable[Key]) -> None: ...

# --------------------------------------------------------------------------
# Records (read-only views)
# --------------------------------------------------------------------------

class PrefixState:
    name: str
    duration_average: float      # < 0 while unknown
    n_durations: int
    n_done: int                  # ever finished computing
    def task_stream(self, since: int = 0, limit: int = 1000
                    ) -> tuple[int, list[tuple[Key, str, float, float, str]]]: ...
    def prefix_counts(self) -> dict[str, dict[str, int]]: ...
    def state_counts(self) -> dict[str, int]: ...   # live tasks per state, plus "done"

class ClientState:
    client_id: str
    wants: dict[TaskState, None]

class WorkerState:
    id: int
    address: str
    name: Any
    nthreads: int
    memory_limit: int
    resources: dict[str, float]
    used_resources: dict[str, float]
    n_processing: int
    n_long_running: int          # seceded tasks (each adds a slot while it lasts)
    has_what: dict[TaskState, None]
    occupancy: float
    nbytes: int
    slots: int
    last_seen: float
    metrics: Any
    @property
    def processing(self) -> list[TaskState]: ...
    @property
    def status_name(self) -> str: ...

class TaskState:
    id: int
    key: Key
    run_spec: Any
    state: int
    dependencies: list[TaskState]
    n_dependents: int
    n_waiters: int
    n_waiting_on: int
    nbytes: int
    typename: Any
    retries: int
    suspicious: int
    annotations: Any
    exception: Any
    traceback: Any
    @property
    def state_name(self) -> str: ...
    @property
    def dependent_keys(self) -> list[Key]: ...
    @property
    def dependency_keys(self) -> list[Key]: ...
    @property
    def who_has_addresses(self) -> list[str]: ...
    @property
    def processing_on_address(self) -> str | None: ...
    @property
    def wanted_by(self) -> list[str]: ...
    @property
    def priority(self) -> tuple[int, int, int]: ...
    @property
    def blame_key(self) -> Key | None: ...
    @property
    def worker_restrictions_set(self) -> frozenset[str] | None: ...
    @property
    def resource_restrictions(self) -> dict[str, float] | None: ...
    @property
    def allow_other_workers(self) -> bool: ...
    @property
    def prefix_name(self) -> str: ...

# --------------------------------------------------------------------------
# Stimuli (events in)
# --------------------------------------------------------------------------

class Stimulus:
    stimulus_id: str

class UpdateGraph(Stimulus):
    client: str
    tasks: list[tuple]
    keys: list[Key]
    workers: Mapping[Key, str | Collection[str]] | None
    allow_other_workers: bool | Collection[Key]
    resources: Mapping[Key, Mapping[str, float]] | None
    retries: int | Mapping[Key, int]
    annotations: Mapping[Key, dict] | None
    priority: int
    def __init__(
        self,
        client: str,
        tasks: Iterable[tuple[Key, Any, Iterable[Key]] | tuple[Key, Any, Iterable[Key], Any]],
        keys: Iterable[Key],
        workers: Mapping[Key, str | Collection[str]] | None = None,
        allow_other_workers: bool | Collection[Key] = False,
        resources: Mapping[Key, Mapping[str, float]] | None = None,
        retries: int | Mapping[Key, int] = 0,
        annotations: Mapping[Key, dict] | None = None,
        priority: int = 0,
        stimulus_id: str = "",
    ) -> None: ...

class TaskFinished(Stimulus):
    worker: str
    task_id: int
    key: Key
    nbytes: int
    typename: Any
    duration: float
    data: Any
    def __init__(self, worker: str, task_id: int = -1, nbytes: int = 0, typename: Any = None,
                 duration: float = -1.0, stimulus_id: str = "", key: Key = None,
                 data: Any = None) -> None: ...

class TasksFinished(Stimulus):
    worker: str
    task_ids: list[int]
    nbytes: list[int]
    typenames: list[Any]
    durations: list[float]
    data: list[Any] | None
    def __init__(self, worker: str, task_ids: list[int], nbytes: list[int],
                 typenames: list[Any], durations: list[float], data: list[Any] | None = None,
                 stimulus_id: str = "") -> None: ...

class TaskLongRunning(Stimulus):
    worker: str
    task_id: int
    key: Key
    def __init__(self, worker: str, task_id: int = -1, stimulus_id: str = "",
                 key: Key = None) -> None: ...

class TaskErred(Stimulus):
    worker: str
    task_id: int
    key: Key
    exception: Any
    traceback: Any
    def __init__(self, worker: str, task_id: int = -1, exception: Any = None,
                 traceback: Any = None, stimulus_id: str = "", key: Key = None) -> None: ...

class AddWorker(Stimulus):
    address: str
    nthreads: int
    memory_limit: int
    resources: dict[str, float]
    name: Any
    now: float
    def __init__(self, address: str, nthreads: int = 1, memory_limit: int = 0,
                 resources: Mapping[str, float] | None = None, name: Any = None,
                 now: float = 0.0, stimulus_id: str = "") -> None: ...

class RemoveWorker(Stimulus):
    address: str
    safe: bool
    now: float
    def __init__(self, address: str, safe: bool = False, now: float = 0.0,
                 stimulus_id: str = "") -> None: ...

class WorkerHeartbeat(Stimulus):
    address: str
    metrics: Any
    now: float
    def __init__(self, address: str, metrics: Any = None, now: float = 0.0,
                 stimulus_id: str = "") -> None: ...

class ClientWantsKeys(Stimulus):
    client: str
    keys: list[Key]
    def __init__(self, client: str, keys: Iterable[Key], stimulus_id: str = "") -> None: ...

class ClientReleasesKeys(Stimulus):
    client: str
    keys: list[Key]
    def __init__(self, client: str, keys: Iterable[Key], stimulus_id: str = "") -> None: ...

class ClientRemoved(Stimulus):
    client: str
    def __init__(self, client: str, stimulus_id: str = "") -> None: ...

class Cancel(Stimulus):
    client: str
    keys: list[Key]
    force: bool
    def __init__(self, client: str, keys: Iterable[Key], force: bool = False,
                 stimulus_id: str = "") -> None: ...

class Retry(Stimulus):
    client: str
    keys: list[Key]
    def __init__(self, client: str, keys: Iterable[Key], stimulus_id: str = "") -> None: ...

class BalanceTick(Stimulus):
    now: float
    def __init__(self, now: float = 0.0, stimulus_id: str = "") -> None: ...

class StealResponse(Stimulus):
    victim: str
    task_id: int
    key: Key
    state: str | None
    def __init__(self, victim: str, task_id: int = -1, state: str | None = None,
                 stimulus_id: str = "", key: Key = None) -> None: ...

class MissingData(Stimulus):
    key: Key
    holder: str
    reporter: str | None
    def __init__(self, key: Key, holder: str, reporter: str | None = None,
                 stimulus_id: str = "") -> None: ...

class AddKeys(Stimulus):
    worker: str
    keys: list[Key]
    def __init__(self, worker: str, keys: Iterable[Key], stimulus_id: str = "") -> None: ...

class UpdateData(Stimulus):
    client: str | None
    who_has: dict[Key, list[str]]
    nbytes: dict[Key, int]
    def __init__(self, client: str | None, who_has: Mapping[Key, Iterable[str]],
                 nbytes: Mapping[Key, int] | None = None, stimulus_id: str = "") -> None: ...

class ReleaseWorkerData(Stimulus):
    worker: str
    keys: list[Key]
    def __init__(self, worker: str, keys: Iterable[Key], stimulus_id: str = "") -> None: ...

class RetireWorkers(Stimulus):
    workers: list[str] | None
    n: int
    def __init__(self, workers: Iterable[str] | None = None, n: int = 0,
                 stimulus_id: str = "") -> None: ...

# --------------------------------------------------------------------------
# Instructions (out)
# --------------------------------------------------------------------------

class Instruction:
    stimulus_id: str
    def to_dict(self) -> dict[str, Any]: ...

class ComputeTask(Instruction):
    worker: str
    task_id: int
    key: Key
    run_spec: Any
    #: (dep_id, dep_key, nbytes, (holder addresses, ...)) per dependency
    dependencies: tuple[tuple[int, Key, int, tuple[str, ...]], ...]
    resources: dict[str, float] | None
    annotations: Any
    duration: float
    @property
    def priority(self) -> tuple[int, int, int]: ...

class FreeKeys(Instruction):
    worker: str
    task_ids: list[int]          # -1 for a key the scheduler does not know
    keys: list[Key]

class StealRequest(Instruction):
    worker: str                  # the victim
    task_id: int
    key: Key

class AcquireReplicas(Instruction):
    worker: str
    who_has: list[tuple[int, Key, int, tuple[str, ...]]]

class KeyInMemory(Instruction):
    clients: tuple[str, ...]
    key: Key
    task_id: int
    nbytes: int
    typename: Any
    data: Any

class TaskErredReport(Instruction):
    clients: tuple[str, ...]
    key: Key
    exception: Any
    traceback: Any
    blame_key: Key

class KeyLost(Instruction):
    clients: tuple[str, ...]
    key: Key

class TaskCancelled(Instruction):
    clients: tuple[str, ...]
    key: Key

class TaskRetried(Instruction):
    clients: tuple[str, ...]
    key: Key

class KeyForgotten(Instruction):
    clients: tuple[str, ...]
    key: Key

class WorkersRetiring(Instruction):
    workers: list[str]
    n_replicas: int

# --------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------

class SchedulerState:
    validate: bool
    allowed_failures: int
    worker_saturation: float
    tiny_task_backlog: float
    bandwidth: float
    unknown_task_duration: float
    work_stealing: bool
    steal_ratio: float
    transition_log_length: int
    task_stream_length: int
    task_stream_total: int       # tasks ever recorded in the task stream
    n_transitions: int           # transitions ever made
    tasks: dict[Key, TaskState]
    workers: dict[str, WorkerState]
    clients: dict[str, ClientState]
    def __init__(
        self,
        *,
        validate: bool = False,
        allowed_failures: int = 2,
        worker_saturation: float = 1.1,
        bandwidth: float = 100e6,
        unknown_task_duration: float = 0.5,
        work_stealing: bool = True,
        steal_ratio: float = 1.0,
        transition_log_length: int = 100_000,
        tiny_task_backlog: float = 0.002,
        task_stream_length: int = 100_000,
    ) -> None: ...
    def handle_stimulus(self, *stimuli: Stimulus) -> list[Instruction]: ...
    def handle(self, ev: Stimulus) -> list[Instruction]: ...
    def transition(self, key: Key, finish: str,
                   stimulus_id: str = "manual-transition") -> list[Instruction]: ...
    def validate_state(self) -> None: ...
    # introspection
    def story(self, *keys_or_stimulus_ids: Any) -> list[tuple[Key, str, str, str, str | None]]: ...
    def transitions_since(self, n: int) -> list[tuple[Key, str, str, str]]: ...
    def get_task(self, key: Key) -> TaskState | None: ...
    def task_state(self, key: Key) -> str: ...
    def task_states(self, keys: Iterable[Key] | None = None) -> dict[Key, str]: ...
    def state_counts(self) -> dict[str, int]: ...
    def key_of(self, task_id: int) -> Key | None: ...
    def id_of(self, key: Key) -> int | None: ...
    def who_has(self, keys: Iterable[Key] | None = None) -> dict[Key, list[str]]: ...
    def has_what(self, workers: Iterable[str] | None = None) -> dict[str, list[Key]]: ...
    def processing(self, workers: Iterable[str] | None = None) -> dict[str, list[Key]]: ...
    def occupancy(self, workers: Iterable[str] | None = None) -> dict[str, float]: ...
    def nthreads(self) -> dict[str, int]: ...
    def worker_resources(self) -> dict[str, dict[str, tuple[float, float]]]: ...
    def worker_info(self, address: str | None = None) -> dict[str, Any]: ...
    def queued_keys(self) -> list[Key]: ...
    def unrunnable_keys(self) -> list[Key]: ...
    def steals_in_flight(self) -> dict[Key, tuple[str, str]]: ...
    def can_close(self, address: str) -> bool: ...
    def retiring_workers(self) -> list[str]: ...
    def stale_workers(self, now: float, timeout: float) -> list[str]: ...
    def adaptive_target(self, target_duration: float = 5.0) -> int: ...
    def workers_to_close(self, n: int) -> list[str]: ...
    @property
    def n_tasks(self) -> int: ...
