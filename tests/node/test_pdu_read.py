"""The upper layer reads a PDU's body into place in as few reads as the network allows:
whole when it comes in pieces, and what arrived when the peer closes, stalls or fails."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from dicom_node.dicom.upper_layer import receive_into


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection: our end (5 s timeout) and the peer's."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def _send_in_pieces(peer: socket.socket, data: bytes, pieces: int, close: bool) -> None:
    step = -(-len(data) // pieces)
    for start in range(0, len(data), step):
        peer.sendall(data[start:start + step])
        time.sleep(0.02)  # each piece its own read on our side
    if close:
        peer.close()


def test_a_body_sent_in_pieces_is_read_whole_into_place(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    data = bytes(range(256)) * 160  # 40 kB, over the 4096 bytes pynetdicom reads at once
    writer = threading.Thread(target=_send_in_pieces, args=(theirs, data, 7, False))
    writer.start()
    buffer = bytearray(6 + len(data))
    got = receive_into(ours, memoryview(buffer)[6:])
    writer.join()
    assert got == len(data)
    assert buffer[6:] == data and buffer[:6] == bytes(6)


def _reset_after(peer: socket.socket, data: bytes) -> None:
    peer.sendall(data)
    time.sleep(0.2)  # read on our side before the reset comes
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_a_peer_that_goes_inside_a_body_gives_what_arrived(
        pair: tuple[socket.socket, socket.socket], how: str) -> None:
    ours, theirs = pair
    if how == "closed":
        writer = threading.Thread(target=_send_in_pieces, args=(theirs, b"x" * 1000, 3, True))
    else:
        writer = threading.Thread(target=_reset_after, args=(theirs, b"x" * 1000))
    writer.start()
    got = receive_into(ours, memoryview(bytearray(5000)))
    writer.join()
    assert got == 1000


def test_a_stalled_peer_times_out_without_raising(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    ours.settimeout(0.2)
    theirs.sendall(b"abc")
    assert receive_into(ours, memoryview(bytearray(10))) == 3
