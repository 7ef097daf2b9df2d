"""A loopback TCP proxy that kills its first connection after so many bytes.

Between a client and the hub (TLS passes through untouched), it forwards both ways and,
once ``cut_after`` bytes have gone in the watched direction (``"up"``: client to hub,
``"down"``: hub to client) on the first connection, closes that connection on both
sides: to both ends it looks like a network failure mid-stream. Later connections (a
client reconnecting) pass whole. Used by the resumption tests and the large-model mode
of ``benchmarks/federation.py``.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CutProxy:
    def __init__(self, target_port: int, cut_after: int, direction: str = "up") -> None:
        if direction not in ("up", "down"):
            raise ValueError("direction is 'up' or 'down'")
        self.target_port = target_port
        self.cut_after = cut_after
        self.direction = direction
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.cut = threading.Event()  # set once the first connection was killed
        self.forwarded = {"up": 0, "down": 0}  # bytes passed on, all connections
        self._count = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):  # forwarded as it comes, as a router would
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            watched = self.connections == 1
            pair = (client, upstream)
            for source, sink, way in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, pair, way, watched and way == self.direction),
                    daemon=True,
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket,
              pair: tuple[socket.socket, socket.socket], way: str, watched: bool) -> None:
        moved = 0
        try:
            while data := source.recv(1 << 16):
                if watched and moved + len(data) >= self.cut_after:
                    data = data[: max(0, self.cut_after - moved)]
                    sink.sendall(data)
                    self._counted(way, len(data))
                    self.cut.set()
                    break
                sink.sendall(data)
                self._counted(way, len(data))
                moved += len(data)
        except OSError:
            pass
        for sock in pair:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _counted(self, way: str, size: int) -> None:
        with self._count:
            self.forwarded[way] += size

    def close(self) -> None:
        self._closed = True
        self.listener.close()
