"""Prometheus metrics and ``/healthz`` of the hub, on their own HTTP port (``[metrics]``).

Everything is read from the hub database at scrape time, so every replica behind a
load balancer reports the same federation-wide numbers:
``tessera_hub_current_generation``, ``tessera_hub_state_version``,
``tessera_hub_generations{status}``, ``tessera_hub_updates{status}`` (``merged``: the
merged updates), ``tessera_hub_rejections_total{stage}`` (gate and intake rejections),
``tessera_hub_nodes{revoked}``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from federation_grpc.hub.store import (
    GenerationRow,
    HubStateRow,
    HubStore,
    NodeRow,
    RejectionRow,
    UpdateRow,
)

LOGGER = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubStateCollector(Collector):
    def __init__(self, store: HubStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        current = GaugeMetricFamily("tessera_hub_current_generation",
                                    "Generation nodes are told to serve (-1: none).")
        version = GaugeMetricFamily("tessera_hub_state_version",
                                    "Changes of the current generation so far.")
        generations = GaugeMetricFamily("tessera_hub_generations", "Generations by status.",
                                        labels=["status"])
        updates = GaugeMetricFamily("tessera_hub_updates", "Updates by status.",
                                    labels=["status"])
        rejections = CounterMetricFamily("tessera_hub_rejections",
                                         "Refused updates and candidates by stage.",
                                         labels=["stage"])
        nodes = GaugeMetricFamily("tessera_hub_nodes", "Enrolled nodes.", labels=["revoked"])
        with self.store.session() as s:
            state = s.get(HubStateRow, 1)
            number = state.current_generation if state else None
            current.add_metric([], -1 if number is None else number)
            version.add_metric([], state.version if state else 0)
            for status, n in s.execute(select(GenerationRow.status, func.count())
                                       .group_by(GenerationRow.status)):
                generations.add_metric([status], n)
            for status, n in s.execute(select(UpdateRow.status, func.count())
                                       .group_by(UpdateRow.status)):
                updates.add_metric([status], n)
            for stage, n in s.execute(select(RejectionRow.stage, func.count())
                                      .group_by(RejectionRow.stage)):
                rejections.add_metric([stage], n)
            for revoked, n in s.execute(select(NodeRow.revoked, func.count())
                                        .group_by(NodeRow.revoked)):
                nodes.add_metric(["true" if revoked else "false"], n)
        yield from (current, version, generations, updates, rejections, nodes)


def render(store: HubStore) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubStateCollector(store))
    return generate_latest(registry)


def healthy(store: HubStore) -> tuple[bool, str]:
    try:
        with store.session() as s:
            s.connection().exec_driver_sql("SELECT 1")
    except Exception as exc:
        LOGGER.exception("hub health check failed")
        return False, f"{type(exc).__name__}: {exc}"
    return True, "ok"


class MetricsServer:
    """``/metrics`` and ``/healthz`` over plain HTTP in a background thread."""

    def __init__(self, store: HubStore, host: str, port: int) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    try:
                        body, code, ctype = render(owner.store), 200, CONTENT_TYPE
                    except Exception as exc:
                        LOGGER.exception("cannot render /metrics")
                        body, code, ctype = str(exc).encode(), 503, "text/plain"
                elif self.path == "/healthz":
                    ok, reason = healthy(owner.store)
                    doc = {"status": "ok"} if ok else {"status": "unhealthy", "reason": reason}
                    body, code, ctype = json.dumps(doc).encode(), 200 if ok else 503, \
                        "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                LOGGER.debug("metrics http: " + format, *args)

        self.store = store
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-metrics",
                                        daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        LOGGER.info("hub metrics and /healthz on http://%s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)
