"""A stand-in PACS for the demo: a real Orthanc when installed, else an in-process SCP."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.dicom.meta import part10
from dicom_node.dicom.scp import set_nodelay
from dicom_node.errors import DicomNodeError

LOGGER = logging.getLogger(__name__)

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        binary = next((b for b in ORTHANC_BINARIES if os.access(b, os.X_OK)), None)
        if binary is None:
            raise DicomNodeError("Orthanc is not installed (Debian package 'orthanc')")
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        storage = workdir / "orthanc"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "TesseraDemoPACS", "StorageDirectory": str(storage),
            "IndexDirectory": str(storage), "DicomAet": ae_title, "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "HttpBindAddress": "127.0.0.1",
        }
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(config))
        env = dict(os.environ, TCP_NODELAY="1")
        self._log = (workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([binary, str(cfg_path)], stdout=self._log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self._get("/system")
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise DicomNodeError(f"Orthanc did not start; see {workdir / 'orthanc.log'}")

    def _get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return bytes(resp.read())

    def instances(self, modality: str | None = None) -> list[pydicom.Dataset]:
        import io

        out = []
        for series in json.loads(self._get("/series?expand")):
            if modality and series["MainDicomTags"].get("Modality") != modality:
                continue
            for iid in series["Instances"]:
                out.append(pydicom.dcmread(io.BytesIO(self._get(f"/instances/{iid}/file"))))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


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
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_C_STORE, self._store)])
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
        out = []
        for f in sorted(self.dir.glob("*.dcm")):
            ds = pydicom.dcmread(f)
            if modality is None or ds.get("Modality") == modality:
                out.append(ds)
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def start_pacs(workdir: Path, prefer_orthanc: bool = True) -> Pacs:
    if prefer_orthanc and any(shutil.which(b) or os.access(b, os.X_OK) for b in ORTHANC_BINARIES):
        try:
            return OrthancPacs(workdir)
        except DicomNodeError as exc:
            LOGGER.warning("%s; using an in-process SCP instead", exc)
    return InProcessPacs(workdir)
