"""Node configuration: one TOML file plus ``TESSERA_`` environment overrides.

Every section is a frozen pydantic model with unknown keys forbidden, so a typo fails
at start-up with the dotted name of the key (``dicom.port: ...``).

Environment overrides use ``TESSERA_<SECTION>__<KEY>=value`` (double underscore
between levels), e.g. ``TESSERA_DICOM__PORT=11113``. Values are parsed as TOML
literals when they parse (numbers, booleans, arrays), else taken as strings.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicom_node.errors import ConfigError

ENV_PREFIX = "TESSERA_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_PHANTOM_SITES = ("A", "B", "C", "D")  # dicom_node.phantom.ct.SITES (MR atlas: A-C)
_LABEL_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")  # model label names


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return value


class PeerAllow(_Section):
    """One allowlist entry: an AE title (``*`` for any) from one of the networks."""

    ae_title: str = "*"
    networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, v: str) -> str:
        return v if v == "*" else _ae_title(v)

    @field_validator("networks")
    @classmethod
    def _check_networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    def allows(self, ae_title: str, address: str) -> bool:
        if self.ae_title not in ("*", ae_title.strip()):
            return False
        return self.allows_address(address)

    def allows_address(self, address: str) -> bool:
        try:
            addr = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(addr in ipaddress.ip_network(n, strict=False) for n in self.networks)


class DicomSettings(_Section):
    ae_title: str = "TESSERA"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    network_timeout_s: float = Field(60.0, gt=0)
    max_instance_mb: float = Field(1024.0, gt=0)
    # Connection hygiene (dicom_node.dicom.connections): a connection that has not sent
    # its whole A-ASSOCIATE-RQ within association_timeout_s is closed; one address holds
    # at most max_connections_per_address connections, the node max_connections in all
    # (associated or not; max_associations bounds associations); an association
    # request (or any PDU but P-DATA-TF on an established association, which the
    # negotiated maximum bounds) over max_association_request_kb is aborted before it
    # is read. Refusals are logged and audited at most once per kind and address per
    # limit_report_interval_s.
    association_timeout_s: float = Field(10.0, gt=0, le=600)
    max_connections_per_address: int = Field(16, ge=1, le=10000)
    max_connections: int = Field(64, ge=1, le=100000)
    listen_backlog: int = Field(128, ge=128, le=65535)
    max_association_request_kb: int = Field(256, ge=16, le=65536)
    limit_report_interval_s: float = Field(60.0, ge=0)
    allow: tuple[PeerAllow, ...] = (PeerAllow(),)
    # DICOM TLS (optional): the SCP's certificate and key (PEM); with tls_ca, peers must
    # present a certificate that CA signed (mutual TLS). The allowlist applies as well.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self

    def allows(self, ae_title: str, address: str) -> bool:
        return any(entry.allows(ae_title, address) for entry in self.allow)

    def allows_address(self, address: str) -> bool:
        """Whether some entry's networks contain ``address`` (whatever the AE title)."""
        return any(entry.allows_address(address) for entry in self.allow)


class NodeSettings(_Section):
    data_dir: Path = Path("var/node")
    database_url: str = ""  # empty: SQLite file in data_dir
    # Bounded disk use (dicom_node.store.quarantine, dicom_node.store.space): the
    # quarantine keeps at most this many entries and megabytes, dropping the oldest;
    # below min_free_mb or min_free_percent free on the instance store's file system,
    # new instances get 0xA700 (C-STORE) or 503 (STOW-RS).
    quarantine_max_files: int = Field(1000, ge=1)
    quarantine_max_mb: float = Field(2048.0, gt=0)
    min_free_mb: float = Field(512.0, ge=0)
    min_free_percent: float = Field(1.0, ge=0, lt=100)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'node.db').resolve()}"


class AssemblerSettings(_Section):
    quiet_period_s: float = Field(5.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)


class JobSettings(_Section):
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    workers: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> Self:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("heartbeat_s must be shorter than lease_s")
        return self


class ExportSettings(_Section):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)


class Destination(_Section):
    """A DICOM peer the node sends to (C-STORE SCU)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class RuleAction(StrEnum):
    FORWARD = "forward"
    SEGMENT = "segment"


class RuleMatch(_Section):
    """Criteria a series must meet; every given criterion must match (AND).

    AE titles, Modality, BodyPartExamined and SOP Class UID compare exactly
    (case-insensitive for the first three); ``series_description`` is a regular
    expression searched in SeriesDescription.
    """

    calling_ae: tuple[str, ...] = ()
    called_ae: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    series_description: str | None = None
    sop_class_uid: tuple[str, ...] = ()

    @field_validator("calling_ae", "called_ae", "modality", "body_part", "sop_class_uid",
                     mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from exc
        return v


class RoutingRule(_Section):
    name: str = Field(min_length=1)
    action: RuleAction = RuleAction.FORWARD
    model: str | None = None
    destinations: tuple[str, ...] = ()
    quiet_period_s: float | None = Field(None, ge=0)
    # A SEG whose input the model was not made for is always marked ("OUT OF DOMAIN?" in
    # its Series Description, node status, /metrics); "hold" also keeps it from the
    # destinations.
    out_of_domain: Literal["send", "hold"] = "send"
    match: RuleMatch = RuleMatch()

    @model_validator(mode="after")
    def _model_for_segment(self) -> Self:
        if self.action is RuleAction.SEGMENT and not self.model:
            raise ValueError("a 'segment' rule must name a model")
        if self.action is RuleAction.FORWARD and not self.destinations:
            raise ValueError("a 'forward' rule must name at least one destination")
        return self


class InferenceSettings(_Section):
    """Where segmentation runs: auto (CUDA when torch sees one), cpu or cuda; ``amp``:
    float16 autocast on CUDA."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    # Out-of-domain check (pipeline/domain.py): structures other than a model's largest
    # label must cover at least this fraction of what it segmented; 0 turns it off.
    min_structure_fraction: float = Field(0.05, ge=0, le=1)


class LearningSettings(_Section):
    """Learning from corrections (Dafne: 5 epochs of Adam at 1e-3 on the corrected slices)."""

    enabled: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where training rounds run
    # Labels this hospital annotates; only their heads train (masked loss). Empty: all.
    annotated_labels: tuple[str, ...] = ()
    train_every: int = Field(1, ge=1)          # queue training after every N corrections
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    augment: bool = True
    time_budget_s: float = Field(50.0, gt=0)     # of steps; a whole round stays <= 60 s
    threads: int = Field(2, ge=1, le=64)
    neighbour_slices: int = Field(2, ge=0)      # stored around each touched slice
    replay_max_slices: int = Field(600, ge=0)   # replay buffer budget (earlier local slices)
    replay_fraction: float = Field(0.5, ge=0, lt=1)
    # Against forgetting what the model knew before local training, without any of the
    # data it came from (TrainingPolicy documents each): the encoder learns at
    # encoder_lr_scale x learning_rate, distill_weight keeps the trained heads close to
    # the round's starting model where it agreed with the labels (learning without
    # forgetting), l2sp_alpha pulls weights toward the round's start (L2-SP; off: it did
    # not help in benchmarks/learning.py). distill_other_heads keeps the heads a round
    # does not train (labels this hospital does not annotate) as the round's starting
    # model had them, through the encoder (ConDistFL; benchmarks/partial_labels.py).
    encoder_lr_scale: float = Field(0.01, gt=0, le=1)
    distill_weight: float = Field(10.0, ge=0)
    distill_other_heads: float = Field(1.0, ge=0)
    # Adam's moments are kept from one round to the next (data_dir/optimiser/<model>),
    # as a federated client keeps its optimiser while weights come from the hub: a
    # fresh Adam's first steps are full-size whatever the gradient, and rounds are
    # short (benchmarks/partial_labels.py). They never leave the node.
    keep_optimiser_state: bool = True
    l2sp_alpha: float = Field(0.0, ge=0)
    validation_every: int = Field(5, ge=0)      # every Nth correction is held out; 0: none
    acceptance_margin: float = Field(0.01, ge=0, le=1)
    # Rehearsal (dicom_node.learning.rehearsal): anchor slices of phantom site
    # rehearsal_site (the starter's origin; "" turns it off), made on the node, fill
    # rehearsal_fraction of each batch; a round whose anchor Dice falls by more than
    # rehearsal_margin from its base model's is refused.
    rehearsal_site: str = "A"
    rehearsal_subjects: int = Field(4, ge=1, le=64)
    rehearsal_seed: int = Field(1, ge=0)
    rehearsal_fraction: float = Field(0.25, ge=0, lt=1)
    rehearsal_margin: float = Field(0.02, ge=0, le=1)
    max_correction_mb: float = Field(256.0, gt=0)  # larger SEGs are flagged, not read
    max_correction_frames: int = Field(20000, ge=1)

    @field_validator("annotated_labels")
    @classmethod
    def _label_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        # Whether each is a label of a served model is checked when the models load.
        for name in v:
            if not _LABEL_RE.match(name):
                raise ValueError(f"{name!r} is not a label name (a model label such as "
                                 f"'liver': {_LABEL_RE.pattern})")
        repeated = sorted({n for n in v if v.count(n) > 1})
        if repeated:
            raise ValueError(f"labels repeat: {repeated}")
        return v

    @field_validator("rehearsal_site")
    @classmethod
    def _phantom_site(cls, v: str) -> str:
        if v not in ("", *_PHANTOM_SITES):
            raise ValueError(f"must be a phantom site ({', '.join(_PHANTOM_SITES)}) or \"\" "
                             f"(rehearsal off), got {v!r}")
        return v

    @model_validator(mode="after")
    def _batch_has_new_samples(self) -> Self:
        if self.replay_fraction + self.rehearsal_fraction >= 1:
            raise ValueError(f"replay_fraction + rehearsal_fraction must be < 1 (a batch "
                             f"needs new samples), got {self.replay_fraction} + "
                             f"{self.rehearsal_fraction}")
        return self


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class HttpSettings(_Section):
    """The node's HTTP port: DICOMweb for viewers (viewer_bridge), /healthz, /status.

    ``tokens`` holds the sha256 hex digests of the bearer tokens that may use it
    (``tessera node token`` makes one); the tokens themselves are never stored.
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(8042, ge=0, le=65535)   # 0: any free port
    tokens: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()        # e.g. ["https://ohif.hospital.example"]
    max_stow_mb: float = Field(512.0, gt=0)   # larger STOW-RS bodies get 413
    # A connection must complete its request head within header_timeout_s; beyond
    # max_connections open ones a new connection is closed (requests at it get 503).
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    max_connections: int = Field(64, ge=1, le=10000)
    ohif_dir: Path | None = None              # OHIF's dist/, served at / (same origin)
    ohif_url: str = ""                        # where status-page links open OHIF

    @field_validator("tokens")
    @classmethod
    def _hashed(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for token in v:
            if not _SHA256_RE.match(token):
                raise ValueError("each entry must be a sha256 hex digest (`tessera node token`)")
        return v


class FederationSettings(_Section):
    """The node's link to the federation hub (off unless ``enabled``).

    Credentials: mutual TLS (``ca_cert``, ``cert``, ``key``, from ``tessera hub certs``)
    plus a node token. The first start trades ``enrolment_token`` (``tessera hub enrol``)
    for a node id and token, kept in ``credentials_path`` (mode 0600); later starts use
    that file and ignore the enrolment token. ``insecure_loopback`` drops TLS and is
    refused unless the hub address is a loopback one (tests and the demo only).
    """

    enabled: bool = False
    hub: str = ""                        # host:port of `tessera hub serve`
    server_name: str = ""                # TLS name to check instead of the host in `hub`
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure_loopback: bool = False
    enrolment_token: str = ""
    credentials_path: Path | None = None  # default: <data_dir>/federation/credentials.json
    display_name: str = ""
    model: str = "tessera-abdomen-ct"    # the model this hub federates
    watch: bool = True                   # follow hub generations and serve them
    upload_interval_s: float = Field(30.0, gt=0)
    upload_backoff_max_s: float = Field(600.0, gt=0)
    metrics_interval_s: float = Field(300.0, gt=0)
    # Answer the hub's federated evaluation tasks (score candidate generations on this
    # node's held-out corrected cases; two numbers go back), checked this often.
    evaluate: bool = True
    evaluation_interval_s: float = Field(60.0, gt=0)
    # Serve this site's own short fine-tune of each hub generation (a few epochs on its
    # trained corrections, see pipeline.site_adaptation), and keep the version served
    # before when the generation scores worse on the held-out corrected cases by more
    # than [learning] acceptance_margin (a local rollback, reported to the hub).
    adapt: bool = True
    adapt_epochs: int = Field(3, ge=1, le=100)
    adapt_time_budget_s: float = Field(30.0, gt=0)
    chunk_kb: int = Field(1024, ge=1, le=4096)
    rpc_timeout_s: float = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if not self.enabled:
            return self
        if not self.hub or ":" not in self.hub:
            raise ValueError("hub must be host:port when federation is enabled")
        if self.insecure_loopback:
            host = self.hub.rsplit(":", 1)[0].strip("[]")
            try:
                loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                raise ValueError("insecure_loopback needs a loopback hub address")
        elif None in (self.ca_cert, self.cert, self.key):
            raise ValueError("ca_cert, cert and key are required (or insecure_loopback "
                             "for a loopback test hub)")
        return self


class NodeConfig(_Section):
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


EXAMPLE_CONFIG = """\
# Tessera node configuration. Every key may be overridden from the environment as
# TESSERA_<SECTION>__<KEY>, e.g. TESSERA_DICOM__PORT=11113.

[node]
# Where instance files, the quarantine and the SQLite index live.
data_dir = "var/node"
# Empty: SQLite (WAL) in data_dir. For several workers on several hosts use PostgreSQL:
# database_url = "postgresql+psycopg://tessera:secret@db.example/tessera"
database_url = ""
# The quarantine (refused payloads, kept for inspection) keeps at most this many
# entries and megabytes; the oldest are dropped (counted in `tessera node status`).
quarantine_max_files = 1000
quarantine_max_mb = 2048
# Disk watermark: with less free space than this on the instance store's file system,
# new instances are refused (0xA700 over DICOM, 503 over STOW-RS) before the disk is full.
min_free_mb = 512
min_free_percent = 1

[dicom]
ae_title = "TESSERA"
host = "127.0.0.1"        # 0.0.0.0 to accept from the network (then widen the allowlist)
port = 11112
max_associations = 10
network_timeout_s = 60
max_instance_mb = 1024    # larger datasets are refused with 0xA700
# Hostile or broken peers: a connection must send its whole association request within
# association_timeout_s (then it is closed); at most max_connections_per_address at once
# from one address and max_connections in all; an association request over
# max_association_request_kb, or a P-DATA-TF PDU over the negotiated maximum, is aborted
# before it is read. Refusals are logged and audited at most once per kind and address
# per limit_report_interval_s.
association_timeout_s = 10
max_connections_per_address = 16
max_connections = 64
listen_backlog = 128
max_association_request_kb = 256
limit_report_interval_s = 60
# DICOM TLS (optional; deploy/tls/make-certs.sh with DICOM_SERVER=... makes a pair).
# With tls_ca, peers must present a certificate signed by that CA.
# tls_cert = "deploy/tls/out/node1-dicom.pem"
# tls_key = "deploy/tls/out/node1-dicom.key"
# tls_ca = "deploy/tls/out/ca.pem"

# Who may associate: an AE title ("*" for any) from one of the networks.
# Nothing else gets in. This example allows loopback only.
[[dicom.allow]]
ae_title = "*"
networks = ["127.0.0.0/8", "::1/128"]

[assembler]
quiet_period_s = 5        # a series is complete after this long without new instances

[jobs]
lease_s = 60              # a crashed worker's job is taken over after its lease expires
heartbeat_s = 10
workers = 2

[export]
max_attempts = 8          # then the item is dead-lettered (see `tessera node status`)
backoff_initial_s = 2     # doubles after each failed attempt ...
backoff_max_s = 600       # ... up to this

# Destinations the node sends to with C-STORE.
[destinations.pacs]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242

# Routing rules: every rule whose criteria all match a completed series applies.
# action = "forward" sends the series unchanged; action = "segment" runs the model
# and sends the DICOM-SEG to the destinations. A series no rule matches is stored only.
# One rule per modality the node has a model for.
[[rules]]
name = "abdomen-ct"
action = "segment"
model = "tessera-abdomen-ct"  # shipped with the node
destinations = ["pacs"]
out_of_domain = "send"    # a SEG of input the model was not made for is marked
                          # "OUT OF DOMAIN?"; "hold" also keeps it from the destinations
[rules.match]
modality = ["CT"]
# body_part = ["ABDOMEN"]
# series_description = "(?i)abdomen|portal"
# calling_ae = ["PACS"]
# called_ae = ["TESSERA"]
# sop_class_uid = ["1.2.840.10008.5.1.4.1.1.2"]

[[rules]]
name = "head-mr"
action = "segment"
# Built on this node, never shipped (the AAL atlas licence): run once
#   tessera model bootstrap --data mr --config <this file>
# (about 9 minutes on 2 CPU cores; it writes <data_dir>/models/tessera-head-mr).
# Until then MR series are refused with that command as the reason.
model = "tessera-head-mr"
destinations = ["pacs"]
out_of_domain = "send"
[rules.match]
modality = ["MR"]

[inference]
device = "auto"           # auto (CUDA when there is one), cpu or cuda
amp = true                # float16 autocast for inference on CUDA
min_structure_fraction = 0.05  # out of domain below this: what the model segmented
                          # outside its largest label (the body), as a fraction; 0: off

[learning]
# Corrected SEGs (C-STORE or STOW-RS) become training samples; a round of local
# training replaces the serving model only if held-out Dice does not fall by more
# than acceptance_margin. `tessera model list-versions` / `rollback` manage versions.
device = "auto"           # where training rounds run: auto, cpu or cuda
annotated_labels = []     # labels this hospital corrects, e.g. ["liver"]; empty: all
train_every = 1           # train after every N corrections
epochs = 5
learning_rate = 0.001
time_budget_s = 50        # training steps stop here; with preparation a round is <= 60 s
# Against forgetting what the model already knew (no foreign data needed):
encoder_lr_scale = 0.01   # encoder learns at this fraction of learning_rate (heads: 1x)
distill_weight = 10.0     # keep heads close to the round's start where it was right
distill_other_heads = 1.0 # heads this site does not train keep their outputs (0: off)
keep_optimiser_state = true # Adam's moments carry over between rounds (stay local)
l2sp_alpha = 0.0          # L2-SP pull toward the round's starting weights (0: off)
# Rehearsal: anchor slices of this phantom site (the starter's origin), made on the node
# (no patient data), fill rehearsal_fraction of each batch; a round whose anchor Dice
# falls by more than rehearsal_margin is refused. "" turns it off.
rehearsal_site = "A"
rehearsal_fraction = 0.25
rehearsal_margin = 0.02
validation_every = 5      # every 5th correction is held out for evaluation
acceptance_margin = 0.01

[http]
# DICOMweb (QIDO-RS, WADO-RS, STOW-RS) for OHIF at /dicomweb, /healthz and /status.
enabled = true
host = "127.0.0.1"
port = 8042               # 0: any free port
# sha256 hex digests of bearer tokens; `tessera node token` prints a new pair.
tokens = []
cors_origins = []         # OHIF served from another origin, e.g. ["https://ohif.example"]
max_stow_mb = 512
header_timeout_s = 10     # a request head must arrive within this, or the connection closes
max_connections = 64      # open HTTP connections at most; requests at the limit get 503
# ohif_dir = "deploy/ohif/vendor/dist"   # serve OHIF at / (deploy/ohif/fetch-ohif.sh)

[federation]
# Share what this node learns (weights only) with a hub; follow its generations.
enabled = false
hub = "hub.example:50051"
ca_cert = "deploy/tls/out/ca.pem"
cert = "deploy/tls/out/node1.pem"
key = "deploy/tls/out/node1.key"
enrolment_token = ""      # `tessera hub enrol`; used once, then credentials_path serves
# credentials_path = "var/node/federation/credentials.json"
model = "tessera-abdomen-ct"
upload_interval_s = 30    # pending updates are retried with backoff, never dropped
metrics_interval_s = 300  # de-identified quality figures and correction Dice
evaluate = true           # score the hub's candidates on held-out corrected cases
adapt = true              # serve a short fine-tune of each hub generation on this site's
adapt_epochs = 3          # corrections; keep the previous version if a generation is
adapt_time_budget_s = 30  # worse here (held-out Dice) by more than acceptance_margin

# Extra models by name (the shipped starter "tessera-abdomen-ct" needs no entry):
# [models]
# my-model = "/srv/tessera/models/my-model.safetensors"

# [[rules]]
# name = "forward-us"
# action = "forward"
# destinations = ["pacs"]
# quiet_period_s = 10
# [rules.match]
# modality = ["US"]
"""
