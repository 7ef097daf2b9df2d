"""Start the hub: gRPC server with mutual TLS, health checking, reflection, aggregator."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from federation_grpc import wire
from federation_grpc._proto import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from federation_grpc.errors import FailedPrecondition
from federation_grpc.hub.admission import PerNodeCallLimit
from federation_grpc.hub.config import HubConfig
from federation_grpc.hub.grpc_api import MAX_CHUNK, AdminServicer, FederationServicer
from federation_grpc.hub.service import HubService

LOGGER = logging.getLogger(__name__)

# One chunk plus protobuf framing must fit in a message.
MAX_MESSAGE_BYTES = MAX_CHUNK + 1024 * 1024
# What a stream may have in flight towards the hub beyond the message being read. grpc
# otherwise grows each stream's HTTP/2 window with its bandwidth-delay estimate (to
# several MB), which fifty uploads at once held in memory; a fixed window keeps a
# stream's memory at about a chunk plus this. With nodes' 256 kB chunks (``[federation]
# chunk_kb``), 256 kB instead of 1 MB took the hub's peak RSS for 50 concurrent 10 MB
# uploads from 254-280 MB to 192-203 MB at the same throughput
# (benchmarks/federation.py --clients 50 --size-mb 10).
STREAM_WINDOW_BYTES = 256 * 1024
SERVICE_NAMES = (
    federation_pb2.DESCRIPTOR.services_by_name["Federation"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


def server_credentials(config: HubConfig) -> grpc.ServerCredentials:
    """Mutual TLS: the hub certificate, and client certificates required from the CA."""
    tls = config.tls
    assert tls.ca_cert and tls.server_cert and tls.server_key
    return grpc.ssl_server_credentials(
        [(tls.server_key.read_bytes(), tls.server_cert.read_bytes())],
        root_certificates=tls.ca_cert.read_bytes(),
        require_client_auth=True,
    )


class _Handlers:
    """Stands in for a server to collect the generated code's method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_federation_servicer(servicer: FederationServicer, server: grpc.Server) -> None:
    """The generated handlers, but upload messages read by :mod:`federation_grpc.wire`
    (a chunk as a view of the received bytes, not a protobuf copy)."""
    collected = _Handlers()
    federation_pb2_grpc.add_FederationServicer_to_server(servicer, collected)
    collected.handlers["UploadUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.UploadUpdate,
        request_deserializer=wire.parse_upload_request,
        response_serializer=federation_pb2.UploadUpdateResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(collected.service, collected.handlers),)
    )
    server.add_registered_method_handlers(collected.service, collected.handlers)


def check_transport(config: HubConfig, insecure_loopback: bool) -> None:
    """Refuse to serve without TLS anywhere but on loopback, or with TLS unconfigured.

    Raises
    ------
    FailedPrecondition
        ``insecure_loopback`` on a non-loopback host, or TLS without its files.
    """
    if insecure_loopback and not config.is_loopback():
        raise FailedPrecondition(
            f"insecure mode is only allowed on loopback, not on {config.host!r}"
        )
    if not insecure_loopback and not config.tls.configured:
        raise FailedPrecondition(
            "TLS is not configured ([tls] ca_cert, server_cert, server_key); "
            "use --insecure-loopback only for local tests"
        )


def per_node_call_limit(config: HubConfig) -> PerNodeCallLimit:
    """The interceptor bounding one node's concurrent calls; warns when the bound does not
    keep one node from holding every worker."""
    per_node = config.limits.max_calls_per_node
    if not per_node or per_node >= config.max_workers:
        LOGGER.warning(
            "max_calls_per_node %d does not stop one node from holding all %d workers",
            per_node, config.max_workers,
        )
    return PerNodeCallLimit(per_node)


class HubServer:
    """The hub process's server; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        config: HubConfig,
        service: HubService | None = None,
        *,
        insecure_loopback: bool = False,
        watch_poll_s: float = 2.0,
        keepalive_s: float = 15.0,
    ) -> None:
        check_transport(config, insecure_loopback)
        self.config = config
        self.service = service or HubService(config)
        self._owns_service = service is None
        self._stopping = threading.Event()
        self.call_limit = per_node_call_limit(config)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="hub"),
            interceptors=[self.call_limit],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
            ],
        )
        add_federation_servicer(
            FederationServicer(
                self.service,
                watch_poll_s=watch_poll_s,
                keepalive_s=keepalive_s,
                stopping=self._stopping,
            ),
            self.server,
        )
        admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self.service), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self._bind(insecure_loopback)

    def _bind(self, insecure_loopback: bool) -> int:
        """Bind the configured address (TLS unless ``insecure_loopback``); the bound port."""
        address = f"{self.config.host}:{self.config.port}"
        if insecure_loopback:
            LOGGER.warning("hub listens WITHOUT TLS on %s (loopback only)", address)
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, server_credentials(self.config))
        if port == 0:
            raise FailedPrecondition(f"could not bind {address}")
        return port

    def start(self) -> HubServer:
        self.server.start()
        self.service.aggregator.start()
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        LOGGER.info("hub serving on %s:%d", self.config.host, self.port)
        return self

    def stop(self, grace: float = 2.0) -> None:
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._owns_service:
            self.service.close()
        else:
            self.service.aggregator.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()
