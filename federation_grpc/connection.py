"""The node's connection to the hub: the gRPC channel, what each call carries, retries.

The channel is TLS with the node's certificate (or plain, for a loopback test hub), with
the message limits and reconnect backoff every node uses. Each call carries the node's
bearer token and a deadline (:class:`CallSettings`). A transient failure (unavailable,
deadline, aborted, ...) is retried with exponential backoff and jitter
(:class:`RetryPolicy`); a refusal (bad request, bad credentials) is raised at once as
the ``FederationError`` of its gRPC code (:func:`refusal`).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import grpc

from federation_grpc.errors import (
    FailedPrecondition,
    FederationError,
    HubUnavailable,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]
Interceptor: TypeAlias = (grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor
               | grpc.StreamUnaryClientInterceptor | grpc.StreamStreamClientInterceptor)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)
_ERRORS: dict[grpc.StatusCode, type[FederationError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}
_MAX_MESSAGE_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class ClientTls:
    """PEM bytes: the federation CA, this node's certificate and key."""

    ca_cert: bytes
    cert: bytes
    key: bytes

    @classmethod
    def from_files(cls, ca_cert: Path, cert: Path, key: Path) -> ClientTls:
        return cls(ca_cert.read_bytes(), cert.read_bytes(), key.read_bytes())


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        return base * (0.5 + random.random() / 2)  # jitter spreads reconnecting nodes


def open_channel(
    target: str,
    *,
    tls: ClientTls | None,
    insecure: bool,
    server_name: str | None,
    interceptors: Sequence[Interceptor],
) -> grpc.Channel:
    """A channel to the hub at ``target``: TLS unless ``insecure`` (loopback tests only),
    every call through ``interceptors``.

    Raises
    ------
    ValueError
        Neither ``tls`` credentials nor ``insecure=True`` were given.
    """
    if tls is None and not insecure:
        raise ValueError("give tls credentials, or insecure=True for a loopback test hub")
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if tls is not None:
        credentials = grpc.ssl_channel_credentials(tls.ca_cert, tls.key, tls.cert)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    if interceptors:  # every call goes through them, the hand-framed upload too
        channel = grpc.intercept_channel(channel, *interceptors)
    return channel


def is_transient(error: grpc.RpcError) -> bool:
    """Whether a failed call is worth retrying (its gRPC code is in ``RETRYABLE``)."""
    return error.code() in RETRYABLE  # type: ignore[attr-defined,no-any-return]


def refusal(error: grpc.RpcError) -> FederationError:
    """The ``FederationError`` subclass of the call's gRPC code, with the hub's details."""
    code = error.code()  # type: ignore[attr-defined]
    details = error.details()  # type: ignore[attr-defined]
    return _ERRORS.get(code, FederationError)(f"{code.name}: {details}")


@dataclass(frozen=True)
class CallSettings:
    """What each call to the hub carries (the node's bearer token, if any, and a
    deadline) and how a transient failure is retried."""

    metadata: Metadata
    timeout_s: float
    retry: RetryPolicy

    @classmethod
    def for_node(cls, node_token: str, timeout_s: float, retry: RetryPolicy) -> CallSettings:
        token = (("authorization", f"Bearer {node_token}"),) if node_token else ()
        return cls(token, timeout_s, retry)

    def run(self, what: str, attempt_fn: Callable[[], T]) -> T:
        """Run ``attempt_fn`` with retries on transient failures.

        Raises
        ------
        FederationError
            The hub refused the call (the subclass of its gRPC code).
        HubUnavailable
            Every attempt failed transiently.
        """
        last: grpc.RpcError | None = None
        for attempt in range(self.retry.attempts):
            try:
                return attempt_fn()
            except grpc.RpcError as error:
                if not is_transient(error):
                    raise refusal(error) from error
                last = error
                delay = self.retry.delay(attempt)
                LOGGER.warning(
                    "%s failed (%s), retry %d/%d in %.1fs",
                    what,
                    error.code().name,  # type: ignore[attr-defined]
                    attempt + 1,
                    self.retry.attempts,
                    delay,
                )
                time.sleep(delay)
        raise HubUnavailable(
            f"{what}: hub unreachable after {self.retry.attempts} attempts"
        ) from last
