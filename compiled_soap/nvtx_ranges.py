"""NVTX ranges in the "compiled_soap" domain, cheap enough to leave on.

With no profiler attached the nvtx package hands out a dummy domain whose push/pop cost about 0.15 us; the event
attributes are built once per name. Ranges go around compiled calls, never inside them (a graph break).
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

try:
    import nvtx as _nvtx

    _DOMAIN = _nvtx.get_domain("compiled_soap")
except ImportError:  # nvtx is a declared dependency; keep the optimizer usable without it
    _DOMAIN = None


@lru_cache(maxsize=None)
def _attributes(name: str):
    return _DOMAIN.get_event_attributes(message=name)


@contextlib.contextmanager
def nvtx_range(name: str):
    if _DOMAIN is None:
        yield
        return
    _DOMAIN.push_range(_attributes(name))
    try:
        yield
    finally:
        _DOMAIN.pop_range()
