"""Runs the bridge with uvicorn in a background thread of the node process."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from dicom_node.config import NodeConfig
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore
from viewer_bridge.app import create_app
from viewer_bridge.http_limits import guarded_h11

LOGGER = logging.getLogger(__name__)


@dataclass
class RunningBridge:
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def shutdown(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        self.sock.close()


def start_bridge(config: NodeConfig, db: Database, files: InstanceFiles,
                 store: InstanceStore, *, start_timeout: float = 30.0) -> RunningBridge:
    """Bind ``http.host:http.port`` (0: the OS picks) and serve until shutdown.

    Raises
    ------
    OSError
        The address cannot be bound.
    RuntimeError
        The server did not start within ``start_timeout`` seconds.
    """
    http = config.http
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((http.host, http.port))
    sock.listen(128)
    port = int(sock.getsockname()[1])
    app = create_app(config, db, files, store)
    # Header timeout and connection cap (viewer_bridge.http_limits); uvicorn answers 503
    # to requests at limit_concurrency and closes idle keep-alive connections after 5 s.
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off",
        timeout_graceful_shutdown=5, server_header=False,
        http=guarded_h11(http.header_timeout_s, http.max_connections),
        limit_concurrency=http.max_connections, timeout_keep_alive=5,
        h11_max_incomplete_event_size=64 * 1024))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="viewer-bridge", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        raise RuntimeError("the viewer bridge HTTP server did not start")
    LOGGER.info("viewer bridge (DICOMweb, /status) listening on %s:%d", http.host, port)
    return RunningBridge(server, thread, sock, http.host, port)
