"""Nodes: enrolment, tokens bound to client certificates, admin token, revocation.

A node token is 256-bit random, stored as its sha256 only, and bound at enrolment to
the sha256 of the client certificate it came over (a node enrolled without one is
bound at its first call over TLS); ``rebind_node`` moves it to a renewed certificate.
Imports no grpc.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import uuid
from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session

from federation_grpc.errors import InvalidRequest, NotFound, PermissionDenied, Unauthenticated
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.domain import Enrolment, NodeView
from federation_grpc.hub.partial_labels import trained_heads
from federation_grpc.hub.store import (
    EnrolmentTokenRow,
    HubStore,
    NodeRow,
    UpdateRow,
    UpdateStatus,
    as_utc,
    utcnow,
)

LOGGER = logging.getLogger(__name__)

# Before every RPC a node makes: built once, as an upload's statements are (uploads.py).
_BY_TOKEN = (select(NodeRow.node_id, NodeRow.revoked, NodeRow.cert_sha256)
             .where(NodeRow.token_sha256 == bindparam("token")))

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """sha256 hex of a token; tokens are 256-bit random, so a fast hash suffices."""
    return hashlib.sha256(token.encode()).hexdigest()


def _answer(salt: str, request_id: str) -> str:
    """The node token of an enrolment with a request id: HMAC-SHA256 of the id under the
    random salt kept with the enrolment token, as ``secrets.token_urlsafe(32)`` spells it.
    Without the id (the node's secret, sent over TLS) the salt gives nothing away, and
    without the salt (the hub's) the id gives nothing."""
    digest = hmac.new(bytes.fromhex(salt), request_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class SeenThrottle:
    """When a node was last written down as seen, by this process: a node seen again
    within ``every`` is not written again (a row write per call would be a write per RPC,
    and the times are read in minutes)."""

    def __init__(self, every: timedelta = timedelta(seconds=30)) -> None:
        self.every = every
        self._written: dict[str, datetime] = {}

    def due(self, node_id: str, now: datetime) -> bool:
        """Whether ``node_id`` seen at ``now`` is to be written down."""
        written = self._written.get(node_id)
        return written is None or now - written >= self.every

    def written(self, node_id: str, now: datetime) -> None:
        """``node_id`` was written down as seen at ``now``."""
        self._written[node_id] = now


class NodeRegistry:
    """Who the nodes are and how they prove it."""

    def __init__(self, store: HubStore, config: HubConfig) -> None:
        self.store = store
        self.config = config
        self._last_seen = SeenThrottle()

    def create_enrolment_token(self, ttl_s: int = 0, note: str = "") -> tuple[str, datetime]:
        token = secrets.token_urlsafe(32)
        expires = utcnow() + timedelta(seconds=ttl_s or self.config.limits.enrolment_token_ttl_s)
        with self.store.session() as session:
            session.add(
                EnrolmentTokenRow(token_sha256=hash_token(token), expires_at=expires, note=note)
            )
        LOGGER.info("enrolment token created, expires %s", expires.isoformat())
        return token, expires

    def enrol(
        self,
        enrolment_token: str,
        display_name: str = "",
        cert_sha256: str = "",
        request_id: str = "",
    ) -> Enrolment:
        """A node id and token for a one-time enrolment token; the token is bound to the
        client certificate ``cert_sha256`` (sha256 of its DER bytes; "" without TLS).

        ``request_id`` (the node's own random id for this enrolment, 16 to 128
        characters) makes it safe to send again: the node token is then derived from it
        and a random salt kept with the enrolment token, so the used token presented with
        the same id, over the same certificate and before it expires, gets the same
        answer again (node id and token), however many times and in whatever order the
        copies arrive. Without an id, a used token is refused.
        """
        if not enrolment_token:
            raise Unauthenticated("an enrolment token is required")
        if len(display_name) > 200:
            raise InvalidRequest("display_name is longer than 200 characters")
        if request_id and not (16 <= len(request_id) <= 128 and request_id.isprintable()):
            raise InvalidRequest("request_id must be 16 to 128 printable characters")
        key = hash_token(enrolment_token)
        salt = secrets.token_hex(32)
        with self.store.session() as session:
            row = session.get(EnrolmentTokenRow, key, with_for_update=True)
            if row is None:
                raise Unauthenticated("unknown enrolment token")
            if as_utc(row.expires_at) < utcnow():
                raise PermissionDenied("enrolment token has expired")
            now = utcnow()
            node_id = f"node-{uuid.uuid4().hex[:12]}"
            # Claimed by one statement, so that of two enrolments at once (SQLite takes
            # no row lock) exactly one finds the token unused.
            claimed = row.used_by is None and session.execute(
                update(EnrolmentTokenRow)
                .where(EnrolmentTokenRow.token_sha256 == key,
                       EnrolmentTokenRow.used_by.is_(None))
                .values(used_by=node_id, used_at=now,
                        answer_salt=salt if request_id else None)
                .execution_options(synchronize_session=False)
            ).rowcount == 1  # type: ignore[attr-defined]
            if claimed:
                node_token = (_answer(salt, request_id) if request_id
                              else secrets.token_urlsafe(32))
                session.add(
                    NodeRow(
                        node_id=node_id,
                        display_name=display_name,
                        token_sha256=hash_token(node_token),
                        cert_sha256=cert_sha256 or None,
                        last_seen=now,
                    )
                )
            else:
                session.refresh(row)
                node_id, node_token = self._answer_again(session, row, cert_sha256,
                                                         request_id)
        # Enrolling is being seen: the node's next calls need not write it again.
        self._last_seen.written(node_id, now)
        LOGGER.info("node %s enrolled%s (certificate %s)", node_id,
                    "" if claimed else " (its request sent again, answered again)",
                    cert_sha256[:16] or "none")
        return Enrolment(node_id=node_id, node_token=node_token)

    @staticmethod
    def _answer_again(
        session: Session, row: EnrolmentTokenRow, cert_sha256: str, request_id: str
    ) -> tuple[str, str]:
        """The node id and token a used enrolment token gave, if this is the request
        that used it (the same id, over the certificate its node is bound to)."""
        node = session.get(NodeRow, row.used_by) if row.used_by else None
        if not request_id or row.answer_salt is None or node is None:
            raise PermissionDenied("enrolment token was already used")
        node_token = _answer(row.answer_salt, request_id)
        if not hmac.compare_digest(node.token_sha256, hash_token(node_token)):
            raise PermissionDenied("enrolment token was already used")
        if node.revoked:
            raise PermissionDenied("enrolment token was already used (its node is revoked)")
        if node.cert_sha256 is not None and node.cert_sha256 != cert_sha256:
            raise PermissionDenied(
                "enrolment token was already used (its request came over another certificate)"
            )
        return node.node_id, node_token

    def authenticate(self, node_token: str, cert_sha256: str = "") -> str:
        """Node id for a node token presented over the client certificate ``cert_sha256``.

        A token is bound to the certificate it was enrolled over; a node enrolled without
        one (before binding existed, or in process) is bound to the certificate of its
        first call over TLS.

        Raises
        ------
        Unauthenticated
            No token, or an unknown one.
        PermissionDenied
            The node is revoked, or the token comes over another certificate.
        """
        if not node_token:
            raise Unauthenticated("missing node token (metadata 'authorization: Bearer ...')")
        with self.store.engine.begin() as connection:
            row = connection.execute(_BY_TOKEN, {"token": hash_token(node_token)}).one_or_none()
            if row is None:
                raise Unauthenticated("unknown node token")
            node_id, bound = row.node_id, row.cert_sha256
            if row.revoked:
                raise PermissionDenied(f"node {node_id} is revoked")
            if bound is None and cert_sha256:
                # Only if still unbound: of two first calls over different certificates,
                # one binds and the other is refused below.
                taken = connection.execute(
                    update(NodeRow)
                    .where(NodeRow.node_id == node_id, NodeRow.cert_sha256.is_(None))
                    .values(cert_sha256=cert_sha256))
                if taken.rowcount == 1:  # type: ignore[attr-defined]
                    bound = cert_sha256
                    LOGGER.warning("node %s bound to certificate %s at first use",
                                   node_id, cert_sha256[:16])
                else:
                    bound = connection.scalar(
                        select(NodeRow.cert_sha256).where(NodeRow.node_id == node_id))
            if (bound or "") != cert_sha256:
                LOGGER.warning("node %s token presented over certificate %s, bound to %s",
                               node_id, cert_sha256[:16] or "none", (bound or "none")[:16])
                raise PermissionDenied(
                    f"the token of node {node_id} is bound to another client certificate "
                    "(a renewed certificate needs `tessera hub rebind`)"
                )
            now = utcnow()
            if self._last_seen.due(node_id, now):
                connection.execute(
                    update(NodeRow).where(NodeRow.node_id == node_id).values(last_seen=now))
                self._last_seen.written(node_id, now)
            return str(node_id)

    def check_admin(self, admin_token: str) -> None:
        expected = self.config.admin_token_sha256
        if not expected:
            raise PermissionDenied("admin RPCs are disabled (no admin_token_sha256 configured)")
        if not admin_token or not hmac.compare_digest(hash_token(admin_token), expected):
            raise Unauthenticated("bad admin token")

    def list_nodes(self) -> list[NodeView]:
        with self.store.session() as session:
            counts = dict(
                session.execute(
                    select(UpdateRow.node_id, func.count()).group_by(UpdateRow.node_id)
                ).all()
            )
            taken = (UpdateStatus.RECEIVED, UpdateStatus.EVALUATING, UpdateStatus.MERGED)
            groups: dict[str, list[list[str]]] = {}
            for node_id, trained in session.execute(
                select(UpdateRow.node_id, UpdateRow.trained_groups).where(
                    UpdateRow.status.in_(taken))
            ):
                groups.setdefault(node_id, []).append(list(trained or []))
            rows = session.scalars(select(NodeRow).order_by(NodeRow.enrolled_at)).all()
            return [replace(_node_view(row, counts.get(row.node_id, 0)),
                            trained_heads=trained_heads(groups.get(row.node_id, [])))
                    for row in rows]

    def rebind_node(self, node_id: str, cert_sha256: str) -> NodeView:
        """Bind a node's token to a new client certificate (a renewed one); the old
        certificate stops working at once."""
        if not _FINGERPRINT.match(cert_sha256):
            raise InvalidRequest("a certificate fingerprint is 64 lowercase hex digits")
        with self.store.session() as session:
            row = session.get(NodeRow, node_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no node {node_id!r}")
            previous, row.cert_sha256 = row.cert_sha256, cert_sha256
            count = session.scalar(select(func.count()).where(UpdateRow.node_id == node_id)) or 0
            LOGGER.warning("node %s rebound from certificate %s to %s", node_id,
                           (previous or "none")[:16], cert_sha256[:16])
            return _node_view(row, count)

    def revoke_node(self, node_id: str) -> NodeView:
        with self.store.session() as session:
            row = session.get(NodeRow, node_id)
            if row is None:
                raise NotFound(f"no node {node_id!r}")
            row.revoked = True
            count = session.scalar(select(func.count()).where(UpdateRow.node_id == node_id)) or 0
            LOGGER.warning("node %s revoked", node_id)
            return _node_view(row, count)


def _node_view(row: NodeRow, updates: int) -> NodeView:
    return NodeView(
        node_id=row.node_id,
        display_name=row.display_name,
        enrolled_at=as_utc(row.enrolled_at),
        revoked=row.revoked,
        last_seen=as_utc(row.last_seen) if row.last_seen else None,
        updates=updates,
        cert_sha256=row.cert_sha256 or "",
        evaluator_seen=as_utc(row.evaluator_seen) if row.evaluator_seen else None,
    )
