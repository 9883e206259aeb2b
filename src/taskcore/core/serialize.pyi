"""Type stub for the compiled taskcore.core.serialize (see serialize.pyx)."""
from typing import Any, Final, Literal, Sequence

from typing_extensions import Buffer

Frame = bytes | bytearray | memoryview

EXT_TUPLE: Final[int]
EXT_PICKLE: Final[int]
EXT_BUFFER: Final[int]
EXT_SERIALIZED: Final[int]
EXT_EXCEPTION: Final[int]
EXT_DEVICE: Final[int]

class RemoteException(Exception):
    """Stand-in for a remote exception that could not be pickled or rebuilt."""

    type_name: str
    message: str
    def __init__(self, type_name: str, message: str) -> None: ...

class Serialize:
    """Force ``obj`` out of band, keeping its exact type; loads returns ``obj``."""

    @property
    def obj(self) -> Any: ...
    def __init__(self, obj: Any) -> None: ...

class Serialized:
    """Pre-serialized payload; loads returns it as is, dumps forwards its frames."""

    @property
    def kind(self) -> Literal[0, 1]: ...
    @property
    def frames(self) -> list[Frame]: ...
    @property
    def serializer(self) -> Literal["msgpack", "pickle"]: ...
    @property
    def nbytes(self) -> int: ...
    def __init__(self, kind: Literal[0, 1], frames: list[Frame]) -> None: ...
    def deserialize(self) -> Any: ...

def dumps(msg: Any) -> list[Frame]: ...
def dumps_device(msg: Any) -> list[Any]:
    """Like dumps, but GPU objects' frames stay device memory (``__cuda_array_interface__``)."""
def loads(frames: Sequence[Buffer]) -> Any: ...
def serialize_obj(obj: Any) -> Serialized: ...
def nbytes(obj: Any) -> int: ...
def device_nbytes(obj: Any) -> int:
    """Bytes of a GPU object, -1 for anything else."""
def compress_frames(
    frames: Sequence[Buffer],
    min_size: int = 10_000,
    *,
    sample_size: int = 10_000,
    min_ratio: float = 0.9,
) -> tuple[list[Buffer], bytes]: ...
def decompress_frames(
    frames: Sequence[Buffer],
    flags: bytes | Sequence[int],
    max_size: int = ...,
) -> list[Buffer]: ...
