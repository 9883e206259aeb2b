"""Stand-ins for batch systems that cannot be installed here (see batch_standin.py)."""
from .server import FAMILIES, StandinBatch, StandinError

__all__ = ["FAMILIES", "StandinBatch", "StandinError"]
