"""Shared fixtures: a small numpy model, update artifacts, an in-process hub service."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save

from federation_grpc.hub.config import GateConfig, HubConfig
from federation_grpc.hub.domain import UpdateHeader
from federation_grpc.hub.service import HubService

MODEL_CONFIG = json.dumps(
    {"architecture": "unet2d", "heads": {"liver": ["liver"], "spleen": ["spleen"]}}
)


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.conv1.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "encoder.conv1.bias": rng.normal(size=(4,)).astype(np.float32),
        "bottleneck.weight": rng.normal(size=(4, 4)).astype(np.float32),
        "heads.liver.out.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "heads.spleen.out.weight": rng.normal(size=(2, 4)).astype(np.float32),
    }


def nudged(
    base: dict[str, np.ndarray], groups: tuple[str, ...], step: float = 0.01, seed: int = 1
) -> dict[str, np.ndarray]:
    """A plausible trained update: the named groups' tensors moved a little."""
    from federation_grpc.hub.parameters import group_of

    rng = np.random.default_rng(seed)
    return {
        name: (value + step * rng.normal(size=value.shape)).astype(value.dtype)
        for name, value in base.items()
        if group_of(name) in groups
    }


def header_for(
    payload: bytes,
    groups: tuple[str, ...],
    base_generation: int = 0,
    num_samples: int = 8,
    update_id: str | None = None,
) -> UpdateHeader:
    return UpdateHeader(
        update_id=update_id or str(uuid.uuid4()),
        base_generation=base_generation,
        num_samples=num_samples,
        trained_groups=groups,
        local_metrics={"dice.liver": 0.9},
        total_size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


ALL_GROUPS = ("encoder", "bottleneck", "heads.liver")


def make_update(base: dict[str, np.ndarray], groups: tuple[str, ...] = ALL_GROUPS, **kw):
    payload = save(nudged(base, groups, **kw))
    return payload, header_for(payload, groups)


def hub_config(tmp_path: Path, **gate: object) -> HubConfig:
    return HubConfig(
        data_dir=tmp_path / "hub",
        port=0,
        max_workers=32,
        gate=replace(GateConfig(), **gate),  # type: ignore[arg-type]
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[HubService]:
    svc = HubService(hub_config(tmp_path))
    svc.init_model(save(small_model()), MODEL_CONFIG)
    yield svc
    svc.close()


def enrol(svc: HubService, name: str = "site") -> str:
    token, _ = svc.create_enrolment_token()
    return svc.enrol(token, name).node_id


def upload(svc: HubService, node_id: str, payload: bytes, header: UpdateHeader):
    session = svc.uploads.begin(node_id, header)
    if not hasattr(session, "write"):
        return session
    session.write(payload[header.offset :])
    return session.finish()


# --- real-socket hubs with mutual TLS -------------------------------------------------


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory):
    from federation_grpc.hub.certs import make_ca, make_certs

    root = tmp_path_factory.mktemp("certs")
    made = make_certs(root / "ok", nodes=("node1", "node2"))
    other_ca = make_ca(root / "other", name="other-ca")
    from federation_grpc.hub.certs import issue

    made["stranger"] = issue(other_ca, root / "other", "stranger", server=False)
    return made


class RunningHub:
    def __init__(self, server, certs) -> None:  # type: ignore[no-untyped-def]
        self.server = server
        self.service = server.service
        self.certs = certs
        self.target = f"127.0.0.1:{server.port}"

    def tls(self, who: str = "node1"):  # type: ignore[no-untyped-def]
        from federation_grpc.connection import ClientTls

        c = self.certs
        return ClientTls.from_files(c["ca"].cert, c[who].cert, c[who].key)

    def client(self, token: str = "", who: str = "node1", **kw):  # type: ignore[no-untyped-def]
        from federation_grpc.client import FederationClient
        from federation_grpc.connection import RetryPolicy

        kw.setdefault("retry", RetryPolicy(attempts=4, initial_backoff_s=0.05, max_backoff_s=0.5))
        return FederationClient(self.target, tls=self.tls(who), node_token=token, **kw)

    def enrolled_client(self, **kw):  # type: ignore[no-untyped-def]
        token, _ = self.service.create_enrolment_token()
        client = self.client(**kw)
        client.enrol(token, "test site")
        return client


def tls_config(tmp_path: Path, certs, **gate: object) -> HubConfig:  # type: ignore[no-untyped-def]
    from federation_grpc.hub.config import TlsConfig

    return replace(
        hub_config(tmp_path, **gate),
        admin_token_sha256=hashlib.sha256(b"admin-secret").hexdigest(),
        tls=TlsConfig(certs["ca"].cert, certs["hub"].cert, certs["hub"].key),
    )


@pytest.fixture
def start_hub(tmp_path: Path, certs):  # type: ignore[no-untyped-def]
    """Factory: a TLS hub on 127.0.0.1 (OS-assigned port) with its own generation 0."""
    from federation_grpc.hub.process import HubServer

    started: list[tuple[HubServer, HubService]] = []

    def start(
        model: dict[str, np.ndarray] | None = None,
        *,
        model_config: str = MODEL_CONFIG,
        aggregation: dict[str, object] | None = None,
        limits: dict[str, object] | None = None,
        **gate: object,
    ) -> RunningHub:
        config = tls_config(tmp_path / f"hub{len(started)}", certs, **gate)
        config = replace(
            config,
            aggregation=replace(config.aggregation, **(aggregation or {})),  # type: ignore[arg-type]
            limits=replace(config.limits, **(limits or {})),  # type: ignore[arg-type]
        )
        svc = HubService(config)
        svc.init_model(save(model or small_model()), model_config)
        server = HubServer(svc.config, svc, watch_poll_s=0.2, keepalive_s=1.0).start()
        started.append((server, svc))
        return RunningHub(server, certs)

    yield start
    for server, svc in started:
        server.stop(grace=0.5)
        svc.close()


@pytest.fixture
def hub(start_hub) -> RunningHub:  # type: ignore[no-untyped-def]
    return start_hub()
