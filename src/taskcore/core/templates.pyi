"""Type stub for the compiled taskcore.core.templates (see templates.pyx)."""
from typing import Any, Hashable, Mapping

class Hole:
    index: int
    dep: bool
    def __init__(self, index: int, dep: bool) -> None: ...

class Node:
    kind: int
    items: tuple
    keys: tuple | None
    def __init__(self, kind: int, items: tuple, keys: tuple | None = ...) -> None: ...

class Template:
    skeleton: Any
    n_values: int
    payload: Any
    def __init__(self, skeleton: Any, n_values: int) -> None: ...

class Templater:
    templates_made: int
    def __init__(self, dep_type: type, budget: int = ...) -> None: ...
    def split(self, prefix: Hashable, encoded: Any) -> tuple[Template, list] | None: ...
    def disable(self, prefix: Hashable) -> None: ...

def fill(sk: Any, values: list, data: Mapping) -> Any: ...
