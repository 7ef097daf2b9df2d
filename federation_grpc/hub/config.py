"""Hub configuration: one TOML file, read into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federation_grpc.errors import InvalidRequest

# Overrides [hub] database_url (keeps a database password out of the config file).
DATABASE_URL_ENV = "TESSERA_HUB_DATABASE_URL"

EXAMPLE_CONFIG = """\
# Tessera hub configuration (`tessera hub serve --config hub.toml`).

[hub]
# Address to listen on. Use 0.0.0.0 only with TLS configured below.
host = "127.0.0.1"
port = 50051
# Directory for the SQLite database, the blob store and partial uploads.
data_dir = "var/hub"
# SQLAlchemy URL; empty means sqlite in data_dir (WAL mode).
# For PostgreSQL: "postgresql+psycopg://tessera:PASSWORD@db/tessera", or leave it empty
# here and set TESSERA_HUB_DATABASE_URL in the environment (it takes precedence).
database_url = ""
# Worker threads serving RPCs; every open stream (watch, upload) holds one.
max_workers = 128
# sha256 (hex) of the admin token for the Admin RPCs; empty disables them.
admin_token_sha256 = ""

[tls]
# Mutual TLS: nodes must present a certificate signed by ca_cert.
# `tessera hub certs DIR` makes a CA, a hub certificate and node certificates.
ca_cert = "deploy/tls/out/ca.pem"
server_cert = "deploy/tls/out/hub.pem"
server_key = "deploy/tls/out/hub.key"

[limits]
# Largest update upload accepted (bytes).
max_update_bytes = 536870912
# Chunk size of model downloads (bytes).
download_chunk_bytes = 1048576
# Lifetime of one-time enrolment tokens (seconds).
enrolment_token_ttl_s = 86400
# Largest num_samples an update may declare; above it (or below 1) the upload is refused
# with INVALID_ARGUMENT and recorded in `tessera hub rejections`.
max_num_samples = 100000
# Concurrent RPCs and open streams (watch, upload, download) per node, counted by client
# certificate; the extra ones get RESOURCE_EXHAUSTED. Keep it well below max_workers so
# one node cannot starve the others. 0 disables.
max_calls_per_node = 16

[aggregation]
# delta (add each update's change from its own base generation on arrival, times
# server_lr and the staleness discount; the default), fedasync (mix each update in,
# weighted by samples and staleness), fedbuff (buffer K updates, apply their mean
# delta), fedavg, or dafne (Dafne's merge: 0.5 current + 0.5 update; for comparison).
# delta met issue 21's targets (benchmarks/federated_learning.py, README).
strategy = "delta"
# fedasync's mixing weight before the sample and staleness factors.
alpha = 0.8
# An update of n corrections mixes with weight alpha * n/(n + sample_halfpoint) *
# staleness discount, at most max_update_share: 1 gives one correction 0.4.
sample_halfpoint = 1.0
# Staleness discount (1 + generations behind) ** -staleness_exponent (delta, fedasync,
# fedbuff).
staleness_exponent = 0.5
# fedbuff/fedavg: updates per merge.
buffer_size = 3
# delta and fedbuff: the step applied is server_lr times the update's change.
server_lr = 1.0
# delta/fedasync under a burst: fold up to this many waiting updates (each with its own
# weight) into one generation, so the hub catches up instead of saving every step.
max_pending_fold = 32
# Robust weighting. No single update makes more than this share of a merge: fedasync
# caps its mixing weight (merged = (1-w) current + w update, w <= share); fedbuff and
# fedavg cap each update's normalised weight and renormalise the others (with fewer
# than 1/share updates in a group, they get equal shares). 1 disables the cap. delta
# weighs every update the same (server_lr x staleness), whatever num_samples it
# declares: its change is bounded by clip_norm and the gate's update norms instead.
max_update_share = 0.5
# Clip each update's change from its base generation to this L2 norm before merging
# (every strategy); 0 disables. The gate's max_update_norm refuses instead of clipping.
clip_norm = 0.0
# fedbuff/fedavg: per coordinate, drop this fraction of the highest and of the lowest
# values before averaging (unweighted); 0 disables. 0.34 with buffer_size 3 is the median.
trim_fraction = 0.0

[gate]
# Largest L2 norm of (update - base) over the trained groups; 0 disables.
max_update_norm = 0.0
# Largest norm of (update - base) relative to the base norm; 0 disables.
max_relative_update_norm = 1.0
# A candidate may score at most this much below the current generation.
validation_margin = 0.005
# A candidate the hub's evaluator scores too low is merged again with the updates'
# steps halved, up to this many times, before they are refused (0: refused at once).
# Off by default: in benchmarks/federated_learning.py (CT, seed 0) 2 took every update
# but left the union of the sites at 0.858 against 0.868 with 0. Federated evaluation
# on nodes judges the full step only.
backtrack = 0
# Hub validation set: "package.module:attr", an Evaluator (see federation_grpc.hub.gate).
evaluator = ""
# Federated evaluation on nodes' held-out cases when no evaluator is set: "auto" turns it
# on while at least 2 enrolled nodes take part (asked for evaluation tasks within
# evaluator_window_s; a node does unless its [federation] evaluate = false); true, false.
federated_evaluation = "auto"
# A candidate is judged once every node taking part has answered (or at the deadline);
# it needs min_evaluations answers scored on held-out cases. With fewer (nodes without
# held-out cases, or silent), "accept" publishes it with a note saying it was not judged,
# "reject" refuses it with that reason.
min_evaluations = 2
unjudged = "accept"
evaluation_timeout_s = 3600
evaluator_window_s = 600
# A candidate that lowers any one site's held-out Dice by more than validation_margin is
# refused, naming the site and its figures; a site with fewer held-out cases than this is
# reported as too small to judge (in the log, and in the record when refused).
min_site_cases = 2

[metrics]
# Prometheus /metrics and /healthz over plain HTTP, without authentication: loopback by
# default; bind another address only on a network reserved to monitoring.
enabled = false
host = "127.0.0.1"
port = 9464
"""


@dataclass(frozen=True)
class TlsConfig:
    ca_cert: Path | None = None
    server_cert: Path | None = None
    server_key: Path | None = None

    @property
    def configured(self) -> bool:
        return all((self.ca_cert, self.server_cert, self.server_key))


@dataclass(frozen=True)
class Limits:
    max_update_bytes: int = 512 * 1024 * 1024
    download_chunk_bytes: int = 1024 * 1024
    enrolment_token_ttl_s: int = 86400
    max_num_samples: int = 100_000
    max_calls_per_node: int = 16

    def __post_init__(self) -> None:
        if self.max_num_samples < 1:
            raise InvalidRequest("[limits] max_num_samples must be at least 1")
        if self.max_calls_per_node < 0:
            raise InvalidRequest("[limits] max_calls_per_node must not be negative")


@dataclass(frozen=True)
class AggregationConfig:
    strategy: str = "delta"
    alpha: float = 0.8
    sample_halfpoint: float = 1.0
    staleness_exponent: float = 0.5
    buffer_size: int = 3
    server_lr: float = 1.0
    max_pending_fold: int = 32
    max_update_share: float = 0.5
    clip_norm: float = 0.0
    trim_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.max_update_share <= 1:
            raise InvalidRequest("[aggregation] max_update_share must be in (0, 1]")
        if self.clip_norm < 0:
            raise InvalidRequest("[aggregation] clip_norm must not be negative")
        if not 0 <= self.trim_fraction < 0.5:
            raise InvalidRequest("[aggregation] trim_fraction must be in [0, 0.5)")

    def strategy_options(self) -> dict[str, float | int]:
        if self.strategy == "fedasync":
            return {
                "alpha": self.alpha,
                "sample_halfpoint": self.sample_halfpoint,
                "staleness_exponent": self.staleness_exponent,
                "max_pending_fold": self.max_pending_fold,
                "max_update_share": self.max_update_share,
            }
        if self.strategy == "delta":
            return {
                "server_lr": self.server_lr,
                "staleness_exponent": self.staleness_exponent,
                "max_pending_fold": self.max_pending_fold,
            }
        if self.strategy == "dafne":
            return {}
        robust = {"max_update_share": self.max_update_share, "trim_fraction": self.trim_fraction}
        if self.strategy == "fedbuff":
            return {
                "buffer_size": self.buffer_size,
                "server_lr": self.server_lr,
                "staleness_exponent": self.staleness_exponent,
                **robust,
            }
        return {"round_size": self.buffer_size, **robust}


@dataclass(frozen=True)
class GateConfig:
    max_update_norm: float = 0.0
    max_relative_update_norm: float = 1.0
    validation_margin: float = 0.005
    backtrack: int = 0
    evaluator: str = ""
    federated_evaluation: bool | str = "auto"
    min_evaluations: int = 2
    unjudged: str = "accept"
    evaluation_timeout_s: float = 3600.0
    evaluator_window_s: float = 600.0
    min_site_cases: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.federated_evaluation, bool)
                or self.federated_evaluation == "auto"):
            raise InvalidRequest('[gate] federated_evaluation must be "auto", true or false')
        if self.unjudged not in ("accept", "reject"):
            raise InvalidRequest('[gate] unjudged must be "accept" or "reject"')
        if not 0 <= self.backtrack <= 8:
            raise InvalidRequest("[gate] backtrack must be between 0 and 8")
        if self.min_evaluations < 1:
            raise InvalidRequest("[gate] min_evaluations must be at least 1")
        if self.evaluation_timeout_s < 0 or self.evaluator_window_s <= 0:
            raise InvalidRequest("[gate] evaluation_timeout_s must not be negative and "
                                 "evaluator_window_s must be positive")

    def federated(self, evaluators: Callable[[], int]) -> bool:
        """Whether candidates wait for federated evaluation; ``evaluators`` counts the
        nodes taking part and is called only in "auto" (the hub's own evaluator, when
        set, is checked before this)."""
        if self.federated_evaluation == "auto":
            return evaluators() >= 2
        return bool(self.federated_evaluation)


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9464  # 0: any free port


@dataclass(frozen=True)
class HubConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("var/hub")
    database_url: str = ""
    max_workers: int = 128
    admin_token_sha256: str = ""
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: Limits = field(default_factory=Limits)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'hub.db'}"

    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


SECTIONS = ("hub", "tls", "limits", "aggregation", "gate", "metrics")


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise InvalidRequest(f"[{name}] must be a table")
    return value


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise InvalidRequest(f"unknown keys in [{section}]: {sorted(unknown)}")
    return cls(**values)


def load_config(path: Path, env: Mapping[str, str] | None = None) -> HubConfig:
    """Read a hub TOML file; relative paths are taken relative to the working directory.

    ``TESSERA_HUB_DATABASE_URL`` in ``env`` (default: the process environment), when set
    and not empty, replaces ``[hub] database_url``, so a password need not be written
    into the file.

    Raises
    ------
    InvalidRequest
        When a section is not a table, is not one the hub knows, or holds a key the hub
        does not know (a key outside every section included).
    """
    raw = tomllib.loads(path.read_text())
    unknown = set(raw) - set(SECTIONS)
    if unknown:  # a key above every section (or a misspelt section) would be ignored
        raise InvalidRequest(f"unknown sections or keys outside a section: {sorted(unknown)}; "
                             f"the hub config has {', '.join(f'[{s}]' for s in SECTIONS)}")
    hub = dict(_section(raw, "hub"))
    database_url = (os.environ if env is None else env).get(DATABASE_URL_ENV, "")
    if database_url:
        hub["database_url"] = database_url
    if "data_dir" in hub:
        hub["data_dir"] = Path(hub["data_dir"])
    tls_raw = {k: (Path(v) if v else None) for k, v in _section(raw, "tls").items()}
    return _build(
        HubConfig,
        {
            **hub,
            "tls": _build(TlsConfig, tls_raw, "tls"),
            "limits": _build(Limits, _section(raw, "limits"), "limits"),
            "aggregation": _build(AggregationConfig, _section(raw, "aggregation"), "aggregation"),
            "gate": _build(GateConfig, _section(raw, "gate"), "gate"),
            "metrics": _build(MetricsConfig, _section(raw, "metrics"), "metrics"),
        },
        "hub",
    )
