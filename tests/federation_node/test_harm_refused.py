"""Issue 21: a hub and three nodes as real processes under mutual TLS, with the hub's
defaults (federated evaluation "auto"). Each node holds two held-out corrected cases of
its own and answers the hub's evaluation tasks. A harmful update from one node (its
encoder scrambled; the norm gate opened so that the harm reaches the evaluation) makes a
candidate the sites score lower: it is refused, naming a site and its two figures, in
`tessera hub rejections`, and the current generation stays. The other nodes' good
updates still merge and every node serves their generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.learning.weights import load_model
from dicom_node.store.db import Database
from dicom_node.store.models import SampleState
from federation_grpc.hub.store import EvaluationResultRow
from tests.corrections.helpers import Study
from tests.federation.hubproc import HubProcess
from tests.node.conftest import node_process, wait_until, write_node_config  # noqa: F401

from .conftest import (
    federated_node_data,
    seed_update,
    serving_base,
    starter_as_test_model,
    write_sample,
)
from .processes import UNPUBLISHED, hub_cli, hub_with_model, make_site_certs

# Structural checks open: this test is about what federated evaluation catches.
GATE = "[gate]\nmax_relative_update_norm = 1000000.0\n"


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return starter_as_test_model(tmp_path_factory.mktemp("starter"))


def _site(tmp_path: Path, i: int, hub: str, token: str, certs: dict[str, Any],
          model_file: Path) -> tuple[Path, Path, str]:
    """Site ``i``'s config, data dir and database, with two held-out cases of its own."""
    data_dir = tmp_path / f"site{i}"
    data = federated_node_data(data_dir, model_file, hub, token=token,
                               tls=(certs["ca"], *certs[f"site{i}"]))
    config = write_node_config(tmp_path / f"site{i}.toml", data)
    url = f"sqlite:///{(data_dir / 'node.db').resolve()}"
    _, model_config = load_model(model_file)
    db = Database(url)
    try:
        db.create_schema()
        for k in range(2):
            write_sample(db, data_dir, model_config, Study("A", 10 * i + k, seed=7, slices=16),
                         SampleState.HELD_OUT, every=3)
    finally:
        db.dispose()
    return config, data_dir, url


def _evaluators(svc: Any) -> int:
    with svc.store.session() as s:
        return len(svc.evaluations.evaluators(s, 600))


def _answers(svc: Any, candidate: int) -> list[EvaluationResultRow]:
    from federation_grpc.hub.store import EvaluationTaskRow

    with svc.store.session() as s:
        rows = list(s.execute(select(EvaluationResultRow).join(
            EvaluationTaskRow, EvaluationTaskRow.task_id == EvaluationResultRow.task_id).where(
            EvaluationTaskRow.candidate_generation == candidate)).scalars())
        s.expunge_all()
        return rows


def test_a_harmful_update_is_refused_by_federated_evaluation_and_good_ones_merge(
    tmp_path: Path, node_process: Any, starter: Path  # noqa: F811
) -> None:
    certs = make_site_certs(tmp_path / "certs", 3)
    config, svc = hub_with_model(tmp_path, certs, starter, GATE)
    hub = HubProcess(config, tmp_path / "hub.log")
    try:
        sites = [_site(tmp_path, i, f"127.0.0.1:{hub.port}",
                       hub_cli("enrol", "--config", str(config)).strip(), certs, starter)
                 for i in range(3)]
        for path, _, _ in sites:
            node_process(path)
        wait_until(lambda: _evaluators(svc) == 3, timeout=90, what="three evaluating nodes")

        harmful = seed_update(sites[0][2], starter, sites[0][1], step=1.0, seed=3)
        (rejection,) = wait_until(lambda: svc.list_rejections(), timeout=180,
                                  what="the harmful update refused")
        assert svc.require_current().number == 0
        candidate = rejection.candidate_generation
        assert candidate > 0 and svc.generation(candidate).status == "REJECTED"
        answers = _answers(svc, candidate)
        assert len(answers) == 3 and all(a.num_cases == 2 for a in answers)
        assert all(a.candidate_score < a.reference_score - 0.005 for a in answers)
        harmed = [r for r in rejection.reasons if r.startswith("site node-")]
        assert len(harmed) == 3 and "more than the margin 0.0050" in harmed[0]
        shown = " ".join(hub_cli("rejections", "--config", str(config)).split())
        assert "gate" in shown and "more than the margin" in shown, shown
        assert harmful  # the node's own id; the hub's id of it is rejection.update_id

        good = [seed_update(url, starter, d, step=1e-4, seed=10 + k)
                for k, (_, d, url) in enumerate(sites[1:])]
        wait_until(lambda: len([u for g in svc.list_generations()
                                if g.status not in UNPUBLISHED for u in g.update_ids]) == 2,
                   timeout=180, what="both good updates merged")
        current = svc.require_current().number
        assert current > candidate
        assert len(svc.list_rejections()) == 1 and len(good) == 2
        for _, _, url in sites:
            wait_until(lambda u=url: serving_base(u) == current, timeout=120,
                       what=f"every node serving generation {current}")
    finally:
        hub.stop()
        svc.close()
