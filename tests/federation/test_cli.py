"""``tessera hub`` commands against a hub database."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save
from typer.testing import CliRunner

from federation_grpc.hub.cli import hub_app
from federation_grpc.hub.config import load_config
from federation_grpc.hub.service import HubService

from .conftest import ALL_GROUPS, MODEL_CONFIG, header_for, nudged, small_model, upload

runner = CliRunner(env={"COLUMNS": "300"})


def test_operator_workflow(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    assert runner.invoke(hub_app, ["init", str(config)]).exit_code == 0
    text = config.read_text().replace('data_dir = "var/hub"', f'data_dir = "{tmp_path / "data"}"')
    config.write_text(text)
    assert load_config(config).aggregation.strategy == "delta"
    weights, model_json = tmp_path / "model.safetensors", tmp_path / "model.json"
    weights.write_bytes(save(small_model()))
    model_json.write_text(MODEL_CONFIG)
    result = runner.invoke(
        hub_app,
        [
            "init-model",
            "--weights",
            str(weights),
            "--config",
            str(model_json),
            "--hub-config",
            str(config),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(hub_app, ["enrol", "--config", str(config)])
    assert result.exit_code == 0, result.output
    token = result.stdout.splitlines()[0].strip()

    svc = HubService(load_config(config))
    node = svc.enrol(token, "Hospital A").node_id
    good = save(nudged(small_model(), ALL_GROUPS))
    upload(svc, node, good, header_for(good, ALL_GROUPS))
    bad_tensors = nudged(small_model(), ALL_GROUPS)
    bad_tensors["encoder.conv1.bias"][:] = np.inf
    bad = save(bad_tensors)
    upload(svc, node, bad, header_for(bad, ALL_GROUPS))
    svc.aggregator.process_pending()
    svc.close()

    nodes = runner.invoke(hub_app, ["nodes", "--config", str(config)])
    assert node in nodes.output and "Hospital A" in nodes.output
    models = runner.invoke(hub_app, ["models", "--config", str(config)])
    assert "1 *" in models.output and node in models.output
    rejections = runner.invoke(hub_app, ["rejections", "--config", str(config)])
    assert "non-finite" in rejections.output
    assert runner.invoke(hub_app, ["rollback", "--config", str(config)]).exit_code == 0
    models = runner.invoke(hub_app, ["models", "--config", str(config)])
    assert "0 *" in models.output and "ROLLED_BACK" in models.output
    assert runner.invoke(hub_app, ["promote", "1", "--config", str(config)]).exit_code == 0
    missing = runner.invoke(hub_app, ["promote", "9", "--config", str(config)])
    assert missing.exit_code == 1 and "NotFound" in missing.output
    assert runner.invoke(hub_app, ["revoke", node, "--config", str(config)]).exit_code == 0
    certs = runner.invoke(hub_app, ["certs", str(tmp_path / "tls"), "--node", "a", "--node", "b"])
    assert certs.exit_code == 0, certs.output
    assert {p.name for p in (tmp_path / "tls").glob("*.pem")} == {
        "ca.pem",
        "hub.pem",
        "a.pem",
        "b.pem",
    }
    assert json.loads(MODEL_CONFIG)["architecture"] == "unet2d"
