"""Partial labels at the hub: each head merged only from the nodes that trained it, the
encoder from all; declared groups checked against the base generation before any byte;
what each node trains visible to the operator. Over real gRPC with mutual TLS too."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub import strategies as agg
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.partial_labels import (
    check_trained_groups,
    describe_heads,
    generation_groups,
    head_labels,
    trained_heads,
)
from federation_grpc.hub.process import HubServer
from federation_grpc.hub.service import HubService
from federation_grpc.uploading import UpdateMetadata

from .conftest import (
    MODEL_CONFIG,
    RunningHub,
    enrol,
    header_for,
    hub_config,
    nudged,
    small_model,
    tls_config,
    upload,
)

LIVER = ("encoder", "bottleneck", "heads.liver")
SPLEEN = ("encoder", "bottleneck", "heads.spleen")


def test_groups_of_a_generation_include_pending_added_heads() -> None:
    names = list(small_model())
    assert generation_groups(names, MODEL_CONFIG) == {
        "encoder", "bottleneck", "heads.liver", "heads.spleen"}
    added = json.dumps({"format": "tessera-model/1",
                        "heads": {"liver": ["liver"], "kidneys": ["kidney_left"]},
                        "added_heads": {"kidneys": {"init_seed": 1, "trained": False}}})
    assert "heads.kidneys" in generation_groups(names, added)
    check_trained_groups(["encoder", "heads.liver"], generation_groups(names, MODEL_CONFIG), 0)
    with pytest.raises(InvalidRequest, match=r"\['heads.kidneys'\] are not parameter groups "
                                             r"of base generation 7"):
        check_trained_groups(["encoder", "heads.kidneys"],
                             generation_groups(names, MODEL_CONFIG), 7)


def test_heads_and_labels_for_operators() -> None:
    assert head_labels(MODEL_CONFIG) == {"liver": ("liver",), "spleen": ("spleen",)}
    assert head_labels("not json") == {}
    assert trained_heads([["encoder", "heads.liver"], ["heads.spleen", "encoder"], []]) == (
        "liver", "spleen")
    assert describe_heads(("liver", "kidneys"), {"liver": ("liver",)}) == "liver (liver), kidneys"


def test_unknown_head_group_is_refused_at_the_header_and_recorded(service: HubService) -> None:
    node = enrol(service)
    base = small_model()
    hostile = {**nudged(base, LIVER), "heads.kidneys.out.weight": np.ones((3, 4), np.float32)}
    payload = save(hostile)
    header = header_for(payload, (*LIVER, "heads.kidneys"))
    with pytest.raises(InvalidRequest, match=r"heads\.kidneys"):
        service.uploads.begin(node, header)
    assert service.uploads.status(node, header.update_id).state == UploadState.UNKNOWN
    assert not service.staging.path(header.update_id).exists()
    [rejection] = service.list_rejections()
    assert rejection.stage == "validation" and "heads.kidneys" in rejection.reasons[0]
    # Declaring only known groups while carrying the unknown head fails on the bytes.
    sneaky = header_for(payload, LIVER)
    with pytest.raises(InvalidRequest, match="unknown tensor names"):
        upload(service, node, payload, sneaky)
    assert service.aggregator.process_pending() == []


def test_each_head_merges_only_from_nodes_that_trained_it(tmp_path: Path) -> None:
    """FedAvg over a liver-only and a spleen-only node: heads taken from their one
    trainer, the shared groups averaged by sample count."""
    svc = HubService(hub_config(tmp_path), strategy=agg.FedAvg(round_size=2))
    try:
        base = small_model()
        svc.init_model(save(base), MODEL_CONFIG)
        a, b = enrol(svc, "liver site"), enrol(svc, "spleen site")
        liver, spleen = nudged(base, LIVER, 0.1, seed=1), nudged(base, SPLEEN, 0.1, seed=2)
        for node, tensors, groups, n in ((a, liver, LIVER, 30), (b, spleen, SPLEEN, 10)):
            payload = save(tensors)
            assert upload(svc, node, payload, header_for(payload, groups, num_samples=n)
                          ).state == UploadState.RECEIVED
        assert svc.aggregator.process_pending() == [1]
        merged = load(svc.blobs.get(svc.generation(1).sha256))
        _check_per_head(merged, base, liver, spleen, 30, 10)
        heads = {n.display_name: n.trained_heads for n in svc.list_nodes()}
        assert heads == {"liver site": ("liver",), "spleen site": ("spleen",)}
    finally:
        svc.close()


def _check_per_head(merged: dict[str, np.ndarray], base: dict[str, np.ndarray],
                    liver: dict[str, np.ndarray], spleen: dict[str, np.ndarray],
                    n_liver: int, n_spleen: int) -> None:
    np.testing.assert_allclose(merged["heads.liver.out.weight"], liver["heads.liver.out.weight"],
                               rtol=1e-6)
    np.testing.assert_allclose(merged["heads.spleen.out.weight"],
                               spleen["heads.spleen.out.weight"], rtol=1e-6)
    for name in ("encoder.conv1.weight", "bottleneck.weight"):
        mean = (n_liver * liver[name] + n_spleen * spleen[name]) / (n_liver + n_spleen)
        np.testing.assert_allclose(merged[name], mean, rtol=1e-5, atol=1e-6)
        assert not np.allclose(merged[name], base[name])


def test_two_nodes_with_disjoint_labels_over_grpc(tmp_path: Path, certs) -> None:  # type: ignore[no-untyped-def]
    """A real mTLS hub: a liver-only and a spleen-only node upload; the generation they
    make holds each head from its one trainer and the encoder from both; a node that
    declares a head the model does not have gets INVALID_ARGUMENT with the reason."""
    svc = HubService(tls_config(tmp_path, certs), strategy=agg.FedAvg(round_size=2))
    base = small_model()
    svc.init_model(save(base), MODEL_CONFIG)
    server = HubServer(svc.config, svc, watch_poll_s=0.2, keepalive_s=1.0).start()
    hub = RunningHub(server, certs)
    clients = [hub.enrolled_client(), hub.enrolled_client()]
    try:
        liver, spleen = nudged(base, LIVER, 0.1, seed=3), nudged(base, SPLEEN, 0.1, seed=4)
        for client, tensors, groups, n in ((clients[0], liver, LIVER, 12),
                                           (clients[1], spleen, SPLEEN, 4)):
            meta = UpdateMetadata(update_id=header_for(b"x", groups).update_id,
                                  base_generation=0, num_samples=n, trained_groups=groups)
            assert client.upload(save(tensors), meta).state in (UploadState.RECEIVED,
                                                                UploadState.MERGED)
        number = _wait_generation(svc, 1)
        merged = load(clients[0].download(number))
        _check_per_head(merged, base, liver, spleen, 12, 4)
        view = svc.generation(number)
        assert len(view.update_ids) == 2 and len(set(view.node_ids)) == 2

        hostile = {**nudged(base, LIVER), "heads.kidneys.out.weight": np.ones((3, 4), np.float32)}
        meta = UpdateMetadata(update_id=header_for(b"x", LIVER).update_id, base_generation=1,
                              num_samples=3, trained_groups=(*LIVER, "heads.kidneys"))
        with pytest.raises(InvalidRequest, match=r"heads\.kidneys.*not parameter groups"):
            clients[0].upload(save(hostile), meta)
        assert svc.current_number() == number
    finally:
        for client in clients:
            client.close()
        server.stop(grace=0.5)
        svc.close()


def _wait_generation(svc: HubService, number: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = svc.current_number()
        if current is not None and current >= number:
            return current
        time.sleep(0.1)
    raise AssertionError(f"no generation {number} within {timeout} s")


def test_hub_nodes_shows_the_heads_each_node_trains(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from federation_grpc.hub.cli import hub_app
    from federation_grpc.hub.config import load_config

    config = tmp_path / "hub.toml"
    config.write_text(f'[hub]\ndata_dir = "{tmp_path / "data"}"\n')
    svc = HubService(load_config(config))
    try:
        svc.init_model(save(small_model()), MODEL_CONFIG)
        for name, groups in (("Liver Hospital", LIVER), ("Spleen Hospital", SPLEEN),
                             ("Quiet Hospital", None)):
            node = enrol(svc, name)
            if groups is not None:
                payload = save(nudged(small_model(), groups))
                upload(svc, node, payload, header_for(payload, groups))
    finally:
        svc.close()
    output = CliRunner(env={"COLUMNS": "300"}).invoke(
        hub_app, ["nodes", "--config", str(config)]).output
    lines = {line.split("│")[2].strip(): line for line in output.splitlines()
             if "Hospital" in line}
    assert "liver (liver)" in lines["Liver Hospital"] and "spleen" not in lines["Liver Hospital"]
    assert "spleen (spleen)" in lines["Spleen Hospital"]
    assert "liver" not in lines["Quiet Hospital"] and "spleen" not in lines["Quiet Hospital"]
