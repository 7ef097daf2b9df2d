"""What a long-running process built at start leaves the cyclic garbage collector alone.

The node's process holds about 370,000 objects once it is built (torch, pydicom's
dictionaries, SQLAlchemy, the configuration), and they live as long as the process.
Python's collector walks every one of them at each full collection, holding the GIL
for 150-190 ms (measured with ``gc.collect()`` in a built node), and pynetdicom forces
one every 60 turns of its server's accept loop (``service_actions``: at least every 30
seconds, and after every few associations). Each such pause held up every association
and the intake with it. :func:`freeze_startup_objects` moves what exists to the
collector's permanent generation (``gc.freeze``), after one last collection; a full
collection then walks only what was made later. Reference counting still frees
everything as before; only a reference cycle among the frozen objects would outlive
its use, so this is called once the process is built and before it starts work.
"""

from __future__ import annotations

import gc
import logging

LOGGER = logging.getLogger(__name__)


def freeze_startup_objects() -> int:
    """Collect once, then leave every object alive now out of later collections;
    returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    LOGGER.debug("%d objects built at start left out of garbage collection", frozen)
    return frozen
