"""Node configuration: one TOML file plus ``TESSERA_`` environment overrides.

Every section is a frozen pydantic model with unknown keys forbidden, so a typo fails
at start-up with the dotted name of the key (``dicom.port: ...``). The sections live
beside this module: :mod:`.sections` (node, DICOM, assembler, jobs, export,
destinations, rules, inference, HTTP), :mod:`.learning` (``[learning]`` with its
``round`` and ``rehearsal`` policies), :mod:`.federation`; :mod:`.example` is the
documented file ``tessera node init`` writes. Each stage of the node is handed only
the sections it uses.

Environment overrides use ``TESSERA_<SECTION>__<KEY>=value`` (double underscore
between levels), e.g. ``TESSERA_DICOM__PORT=11113`` or
``TESSERA_LEARNING__ROUND__EPOCHS=3``. Values are parsed as TOML literals when they
parse (numbers, booleans, arrays), else taken as strings.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError, model_validator

from dicom_node.config.example import EXAMPLE_CONFIG
from dicom_node.config.federation import FederationSettings
from dicom_node.config.learning import (
    RENAMED_KEYS,
    LearningSettings,
    RehearsalSettings,
    RoundSettings,
)
from dicom_node.config.sections import (
    AssemblerSettings,
    Destination,
    DicomSettings,
    ExportSettings,
    HttpSettings,
    InferenceSettings,
    JobSettings,
    NodeSettings,
    PeerAllow,
    RoutingRule,
    RuleAction,
    RuleMatch,
    Section,
)
from dicom_node.errors import ConfigError

__all__ = [
    "ENV_PREFIX", "EXAMPLE_CONFIG", "RENAMED_KEYS", "AssemblerSettings", "Destination",
    "DicomSettings", "ExportSettings", "FederationSettings", "HttpSettings",
    "InferenceSettings", "JobSettings", "LearningSettings", "NodeConfig", "NodeSettings",
    "PeerAllow", "RehearsalSettings", "RoundSettings", "RoutingRule", "RuleAction",
    "RuleMatch", "load_config",
]

ENV_PREFIX = "TESSERA_"


class NodeConfig(Section):
    node: NodeSettings = NodeSettings()
    dicom: DicomSettings = DicomSettings()
    assembler: AssemblerSettings = AssemblerSettings()
    jobs: JobSettings = JobSettings()
    export: ExportSettings = ExportSettings()
    destinations: dict[str, Destination] = {}
    rules: tuple[RoutingRule, ...] = ()
    # Extra models by name -> weights file (safetensors + JSON beside it). The shipped
    # starter model is always available under its own name.
    models: dict[str, Path] = {}
    inference: InferenceSettings = InferenceSettings()
    learning: LearningSettings = LearningSettings()
    http: HttpSettings = HttpSettings()
    federation: FederationSettings = FederationSettings()

    @model_validator(mode="after")
    def _destinations_exist(self) -> Self:
        names = set()
        for i, rule in enumerate(self.rules):
            if rule.name in names:
                raise ValueError(f"rules[{i}].name: duplicate rule name {rule.name!r}")
            names.add(rule.name)
            for dest in rule.destinations:
                if dest not in self.destinations:
                    raise ValueError(
                        f"rules[{i}].destinations: unknown destination {dest!r} "
                        f"(define [destinations.{dest}])"
                    )
        return self

    @property
    def files_dir(self) -> Path:
        return self.node.data_dir / "instances"

    @property
    def quarantine_dir(self) -> Path:
        return self.node.data_dir / "quarantine"

    @property
    def built_models_dir(self) -> Path:
        """Models this node builds itself (``tessera model bootstrap --data mr``):
        ``<data_dir>/models/<name>/model.safetensors``."""
        return self.node.data_dir / "models"


def _format_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg}")
    return "invalid configuration: " + "; ".join(lines)


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        target = data
        for part in path[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"invalid configuration: {name} overrides a non-table key")
            target = nxt
        target[path[-1]] = _parse_env_value(raw)


def load_config(
    path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Load the node configuration.

    Precedence, lowest first: built-in defaults, the TOML file, ``TESSERA_*``
    environment variables, then ``overrides`` (command-line flags) given as
    ``{"dicom.port": 11113}``.

    Raises
    ------
    ConfigError
        The file is missing or not TOML, or a key is unknown or has a bad value;
        the message names the key.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file not found: {p}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from exc
    _apply_env(data, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        target = data
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    try:
        return NodeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
