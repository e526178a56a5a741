"""Keep a long-running process's start-up heap out of the garbage collector's way.

After start-up a worker holds well over a hundred thousand objects that live as long as
the process: modules, the Celery app, clients, the sandbox provider. CPython's full
(generation 2) collection walks all of them, with the GIL held: the first one fires once the
first burst of tasks has made enough new objects, and it stops every agent loop of the
process at once (docs/performance.md says for how long). ``gc.freeze()`` moves what is alive
now into a permanent generation that collections skip; later full collections walk only what
the tasks made. Frozen objects are still freed by reference counting; only cycles among them
are never collected, which start-up objects do not make.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left; returns how many objects are frozen."""
    gc.collect()  # today's garbage must not be frozen with the rest
    gc.freeze()
    return gc.get_freeze_count()
