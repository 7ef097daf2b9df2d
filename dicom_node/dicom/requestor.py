"""pynetdicom's requestor association without its pause race (pynetdicom 3.0.4).

A requestor's ``send_c_store`` (every ``send_*``) clears ``_reactor_checkpoint`` and then
waits until the reactor thread says ``_is_paused``. The reactor sets ``_is_paused``
before ``_reactor_checkpoint.wait()`` and clears it after. A sender that clears the
checkpoint while the reactor is between that wait returning and ``_is_paused = False``
goes on although the reactor is running: the reactor takes the C-STORE response off the
queue as an unexpected request ("Received unexpected C-STORE service message") and the
sender waits out its DIMSE timeout, then the instance is sent again on a new
association. Seen in CI on loaded machines, in exports and in the demo's sender.

:class:`RequestorAssociation` resumes only if the checkpoint is still set, checked under
the lock its ``clear()`` takes, so a sender that sees ``_is_paused`` after its clear
sees a reactor that stays paused. :func:`install` makes every requestor association of
this process one (``pynetdicom.ae`` looks ``Association`` up each time it associates);
the node's acceptor associations are :class:`~dicom_node.dicom.association.NodeAssociation`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

import pynetdicom.ae
from pynetdicom import evt
from pynetdicom.association import Association

LOGGER = logging.getLogger("pynetdicom.association")  # the library's own messages


class Checkpoint(threading.Event):
    """The reactor's checkpoint: ``clear()`` under a lock the reactor's resume takes."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def clear(self) -> None:
        with self.lock:
            super().clear()


class _AnyAssociation(type):
    """``pynetdicom.ae`` uses its name ``Association`` both to build requestors and to
    count an AE's active associations (``isinstance``): after :func:`install` every
    association must still count, the node's acceptors included."""

    def __instancecheck__(cls, instance: object) -> bool:
        return isinstance(instance, Association)


class RequestorAssociation(Association, metaclass=_AnyAssociation):
    """A pynetdicom association whose reactor pauses without the race (module docstring).
    ``isinstance(x, RequestorAssociation)`` holds for every pynetdicom association."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        checkpoint = Checkpoint()
        checkpoint.set()
        self._reactor_checkpoint = checkpoint

    def _pause(self) -> None:
        """Stay paused while the checkpoint is clear; resume only once it is set and
        has not been cleared since (checked under the lock ``clear()`` takes)."""
        checkpoint = cast(Checkpoint, self._reactor_checkpoint)
        self._is_paused = True
        while True:
            checkpoint.wait()
            with checkpoint.lock:
                if checkpoint.is_set():
                    self._is_paused = False
                    return

    def _run_reactor(self) -> None:
        # pynetdicom 3.0.4's Association._run_reactor with its pause replaced by _pause.
        self._is_paused = False
        while not self._kill:
            time.sleep(0.001)
            self._pause()
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def install() -> None:
    """Every requestor association pynetdicom makes in this process from now on is a
    :class:`RequestorAssociation` (idempotent)."""
    pynetdicom.ae.Association = RequestorAssociation  # type: ignore[misc]
