"""Fixtures of the node <-> hub tests: a tiny model at the hub and nodes, mTLS certs,
hubs in-process or as processes, nodes configured for federation, recorded wire."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.learning.bootstrap import STARTER_DIR
from dicom_node.learning.incremental import cut_sample, encode_sample
from dicom_node.learning.model_config import ModelConfig
from dicom_node.learning.weights import arrays_to_bytes, load_model, save_model
from dicom_node.pipeline.versions import hub_base_generation
from dicom_node.store.db import Database
from dicom_node.store.models import (
    Correction,
    Job,
    JobState,
    ModelVersion,
    SampleState,
    TrainingSample,
    UpdateOutboxItem,
)
from dicom_node.update_outbox import PAYLOAD_SHA256
from federation_grpc.wire import serialize_upload_request
from tests.corrections.helpers import (
    TEST_MODEL,
    Study,
    learning_section,
    segment_rule,
    tiny_model,
)
from tests.federation.conftest import certs  # noqa: F401 - pytest fixture
from tests.node.conftest import (  # noqa: F401 - fixtures
    node_config_data,
    start_node,
    wait_swapped,
    wait_until,
)

__all__ = ["TEST_MODEL"]


@pytest.fixture(scope="session")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test model every hub and node of a test starts from (generation 0)."""
    return tiny_model(tmp_path_factory.mktemp("model"))


LABELS = ("body", "liver", "spleen", "kidney_left", "kidney_right")


def starter_as_test_model(folder: Path) -> Path:
    """The shipped starter under the test model's name: a model whose Dice means
    something, for tests where a generation must help or harm."""
    model, config = load_model(STARTER_DIR / "model.safetensors")
    return save_model(model, replace(config, name=TEST_MODEL),
                      folder / f"{TEST_MODEL}.safetensors")


def write_sample(db: Database, data_dir: Path, config: ModelConfig, study: Study,
                 state: str, every: int = 2) -> None:
    """A corrected case as the correction intake keeps it (trained, or held out: every
    validation_every-th correction, never trained on), every ``every``-th slice."""
    truth = study.truth_in_volume_order()
    sample = cut_sample(study.volume().pixels, truth, range(0, truth.shape[0], every),
                        LABELS, config)
    rel = f"samples/{uuid.uuid4().hex}.npz"
    data = encode_sample(sample)
    (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / rel).write_bytes(data)
    split = "validation" if state == SampleState.HELD_OUT else "training"
    with db.session() as s:
        correction = Correction(seg_sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                                seg_series_uid=f"2.25.{uuid.uuid4().int}",
                                source_series_uid=study.series_uid, model_name=TEST_MODEL,
                                ai_generation=0, state="recorded", split=split,
                                dice={"liver": 0.5}, changed_slices=[], labels=[],
                                unknown_segments=[])
        s.add(correction)
        s.flush()
        s.add(TrainingSample(correction_id=correction.id, source_series_uid=study.series_uid,
                             model_name=TEST_MODEL, split=split, state=state, path=rel,
                             slices=int(sample.image.shape[0]), size=len(data),
                             annotated=list(sample.annotated)))


def model_json(model_file: Path) -> str:
    return model_file.with_suffix(".json").read_text()


# -- hubs -------------------------------------------------------------------------------
class InProcessHub:
    def __init__(self, server: Any, service: Any) -> None:
        self.server = server
        self.service = service
        self.target = f"127.0.0.1:{server.port}"

    def token(self) -> str:
        return str(self.service.create_enrolment_token()[0])

    def current(self) -> int:
        return int(self.service.require_current().number)


def assert_serves_hub_weights(hub: InProcessHub, node: Any, model: str,
                              generation: int = 1) -> Any:
    """``node`` serves exactly the hub's ``generation`` of an imported ``model`` (every
    tensor, all in its ``network`` group), which learned (differs from generation 0);
    returns the served config."""
    wait_swapped(node, model, generation)
    served_model, config = node.parts.models.get(model)
    assert config.generation == generation
    merged = hub.service.generation_tensors(generation)
    start = hub.service.generation_tensors(0)
    served = served_model.state_dict()
    assert set(merged) == set(served) and all(k.startswith("network.") for k in merged)
    for name, value in merged.items():
        np.testing.assert_array_equal(served[name].numpy(), value)
    assert any(not np.array_equal(merged[k], start[k]) for k in merged)  # it learned
    return config


@contextmanager
def mtls_hub(data_dir: Path, certs: Any,  # noqa: F811
             weights: Path) -> Iterator[InProcessHub]:
    """A hub under mutual TLS with its defaults, whose generation 0 is ``weights`` (its
    JSON beside it)."""
    from federation_grpc.hub.config import HubConfig, TlsConfig
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.service import HubService

    config = HubConfig(data_dir=data_dir, port=0, max_workers=16,
                       tls=TlsConfig(certs["ca"].cert, certs["hub"].cert, certs["hub"].key))
    service = HubService(config)
    service.init_model(weights.read_bytes(), model_json(weights))
    server = HubServer(config, service, watch_poll_s=0.2, keepalive_s=1.0).start()
    try:
        yield InProcessHub(server, service)
    finally:
        server.stop(grace=0.5)
        service.close()


@pytest.fixture
def start_hub(tmp_path: Path, certs: Any,  # noqa: F811
              model_file: Path) -> Iterator[Callable[..., InProcessHub]]:
    from federation_grpc.hub.config import HubConfig, TlsConfig
    from federation_grpc.hub.process import HubServer
    from federation_grpc.hub.service import HubService

    started: list[InProcessHub] = []

    def start(gate: dict[str, Any] | None = None, aggregation: dict[str, Any] | None = None,
              **limits: Any) -> InProcessHub:
        config = HubConfig(data_dir=tmp_path / f"hub{len(started)}", port=0, max_workers=16,
                           tls=TlsConfig(certs["ca"].cert, certs["hub"].cert, certs["hub"].key))
        if limits:
            config = replace(config, limits=replace(config.limits, **limits))
        if aggregation:
            config = replace(config, aggregation=replace(config.aggregation, **aggregation))
        if gate:
            config = replace(config, gate=replace(config.gate, **gate))
        svc = HubService(config)
        svc.init_model(model_file.read_bytes(), model_json(model_file))
        server = HubServer(config, svc, watch_poll_s=0.2, keepalive_s=1.0).start()
        started.append(InProcessHub(server, svc))
        return started[-1]

    yield start
    for hub in started:
        hub.server.stop(grace=0.5)
        hub.service.close()


# -- nodes ------------------------------------------------------------------------------
def federated_node_data(data_dir: Path, model_file: Path, hub: str, *, token: str = "",
                        tls: tuple[Path, Path, Path] | None = None, insecure: bool = False,
                        **federation: Any) -> dict[str, Any]:
    """A test node: the tiny model, segmentation of CT, quick learning, fast federation."""
    data = node_config_data(data_dir, rules=[segment_rule()], learning=learning_section())
    data["models"] = {TEST_MODEL: str(model_file)}
    section: dict[str, Any] = {
        "enabled": True, "hub": hub, "model": TEST_MODEL, "enrolment_token": token,
        "upload_interval_s": 0.3, "upload_backoff_max_s": 1.0, "metrics_interval_s": 0.5,
        "evaluation_interval_s": 0.5, "rpc_timeout_s": 20, "display_name": data_dir.name,
    }
    if insecure:
        section["insecure_loopback"] = True
    else:
        assert tls is not None
        section.update(ca_cert=str(tls[0]), cert=str(tls[1]), key=str(tls[2]))
    section.update(federation)
    data["federation"] = section
    return data


def node_tls(certs: Any, who: str = "node1") -> tuple[Path, Path, Path]:  # noqa: F811
    return certs["ca"].cert, certs[who].cert, certs[who].key


def seed_update(db_url: str, model_file: Path, data_dir: Path, *, base: int = 0,
                seed: int = 0, step: float = 0.005) -> str:
    """Put an update in a node's outbox as a training round would (encoder nudged by
    ``step`` x normal noise: the hub's default strategy, delta, applies the change whole;
    FedAsync mixed in half of the earlier 0.01)."""
    model, _ = load_model(model_file)
    rng = np.random.default_rng(seed)
    arrays = {name: (t.detach().numpy() + step * rng.normal(size=t.shape)).astype(np.float32)
              for name, t in model.state_dict().items() if name.startswith("encoder.")}
    update_id = f"2.25.{uuid.uuid4().int}"
    meta = {"format": "tessera-update/1", "update_id": update_id, "model": TEST_MODEL,
            "base_generation": str(base), "num_samples": "4", "num_slices": "12",
            "trained_groups": '["encoder"]',
            "validation": '{"base": {"mean": 0.5}, "candidate": {"mean": 0.52}, "cases": 1}'}
    path = data_dir / "updates" / f"{update_id}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = arrays_to_bytes(arrays, meta)
    path.write_bytes(data)
    meta[PAYLOAD_SHA256] = hashlib.sha256(data).hexdigest()  # as write_update keeps it
    db = Database(db_url)
    try:
        with db.session() as s:
            s.add(UpdateOutboxItem(update_id=update_id, model_name=TEST_MODEL,
                                   base_generation=base, path=str(path), meta=meta))
    finally:
        db.dispose()
    return update_id


def serving(db_url: str) -> tuple[int, str] | None:
    """(generation, origin) of the version a node's table says serves."""
    db = Database(db_url)
    try:
        with db.session() as s:
            row = s.execute(select(ModelVersion).where(ModelVersion.state == "serving")
                            .order_by(ModelVersion.activated_at.desc())).scalars().first()
            return None if row is None else (row.generation, row.origin)
    finally:
        db.dispose()


def serving_base(db_url: str) -> int | None:
    """The hub generation a node serves, as received or as its own fine-tune of it
    (``[federation] adapt``, see dicom_node/pipeline/site_adaptation.py)."""
    db = Database(db_url)
    try:
        with db.session() as s:
            row = s.execute(select(ModelVersion).where(ModelVersion.state == "serving")
                            .order_by(ModelVersion.activated_at.desc())).scalars().first()
            return None if row is None else hub_base_generation(s, row.name, row.generation)
    finally:
        db.dispose()


def site_checked(db_url: str) -> bool:
    """No ``generation-adapt`` job is waiting or running at the node."""
    db = Database(db_url)
    try:
        with db.session() as s:
            return not s.execute(select(Job.id).where(
                Job.kind == "generation-adapt",
                Job.state.in_((JobState.PENDING, JobState.RUNNING)))).first()
    finally:
        db.dispose()


def outbox(db_url: str) -> list[tuple[str, str, int, str | None]]:
    db = Database(db_url)
    try:
        with db.session() as s:
            return [(r.update_id, r.state, r.attempts, r.last_error) for r in s.execute(
                select(UpdateOutboxItem).order_by(UpdateOutboxItem.id)).scalars()]
    finally:
        db.dispose()


def settled_outbox(db_url: str, timeout: float = 30) -> list[tuple[str, str, int, str | None]]:
    """:func:`outbox` once none of its rows is pending. A node marks its update sent when
    the upload returns, which can be after the hub has merged it (and published)."""
    return wait_until(lambda: (lambda rows: rows if all(r[1] != "pending" for r in rows)
                               else None)(outbox(db_url)),
                      timeout=timeout, what="the update outbox settled")


# -- the wire -----------------------------------------------------------------------------
class WireRecorder(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Keeps the serialised bytes of every request message and the call metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bytes]] = []
        self._lock = threading.Lock()

    def _keep(self, details: Any, message: Any) -> None:
        # Upload chunks go as raw views (federation_grpc.wire): record their wire bytes.
        data = (message.SerializeToString() if hasattr(message, "SerializeToString")
                else serialize_upload_request(message))
        meta = b"".join(f"{k}={v}".encode() for k, v in (details.metadata or ()))
        with self._lock:
            self.calls.append((details.method, data, meta))

    def _stream(self, details: Any, iterator: Any) -> Any:
        for message in iterator:
            self._keep(details, message)
            yield message

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._keep(details, request)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self._keep(details, request)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, iterator: Any) -> Any:
        return continuation(details, self._stream(details, iterator))

    def intercept_stream_stream(self, continuation: Any, details: Any, iterator: Any) -> Any:
        return continuation(details, self._stream(details, iterator))

    def methods(self) -> set[str]:
        with self._lock:
            return {m.rsplit("/", 1)[-1] for m, _, _ in self.calls}

    def everything(self) -> bytes:
        with self._lock:
            return b"".join(data + meta for _, data, meta in self.calls)

    def requests(self, method: str) -> list[bytes]:
        with self._lock:
            return [d for m, d, _ in self.calls if m.endswith("/" + method)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
