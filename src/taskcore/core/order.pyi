"""Type stub for the compiled taskcore.core.order (see order.pyx)."""
from typing import Any, Hashable

def order_graph(dsk: dict[Hashable, Any]) -> tuple[list[Hashable], dict[Hashable, int]]: ...
