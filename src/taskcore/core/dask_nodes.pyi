"""Type stub for the compiled taskcore.core.dask_nodes (see dask_nodes.pyx)."""
from typing import Any, Hashable, Mapping

class Marker:
    name: str
    def __init__(self, name: str) -> None: ...

_CALL: Marker
_SUBGRAPH: Marker
_INNER: Marker
_OPAQUE: Marker
_LEGACY: Marker

def run_node(x: tuple, local: Mapping | None, data: Mapping) -> Any: ...

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
    def __init__(self, ts: Any, dep_type: type) -> None: ...
    def func(self, f: Any) -> Any: ...
    def enc(self, node: Any, scope: set | None) -> tuple[Any, bool]: ...
    def subgraph_bindings(self, rest: tuple) -> tuple[tuple, tuple] | None: ...

def toposort(graph: dict[Hashable, Any]) -> list[Hashable]: ...
