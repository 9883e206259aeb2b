"""The compiled hot path (Cython). Everything here except protocol is sans-I/O."""
