"""The cycle collector set up for a long-running service process: the aggregator and its store writer.

CPython's collector walks every tracked object at each full collection. An aggregator process holds
~240,000 of them from its imports alone (torch most), and an ingest burst triggered a full collection
every ~2,000 updates, each 80-170 ms with the interpreter lock held; with the young collections, ~15%
of the process's CPU at 1,500 updates/s (``docs/capacity.md``). Two standard remedies:

- freeze what is alive once the service is set up (``gc.freeze``): collections skip it from then on;
- collect the youngest generation every 50,000 net allocations instead of 700: the objects a batch
  of up to 512 updates keeps alive until its commit are not walked over and over meanwhile (paired
  runs, 8 turns: 50,000 beat 10,000 by 7-12% of CPU per update).

Both are process-wide, so only the entry point of a process whose job is the service calls this
(``fedmask aggregator run``, the store writer's child), not the service class.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000  # CPython's default is 700


def settle_for_service() -> None:
    """Collect once, freeze every object alive now, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(YOUNG_THRESHOLD, young), middle, old)
