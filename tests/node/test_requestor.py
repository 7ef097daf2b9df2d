"""pynetdicom's requestor pause race, closed (dicom_node/dicom/requestor.py): a sender
that clears the reactor's checkpoint just after the reactor's wait returned must find
the reactor paused, not taking its response off the queue."""

from __future__ import annotations

import threading

import pynetdicom.ae
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.dicom.requestor import RequestorAssociation, install


def test_a_checkpoint_cleared_as_the_reactor_resumes_keeps_it_paused() -> None:
    assoc = RequestorAssociation(AE(), "requestor")
    checkpoint = assoc._reactor_checkpoint
    returned, cleared, resumed = threading.Event(), threading.Event(), threading.Event()
    wait = checkpoint.wait
    calls = [0]

    def wait_then_stall(timeout: float | None = None) -> bool:
        result = wait(timeout)
        calls[0] += 1
        if calls[0] == 1:  # the race: the sender acts right after this wait returns
            returned.set()
            cleared.wait(10)
        return result

    checkpoint.wait = wait_then_stall  # type: ignore[method-assign]

    def reactor() -> None:
        assoc._pause()
        resumed.set()

    thread = threading.Thread(target=reactor, daemon=True)
    thread.start()
    assert returned.wait(10)
    checkpoint.clear()  # what send_c_store does, then it waits for _is_paused
    cleared.set()
    assert assoc._is_paused, "the sender would go on while the reactor runs"
    assert not resumed.wait(0.5), "the reactor resumed with the checkpoint clear"
    checkpoint.set()  # the sender is done
    assert resumed.wait(10)
    assert not assoc._is_paused
    thread.join(10)


def test_install_makes_every_requestor_association_one() -> None:
    install()
    assert pynetdicom.ae.Association is RequestorAssociation


def test_after_install_the_acceptors_still_count_against_max_associations() -> None:
    """pynetdicom.ae counts active associations with isinstance against the name it
    builds requestors from: a node's acceptor must still pass."""
    install()
    ae = AE()
    acceptor = Association(ae, "acceptor")
    assert isinstance(acceptor, pynetdicom.ae.Association)
