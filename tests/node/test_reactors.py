"""An accepted association's two threads wait for work instead of polling for it
(``dicom_node/dicom/upper_layer.py``, ``dicom_node/dicom/reactor.py``): an idle one
hardly turns, and every kind of work wakes them at once, even with the idle cap far
longer than any timeout the peer allows. pynetdicom's logging handlers run only where
their output is kept."""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.dicom import association as association_module
from dicom_node.dicom import upper_layer
from dicom_node.dicom.upper_layer import Wakeup
from tests.node.conftest import make_ct_series, node_config_data, wait_until

IDLE_S = 1.0


def _counting(method: Callable[..., Any], counter: list[int]) -> Callable[..., Any]:
    def counted(*args: Any) -> Any:
        counter[0] += 1
        return method(*args)
    return counted


def _scu(timeout_s: float) -> AE:
    ae = AE(ae_title="REACTOR")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    return ae


def test_an_idle_association_hardly_turns_its_reactors(start_node, tmp_path: Path) -> None:
    """pynetdicom's DUL naps 1 ms (the node used 0.1 ms) and its association reactor
    1 ms between looks: about a thousand turns a second each, idle or not."""
    node = start_node(node_config_data(tmp_path / "node"))
    assoc = _scu(10).associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    try:
        accepted = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                              what="the node's side of the association")[0]
        dul_turns, reactor_turns = [0], [0]
        accepted.dul._is_transport_event = _counting(accepted.dul._is_transport_event,
                                                     dul_turns)
        accepted.idle = _counting(accepted.idle, reactor_turns)
        threading.Event().wait(IDLE_S)
        limit = 3 * IDLE_S / upper_layer.IDLE_WAIT_S
        assert 0 < dul_turns[0] <= limit, dul_turns
        assert 0 < reactor_turns[0] <= limit, reactor_turns
        assert assoc.send_c_echo().Status == 0x0000  # still serving after all that
    finally:
        assoc.release()


def test_every_kind_of_work_wakes_the_reactors(start_node, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With the idle cap at 60 s and the peer's timeouts at 10 s, anything that only
    polling would notice times the peer out: C-ECHO and C-STORE (the DIMSE queue, the
    responses the DUL sends), release (the DUL's primitive to the reactor), abort, and
the node stopping with an association open (a kill from another thread)."""
    monkeypatch.setattr(upper_layer, "IDLE_WAIT_S", 60.0)
    monkeypatch.setattr(association_module, "IDLE_WAIT_S", 60.0)
    node = start_node(node_config_data(tmp_path / "node"))
    series = make_ct_series(tmp_path / "in", 5)
    ae = _scu(10)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    accepted = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                          what="the node's side of the association")[0]
    assert accepted.dul._run_loop_delay == 60.0  # the cap really is out of reach
    for _ in range(10):
        assert assoc.send_c_echo().Status == 0x0000
    for path in series.files:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    assoc.release()
    assert assoc.is_released
    wait_until(lambda: not accepted.dul.is_alive(), timeout=10, what="the released DUL")

    aborted = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert aborted.is_established
    theirs = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                        what="the second association")[0]
    aborted.abort()
    wait_until(lambda: not theirs.is_alive() and not theirs.dul.is_alive(), timeout=10,
               what="the aborted association's threads")

    # The node stops with an association open: its reactors are told from outside.
    held = ae.associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert held.is_established
    last = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                      what="the third association")[0]
    stopping = threading.Thread(target=node.stop, daemon=True)
    stopping.start()
    stopping.join(20)
    assert not stopping.is_alive(), "the node did not stop with an association open"
    wait_until(lambda: not last.is_alive() and not last.dul.is_alive(), timeout=10,
               what="the threads of the association open at stop")


def test_a_wakeup_signals_select_and_is_inert_once_closed() -> None:
    wakeup = Wakeup()
    assert select.select([wakeup], [], [], 0)[0] == []
    for _ in range(100_000):  # more than a pipe holds: a full pipe is already signalled
        wakeup.signal()
    assert select.select([wakeup], [], [], 0)[0] == [wakeup]
    wakeup.clear()
    assert select.select([wakeup], [], [], 0)[0] == []
    wakeup.close()
    wakeup.signal()  # the descriptor's number may already be another file's: no write
    wakeup.close()


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO])
def test_pynetdicoms_logging_handlers_run_only_when_their_output_is_kept(
        start_node, tmp_path: Path, level: int, caplog: pytest.LogCaptureFixture) -> None:
    """pynetdicom binds handlers to every association that log each PDU and DIMSE
    message at INFO and DEBUG; the node's processes log pynetdicom at WARNING, where
    they are unbound. At INFO they stay, and log."""
    library = logging.getLogger("pynetdicom")
    previous = library.level
    library.setLevel(level)
    try:
        node = start_node(node_config_data(tmp_path / "node"))
        series = make_ct_series(tmp_path / "in", 1)
        with caplog.at_level(level, logger="pynetdicom"):
            assoc = _scu(10).associate("127.0.0.1", node.port, ae_title="TESSERA")
            assert assoc.is_established
            accepted = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                                  what="the node's side of the association")[0]
            assert assoc.send_c_store(pydicom.dcmread(series.files[0])).Status == 0x0000
            assoc.release()
        library_handlers = [
            handler for event in (evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT,
                                  evt.EVT_PDU_RECV, evt.EVT_PDU_SENT)
            for handler, _ in accepted.get_handlers(event)
            if handler.__module__ == "pynetdicom._handlers"]
        stored = [r for r in caplog.records if r.getMessage() == "Received Store Request"]
        if level == logging.WARNING:
            assert library_handlers == [] and stored == []
        else:
            assert len(library_handlers) == 4 and len(stored) == 1
    finally:
        library.setLevel(previous)


def _associated(start_node: Any, tmp_path: Path, instances: int, timeout_s: float,
                **sections: dict[str, Any]) -> tuple[Any, list[Path], Any, Any]:
    """A node (configuration ``sections`` over the tests' own), a CT series of
    ``instances`` to send, an association to it (the peer's timeouts ``timeout_s``) and
    the node's side of that association."""
    node = start_node(node_config_data(tmp_path / "node", **sections))
    series = make_ct_series(tmp_path / "in", instances)
    assoc = _scu(timeout_s).associate("127.0.0.1", node.port, ae_title="TESSERA")
    assert assoc.is_established
    accepted = wait_until(lambda: node.scp.server.active_associations, timeout=10,
                          what="the node's side of the association")[0]
    return node, list(series.files), assoc, accepted


def test_a_store_answer_is_sent_on_the_associations_own_thread(start_node,
                                                               tmp_path: Path) -> None:
    """Each C-STORE response goes out as one P-DATA-TF written by the thread that
    served the request, not handed to the upper layer's reactor (a wake, a turn of its
    state machine and pynetdicom's encoder per instance); the peer reads every answer."""
    _, files, assoc, accepted = _associated(start_node, tmp_path, 6, 10)
    reactor_sends, direct_sends = [0], [0]
    senders: set[int] = set()
    accepted.dul._send = _counting(accepted.dul._send, reactor_sends)
    send_pdv = accepted.dul.send_pdv

    def sent_here(*args: Any) -> Any:
        senders.add(threading.get_ident())
        return send_pdv(*args)

    accepted.dul.send_pdv = _counting(sent_here, direct_sends)
    try:
        for path in files:
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
        assert direct_sends[0] == len(files)
        assert reactor_sends[0] == 0
        assert senders == {accepted.ident}  # the association's thread, not the DUL's
        assert assoc.send_c_echo().Status == 0x0000  # pynetdicom's own way, in order
        assert reactor_sends[0] == 1
    finally:
        assoc.release()
    assert assoc.is_released


def test_an_answer_that_cannot_be_written_closes_the_association(
        start_node, tmp_path: Path) -> None:
    """A partly written PDU leaves nothing to continue: the transport is shut down at
    once, and the upper layer ends the association as for a peer that went away. Both
    sides' timeouts are two minutes, so nothing else ends it within the wait."""
    _, files, assoc, accepted = _associated(start_node, tmp_path, 1, 120,
                                            dicom={"network_timeout_s": 120})
    raw = accepted.dul.socket.socket

    class Failing:
        def __getattr__(self, name: str) -> Any:
            return getattr(raw, name)

        def sendall(self, data: bytes) -> None:
            raise ConnectionResetError("simulated")

    accepted.dul.socket.socket = Failing()
    answers: list[Any] = []
    sender = threading.Thread(
        target=lambda: answers.append(assoc.send_c_store(pydicom.dcmread(files[0]))),
        daemon=True)
    sender.start()
    wait_until(lambda: not accepted.is_alive() and not accepted.dul.is_alive(), timeout=10,
               what="the end of the association whose answer failed")
    sender.join(20)
    assert answers and not answers[0]  # no answer came: the association ended
    assert not assoc.is_established


@pytest.mark.parametrize("reason", ["tls", "listener", "ending"])
def test_an_answer_takes_the_reactors_path_when_it_must(start_node, tmp_path: Path,
                                                        reason: str) -> None:
    """``send_pdv`` declines over TLS (one SSL object is not written and read from two
    threads), when a handler listens for sent PDUs, and once an A-ABORT or A-RELEASE was
    written (even before the state machine has moved): nothing answers after those."""
    _, files, assoc, accepted = _associated(start_node, tmp_path, 1, 10)
    dul = accepted.dul
    pdv = b"\x03" + bytes(8)
    try:
        if reason == "tls":
            real = dul.socket.socket
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            with context.wrap_socket(socket.socket(), server_side=True,
                                     do_handshake_on_connect=False) as tls:
                dul.socket.socket = tls
                try:
                    assert dul.send_pdv(1, pdv) is False
                finally:
                    dul.socket.socket = real
        elif reason == "listener":
            heard: list[Any] = []
            accepted.bind(evt.EVT_PDU_SENT, heard.append)
            reactor_sends = [0]
            dul._send = _counting(dul._send, reactor_sends)
            assert assoc.send_c_store(pydicom.dcmread(files[0])).Status == 0x0000
            assert reactor_sends[0] == 1 and heard
        else:
            abort = A_ABORT_RQ()
            abort.source, abort.reason_diagnostic = 0x02, 0x00
            dul.send_abort(abort)
            assert dul.state_machine.current_state == "Sta6"  # not moved yet
            assert dul.send_pdv(1, pdv) is False
    finally:
        if assoc.is_established:
            assoc.abort()


def test_the_socket_is_closed_only_between_two_writes(start_node, tmp_path: Path) -> None:
    """pynetdicom closes the socket on the upper layer's thread; while another thread
    writes an answer (holding the send lock), the close waits, so the descriptor's
    number cannot pass to another connection mid-write. It is shut down at once."""
    _, _, assoc, accepted = _associated(start_node, tmp_path, 0, 10)
    raw = accepted.dul.socket.socket
    with accepted.dul.send_lock:
        assoc.abort()  # the node's state machine closes its socket (AA-3)
        threading.Event().wait(1.0)  # ample for the upper layer to reach the close
        assert raw.fileno() >= 0, "closed while a write held the lock"
    wait_until(lambda: raw.fileno() < 0, timeout=10, what="the socket to close")
    wait_until(lambda: not accepted.is_alive() and not accepted.dul.is_alive(), timeout=10,
               what="the aborted association's threads")
