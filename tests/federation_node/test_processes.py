"""A hub and three nodes as real processes (`tessera hub serve`, `tessera node serve`)
on loopback with mutual TLS: updates -> generations -> every node serves the new one;
the hub down while updates are produced -> they wait, then arrive exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from federation_grpc.hub.service import HubService
from tests.federation.hubproc import HubProcess
from tests.node.conftest import node_process, status_json, wait_until, write_node_config  # noqa: F401

from .conftest import federated_node_data, outbox, seed_update, serving
from .processes import UNPUBLISHED, hub_cli, hub_with_model, make_site_certs


def _generation_updates(svc: HubService) -> list[str]:
    """The updates merged into published generations (a candidate waiting for
    federated evaluation lists the updates it holds, not merged yet)."""
    return [u for g in svc.list_generations() if g.status not in UNPUBLISHED
            for u in g.update_ids]


def test_three_node_processes_follow_the_hub_generations(
    tmp_path: Path, node_process: Any, model_file: Path  # noqa: F811
) -> None:
    certs = make_site_certs(tmp_path / "certs", 3)
    config, svc = hub_with_model(tmp_path, certs, model_file)
    hub = HubProcess(config, tmp_path / "hub.log")
    sites = []
    try:
        for i in range(3):
            token = hub_cli("enrol", "--config", str(config)).strip()
            data_dir = tmp_path / f"site{i}"
            data = federated_node_data(data_dir, model_file, f"127.0.0.1:{hub.port}",
                                       token=token,
                                       tls=(certs["ca"], *certs[f"site{i}"]))
            path = write_node_config(tmp_path / f"site{i}.toml", data)
            sites.append((path, data_dir, f"sqlite:///{(data_dir / 'node.db').resolve()}"))
        for path, _, _ in sites:
            node_process(path)
        assert len(hub_cli("nodes", "--config", str(config)).split("site")) > 1

        # Site 0 learns something: generation 1, served by all three.
        seed_update(sites[0][2], model_file, sites[0][1], seed=1)
        wait_until(lambda: svc.require_current().number == 1, timeout=60,
                   what="hub generation 1")
        for _, _, url in sites:
            wait_until(lambda u=url: serving(u) == (1, "hub"), timeout=60,
                       what="every node serving generation 1")

        # Sites 1 and 2 learn from generation 1; the hub merges both; all follow.
        ids = [seed_update(url, model_file, d, base=1, seed=10 + k)
               for k, (_, d, url) in enumerate(sites[1:])]
        wait_until(lambda: len(_generation_updates(svc)) == 3, timeout=90,
                   what="all three updates merged")
        current = svc.require_current().number
        assert current >= 2
        for _, _, url in sites:
            wait_until(lambda u=url: serving(u) == (current, "hub"), timeout=60,
                       what=f"every node serving generation {current}")
        status = status_json(sites[1][0])
        assert status["update_outbox"]["counts"] == {"sent": 1}
        serving_rows = [v for v in status["learning"]["model_versions"]
                        if v["state"] == "serving"]
        assert [(v["generation"], v["origin"]) for v in serving_rows] == [(current, "hub")]
        assert len(ids) == 2 and all(o[1] == "sent" for _, _, u in sites for o in outbox(u))
    finally:
        hub.stop()
        svc.close()


def test_updates_made_while_the_hub_is_down_arrive_once_it_is_back(
    tmp_path: Path, node_process: Any, model_file: Path  # noqa: F811
) -> None:
    certs = make_site_certs(tmp_path / "certs", 1)
    config, svc = hub_with_model(tmp_path, certs, model_file)
    hub = HubProcess(config, tmp_path / "hub.log")
    port = hub.port
    token = hub_cli("enrol", "--config", str(config)).strip()
    data_dir = tmp_path / "site0"
    url = f"sqlite:///{(data_dir / 'node.db').resolve()}"
    data = federated_node_data(data_dir, model_file, f"127.0.0.1:{port}", token=token,
                               tls=(certs["ca"], *certs["site0"]))
    node_process(write_node_config(tmp_path / "site0.toml", data))
    try:
        wait_until(lambda: (data_dir / "federation" / "credentials.json").exists(),
                   timeout=60, what="enrolment")
        hub.kill()
        ids = [seed_update(url, model_file, data_dir, seed=20 + k) for k in range(2)]
        # Offline: the rows stay pending, each attempt recorded with its error.
        rows = wait_until(lambda: [r for r in outbox(url) if r[2] >= 2 and r[3]],
                          timeout=60, what="failed delivery attempts")
        assert all(state == "pending" for _, state, _, _ in outbox(url)), rows
        assert any("unreachable" in (r[3] or "") or "UNAVAILABLE" in (r[3] or "")
                   for r in rows), rows
        hub = HubProcess(config, tmp_path / "hub.log", port=port)
        wait_until(lambda: all(r[1] == "sent" for r in outbox(url)), timeout=90,
                   what="delivery after the hub came back")
        wait_until(lambda: len(_generation_updates(svc)) == 2, timeout=60,
                   what="both updates merged")
        from dicom_node.federation import hub_update_id

        merged = _generation_updates(svc)
        node_id = json.loads((data_dir / "federation" / "credentials.json").read_text())[
            "node_id"]
        assert sorted(merged) == sorted(hub_update_id(node_id, u) for u in ids)  # once each
        assert len(set(merged)) == len(merged)
        wait_until(lambda: serving(url) == (svc.require_current().number, "hub"), timeout=60,
                   what="the node serving the newest generation")
    finally:
        hub.stop()
        svc.close()
