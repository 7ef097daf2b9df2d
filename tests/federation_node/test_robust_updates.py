"""Robust weighting against updates a node really trained (issue 21 item 4): one
trained on corrupted labels (liver and spleen swapped) that lies about its sample
count, next to two honest ones, through the real gRPC path over mTLS."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load, save

from dicom_node.learning.policy import TrainingPolicy
from dicom_node.learning.slices import samples_from_volume
from dicom_node.learning.training import train
from dicom_node.learning.weights import extract_groups, load_model
from dicom_node.phantom.ct import generate_subject
from federation_grpc.client import FederationClient
from federation_grpc.errors import InvalidRequest
from federation_grpc.uploading import UpdateMetadata

from .conftest import node_tls

GROUPS = ("encoder", "heads.liver", "heads.spleen")
ANNOTATED = ("body", "liver", "spleen", "kidney_left", "kidney_right")


def trained_update(model_file: Path, index: int, *, swap_liver_spleen: bool = False
                   ) -> tuple[dict[str, np.ndarray], int]:
    """A short round of the node's own training on a phantom subject of site A."""
    model, config = load_model(model_file)
    subject = generate_subject("A", index, seed=3)
    labels = subject.labels.copy()
    if swap_liver_spleen:
        liver, spleen = config.label_values["liver"], config.label_values["spleen"]
        labels[subject.labels == liver] = spleen
        labels[subject.labels == spleen] = liver
    organs = np.flatnonzero((labels > 1).any(axis=(1, 2)))
    slices = organs[:: max(1, len(organs) // 12)][:12]
    samples = samples_from_volume(subject.image, labels, ANNOTATED, config, slices=slices)
    train(model, config, samples,
          TrainingPolicy(epochs=2, batch_size=6, num_threads=2, seed=index, augment=False))
    return extract_groups(model, GROUPS), len(samples)


def client_for(hub: Any, certs: Any, who: str) -> FederationClient:
    ca, cert, key = node_tls(certs, who)
    from federation_grpc.connection import ClientTls

    client = FederationClient(hub.target, tls=ClientTls.from_files(ca, cert, key))
    client.enrol(hub.token(), who)
    return client


def test_a_corrupted_update_that_lies_about_its_samples_is_refused_then_bounded(
    start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub(aggregation={"strategy": "fedavg", "buffer_size": 3,
                                 "max_update_share": 0.5})
    base = hub.service.generation_tensors(0)
    liar_tensors, _ = trained_update(model_file, 0, swap_liver_spleen=True)
    honest = [trained_update(model_file, i) for i in (1, 2)]
    liar = client_for(hub, certs, "node1")
    good = [client_for(hub, certs, "node2") for _ in honest]

    # 2**62 samples: refused before any byte, with the reason, and recorded.
    lie = UpdateMetadata(str(uuid.uuid4()), 0, 2**62, GROUPS)
    with pytest.raises(InvalidRequest, match="num_samples"):
        liar.upload(save(liar_tensors), lie)
    assert any(r.update_id == lie.update_id and "max_num_samples" in r.reasons[0]
               for r in hub.service.list_rejections())

    # 100000 samples (within the bound, still a lie): merged, with at most half the say.
    liar.upload(save(liar_tensors), UpdateMetadata(str(uuid.uuid4()), 0, 100_000, GROUPS))
    for client, (tensors, count) in zip(good, honest, strict=True):
        client.upload(save(tensors), UpdateMetadata(str(uuid.uuid4()), 0, count, GROUPS))
    deadline = time.monotonic() + 60
    while hub.current() < 1:
        assert time.monotonic() < deadline, hub.service.list_rejections()
        time.sleep(0.05)
    merged = load(liar.download(1))

    def delta(tensors: dict[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([(tensors[n].astype(np.float64) - base[n]).ravel()
                               for n in sorted(liar_tensors)])

    honest_mean = (delta(honest[0][0]) * honest[0][1] + delta(honest[1][0]) * honest[1][1]
                   ) / (honest[0][1] + honest[1][1])
    towards_liar = delta(liar_tensors) - honest_mean
    share = float(np.dot(delta(merged) - honest_mean, towards_liar)
                  / np.dot(towards_liar, towards_liar))
    assert share == pytest.approx(0.5, abs=1e-3), "sample-weighted it would be ~0.9998"
    for client in (liar, *good):
        client.close()
