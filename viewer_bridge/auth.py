"""Bearer tokens, stored hashed: the node keeps sha256 digests, never the tokens.

A request is authenticated by ``Authorization: Bearer <token>`` or, for a browser on
the same origin (OHIF served by the bridge, the status page), by the ``tessera_token``
cookie that ``/login`` sets (HttpOnly, SameSite=Strict, so a cross-site form cannot
post with it).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable

LOGGER = logging.getLogger(__name__)

COOKIE = "tessera_token"


def hash_token(token: str) -> str:
    """The sha256 hex digest that ``http.tokens`` holds for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh random token and its digest: ``(token, sha256_hex)``."""
    token = secrets.token_urlsafe(32)
    return token, hash_token(token)


class TokenCheck:
    """Compares a presented token with the configured digests in constant time."""

    def __init__(self, digests: Iterable[str]) -> None:
        self._digests = tuple(d.lower() for d in digests)
        if not self._digests:
            LOGGER.warning("http.tokens is empty: every DICOMweb request will be refused")

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        presented = hash_token(token)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(presented, digest)
        return ok

    def from_headers(self, authorization: str | None, cookie_token: str | None) -> bool:
        if authorization:
            scheme, _, value = authorization.partition(" ")
            return scheme.lower() == "bearer" and self.valid(value.strip())
        return self.valid(cookie_token)
