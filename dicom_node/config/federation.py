"""``[federation]``: the node's link to the hub, and how it follows the hub's generations."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from dicom_node.config.sections import Section

__all__ = ["FederationSettings"]


class FederationSettings(Section):
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
    # node's held-out corrected cases; two numbers go back, or "cannot judge" without
    # held-out cases), checked this often: a candidate waits at the hub for every node
    # taking part ([gate] federated_evaluation = "auto"), so this bounds its wait.
    evaluate: bool = True
    evaluation_interval_s: float = Field(15.0, gt=0)
    # Serve this site's own short fine-tune of each hub generation (a few epochs on its
    # trained corrections, see pipeline.site_adaptation), and keep the version served
    # before when the generation scores worse on the held-out corrected cases by more
    # than [learning] acceptance_margin (a local rollback, reported to the hub).
    adapt: bool = True
    adapt_epochs: int = Field(3, ge=1, le=100)
    adapt_time_budget_s: float = Field(30.0, gt=0)
    chunk_kb: int = Field(256, ge=1, le=4096)
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
