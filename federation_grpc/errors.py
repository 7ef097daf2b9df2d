"""Error root of the federation package. The servicer maps each class to one gRPC code."""

from __future__ import annotations


class TesseraError(Exception):
    """Root of every error Tessera raises on purpose: the node's (:class:`DicomNodeError`),
    the federation's (:class:`FederationError`) and the viewer bridge's. It lives here
    because this is the one package every other may import (never the reverse)."""


class FederationError(TesseraError):
    """Root of every error the federation package raises on purpose."""


class InvalidRequest(FederationError):
    """The request itself is wrong (bad field, malformed upload): INVALID_ARGUMENT."""


class NotFound(FederationError):
    """The named node, generation, update or task does not exist: NOT_FOUND."""


class Unauthenticated(FederationError):
    """No credential, or one the hub does not know: UNAUTHENTICATED."""


class PermissionDenied(FederationError):
    """A known credential that may not do this (revoked node, foreign update): PERMISSION_DENIED."""


class FailedPrecondition(FederationError):
    """The hub's state does not allow this now (no model yet, wrong resume offset)."""


class HubUnavailable(FederationError):
    """The client gave up after its retries: the hub could not be reached or kept failing."""
