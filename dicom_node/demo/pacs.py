"""A stand-in PACS for the demo: a real Orthanc when installed, else an in-process SCP."""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.demo.orthanc import orthanc_binary, start_orthanc
from dicom_node.dicom.meta import part10
from dicom_node.dicom.scp import set_nodelay
from dicom_node.errors import DicomNodeError

LOGGER = logging.getLogger(__name__)

class Pacs(Protocol):
    ae_title: str
    port: int
    kind: str

    def instances(self, modality: str | None = None) -> list[pydicom.Dataset]: ...

    def stop(self) -> None: ...


class OrthancPacs:
    """Orthanc started from its Debian package on free loopback ports."""

    kind = "orthanc"

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC") -> None:
        self.orthanc = start_orthanc(workdir / "orthanc", ae_title=ae_title,
                                     name="TesseraDemoPACS", timeout_s=30)
        self.ae_title = ae_title
        self.port = self.orthanc.dicom_port
        self.http_port = self.orthanc.http_port

    def instances(self, modality: str | None = None) -> list[pydicom.Dataset]:
        out: list[pydicom.Dataset] = []
        for series in self.orthanc.get("/series?expand"):
            if modality and series["MainDicomTags"].get("Modality") != modality:
                continue
            for iid in series["Instances"]:
                data = self.orthanc.get_bytes(f"/instances/{iid}/file")
                out.append(pydicom.dcmread(io.BytesIO(data)))
        return out

    def stop(self) -> None:
        self.orthanc.stop()


class InProcessPacs:
    """A pynetdicom storage SCP keeping what it receives in a folder."""

    kind = "in-process SCP"

    def __init__(self, workdir: Path, ae_title: str = "DEMOPACS") -> None:
        self.ae_title = ae_title
        self.dir = workdir / "pacs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        self.ae = ae
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_C_STORE, self._store)])
        assert server is not None  # block=False always returns the server
        self.server = server
        self.port = int(self.server.server_address[1])

    def _store(self, event: Event) -> int:
        ds = event.dataset
        data = part10(event.encoded_dataset(include_meta=False),
                      sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                      transfer_syntax_uid=str(event.context.transfer_syntax))
        with self._lock:
            (self.dir / f"{ds.SOPInstanceUID}.dcm").write_bytes(data)
        return 0x0000

    def instances(self, modality: str | None = None) -> list[pydicom.Dataset]:
        out: list[pydicom.Dataset] = []
        for f in sorted(self.dir.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            if modality is None or ds.get("Modality") == modality:
                out.append(ds)
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def start_pacs(workdir: Path, prefer_orthanc: bool = True) -> Pacs:
    if prefer_orthanc and orthanc_binary() is not None:
        try:
            return OrthancPacs(workdir)
        except DicomNodeError as exc:
            LOGGER.warning("%s; using an in-process SCP instead", exc)
    return InProcessPacs(workdir)
