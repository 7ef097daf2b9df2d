"""The node's standing with the hub: the credentials enrolment gave (kept 0600 in the
data directory) and the gRPC client built from the ``[federation]`` settings.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.config import FederationSettings
from dicom_node.store.durable import write_atomic
from dicom_node.store.private import PRIVATE_FILE
from federation_grpc.client import FederationClient
from federation_grpc.connection import ClientTls, RetryPolicy

Interceptor = Any  # a grpc.*ClientInterceptor


class Credentials:
    """The node id and token the hub gave at enrolment, in a file only the owner reads."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[str, str] | None:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        return str(doc["node_id"]), str(doc["node_token"])

    def save(self, node_id: str, node_token: str, hub: str) -> None:
        doc = {"node_id": node_id, "node_token": node_token, "hub": hub,
               "enrolled_at": datetime.now(UTC).isoformat()}
        # Durable: a token the hub issued once cannot be asked for again.
        write_atomic(self.path, json.dumps(doc).encode(), durable=True, mode=PRIVATE_FILE)
        self.request_path.unlink(missing_ok=True)

    @property
    def request_path(self) -> Path:
        return self.path.with_name(self.path.name + ".request")

    def enrolment_request(self, enrolment_token: str) -> str:
        """The id of this node's enrolment with ``enrolment_token``, kept until the
        credentials are saved: a node killed after the hub enrolled it, before the save,
        sends the same id again and is answered again (the token is one-time). A new
        token gets a new id."""
        token_sha256 = hashlib.sha256(enrolment_token.encode()).hexdigest()
        try:
            doc = json.loads(self.request_path.read_text())
            if doc.get("token_sha256") == token_sha256 and isinstance(doc.get("id"), str):
                return str(doc["id"])
        except (FileNotFoundError, ValueError, AttributeError):
            pass
        request_id = secrets.token_hex(16)
        write_atomic(self.request_path,
                     json.dumps({"id": request_id, "token_sha256": token_sha256}).encode(),
                     durable=True, mode=PRIVATE_FILE)
        return request_id


def make_client(settings: FederationSettings, node_token: str = "",
                interceptors: Sequence[Interceptor] = ()) -> FederationClient:
    tls = None
    if not settings.insecure_loopback:
        assert settings.ca_cert and settings.cert and settings.key
        tls = ClientTls.from_files(settings.ca_cert, settings.cert, settings.key)
    client = FederationClient(
        settings.hub, tls=tls, insecure=settings.insecure_loopback, node_token=node_token,
        # Short retries inside a call; the agent's own backoff covers long outages.
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.2, max_backoff_s=2.0),
        chunk_size=settings.chunk_kb * 1024, timeout_s=settings.rpc_timeout_s,
        server_name=settings.server_name or None, interceptors=interceptors)
    return client
