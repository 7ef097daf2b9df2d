"""A site's own fine-tune of each hub generation, and the local rollback of one that is
worse here (dicom_node/pipeline/site_adaptation.py), with the shipped starter model on
phantom studies: a shifted site (C) serves its fine-tune of the generation and scores
better with it than with the generation as received; a generation that hurts site A's
held-out cases is rolled back, shown by `node status`, not downloaded again, and told
to a real hub over mTLS (`tessera hub site-checks`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from dicom_node.config import load_config
from dicom_node.learning.weights import load_model, model_to_bytes
from dicom_node.node import Node
from dicom_node.pipeline.flow import JobKind
from dicom_node.pipeline.hub_generations import known_hub_generation, serve_hub_generation
from dicom_node.pipeline.site_adaptation import ROLLED_BACK_EVENT, SITE_CHECK, rebase
from dicom_node.pipeline.trainer import IncrementalTrainer
from dicom_node.status import node_status, render_status
from dicom_node.store.models import (
    AuditEvent,
    ModelVersion,
    SampleState,
    UpdateOutboxItem,
)
from tests.corrections.helpers import TEST_MODEL, Study
from tests.deploy.conftest import subprocess_env
from tests.node.conftest import wait_until, write_node_config

from .conftest import (
    federated_node_data,
    node_tls,
    seed_update,
    serving,
    starter_as_test_model,
    write_sample,
)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped starter under the test model's name (hub and nodes start from it)."""
    return starter_as_test_model(tmp_path_factory.mktemp("starter"))


def _node(tmp_path: Path, data: dict[str, Any]) -> Node:
    return Node(load_config(write_node_config(tmp_path / "node.toml", data), env={}))


def _sample(node: Node, study: Study, state: str, every: int = 2) -> None:
    """A corrected case as the correction intake keeps it (trained or held out)."""
    _, config = node.parts.models.get(TEST_MODEL)
    write_sample(node.parts.db, node.config.node.data_dir, config, study, state, every)


def _harmful(model_file: Path) -> bytes:
    """The starter with its liver and spleen heads swapped."""
    model, config = load_model(model_file)
    state = model.state_dict()
    swapped = [k for k in state if k.startswith("heads.liver.")]
    assert swapped
    for key in swapped:
        other = key.replace("heads.liver.", "heads.spleen.")
        state[key], state[other] = state[other].clone(), state[key].clone()
    model.load_state_dict(state)
    return model_to_bytes(model, config)


def _adapt_jobs(node: Node) -> list[dict[str, Any]]:
    from dicom_node.store.models import Job

    with node.parts.db.session() as s:
        return [j.payload for j in s.execute(select(Job).where(
            Job.kind == JobKind.ADAPT.value)).scalars()]


def _versions(node: Node) -> dict[int, ModelVersion]:
    with node.parts.db.session() as s:
        rows = list(s.execute(select(ModelVersion)).scalars())
        for row in rows:
            s.expunge(row)
    return {r.generation: r for r in rows}


def _adapter(node: Node) -> Any:
    from dicom_node.pipeline.site_adaptation import GenerationAdapter

    return next(h for h in node.parts.handlers if isinstance(h, GenerationAdapter))


def test_rebase_carries_the_sites_change_to_the_new_generation(model_file: Path) -> None:
    base, config = load_model(model_file)
    served, _ = load_model(model_file)
    generation, _ = load_model(model_file)
    key = "heads.liver.conv.weight" if "heads.liver.conv.weight" in base.state_dict() else next(
        k for k in base.state_dict() if k.startswith("heads.liver."))
    other = next(k for k in base.state_dict() if k.startswith("encoder."))
    with torch.no_grad():
        served.state_dict()[key].add_(0.25)  # what the site learned
        generation.state_dict()[other].add_(-0.5)  # what the hub merged meanwhile
    out = rebase(generation, config, served, base).state_dict()
    b = base.state_dict()
    torch.testing.assert_close(out[key], b[key] + 0.25)
    torch.testing.assert_close(out[other], b[other] - 0.5)
    assert generation.state_dict()[key].equal(b[key])  # the generation itself untouched


def test_a_shifted_site_serves_its_fine_tune_of_a_hub_generation(
    tmp_path: Path, model_file: Path
) -> None:
    data = federated_node_data(tmp_path / "site", model_file, "127.0.0.1:1", insecure=True,
                               adapt_epochs=4, adapt_time_budget_s=60)
    node = _node(tmp_path, data)
    try:
        for i in range(3):
            _sample(node, Study("C", i, seed=11), SampleState.TRAINED)
        _sample(node, Study("C", 7, seed=11), SampleState.HELD_OUT, every=3)
        serve_hub_generation(node.parts.db, node.parts.models, TEST_MODEL,
                             model_file.read_bytes(), generation=1, parent=0,
                             config_json="", models_dir=tmp_path / "site" / "models",
                             adapt_queue=node.parts.queue)
        assert _adapt_jobs(node) == [{"model": TEST_MODEL, "generation": 1, "previous": -1}]

        check = _adapter(node).adapt(TEST_MODEL, 1, -1)
        assert check is not None and check.adapted and not check.rolled_back
        print(check.verdict)
        # The site gains from its own corrections on top of the hub's generation.
        assert check.scores["adapted"] > check.scores["generation"] + 0.02, check
        versions = _versions(node)
        adapted = versions[check.served]
        assert (adapted.origin, adapted.parent_generation, adapted.state) == (
            "adapted", 1, "serving")
        assert versions[1].state == "retired"
        assert versions[1].metrics[SITE_CHECK]["served"] == check.served
        assert node.parts.models.get(TEST_MODEL)[1].generation == check.served
        # What the site learns next is sent against the hub generation it descends from.
        assert known_hub_generation(node.parts.db, TEST_MODEL) == 1
        # A retry of the job (a crash after the commit) changes nothing.
        assert _adapter(node).adapt(TEST_MODEL, 1, -1) is None
        _sends_a_round_from_the_generation(node, Path(versions[1].path))
    finally:
        node.parts.db.dispose()


def _sends_a_round_from_the_generation(node: Node, generation_path: Path) -> None:
    """A round from the adapted version serves as trained; the update for the hub is a
    round trained from generation 1 itself on the same corrections (pipeline.round_update):
    neither the fine-tune again nor the round's tiny change alone."""
    adapted, _ = node.parts.models.get(TEST_MODEL)
    _sample(node, Study("C", 3, seed=11), SampleState.PENDING)
    trainer = next(h for h in node.parts.handlers if isinstance(h, IncrementalTrainer))
    version = trainer.train(TEST_MODEL)
    assert version is not None and version.state == "serving", version
    trained, _ = node.parts.models.get(TEST_MODEL)
    with node.parts.db.session() as s:
        item = s.execute(select(UpdateOutboxItem)).scalar_one()
        assert item.base_generation == version.parent_generation
    assert item.meta["trained_from"] == "hub generation"
    assert item.meta["num_samples"] == "4"  # the new correction and the 3 replayed
    sent = load_file(item.path)
    generation, _ = load_model(generation_path)
    g, a, t = (m.state_dict() for m in (generation, adapted, trained))

    def distance(x: dict[str, torch.Tensor], keys: list[str]) -> float:
        return sum(float((sent[k] - x[k]).norm()) for k in keys)

    encoder = [k for k in sent if k.startswith("encoder.") and g[k].is_floating_point()]
    assert encoder and distance(g, encoder) < distance(a, encoder), "not trained from g"
    assert not all(sent[k].equal(g[k]) for k in sent), "it learned nothing"
    assert not all(sent[k].equal(t[k]) for k in sent), "the served round was sent"


def test_a_generation_worse_here_is_rolled_back_and_not_fetched_again(
    tmp_path: Path, model_file: Path
) -> None:
    data = federated_node_data(tmp_path / "site", model_file, "127.0.0.1:1", insecure=True)
    node = _node(tmp_path, data)
    db = node.parts.db
    try:
        _sample(node, Study("A", 3, seed=5), SampleState.HELD_OUT, every=3)
        serve_hub_generation(db, node.parts.models, TEST_MODEL, model_file.read_bytes(),
                             generation=1, parent=0, config_json="",
                             models_dir=tmp_path / "site" / "models",
                             adapt_queue=node.parts.queue)
        first = _adapter(node).adapt(TEST_MODEL, 1, -1)
        assert first is not None and not first.adapted  # nothing trained here: as received
        serve_hub_generation(db, node.parts.models, TEST_MODEL, _harmful(model_file),
                             generation=2, parent=1, config_json="",
                             models_dir=tmp_path / "site" / "models",
                             adapt_queue=node.parts.queue)
        assert _adapt_jobs(node)[-1] == {"model": TEST_MODEL, "generation": 2, "previous": 1}

        check = _adapter(node).adapt(TEST_MODEL, 2, 1)
        assert check is not None and check.rolled_back and check.served == 1, check
        print(check.verdict)
        assert check.scores["generation"] < check.scores["previous"] - 0.1, check
        assert serving(node.config.node.resolved_database_url()) == (1, "hub")
        assert node.parts.models.get(TEST_MODEL)[1].generation == 1
        # The rolled-back generation counts as known: the watch does not fetch it again.
        assert known_hub_generation(db, TEST_MODEL) == 2
        with db.session() as s:
            [event] = s.execute(select(AuditEvent).where(
                AuditEvent.kind == ROLLED_BACK_EVENT)).scalars()
            assert "hub generation 2 rolled back" in event.reason
        text = render_status(node_status(db))
        assert ROLLED_BACK_EVENT in text and "hub generation 2 rolled back" in text
    finally:
        db.dispose()


def test_a_rollback_reaches_the_hub_over_mtls(
    tmp_path: Path, start_hub: Any, certs: Any, model_file: Path
) -> None:
    """A harmful update merged Dafne-style (0.5 x the upload) makes generation 1; the
    node with held-out site-A cases rolls it back and the hub lists that."""
    hub = start_hub(gate={"max_relative_update_norm": 1e6},
                    aggregation={"strategy": "dafne"})
    data = federated_node_data(tmp_path / "site", model_file, hub.target, token=hub.token(),
                               tls=node_tls(certs), metrics_interval_s=0.3)
    node = _node(tmp_path, data)
    url = node.config.node.resolved_database_url()
    _sample(node, Study("A", 4, seed=5), SampleState.HELD_OUT, every=3)
    node.start()
    try:
        seed_update(url, model_file, node.config.node.data_dir, step=0.5)
        wait_until(lambda: hub.current() >= 1, timeout=60, what="hub generation 1")
        wait_until(lambda: any(r.values.get("rolled_back") == 1.0 for _, r in
                               hub.service.metric_records("site-check")),
                   timeout=120, what="the site's rollback at the hub")
        assert serving(url) in ((0, "configured"), (0, "hub"))  # generation 0 again
        # (generation 0 may have a record too: it is served, then checked, as received)
        [(node_id, record)] = [(n, r) for n, r in hub.service.metric_records("site-check")
                               if r.generation == 1]
        assert node_id == node.parts.federation.node_id
        assert record.values["held_out.generation"] < record.values["held_out.previous"]
        # A crash between the report and the cursor's save: the next report sends the
        # records again, and the hub holds each once.
        agent = node.parts.federation
        (agent.dir / "metrics-cursor.json").unlink()
        assert agent.report_metrics() >= 1
        held = [r.key for n, r in hub.service.metric_records() if n == node_id]
        assert record.key in held and len(held) == len(set(held)), held
    finally:
        node.stop()

    config = hub.service.config  # the admin command reads the same database
    toml = tmp_path / "hub.toml"
    toml.write_text(f'[hub]\ndata_dir = "{config.data_dir}"\n')
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "tessera"), "hub", "site-checks",
         "--rolled-back", "--config", str(toml)],
        capture_output=True, text=True, timeout=120, env=subprocess_env(COLUMNS="200"))
    assert shown.returncode == 0, shown.stderr
    assert "ROLLED BACK" in shown.stdout and node_id[:8] in shown.stdout, shown.stdout
