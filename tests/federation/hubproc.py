"""Run the hub as a real process (``tessera hub serve``) for fault tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, data_dir: Path, certs) -> Path:  # type: ignore[no-untyped-def]
    path.write_text(
        f"""
[hub]
host = "127.0.0.1"
port = 0
data_dir = "{data_dir}"
max_workers = 16

[tls]
ca_cert = "{certs["ca"].cert}"
server_cert = "{certs["hub"].cert}"
server_key = "{certs["hub"].key}"
"""
    )
    return path


class HubProcess:
    """``python -m federation_grpc.hub.cli serve``; ``port`` is read from its first line."""

    def __init__(self, config: Path, log: Path, port: int = 0, insecure: bool = False) -> None:
        self.log = log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "federation_grpc.hub.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
                *(["--insecure-loopback"] if insecure else []),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.port = self._read_port(timeout=60)

    def _read_port(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.proc.stdout.readline().decode()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not found or "listening on" not in found[0]:
            self.kill()
            raise RuntimeError(f"hub did not start: {found!r}; see {self.log.name}")
        return int(found[0].rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL: no clean-up, as in a crash."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
