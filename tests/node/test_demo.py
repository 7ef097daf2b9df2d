"""``tessera demo`` (the README's main command) end to end, with a real Orthanc as PACS."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.node.conftest import ORTHANC
from tests.peers import require_binary, venv_tool


def test_demo_segments_a_phantom_study_into_orthanc(tmp_path: Path) -> None:
    require_binary(ORTHANC)
    proc = subprocess.run(
        [venv_tool("tessera"), "demo", "--subjects", "1", "--json",
         "--work-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["pacs"] == "orthanc"
    (study,) = report["studies"]
    assert study["seg_received"] and study["acknowledged"] == study["slices"]
    assert study["mean_dice"] >= 0.9, study["dice"]
    # Orthanc kept what it stored under the work folder, the SEG among it.
    assert (tmp_path / "demo" / "orthanc" / "orthanc.log").exists()


def test_the_demo_s_sender_opens_a_new_association_for_instances_left_unanswered(
    tmp_path: Path,
) -> None:
    """A receiver that leaves the first C-STORE unanswered past the DIMSE timeout (as when
    pynetdicom's requestor loses a response): the rest and that one go again on a new
    association, each acknowledged once."""
    import threading
    import time

    from pydicom import dcmread
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    from dicom_node.config import Destination
    from dicom_node.demo.run import send_until_acknowledged
    from dicom_node.dicom.scu import OutgoingInstance
    from tests.node.conftest import make_ct_series

    series = make_ct_series(tmp_path / "ct", 4)
    items = []
    for path in series.files:
        ds = dcmread(path)
        items.append(OutgoingInstance(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                      str(ds.file_meta.TransferSyntaxUID), path))
    stored: list[str] = []
    stalled = threading.Event()

    def on_store(event: evt.Event) -> int:
        if not stalled.is_set():
            stalled.set()
            time.sleep(2.5)  # past the sender's 1 s: it aborts, and this answer is lost
            return 0x0000
        stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="SLOWPACS")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        acknowledged = send_until_acknowledged(
            Destination(ae_title="SLOWPACS", host="127.0.0.1", port=port), "DEMOPACS",
            items, timeout_s=1.0)
    finally:
        server.shutdown()
    assert acknowledged == len(items)
    assert sorted(stored) == sorted(i.sop_instance_uid for i in items)
