"""Type stub for the compiled taskcore.core.dask_encode (see dask_encode.pyx)."""
from typing import Any, Hashable

class NodeEncoder:
    fns: dict
    used: dict
    aliases: dict
    ts: Any
    TaskRef: type | None
    Alias: type | None
    DataNode: type | None
    GraphNode: type | None
    subgraph_fn: Any
    task_types: frozenset
    def __init__(self, ts: Any, dep_type: type, markers: tuple) -> None: ...
    def func(self, f: Any) -> Any: ...
    def enc(self, node: Any, scope: set | None) -> tuple[Any, bool]: ...
    def subgraph_bindings(self, rest: tuple) -> tuple[tuple, tuple] | None: ...

def toposort(graph: dict[Hashable, Any]) -> list[Hashable]: ...
