"""Federated evaluation against a real mTLS hub in this process: a candidate generation
waits for nodes' scores; the node scores candidate and reference on its held-out
corrected cases and answers with the same pooled Dice its own gate uses; the hub then
publishes (or rejects) the candidate and the node serves it. A node without held-out
cases answers that it cannot judge: the hub publishes the candidate with a note saying
it was not judged (``[gate] unjudged = "accept"``, the default) or refuses it."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.learning.incremental import cut_sample, encode_sample, evaluate_slices
from dicom_node.learning.weights import model_from_bytes
from dicom_node.node import Node
from dicom_node.pipeline.federated_evaluation import EvaluationResponder
from dicom_node.pipeline.hub_generations import hub_config_for
from dicom_node.store.models import Correction, SampleState, TrainingSample
from federation_grpc.hub.store import EvaluationResultRow, EvaluationTaskRow, GenerationRow
from tests.corrections.helpers import Study
from tests.node.conftest import wait_until, write_node_config

from .conftest import TEST_MODEL, federated_node_data, node_tls, seed_update, serving

GATE = {"federated_evaluation": True, "min_evaluations": 1, "evaluation_timeout_s": 120.0}


def _node(tmp_path: Path, data: dict[str, Any]) -> Node:
    return Node(load_config(write_node_config(tmp_path / "node.toml", data), env={}))


def _evaluating_node(tmp_path: Path, hub: Any, certs: Any, model_file: Path,
                     interval_s: float, held_out: Study | None = None) -> tuple[Node, str]:
    """A started node enrolled at ``hub`` answering evaluation tasks every
    ``interval_s``, with ``held_out`` as its one held-out case (none if ``None``);
    returns the node and its database URL."""
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs), evaluation_interval_s=interval_s)
    node = _node(tmp_path, data)
    if held_out is not None:
        _held_out_case(node, held_out)
    node.start()
    return node, node.config.node.resolved_database_url()


def _held_out_case(node: Node, study: Study) -> None:
    """A held-out corrected case as the correction intake keeps it (every
    validation_every-th correction; never trained on)."""
    _, config = node.parts.models.get(TEST_MODEL)
    volume = study.volume()
    truth = study.truth_in_volume_order()
    sample = cut_sample(volume.pixels, truth, range(0, truth.shape[0], 4),
                        ("body", "liver", "spleen", "kidney_left", "kidney_right"), config)
    rel = f"samples/{uuid.uuid4().hex}.npz"
    data = encode_sample(sample)
    (node.config.node.data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (node.config.node.data_dir / rel).write_bytes(data)
    with node.parts.db.session() as s:
        correction = Correction(seg_sop_instance_uid=f"2.25.{uuid.uuid4().int}",
                                seg_series_uid=f"2.25.{uuid.uuid4().int}",
                                source_series_uid=study.series_uid, model_name=TEST_MODEL,
                                ai_generation=0, state="recorded", split="validation",
                                dice={"liver": 0.5}, changed_slices=[], labels=[],
                                unknown_segments=[])
        s.add(correction)
        s.flush()
        s.add(TrainingSample(correction_id=correction.id, source_series_uid=study.series_uid,
                             model_name=TEST_MODEL, split="validation",
                             state=SampleState.HELD_OUT, path=rel,
                             slices=int(sample.image.shape[0]), size=len(data),
                             annotated=list(sample.annotated)))


def _results(hub: Any) -> list[EvaluationResultRow]:
    with hub.service.store.session() as s:
        rows = list(s.execute(select(EvaluationResultRow)).scalars())
        s.expunge_all()
        return rows


def _status(hub: Any, number: int) -> str | None:
    with hub.service.store.session() as s:
        row = s.get(GenerationRow, number)
        return None if row is None else str(row.status)


def test_node_scores_a_candidate_on_its_held_out_cases_and_the_hub_publishes_it(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    hub = start_hub(gate=GATE)
    node, url = _evaluating_node(tmp_path, hub, certs, model_file, 0.3,
                                 held_out=Study("A", 0, 7, slices=24))
    try:
        seed_update(url, model_file, node.config.node.data_dir)
        wait_until(lambda: _results(hub), timeout=90, what="the node's evaluation result")
        wait_until(lambda: serving(url) == (1, "hub"), timeout=60,
                   what="the node to serve the evaluated generation 1")
        (result,) = _results(hub)
        assert result.node_id == node.parts.federation.node_id
        assert result.num_cases == 1

        # The two numbers are the node's own gate measure of both generations.
        held = node.parts.federation.evaluations.held_out()
        _, current = node.parts.models.get(TEST_MODEL)
        expected = {}
        for number in (0, 1):
            blob = hub.service.blobs.path(hub.service.generation(number).sha256).read_bytes()
            model, config = model_from_bytes(blob, hub_config_for("", current, number))
            expected[number] = evaluate_slices(model, config, held)["mean"]
        assert expected[0] != expected[1]  # the update changed what the model segments
        assert np.isclose(result.candidate_score, expected[1], atol=1e-6)
        assert np.isclose(result.reference_score, expected[0], atol=1e-6)
        assert _status(hub, 1) == "ACTIVE"
        with hub.service.store.session() as s:
            (task,) = s.execute(select(EvaluationTaskRow)).scalars()
            assert not task.open and task.candidate_generation == 1
    finally:
        node.stop()


@pytest.mark.parametrize("unjudged", ["accept", "reject"])
def test_a_node_without_held_out_cases_answers_that_it_cannot_judge(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path, unjudged: str
) -> None:
    hub = start_hub(gate={**GATE, "unjudged": unjudged})
    node, url = _evaluating_node(tmp_path, hub, certs, model_file, 0.2)
    try:
        seed_update(url, model_file, node.config.node.data_dir)
        wait_until(lambda: _results(hub), timeout=90, what="the node's answer")
        (result,) = _results(hub)
        assert result.node_id == node.parts.federation.node_id and result.num_cases == 0
        wait_until(lambda: _status(hub, 1) in ("ACTIVE", "REJECTED"), timeout=30,
                   what="the candidate settled")
        notes = hub.service.generation(1).notes
        if unjudged == "accept":
            assert _status(hub, 1) == "ACTIVE"
            assert notes.startswith("not judged: 0 of the 1 sites needed")
            assert f"no held-out cases at {result.node_id}" in notes
            wait_until(lambda: serving(url) == (1, "hub"), timeout=60,
                       what="the node to serve generation 1")
        else:
            assert _status(hub, 1) == "REJECTED"
            (rejection,) = hub.service.list_rejections()
            assert rejection.reasons[0].startswith("not judged")
            assert serving(url) in (None, (0, "hub"), (0, "local"))
    finally:
        node.stop()


def test_tasks_of_one_round_score_each_generation_once() -> None:
    """Two open tasks against the same reference: the reference is downloaded and scored
    once per round, and each task still gets its own answer."""
    tasks = [SimpleNamespace(task_id="t1", candidate_generation=1, reference_generation=0),
             SimpleNamespace(task_id="t2", candidate_generation=2, reference_generation=0)]
    sent: list[tuple[str, float, float, int]] = []
    client = SimpleNamespace(
        fetch_evaluation_tasks=lambda: tasks,
        submit_evaluation_result=lambda *answer: sent.append(answer) or True)
    responder = EvaluationResponder(None, None, Path("."), TEST_MODEL)  # type: ignore[arg-type]
    scored: list[int] = []
    responder.held_out = lambda: ["case"]  # type: ignore[method-assign,list-item,return-value]
    responder._score = lambda _c, generation, _h: scored.append(generation) or generation / 10  # type: ignore[method-assign]
    answers = responder.answer(client)  # type: ignore[arg-type]
    assert sorted(scored) == [0, 1, 2]
    assert sent == [("t1", 0.1, 0.0, 1), ("t2", 0.2, 0.0, 1)]
    assert [a.task_id for a in answers] == ["t1", "t2"]
    assert responder.answer(client) == []  # settled: not scored again
    assert sorted(scored) == [0, 1, 2]
