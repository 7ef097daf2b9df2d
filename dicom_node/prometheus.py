"""Prometheus metrics of the node.

Counters and the job latency histogram live in the process that does the work
(prometheus_client's default registry: the ``serve`` process counts ingest, every
process counts its own jobs). Queue depths, outbox states and the serving generation
are read from the database at scrape time, so any process shows the whole node (all
workers on one PostgreSQL included).

Series names: ``tessera_node_instances_received_total{source}``,
``tessera_node_instances_refused_total{source,status}``,
``tessera_node_dicom_connections_refused_total{kind}``,
``tessera_node_dicom_receivers_ready``, ``tessera_node_dicom_receiver_exits_total``,
``tessera_node_jobs{kind,state}``, ``tessera_node_job_seconds{kind,outcome}``,
``tessera_node_jobs_finished_total{kind,outcome}`` (kind ``export`` gives the export
outcomes), ``tessera_node_outbox_items{destination,state}``,
``tessera_node_serving_generation{model}``, ``tessera_node_quarantine_entries``,
``tessera_node_quarantine_bytes``, ``tessera_node_quarantine_dropped_total``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from dicom_node.store.db import Database
from dicom_node.store.models import AuditEvent, Job, ModelVersion, ModelVersionState, OutboxItem
from dicom_node.store.quarantine import Quarantine

LOGGER = logging.getLogger(__name__)

OUT_OF_DOMAIN_EVENT = "out-of-domain"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

INSTANCES_RECEIVED = Counter(
    "tessera_node_instances_received", "Instances stored and acknowledged.", ["source"])
INSTANCES_REFUSED = Counter(
    "tessera_node_instances_refused", "Instances refused, by DICOM status (hex).",
    ["source", "status"])
CONNECTIONS_REFUSED = Counter(
    "tessera_node_dicom_connections_refused",
    "DICOM connections refused or closed at a limit, by kind (every one, not rate-limited).",
    ["kind"])
RECEIVERS_READY = Gauge(
    "tessera_node_dicom_receivers_ready",
    "Receiving processes taking connections ([dicom] receivers, less the node's own).")
RECEIVER_EXITS = Counter(
    "tessera_node_dicom_receiver_exits",
    "Receiving processes that exited while the node ran (each is started again).")
JOB_SECONDS = Histogram(
    "tessera_node_job_seconds", "Time a handler took for one job attempt.",
    ["kind", "outcome"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
JOBS_FINISHED = Counter(
    "tessera_node_jobs_finished", "Job attempts by outcome (done, retry, dead, lost).",
    ["kind", "outcome"])


# The ingest counters by the name a receiving process forwards them under.
# (the counter, how many labels it takes)
INGEST_COUNTERS = {"received": (INSTANCES_RECEIVED, 1), "refused": (INSTANCES_REFUSED, 2),
                   "connection-refused": (CONNECTIONS_REFUSED, 1)}
CountSink = Callable[[str, tuple[str, ...]], None]
_sink: list[CountSink] = []  # set in a receiving process: its counts go to the node


def forward_counts(sink: CountSink) -> None:
    """From now on, hand this process's ingest counts to ``sink`` (a receiving process
    sends them to the node's own process, whose /metrics shows them) instead of
    counting them here."""
    _sink[:] = [sink]


def add_count(name: str, labels: tuple[str, ...]) -> None:
    """Count one ingest event forwarded by a receiving process; an unknown name or the
    wrong number of labels raises ValueError."""
    counter, arity = INGEST_COUNTERS.get(name, (None, 0))
    if counter is None or len(labels) != arity or not all(isinstance(v, str) for v in labels):
        raise ValueError(f"not an ingest counter: {name!r} with {len(labels)} label(s)")
    counter.labels(*labels).inc()


def _count(name: str, labels: tuple[str, ...]) -> None:
    if _sink:
        _sink[0](name, labels)
    else:
        INGEST_COUNTERS[name][0].labels(*labels).inc()


def count_received(source: str) -> None:
    _count("received", (source,))


def count_refused(source: str, status: int) -> None:
    _count("refused", (source, f"0x{status:04X}"))


def count_connection_refused(kind: str) -> None:
    _count("connection-refused", (kind,))


def receivers_ready(count: int) -> None:
    RECEIVERS_READY.set(count)


def count_receiver_exit() -> None:
    RECEIVER_EXITS.inc()


def observe_job(kind: str, outcome: str, seconds: float) -> None:
    JOB_SECONDS.labels(kind, outcome).observe(seconds)
    JOBS_FINISHED.labels(kind, outcome).inc()


class NodeStateCollector(Collector):
    """Gauges read from the node database (and the quarantine) when Prometheus scrapes."""

    def __init__(self, db: Database, quarantine: Quarantine | None = None) -> None:
        self.db = db
        self.quarantine = quarantine

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("tessera_node_jobs", "Jobs in the queue by kind and state.",
                                 labels=["kind", "state"])
        outbox = GaugeMetricFamily("tessera_node_outbox_items",
                                   "Outbox items by destination and state.",
                                   labels=["destination", "state"])
        serving = GaugeMetricFamily("tessera_node_serving_generation",
                                    "Generation of each model the node serves.",
                                    labels=["model"])
        out_of_domain = CounterMetricFamily(
            "tessera_node_segmentations_out_of_domain",
            "Segmentations whose input the model was not made for (marked, or held back).")
        flagged = 0
        try:
            with self.db.session() as s:
                for kind, state, n in s.execute(
                        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
                    jobs.add_metric([kind, state], n)
                for dest, state, n in s.execute(
                        select(OutboxItem.destination, OutboxItem.state, func.count())
                        .group_by(OutboxItem.destination, OutboxItem.state)):
                    outbox.add_metric([dest, state], n)
                for name, gen in s.execute(
                        select(ModelVersion.name, func.max(ModelVersion.generation))
                        .where(ModelVersion.state == ModelVersionState.SERVING)
                        .group_by(ModelVersion.name)):
                    serving.add_metric([name], gen)
                flagged = s.scalar(select(func.count()).select_from(AuditEvent).where(
                    AuditEvent.kind == OUT_OF_DOMAIN_EVENT)) or 0
        except Exception:
            LOGGER.exception("cannot read node state for /metrics")
        yield jobs
        yield outbox
        yield serving
        out_of_domain.add_metric([], flagged)
        yield out_of_domain
        if self.quarantine is not None:
            yield from _quarantine_metrics(self.quarantine)


def _quarantine_metrics(quarantine: Quarantine) -> Iterator[Metric]:
    try:
        usage = quarantine.usage()
    except OSError:
        LOGGER.exception("cannot read the quarantine for /metrics")
        return
    yield GaugeMetricFamily("tessera_node_quarantine_entries",
                            "Refused payloads kept in the quarantine.", value=usage.entries)
    yield GaugeMetricFamily("tessera_node_quarantine_bytes",
                            "Bytes the quarantine holds.", value=usage.bytes)
    yield CounterMetricFamily("tessera_node_quarantine_dropped",
                              "Oldest quarantine entries dropped to stay within the cap.",
                              value=usage.dropped)


def render(db: Database, quarantine: Quarantine | None = None) -> bytes:
    """The Prometheus text exposition: this process's counters plus the database gauges."""
    state = CollectorRegistry(auto_describe=False)
    state.register(NodeStateCollector(db, quarantine))
    return generate_latest(REGISTRY) + generate_latest(state)
