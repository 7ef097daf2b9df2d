"""Process-wide settings of a long-running node process, made once it is built and
before it starts work (:func:`prepare_process`): by ``tessera node serve`` and ``node
worker`` (:func:`dicom_node.node_cli.run_until_signal`) and by each receiving process
(:mod:`dicom_node.dicom.receiver_process`). A node started in process by other code (the
tests) keeps the interpreter's settings as it found them.

**What was built stays out of the cyclic garbage collector's passes.** The node's
process holds about 370,000 objects once it is built (torch, pydicom's dictionaries,
SQLAlchemy, the configuration), and they live as long as the process. Python's
collector walks every one of them at each full collection, holding the GIL for
150-190 ms (measured with ``gc.collect()`` in a built node), and pynetdicom forces one
every 60 turns of its server's accept loop (``service_actions``: at least every 30
seconds, and after every few associations). Each such pause held up every association
and the intake with it. :func:`freeze_startup_objects` moves what exists to the
collector's permanent generation (``gc.freeze``), after one last collection; a full
collection then walks only what was made later (about 2 ms). Reference counting still
frees everything as before; only a reference cycle among the frozen objects would
outlive its use, which is why this happens once the process is built and before it
starts.

**Values are read without pydicom's validation.** By default pydicom checks every value
it reads against its VR (a regular expression for each UID, date, code string, ...)
and, on a mismatch, only warns, quoting the value: nothing is refused. pynetdicom reads
every UID of an association request and of each DIMSE command this way. The node
refuses what it must itself: the command's UIDs
(:func:`~dicom_node.dicom.association.invalid_command_uid`), the index's values and the
data set's structure (:mod:`dicom_node.dicom.parse`), with messages that quote a peer's
text escaped and truncated. Measured with py-spy on a receiving process, the validation
was about a tenth of an association's CPU. pydicom also takes this mode as the default
for values assigned in code (``ds.X = value``), so the objects the node writes (its
SEGs) are not checked by these warnings either; dciodvfy and the SEG validators check
them in the tests.
"""

from __future__ import annotations

import gc
import logging

import pydicom.config

LOGGER = logging.getLogger(__name__)


def prepare_process() -> None:
    """Both settings below, for a node process that is built and not yet started."""
    read_values_unvalidated()
    freeze_startup_objects()


def freeze_startup_objects() -> int:
    """Collect once, then leave every object alive now out of later collections;
    returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    LOGGER.debug("%d objects built at start left out of garbage collection", frozen)
    return frozen


def read_values_unvalidated() -> None:
    """Turn off pydicom's validation of the values it reads, for this process."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
