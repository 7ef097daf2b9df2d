"""Prometheus metrics and ``/healthz`` of the hub, on their own HTTP port (``[metrics]``).

Everything is read from the hub database at scrape time, so every replica behind a
load balancer reports the same federation-wide numbers:
``tessera_hub_current_generation``, ``tessera_hub_state_version``,
``tessera_hub_generations{status}``, ``tessera_hub_updates{status}`` (``merged``: the
merged updates), ``tessera_hub_rejections_total{stage}`` (gate and intake rejections),
``tessera_hub_nodes{revoked}``.

``/status`` is a small HTML status page for the operator (generations, nodes, quality
monitoring: the model fit, flagged segmentations per node and generation, drift);
``/status.json`` is the same as JSON.
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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


def status(store: HubStore) -> dict[str, Any]:
    """What the status page shows: generations, nodes and the quality report."""
    from federation_grpc.hub.quality import report_for_store

    with store.session() as s:
        state = s.get(HubStateRow, 1)
        generations = {status: n for status, n in s.execute(
            select(GenerationRow.status, func.count()).group_by(GenerationRow.status))}
        nodes = s.scalar(select(func.count()).select_from(NodeRow)
                         .where(NodeRow.revoked.is_(False)))
    return {"current_generation": state.current_generation if state else None,
            "generations": generations, "nodes": int(nodes or 0),
            "quality": report_for_store(store)}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def status_html(doc: dict[str, Any]) -> str:
    """The status document as a plain page (no scripts; every value escaped)."""
    q = doc["quality"]
    m = q["model"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Tessera hub</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        ".drifting{color:#b00}</style></head><body><h1>Tessera hub</h1>",
        f"<p>current generation {_cell(doc['current_generation'])}; generations "
        f"{_cell(doc['generations'])}; {doc['nodes']} active nodes</p>",
        "<h2>Quality monitoring</h2>",
        f"<p>{q['records']['segmentation']} segmentations, {q['records']['correction']} "
        f"corrections, {q['records']['ignored']} records ignored "
        f"{_cell(q['ignored']['reasons']) if q['ignored']['reasons'] else ''}</p>",
    ]
    if m["status"] == "fitted":
        parts.append(
            f"<p id='model'>model: n={m['n']}, R&sup2;={m['r2']:.3f} (leave-one-out "
            f"{m['loo_r2']:.3f}), flag when predicted Dice &lt; {m['threshold']:.3f}</p>")
        coefs = [{"feature": k, "coefficient per SD": v}
                 for k, v in sorted(m["coefficients"].items(), key=lambda kv: -abs(kv[1]))]
        parts.append(_table(coefs, ["feature", "coefficient per SD"]))
    else:
        parts.append(f"<p id='model'>model not fitted: {_cell(m['message'])}</p>")
    parts.append("<h3>Per node and generation</h3>")
    parts.append(_table(q["groups"], ["node", "generation", "segmentations", "flagged",
                                      "flag_rate", "mean_predicted_dice", "corrections",
                                      "mean_dice", "known_low"]))
    parts.append("<h3>Drift</h3>")
    drift = [dict(d, reasons="; ".join(d["reasons"])) for d in q["drift"]]
    parts.append(_table(drift, ["node", "generation", "segmentations", "mean_predicted_dice",
                                "dice_drop", "mean_abs_shift_sd", "drifting", "reasons"]))
    parts.append("<h3>Flagged segmentations</h3>")
    parts.append(_table(q["flagged"], ["node", "generation", "segmentation_seq",
                                       "predicted_dice"]))
    parts.append("</body></html>")
    return "\n".join(parts)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/status`` over plain HTTP in a background thread."""

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
                elif self.path in ("/status", "/status.json"):
                    try:
                        doc = status(owner.store)
                        if self.path == "/status.json":
                            body, ctype = json.dumps(doc).encode(), "application/json"
                        else:
                            body, ctype = status_html(doc).encode(), "text/html; charset=utf-8"
                        code = 200
                    except Exception as exc:
                        LOGGER.exception("cannot render %s", self.path)
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
