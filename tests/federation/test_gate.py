"""The gate can say no: NaN, huge norm, lower validation score; the generation is kept."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from sqlalchemy import select

from federation_grpc.errors import FailedPrecondition
from federation_grpc.hub.domain import UploadState
from federation_grpc.hub.generations import NewGeneration
from federation_grpc.hub.service import HubService
from federation_grpc.hub.store import GenerationRow, UpdateRow
from federation_grpc.hub.strategies import FedBuff

from .conftest import (
    ALL_GROUPS,
    MODEL_CONFIG,
    enrol,
    header_for,
    hub_config,
    make_update,
    nudged,
    small_model,
    upload,
)
from .evaluators import TARGET_SHIFT, target


def gated_service(tmp_path: Path, **gate: object) -> HubService:
    svc = HubService(hub_config(tmp_path, **gate))
    svc.init_model(save(small_model()), MODEL_CONFIG)
    return svc


def send(svc: HubService, node: str, tensors: dict[str, np.ndarray], groups=ALL_GROUPS):  # type: ignore[no-untyped-def]
    payload = save(tensors)
    return upload(svc, node, payload, header_for(payload, groups))


def test_nan_update_is_rejected_with_reason(service: HubService) -> None:
    node = enrol(service)
    update = nudged(small_model(), ALL_GROUPS)
    update["encoder.conv1.bias"][1] = np.nan
    status = send(service, node, update)
    assert status.state == UploadState.REJECTED
    assert "non-finite" in status.reason
    assert service.aggregator.process_pending() == []
    assert service.current_number() == 0
    (rejection,) = service.list_rejections()
    assert rejection.stage == "gate" and "encoder.conv1.bias" in rejection.reasons[0]


def test_huge_norm_update_is_rejected_with_reason(tmp_path: Path) -> None:
    svc = gated_service(tmp_path, max_update_norm=50.0, max_relative_update_norm=0.0)
    node = enrol(svc)
    huge = {k: v * 1e6 for k, v in nudged(small_model(), ALL_GROUPS).items()}
    status = send(svc, node, huge)
    assert status.state == UploadState.REJECTED
    assert "update norm" in status.reason and "exceeds the bound 50" in status.reason
    ok = send(svc, node, nudged(small_model(), ALL_GROUPS))
    assert ok.state == UploadState.RECEIVED, "a normal update still passes"
    svc.close()


def test_relative_norm_bound_is_on_by_default(service: HubService) -> None:
    node = enrol(service)
    status = send(
        service, node, {k: v * 100 for k, v in small_model().items() if "heads.spleen" not in k}
    )
    assert status.state == UploadState.REJECTED and "relative update norm" in status.reason


def test_update_that_lowers_validation_score_is_rejected(tmp_path: Path) -> None:
    svc = gated_service(
        tmp_path, evaluator="tests.federation.evaluators:TowardsTarget", validation_margin=1e-4,
        backtrack=2,
    )
    node = enrol(svc)
    away = {k: v - 0.2 for k, v in small_model().items() if not k.startswith("heads.spleen")}
    assert send(svc, node, away).state == UploadState.RECEIVED
    assert svc.aggregator.process_pending() == []
    assert svc.current_number() == 0
    (rejection,) = svc.list_rejections()
    assert (
        "validation score" in rejection.reasons[0] and "below the current" in rejection.reasons[0]
    )
    assert "also refused at 1/4 of its step" in rejection.reasons[-1]
    towards = {k: v for k, v in target().items() if not k.startswith("heads.spleen")}
    assert send(svc, node, towards).state == UploadState.RECEIVED
    assert svc.aggregator.process_pending() == [1]
    generation = svc.generation(1)
    assert generation.validation_score is not None
    assert generation.validation_score > -TARGET_SHIFT * 100
    svc.close()


@pytest.mark.parametrize("backtrack", [2, 0])
def test_a_step_past_the_optimum_is_merged_at_half_step_rather_than_refused(
    tmp_path: Path, backtrack: int,
) -> None:
    """The update points the right way but goes too far: its full mixing step lands
    further from the target than the current generation, half of it lands closer."""
    svc = gated_service(tmp_path, evaluator="tests.federation.evaluators:TowardsTarget",
                        validation_margin=1e-4, backtrack=backtrack)
    node = enrol(svc)
    start = small_model()
    past = {k: v + 6 * TARGET_SHIFT for k, v in start.items() if not k.startswith("heads.spleen")}
    assert send(svc, node, past).state == UploadState.RECEIVED
    published = svc.aggregator.process_pending()
    if backtrack == 0:
        assert published == [] and svc.current_number() == 0
        (rejection,) = svc.list_rejections()
        assert "below the current" in rejection.reasons[0]
        assert not any("also refused" in r for r in rejection.reasons)
        return
    assert published == [1] and svc.list_rejections() == []
    merged = svc.generation_tensors(1)
    goal = target()
    moved = [float(np.mean(merged[k] - start[k])) for k in past]
    # Half of the strategy's step (FedAsync: at most half the way to the update).
    assert all(0 < m < 6 * TARGET_SHIFT * 0.5 / 2 + 1e-6 for m in moved), moved
    assert sum(float(np.linalg.norm(merged[k] - goal[k])) for k in past) < sum(
        float(np.linalg.norm(start[k] - goal[k])) for k in past)
    assert svc.generation(1).validation_score is not None
    svc.close()


def test_fedbuff_waits_for_k_updates_through_the_service(tmp_path: Path) -> None:
    svc = HubService(hub_config(tmp_path), strategy=FedBuff(buffer_size=2))
    svc.init_model(save(small_model()), MODEL_CONFIG)
    a, b = enrol(svc, "a"), enrol(svc, "b")
    send(
        svc,
        a,
        nudged(small_model(), ("encoder", "bottleneck", "heads.liver"), seed=1),
        ("encoder", "bottleneck", "heads.liver"),
    )
    assert svc.aggregator.process_pending() == []
    send(
        svc,
        b,
        nudged(small_model(), ("encoder", "bottleneck", "heads.spleen"), seed=2),
        ("encoder", "bottleneck", "heads.spleen"),
    )
    assert svc.aggregator.process_pending() == [1]
    assert set(svc.generation(1).node_ids) == {a, b}
    svc.close()


@pytest.mark.parametrize("helpful", [True, False])
def test_federated_evaluation_on_nodes_decides(tmp_path: Path, helpful: bool) -> None:
    svc = gated_service(tmp_path, federated_evaluation=True, min_evaluations=2)
    nodes = [enrol(svc, f"site{i}") for i in range(2)]
    payload, header = make_update(small_model())
    upload(svc, nodes[0], payload, header)
    assert svc.aggregator.process_pending() == []
    (task,) = svc.fetch_evaluation_tasks(nodes[1])
    assert svc.generation(task.candidate_generation).status == "CANDIDATE"
    svc.download_source(task.candidate_generation, nodes[1])  # candidates are downloadable now
    for node in nodes:
        delta = 0.02 if helpful else -0.2
        assert svc.submit_evaluation_result(node, task.task_id, 0.8 + delta, 0.8, 10)
    assert svc.fetch_evaluation_tasks(nodes[0]) == []
    svc.aggregator.process_pending()
    if helpful:
        assert svc.current_number() == task.candidate_generation
    else:
        assert svc.current_number() == 0
        assert svc.generation(task.candidate_generation).status == "REJECTED"
        assert "below the current" in svc.list_rejections()[0].reasons[0]
    svc.close()


def test_federated_evaluation_without_enough_results_rejects_at_deadline(tmp_path: Path) -> None:
    svc = gated_service(
        tmp_path, federated_evaluation=True, min_evaluations=3, evaluation_timeout_s=0.0,
        unjudged="reject",
    )
    node = enrol(svc)
    payload, header = make_update(small_model())
    upload(svc, node, payload, header)
    svc.aggregator.process_pending()
    svc.aggregator.process_pending()
    assert svc.current_number() == 0
    assert "before the deadline" in svc.list_rejections()[0].reasons[0]
    svc.close()


def test_a_refused_fold_is_retried_update_by_update(tmp_path: Path) -> None:
    svc = gated_service(
        tmp_path, evaluator="tests.federation.evaluators:TowardsTarget", validation_margin=1e-4
    )
    node = enrol(svc)
    towards = {k: v for k, v in target().items() if not k.startswith("heads.spleen")}
    away = {k: v - 0.5 for k, v in small_model().items() if not k.startswith("heads.spleen")}
    good, bad = send(svc, node, towards), send(svc, node, away)
    assert svc.aggregator.process_pending() == [1]
    assert svc.generation(1).update_ids == (good.update_id,)
    (rejection,) = svc.list_rejections()
    assert rejection.update_id == bad.update_id and "validation score" in rejection.reasons[0]
    svc.close()


def test_federated_evaluation_refuses_a_candidate_that_harms_one_site(tmp_path: Path) -> None:
    # The paired mean rises (+0.04 on 30 cases, -0.05 on 10), but site 1 loses 0.05.
    svc = gated_service(tmp_path, federated_evaluation=True, min_evaluations=3)
    nodes = [enrol(svc, f"site{i}") for i in range(3)]
    payload, header = make_update(small_model())
    upload(svc, nodes[0], payload, header)
    svc.aggregator.process_pending()
    (task,) = svc.fetch_evaluation_tasks(nodes[0])
    figures = [(0.84, 0.80, 30), (0.75, 0.80, 10), (0.70, 0.80, 1)]
    for node, (candidate, reference, cases) in zip(nodes, figures, strict=True):
        assert svc.submit_evaluation_result(node, task.task_id, candidate, reference, cases)
    svc.aggregator.process_pending()
    assert svc.current_number() == 0
    assert svc.generation(task.candidate_generation).status == "REJECTED"
    reasons = " | ".join(svc.list_rejections()[0].reasons)
    assert f"site {nodes[1]}: 0.8000 -> 0.7500 on 10 held-out case(s)" in reasons
    # One case is too small to judge: reported as such, not counted as the harm.
    assert f"site {nodes[2]}: 0.8000 -> 0.7000 on 1 held-out case(s), too small" in reasons
    assert "below the current" not in reasons
    svc.close()


def test_an_operator_rollback_during_a_merge_is_not_undone_by_it(service: HubService) -> None:
    """The operator's rollback does not wait for a merge: a merge made on the generation
    rolled back is dropped, and its update refused as off the lineage, never published
    over the rollback."""
    node = enrol(service)
    upload(service, node, *make_update(small_model()))
    assert service.aggregator.process_pending() == [1]
    payload, header = make_update(service.generation_tensors(1), seed=2)
    header = replace(header, base_generation=1)  # trained on generation 1
    upload(service, node, payload, header)
    gate = service.aggregator.gate
    check = gate.check_candidate

    def rolled_back_meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        gate.check_candidate = check
        service.rollback()  # to generation 0, while generation 1 is merged on
        return check(*args, **kwargs)

    gate.check_candidate = rolled_back_meanwhile  # type: ignore[method-assign]
    assert service.aggregator.process_pending() == []
    assert service.current_number() == 0
    assert service.generation(1).status == "ROLLED_BACK"
    (rejection,) = service.list_rejections()
    assert rejection.update_id == header.update_id
    assert "not in the lineage" in rejection.reasons[0]
    with service.store.session() as s:  # the blobs are generations and updates
        named = {*s.scalars(select(GenerationRow.sha256)), *s.scalars(select(UpdateRow.sha256))}
    kept = {p.name for p in service.blobs.root.glob("??/*") if not p.name.startswith(".")}
    assert kept == named  # the dropped merge's file is not left behind


def test_a_candidate_accepted_after_a_rollback_is_not_published_and_its_update_waits(
    tmp_path: Path,
) -> None:
    svc = gated_service(tmp_path, federated_evaluation=True, min_evaluations=1)
    node = enrol(svc, "site")
    upload(svc, node, *make_update(small_model()))
    assert svc.aggregator.process_pending() == []
    (task,) = svc.fetch_evaluation_tasks(node)
    with pytest.raises(FailedPrecondition, match="candidate"):
        svc.promote(task.candidate_generation)  # the nodes' verdict decides, not promote
    # The operator publishes another generation (here: promotes 0 again, a new notice)
    # while the candidate built on 0 is evaluated; then it is accepted.
    with svc.store.session() as session:
        svc.ledger.publish(session, NewGeneration(0, svc.generation(0).sha256,
                                                  svc.generation(0).size_bytes,
                                                  MODEL_CONFIG, "operator"))
    moved_to = svc.current_number()
    assert moved_to not in (0, task.candidate_generation)
    assert svc.submit_evaluation_result(node, task.task_id, 0.9, 0.8, 10)
    svc.aggregator.process_pending()
    candidate = svc.generation(task.candidate_generation)
    assert candidate.status == "REJECTED" and "moved" in (candidate.notes or "")
    assert svc.current_number() != task.candidate_generation
    assert svc.list_rejections() == []  # not refused: merged again, on the new current
    (again,) = svc.fetch_evaluation_tasks(node)
    assert svc.generation(again.candidate_generation).parent == moved_to
    svc.close()


def test_a_candidate_whose_parent_is_no_longer_current_is_not_left_to_the_nodes(
    tmp_path: Path,
) -> None:
    """The operator moves the pointer while a candidate waits for federated evaluation:
    the nodes are not asked to judge it (settle could never publish it); its updates are
    merged again on the new current generation."""
    svc = gated_service(tmp_path, federated_evaluation=True, min_evaluations=1)
    node = enrol(svc, "site")
    upload(svc, node, *make_update(small_model()))
    assert svc.aggregator.process_pending() == []
    (task,) = svc.fetch_evaluation_tasks(node)
    with svc.store.session() as session:
        svc.ledger.publish(session, NewGeneration(0, svc.generation(0).sha256,
                                                  svc.generation(0).size_bytes,
                                                  MODEL_CONFIG, "operator"))
    moved_to = svc.current_number()
    svc.aggregator.process_pending()  # no node has answered
    stale = svc.generation(task.candidate_generation)
    assert stale.status == "REJECTED" and f"moved to {moved_to}" in (stale.notes or "")
    (again,) = svc.fetch_evaluation_tasks(node)
    assert again.task_id != task.task_id
    assert svc.generation(again.candidate_generation).parent == moved_to
    assert not svc.submit_evaluation_result(node, task.task_id, 0.9, 0.8, 10)
    assert svc.list_rejections() == []
    svc.close()
