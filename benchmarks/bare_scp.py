"""A bare pynetdicom storage SCP for the ingest benchmark: accepts every storage context,
answers Success and discards the data. pynetdicom's own floor, with the node's knobs
(raw data set bytes, TCP_NODELAY, the short DUL poll, the maximum PDU) so the difference
to the node is the node's own work.

    python benchmarks/bare_scp.py PORT COUNT_FILE

Writes the number of C-STOREs received so far to COUNT_FILE at each association's end.
It accepts PDUs as large as the node does (``[dicom] max_pdu_kb``); ``BARE_MAX_PDU``
sets another maximum, in bytes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, _config, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config.sections import DicomSettings

_config.STORE_RECV_CHUNKED_DATASET = False
# pynetdicom's DUL thread naps this long whenever it finds nothing to do (default 1 ms),
# and several naps fall into every C-STORE round trip; the node's reactor does not nap
# (dicom_node/dicom/upper_layer.py). A shorter nap is the best plain pynetdicom does.
DUL_POLL_S = 0.0001


def main(argv: list[str]) -> int:
    port, count_file = int(argv[0]), Path(argv[1])
    received = [0]
    lock = threading.Lock()

    def on_store(event: Event) -> int:
        event.encoded_dataset(include_meta=False)  # what the node reads too
        with lock:
            received[0] += 1
        return 0x0000

    def on_open(event: Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_accepted(event: Event) -> None:
        event.assoc.dul._run_loop_delay = DUL_POLL_S

    def on_released(event: Event) -> None:
        with lock:
            count_file.write_text(str(received[0]))

    ae = AE(ae_title="BARE")
    ae.maximum_associations = 16
    ae.maximum_pdu_size = int(os.environ.get("BARE_MAX_PDU",
                                             str(DicomSettings().max_pdu_kb * 1024)))
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
    handlers: list[Any] = [(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_open),
                           (evt.EVT_ACCEPTED, on_accepted), (evt.EVT_RELEASED, on_released),
                           (evt.EVT_ABORTED, on_released)]
    count_file.write_text("0")
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
