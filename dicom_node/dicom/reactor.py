"""pynetdicom's association reactor, fixed and with a replaceable idle step.

pynetdicom 3.0.4's ``Association._run_reactor`` has two flaws the node's associations
avoid through :class:`ReactorAssociation`:

- **Its pause races.** A requestor's ``send_c_store`` (every ``send_*``) clears
  ``_reactor_checkpoint`` and then waits until the reactor thread says ``_is_paused``.
  The reactor sets ``_is_paused`` before ``_reactor_checkpoint.wait()`` and clears it
  after. A sender that clears the checkpoint while the reactor is between that wait
  returning and ``_is_paused = False`` goes on although the reactor is running: the
  reactor takes the C-STORE response off the queue as an unexpected request
  ("Received unexpected C-STORE service message") and the sender waits out its DIMSE
  timeout. Seen in CI on loaded machines, in exports and in the demo's sender. Here the
  reactor resumes only if the checkpoint is still set, checked under the lock its
  ``clear()`` takes, so a sender that sees ``_is_paused`` after its clear sees a
  reactor that stays paused.
- **It polls.** Each turn starts with a 1 ms nap, then looks at the DIMSE queue, the
  release and abort primitives, the DUL thread and the idle timer. The nap is
  :meth:`ReactorAssociation.idle`; the node's acceptor replaces it with a wait that the
  arrival of a message or primitive ends (``dicom/association.NodeAssociation``).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, cast

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


class ReactorAssociation(Association):
    """A pynetdicom association whose reactor pauses without the race and whose idle
    step subclasses may replace (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        checkpoint = Checkpoint()
        checkpoint.set()
        self._reactor_checkpoint = checkpoint

    def idle(self, served: bool) -> None:
        """Between two turns of the reactor (``served``: the last turn took a message).
        pynetdicom's nap."""
        time.sleep(0.001)

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
        # pynetdicom 3.0.4's Association._run_reactor with its pause replaced by _pause
        # and its nap by idle.
        self._is_paused = False
        served = False
        while not self._kill:
            self.idle(served)
            self._pause()
            context_id, msg = self.dimse.get_msg(block=False)
            served = msg is not None
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
