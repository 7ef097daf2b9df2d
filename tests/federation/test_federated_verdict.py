"""Federated evaluation by default (issue 21): "auto" turns it on with two nodes taking
part; nodes without held-out cases answer that they cannot judge; a candidate nobody
could judge is published with a note saying so (or refused, ``unjudged = "reject"``);
one harmed site refuses it whatever the count; a silent node is named at the deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.numpy import save

from federation_grpc.errors import InvalidRequest
from federation_grpc.hub.config import GateConfig, load_config
from federation_grpc.hub.federated_verdict import judge, waiting
from federation_grpc.hub.gate import SiteScore
from federation_grpc.hub.service import HubService

from .conftest import MODEL_CONFIG, enrol, hub_config, make_update, small_model, upload


def hub(tmp_path: Path, **gate: object) -> HubService:
    svc = HubService(hub_config(tmp_path, **gate))
    svc.init_model(save(small_model()), MODEL_CONFIG)
    return svc


def one_update(svc: HubService, node: str) -> None:
    payload, header = make_update(small_model())
    upload(svc, node, payload, header)
    svc.aggregator.process_pending()


def evaluating(svc: HubService, count: int) -> list[str]:
    """``count`` enrolled nodes that asked for evaluation tasks (they take part)."""
    nodes = [enrol(svc, f"site{i}") for i in range(count)]
    for node in nodes:
        assert svc.fetch_evaluation_tasks(node) == []
    return nodes


@pytest.mark.parametrize("evaluators", [0, 1, 2])
def test_auto_waits_for_the_nodes_once_two_take_part(tmp_path: Path, evaluators: int) -> None:
    svc = hub(tmp_path)  # the defaults: federated_evaluation = "auto"
    nodes = [enrol(svc, f"site{i}") for i in range(3)]
    for node in nodes[:evaluators]:
        assert svc.fetch_evaluation_tasks(node) == []  # asking makes it an evaluator
    seen = {n.node_id: n.evaluator_seen for n in svc.list_nodes()}
    assert [seen[n] is not None for n in nodes] == [i < evaluators for i in range(3)]
    one_update(svc, nodes[2])
    if evaluators < 2:
        assert svc.current_number() == 1  # merged and published at once, as before
    else:
        assert svc.current_number() == 0
        (task,) = svc.fetch_evaluation_tasks(nodes[0])
        assert svc.generation(task.candidate_generation).status == "CANDIDATE"
    svc.close()


def test_a_revoked_node_is_not_an_evaluator(tmp_path: Path) -> None:
    svc = hub(tmp_path)
    nodes = evaluating(svc, 2)
    svc.revoke_node(nodes[1])
    one_update(svc, nodes[0])
    assert svc.current_number() == 1
    svc.close()


@pytest.mark.parametrize("unjudged", ["accept", "reject"])
def test_nodes_without_held_out_cases_answer_and_the_candidate_is_not_judged(
    tmp_path: Path, unjudged: str
) -> None:
    svc = hub(tmp_path, unjudged=unjudged)
    nodes = evaluating(svc, 2)
    one_update(svc, nodes[0])
    (task,) = svc.fetch_evaluation_tasks(nodes[0])
    assert svc.submit_evaluation_result(nodes[0], task.task_id, 0.0, 0.0, 0)
    svc.aggregator.process_pending()
    assert svc.current_number() == 0, "one evaluator has not answered yet: it waits"
    assert svc.submit_evaluation_result(nodes[1], task.task_id, 0.0, 0.0, 0)
    svc.aggregator.process_pending()
    generation = svc.generation(task.candidate_generation)
    said = f"no held-out cases at {', '.join(sorted(nodes))}"
    if unjudged == "accept":
        assert svc.current_number() == task.candidate_generation
        assert svc.ledger.published_numbers() == (0, task.candidate_generation)
        assert generation.notes.startswith("not judged: 0 of the 2 sites needed")
        assert said in generation.notes
        assert generation.validation_score is None
    else:
        assert svc.current_number() == 0 and generation.status == "REJECTED"
        # a watcher is never told of it (WatchGenerations' superseded lists published ones)
        assert svc.ledger.published_numbers() == (0,)
        (rejection,) = svc.list_rejections()
        assert rejection.reasons[0].startswith("not judged") and said in rejection.reasons[0]
    svc.close()


def test_one_harmed_site_refuses_a_candidate_too_few_sites_judged(tmp_path: Path) -> None:
    svc = hub(tmp_path)
    nodes = evaluating(svc, 3)
    one_update(svc, nodes[0])
    (task,) = svc.fetch_evaluation_tasks(nodes[0])
    svc.submit_evaluation_result(nodes[0], task.task_id, 0.0, 0.0, 0)
    svc.submit_evaluation_result(nodes[1], task.task_id, 0.0, 0.0, 0)
    svc.submit_evaluation_result(nodes[2], task.task_id, 0.61, 0.90, 4)
    svc.aggregator.process_pending()
    assert svc.current_number() == 0
    (rejection,) = svc.list_rejections()
    assert rejection.reasons[0].startswith(
        f"site {nodes[2]}: 0.9000 -> 0.6100 on 4 held-out case(s), a drop of 0.2900")
    assert any(r.startswith("not judged: 1 of the 2") for r in rejection.reasons)
    svc.close()


def test_a_silent_evaluator_is_named_at_the_deadline(tmp_path: Path) -> None:
    svc = hub(tmp_path, evaluation_timeout_s=0.0)
    nodes = evaluating(svc, 2)
    one_update(svc, nodes[0])
    svc.aggregator.process_pending()  # past the deadline at once: nobody answered
    assert svc.current_number() == 1
    notes = svc.generation(1).notes
    assert "got 0 of 2 results" in notes and f"no answer from {', '.join(sorted(nodes))}" in notes
    svc.close()


def test_scores_judged_by_enough_sites_decide_without_a_note() -> None:
    gate = GateConfig()
    answers = [SiteScore("a", 0.91, 0.90, 3), SiteScore("b", 0.80, 0.80, 2),
               SiteScore("c", 0.0, 0.0, 0)]
    assert waiting(answers[:2], {"a", "b", "c"}, False, gate)
    assert not waiting(answers[:2], {"a", "b", "c"}, True, gate)
    assert not waiting(answers, {"a", "b", "c"}, False, gate)
    verdict = judge(answers, {"a", "b", "c"}, gate)
    assert verdict.accepted and verdict.notes == []
    assert verdict.score == pytest.approx((0.91 * 3 + 0.80 * 2) / 5)
    # Each site too small to judge alone (1 case); together their mean is 0.10 below.
    lower = judge([SiteScore("a", 0.80, 0.90, 1), SiteScore("b", 0.80, 0.90, 1)], set(), gate)
    assert not lower.accepted and "below the current" in lower.reasons[0]
    assert [n for n in lower.notes if "too small to judge" in n] == lower.notes
    assert len(lower.notes) == 2 and lower.reasons[1:] == lower.notes


@pytest.mark.parametrize("text,message", [
    ('[gate]\nfederated_evaluation = "sometimes"\n', "federated_evaluation must be"),
    ('[gate]\nfederated_evaluation = 1\n', "federated_evaluation must be"),
    ('[gate]\nunjudged = "maybe"\n', "unjudged must be"),
    ('[gate]\nmin_evaluations = 0\n', "min_evaluations must be at least 1"),
    ('[gate]\nevaluator_window_s = 0\n', "evaluator_window_s must be positive"),
    ('[gate]\nbacktrack = -1\n', "backtrack must be between 0 and 8"),
    ('[gate]\nbacktrack = 40\n', "backtrack must be between 0 and 8"),
])
def test_bad_gate_settings_are_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=message):
        load_config(path)


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False),
                                            ('"auto"', "auto")])
def test_gate_settings_read_from_toml(tmp_path: Path, value: str, expected: object) -> None:
    path = tmp_path / "hub.toml"
    path.write_text(f"[gate]\nfederated_evaluation = {value}\n")
    assert load_config(path).gate.federated_evaluation == expected
