"""Who is calling, and may they start one more call: certificate fingerprints and a
per-node cap on concurrent RPCs and open streams.

Every RPC (and every open stream: a watch, an upload, a download) holds one of the
server's ``max_workers`` threads. Without a cap, one node opening enough
``WatchGenerations`` streams starves every other node. :class:`PerNodeCallLimit` counts
the calls in flight per caller and answers RESOURCE_EXHAUSTED beyond
``[limits] max_calls_per_node``; other callers are not affected.

The caller is its client certificate (sha256 of the DER bytes), which mutual TLS has
verified before any RPC runs and which costs nothing to read; on an insecure loopback
hub (tests, the demo) it is the node token, or the peer's address for calls without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

LOGGER = logging.getLogger(__name__)


def certificate_sha256(pem: bytes | str) -> str:
    """sha256 hex of a PEM certificate's DER bytes (what ``openssl x509 -fingerprint
    -sha256`` prints, in lowercase without colons).

    Raises
    ------
    ValueError
        When ``pem`` holds no PEM certificate.
    """
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise ValueError("not a PEM certificate")
    begin = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----", begin) + len("-----END CERTIFICATE-----")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text[begin:end])).hexdigest()


def peer_certificate_sha256(context: grpc.ServicerContext) -> str:
    """Fingerprint of the client certificate of this call; "" without TLS."""
    pems = context.auth_context().get("x509_pem_cert") or []
    return certificate_sha256(pems[0]) if pems else ""


def caller_key(context: grpc.ServicerContext) -> str:
    """The certificate fingerprint; without TLS (loopback tests and demos, where every
    node shares one address) the hash of the bearer token, else the peer's address."""
    fingerprint = peer_certificate_sha256(context)
    if fingerprint:
        return fingerprint
    for key, value in context.invocation_metadata():
        if key == "authorization" and isinstance(value, str):
            return "token:" + hashlib.sha256(value.encode()).hexdigest()
    return context.peer().rsplit(":", 1)[0]


class CallCounter:
    """Calls in flight per caller, at most ``limit`` each (``limit`` 0: no cap)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        with self._lock:
            held = self._in_flight.get(key, 0)
            if self.limit and held >= self.limit:
                return False
            self._in_flight[key] = held + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            held = self._in_flight.get(key, 0) - 1
            if held > 0:
                self._in_flight[key] = held
            else:
                self._in_flight.pop(key, None)

    def in_flight(self, key: str) -> int:
        with self._lock:
            return self._in_flight.get(key, 0)


class PerNodeCallLimit(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse a caller's call beyond ``limit`` in flight with RESOURCE_EXHAUSTED."""

    def __init__(self, limit: int, log_every_s: float = 60.0) -> None:
        self.counter = CallCounter(limit)
        self.log_every_s = log_every_s
        self._logged: dict[str, tuple[float, int]] = {}  # key -> (last log, refused since)
        self._log_lock = threading.Lock()

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not self.counter.limit:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, method),
            handler.request_deserializer, handler.response_serializer)

    def _admit(self, context: grpc.ServicerContext, method: str) -> Callable[[], None]:
        """Count the call in, or abort it; returns the release (safe to call twice)."""
        key = caller_key(context)
        if not self.counter.acquire(key):
            self._log_refusal(method, key)
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this node already has {self.counter.limit} calls or streams open "
                "([limits] max_calls_per_node); close one or retry later",
            )
        held = [key]

        def release() -> None:
            with contextlib.suppress(IndexError):  # list.pop is atomic: released once
                self.counter.release(held.pop())

        # Runs when the RPC ends however it ends (a cancelled stream too).
        context.add_callback(release)
        return release

    def _log_refusal(self, method: str, key: str) -> None:
        """One line per caller per ``log_every_s``, counting the refusals in between (a
        node retrying, or a hostile one, must not flood the log)."""
        now = time.monotonic()
        with self._log_lock:
            last, refused = self._logged.get(key, (-math.inf, 0))
            if now - last < self.log_every_s:
                self._logged[key] = (last, refused + 1)
                return
            self._logged[key] = (now, 0)
        LOGGER.warning("%s refused: %d calls in flight from %s (max_calls_per_node); "
                       "%d more refused since the last such line",
                       method, self.counter.limit, key[:22], refused)

    def _unary(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            release = self._admit(context, method)
            try:
                return behaviour(request, context)
            finally:
                release()

        return wrapper

    def _streaming(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            release = self._admit(context, method)
            try:
                yield from behaviour(request, context)
            finally:
                release()

        return wrapper
