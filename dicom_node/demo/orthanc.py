"""Orthanc (Debian package ``orthanc``) as a child process on free loopback ports.

One launcher for every place that needs a real PACS: the demo's stand-in PACS, the
integration tests and the benchmarks. Orthanc listens on 127.0.0.1 only (HTTP bound
to loopback, remote access off), keeps its storage and index under ``directory`` and
logs to ``directory/orthanc.log``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.errors import DicomNodeError

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


class OrthancError(DicomNodeError):
    """Orthanc is not installed, did not start, or exited."""


def orthanc_binary() -> str | None:
    """The installed Orthanc executable, or ``None``."""
    return next((b for b in ORTHANC_BINARIES if os.access(b, os.X_OK)), None)


def free_port() -> int:
    """A loopback TCP port the OS considers free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancProcess:
    """A running Orthanc: its ports, folder, process and log."""

    ae_title: str
    dicom_port: int
    http_port: int
    directory: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def get_bytes(self, path: str, timeout: float = 10.0) -> bytes:
        """``GET`` on the REST API (``path`` starts with ``/``)."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bytes(resp.read())

    def get(self, path: str) -> Any:
        """``GET`` on the REST API, decoded as JSON."""
        return json.loads(self.get_bytes(path))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def up(self) -> bool:
        """Whether the REST API answers.

        Raises
        ------
        OrthancError
            If the process has exited (with the end of its log).
        """
        if self.proc.poll() is not None:
            raise OrthancError(f"Orthanc exited with {self.proc.returncode}: "
                               f"{self.log_tail()}")
        try:
            return bool(self.get("/system"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_orthanc(directory: Path, *, ae_title: str = "ORTHANC", name: str = "Tessera",
                  dicomweb: bool = False, timeout_s: float = 60.0) -> OrthancProcess:
    """Start Orthanc with its storage under ``directory`` and wait for its REST API.

    ``dicomweb`` loads the DICOMweb plug-in (Debian ``orthanc-dicomweb``) at
    ``/dicom-web/`` when it is installed.

    Raises
    ------
    OrthancError
        If Orthanc is not installed, exits, or does not answer within ``timeout_s``.
    """
    binary = orthanc_binary()
    if binary is None:
        raise OrthancError("Orthanc is not installed (Debian package 'orthanc')")
    directory.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": name, "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"), "DicomAet": ae_title,
        "DicomPort": dicom_port, "HttpPort": http_port, "HttpBindAddress": "127.0.0.1",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
    }
    if dicomweb and os.path.exists(DICOMWEB_PLUGIN):
        config["Plugins"] = [DICOMWEB_PLUGIN]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
    cfg = directory / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = directory / "orthanc.log"
    # TCP_NODELAY avoids ~45 ms stalls per PDU on loopback.
    env = dict(os.environ, TCP_NODELAY="1")
    with log.open("ab") as log_file:
        proc = subprocess.Popen([binary, str(cfg)], stdout=log_file,
                                stderr=subprocess.STDOUT, env=env)
    orthanc = OrthancProcess(ae_title, dicom_port, http_port, directory, proc, log)
    deadline = time.monotonic() + timeout_s
    try:
        while not orthanc.up():
            if time.monotonic() > deadline:
                raise OrthancError(f"Orthanc did not answer within {timeout_s:.0f} s; "
                                   f"see {log}")
            time.sleep(0.2)
    except OrthancError:
        orthanc.stop()
        raise
    return orthanc
