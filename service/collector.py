"""Python's cyclic garbage collector in a served process: what outlives a load is frozen.

Once a bundle is loaded, the process holds about 90,000 container objects that live as
long as it does (FastAPI's routes and OpenAPI schema, pydantic's validators, the imported
modules, the bundle's metadata). Every full collection walks all of them with the GIL
held, so every thread's Python work waits meanwhile: about 40 ms each, a few times a
minute under load (bench/README.md). `settle()` collects what loading left behind and
freezes the survivors (`gc.freeze`: a permanent generation that collections skip), so a
full collection walks only what requests created since.

It first unfreezes, so after a hot reload the previous model's objects are collected once
nothing uses them, instead of staying frozen for good. What a request still held at that
moment stays until the next load: at most one model's worth.
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect, then freeze what survives; return how many objects are now frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
