"""Keep Python's cyclic garbage collector off a service's long-lived objects.

A full (generation 2) collection visits every container object alive: the models, vocabularies and modules a
service loads are hundreds of thousands of them, and each full collection then paused the event loop for
100-400 ms, every few seconds under load (measured in every service and, as a gateway's remembered decisions
grew, up to a second). Those pauses were most of the open-loop benchmark's p95. Objects alive once a service
has started, and again after each model reload, are moved out of the collector's sight (`gc.freeze`); what
handling creates afterwards is collected as before, and reference counting still frees everything.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def settle() -> None:
    """Collect what is garbage now, then freeze what is left (the previous freeze first undone, so that a
    replaced model in a reference cycle is still collected)."""
    start = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug("heap settled: %d objects frozen in %.0f ms", gc.get_freeze_count(), (time.perf_counter() - start) * 1e3)
