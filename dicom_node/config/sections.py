"""The node's configuration sections other than learning and federation: its own files
and database, DICOM, the assembler, jobs, export, destinations, routing rules,
inference and HTTP. Every section is a frozen pydantic model with unknown keys
forbidden, so a typo fails at start-up with the dotted name of the key.
"""

from __future__ import annotations

import ipaddress
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Section(BaseModel):
    """A configuration section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _ae_title(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return value


class PeerAllow(Section):
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


class DicomSettings(Section):
    ae_title: str = "TESSERA"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1, le=1000)
    # Receiving processes (dicom_node.dicom.receiver_pool): with more than one, this
    # process accepts every connection and hands it to the receiver holding the fewest,
    # itself included; each keeps its own intake journal. max_associations is shared
    # among them (each takes its share, rounded up); the connection limits stay whole.
    receivers: int = Field(1, ge=1, le=64)
    network_timeout_s: float = Field(60.0, gt=0)
    max_instance_mb: float = Field(1024.0, gt=0)
    # The largest PDU the node receives (its A-ASSOCIATE-AC's maximum length). Each PDU
    # costs pynetdicom the same work whatever its size, so a 38 KiB CT slice in one PDU
    # is cheaper than in three of pynetdicom's default 16 KiB; an association buffers
    # at most one PDU. 128 KiB is the most dcmtk sends or receives.
    max_pdu_kb: int = Field(128, ge=4, le=16384)
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


class NodeSettings(Section):
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


class AssemblerSettings(Section):
    quiet_period_s: float = Field(5.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)


class JobSettings(Section):
    lease_s: float = Field(60.0, gt=0)
    heartbeat_s: float = Field(10.0, gt=0)
    poll_interval_s: float = Field(0.5, gt=0)
    workers: int = Field(2, ge=1, le=64)

    @model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> Self:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError("heartbeat_s must be shorter than lease_s")
        return self


class ExportSettings(Section):
    max_attempts: int = Field(8, ge=1)
    backoff_initial_s: float = Field(2.0, gt=0)
    backoff_max_s: float = Field(600.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)


class Destination(Section):
    """A DICOM peer the node sends to (C-STORE SCU)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class RuleAction(StrEnum):
    FORWARD = "forward"
    SEGMENT = "segment"


class RuleMatch(Section):
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


class RoutingRule(Section):
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


class InferenceSettings(Section):
    """Where segmentation runs: auto (CUDA when torch sees one), cpu or cuda; ``amp``:
    float16 autocast on CUDA."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    # Out-of-domain check (pipeline/domain.py): structures other than a model's largest
    # label must cover at least this fraction of what it segmented; 0 turns it off.
    min_structure_fraction: float = Field(0.05, ge=0, le=1)



class HttpSettings(Section):
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
