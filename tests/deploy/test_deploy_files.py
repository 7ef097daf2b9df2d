"""deploy/: the compose file against the vendored compose-spec schema (Docker has no
engine here), the Kubernetes manifests against minimal per-kind rules and their
cross-references, the systemd units' commands run for real, the example config."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dicom_node.config import EXAMPLE_CONFIG, load_config
from tests.deploy.conftest import PYTHON, REPO, subprocess_env

DEPLOY = REPO / "deploy"
SCHEMAS = Path(__file__).parent / "schemas"
TESSERA_BIN = "/opt/tessera/venv/bin/tessera"


# --------------------------------------------------------------------------- compose

REQUIRED = "required-value-from-env"


def _interpolate(text: str) -> str:
    """Compose variable interpolation as if no variable were set: ``${VAR:-default}``
    gives the default; a required ``${VAR:?message}`` gives ``REQUIRED`` (Compose would
    stop with the message)."""
    def value(match: re.Match[str]) -> str:
        if match.group(2) and "?" in match.group(2):
            return REQUIRED
        return match.group(3) or ""

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(_interpolate((DEPLOY / "compose.yaml").read_text())))


def test_compose_matches_the_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_services_volumes_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "hub", "node", "node-worker", "orthanc"):
        assert name in services, name
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
            elif source.startswith("./") and "vendor" not in source and "tls/out" not in source:
                assert (DEPLOY / source).exists(), f"{name}: missing {source}"
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert any("DICOM_WEB__ENABLE" in k for k in services["orthanc"]["environment"])


def test_compose_node_environment_overrides_are_real_keys(compose: dict[str, Any]) -> None:
    """Every TESSERA_<SECTION>__<KEY> the compose file sets is a key the node accepts."""
    node_toml = DEPLOY / "compose" / "node.toml"
    for name in ("node", "node-worker", "node-migrate"):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items()}
        overrides = {k: v for k, v in env.items() if "__" in k}
        assert overrides
        config = load_config(node_toml, env=overrides)
        assert config.node.database_url.startswith("postgresql+psycopg://")
    node_env = compose["services"]["node"]["environment"]
    assert load_config(node_toml, env=node_env).dicom.host == "0.0.0.0"


def test_compose_has_no_default_database_password(compose: dict[str, Any]) -> None:
    raw = (DEPLOY / "compose.yaml").read_text()
    hub_toml = DEPLOY / "compose" / "hub.toml"
    for text in (raw, hub_toml.read_text()):
        assert "tessera:tessera" not in text
    uses = re.findall(r"\$\{POSTGRES_PASSWORD([^}]*)\}", raw)
    assert len(uses) >= 3 and all(u.startswith(":?") for u in uses), uses
    postgres = compose["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == REQUIRED
    from federation_grpc.hub.config import load_config as load_hub

    assert load_hub(hub_toml, env={}).database_url == "", "no password in the file"
    for name in ("hub", "hub-migrate"):
        env = {k: str(v) for k, v in compose["services"][name]["environment"].items()}
        url = load_hub(hub_toml, env=env).database_url
        assert url == f"postgresql+psycopg://tessera:{REQUIRED}@postgres/tessera_hub", name


def test_compose_publishes_on_loopback_and_hub_metrics_stay_inside(
    compose: dict[str, Any],
) -> None:
    published = [(name, port) for name, service in compose["services"].items()
                 for port in service.get("ports", [])]
    assert {name for name, _ in published} >= {"hub", "node", "orthanc"}
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
    from federation_grpc.hub.config import load_config as load_hub

    hub = load_hub(DEPLOY / "compose" / "hub.toml", env={})
    assert hub.metrics.enabled and hub.metrics.host == "127.0.0.1"
    healthcheck = " ".join(compose["services"]["hub"]["healthcheck"]["test"])
    assert f"127.0.0.1:{hub.metrics.port}/healthz" in healthcheck


# --------------------------------------------------------------------------- kubernetes

def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_k8s_manifests_have_the_required_fields() -> None:
    schema = json.loads((SCHEMAS / "k8s-minimal.json").read_text())
    docs = _manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim",
            "Job"} <= kinds
    for doc in docs:
        jsonschema.validate(doc, schema)
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]


def test_k8s_references_resolve() -> None:
    docs = _manifests()
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod_labels = [d["spec"]["template"]["metadata"].get("labels", {}) for d in docs
                  if d["kind"] == "Deployment"]
    kustomized = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomized["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml")
    for doc in docs:
        if doc["kind"] == "Service":
            selector = doc["spec"]["selector"]
            assert any(selector.items() <= lab.items() for lab in pod_labels), doc
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim",
                        volume["persistentVolumeClaim"]["claimName"]) in names
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = next(d for d in docs if d["kind"] == "Secret"
                                  and d["metadata"]["name"] == ref["name"])
                    assert ref["key"] in secret["stringData"]
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in pod.get("volumes", [])}
    hub_service = next(d for d in docs if d["kind"] == "Service"
                       and d["metadata"]["name"] == "tessera-hub")
    assert hub_service["spec"]["clusterIP"] == "None", "gRPC needs a headless Service"
    hub = next(d for d in docs if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "tessera-hub")
    assert hub["spec"]["replicas"] > 1


def test_k8s_configmap_node_config_loads(tmp_path: Path) -> None:
    maps = {d["metadata"]["name"]: d for d in _manifests() if d["kind"] == "ConfigMap"}
    node_toml = tmp_path / "node.toml"
    node_toml.write_text(maps["tessera-node-config"]["data"]["node.toml"])
    assert load_config(node_toml, env={}).http.enabled
    hub_toml = tmp_path / "hub.toml"
    hub_toml.write_text(maps["tessera-hub-config"]["data"]["hub.toml.in"].replace(
        "@HUB_DATABASE_URL@", "postgresql+psycopg://u@h/db"))
    from federation_grpc.hub.config import load_config as load_hub

    assert load_hub(hub_toml).metrics.enabled


# --------------------------------------------------------------------------- systemd

HARDENING = ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
             "ReadWritePaths", "User", "CapabilityBoundingSet", "RestrictAddressFamilies")


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def _tessera(argv: list[str], config: Path) -> list[str]:
    """The unit's command for this checkout: tessera -> python -m viewer_bridge.main and
    --config -> a test config."""
    assert argv[0] == TESSERA_BIN, argv
    args = list(argv[1:])
    if "--config" in args:
        args[args.index("--config") + 1] = str(config)
    return [PYTHON, "-m", "viewer_bridge.main", *args]


@pytest.mark.parametrize("unit", ["tessera-node.service", "tessera-node-worker@.service",
                                  "tessera-hub.service"])
def test_systemd_unit_commands_run(unit: str, tmp_path: Path) -> None:
    parser = _unit(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    for key in HARDENING:
        assert key in service, f"{unit}: no {key}"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    is_hub = "hub" in unit
    config = tmp_path / ("hub.toml" if is_hub else "node.toml")
    init = subprocess.run([PYTHON, "-m", "viewer_bridge.main", "hub" if is_hub else "node",
                           "init", str(config)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=subprocess_env())
    assert init.returncode == 0, init.stderr
    text = config.read_text()
    text = text.replace('"var/hub"', json.dumps(str(tmp_path / "hub"))).replace(
        '"var/node"', json.dumps(str(tmp_path / "node")))
    config.write_text(text)
    for key in ("ExecStartPre", "ExecStart"):
        if key not in service:
            continue
        argv = _tessera(shlex.split(service[key]), config)
        if "migrate" in argv:  # runs for real against the test config
            ran = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                 cwd=tmp_path, env=subprocess_env())
            assert ran.returncode == 0, ran.stderr
            assert json.loads(ran.stdout.splitlines()[-1])["to"] is not None
        else:  # a long-running command: its --help must know every option used
            ran = subprocess.run([*argv, "--help"], capture_output=True, text=True,
                                 timeout=120, cwd=tmp_path,
                                 env=subprocess_env(COLUMNS="200"))
            assert ran.returncode == 0, ran.stderr
            for option in (a for a in argv if a.startswith("--")):
                assert option in ran.stdout, f"{unit}: {option} unknown to {argv[3:5]}"


# --------------------------------------------------------------------------- example config

def test_example_routing_config_is_init_output_plus_rules() -> None:
    text = (DEPLOY / "node.example.toml").read_text()
    assert text.startswith(EXAMPLE_CONFIG), "regenerate it from `tessera node init`"
    config = load_config(DEPLOY / "node.example.toml", env={})
    assert len(config.rules) >= 4
    assert {a for r in config.rules for a in [r.action.value]} == {"segment", "forward"}
    assert any(r.match.series_description for r in config.rules)
