"""taskcore: a distributed task runtime with a compiled core and the dask.distributed API."""

__version__ = "0.1.0"
