"""The bridge's ASGI application: DICOMweb, /healthz, /status, /login and OHIF at /."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.config import NodeConfig
from dicom_node.dicom.peer_text import escaped
from dicom_node.prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dicom_node.prometheus import render as render_metrics
from dicom_node.store.db import Database
from dicom_node.store.files import InstanceFiles
from dicom_node.store.instances import InstanceStore
from dicom_node.store.private import private_dir
from viewer_bridge.auth import COOKIE, TokenCheck
from viewer_bridge.dicomweb import PREFIX, DicomWebRoutes
from viewer_bridge.headers import HeaderCache
from viewer_bridge.index import BridgeIndex
from viewer_bridge.status_page import render_status_page, status_data
from viewer_bridge.stow import StowService
from viewer_bridge.web import SinglePageApp, login_routes

LOGGER = logging.getLogger(__name__)

PROTECTED = (PREFIX, "/status")


class BearerAuth:
    """Refuses requests to protected paths without a valid token (401 with a reason)."""

    def __init__(self, app: ASGIApp, tokens: TokenCheck) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED) \
                and scope["method"] != "OPTIONS":
            request = Request(scope)
            if not self.tokens.from_headers(request.headers.get("authorization"),
                                            request.cookies.get(COOKIE)):
                LOGGER.warning("refused %s %s from %s: no valid token",
                               escaped(scope["method"], 16), escaped(scope["path"], 80),
                               escaped((scope.get("client") or ("?",))[0]))
                body = json.dumps({"error": "a valid bearer token is required"}).encode()
                response = Response(body, status_code=401, media_type="application/json",
                                    headers={"WWW-Authenticate": 'Bearer realm="tessera"'})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(config: NodeConfig, db: Database, files: InstanceFiles,
               store: InstanceStore) -> Starlette:
    """The application for one node; ``config.http`` says tokens, CORS and OHIF."""
    http = config.http
    tokens = TokenCheck(http.tokens)
    index = BridgeIndex(db, files)
    headers = HeaderCache()
    stow = StowService(store, int(config.dicom.max_instance_mb * 1024 * 1024))
    dicomweb = DicomWebRoutes(index, headers, stow, int(http.max_stow_mb * 1024 * 1024),
                              spool_dir=private_dir(config.node.data_dir / "spool"))
    ohif_base = http.ohif_url or ("/" if http.ohif_dir else "")

    async def healthz(request: Request) -> Response:
        def probe() -> bool:
            with db.session() as s:
                s.connection().exec_driver_sql("SELECT 1")
            return True
        try:
            await run_in_threadpool(probe)
        except Exception as exc:
            LOGGER.exception("health check failed")
            return JSONResponse({"status": "unhealthy", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(render_metrics, db, files.kept)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    async def status_json(request: Request) -> Response:
        data: dict[str, Any] = await run_in_threadpool(status_data, db)
        return Response(json.dumps(data, default=str), media_type="application/json")

    async def status_html(request: Request) -> Response:
        data = await run_in_threadpool(status_data, db)
        return HTMLResponse(render_status_page(data, ohif_base))

    login_form, login = login_routes(tokens, secure_cookie=False)
    routes: list[Any] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/status", status_html, methods=["GET"]),
        Route("/status.json", status_json, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Mount(PREFIX, routes=dicomweb.routes()),
    ]
    if http.ohif_dir is not None:
        routes.append(Mount("/", app=SinglePageApp(http.ohif_dir, tokens), name="ohif"))
    middleware = [Middleware(BearerAuth, tokens=tokens)]
    if http.cors_origins:
        # Outermost, so that 401 answers carry CORS headers too and the browser can
        # show the reason; preflights are answered here, before authentication.
        middleware.insert(0, Middleware(
            CORSMiddleware, allow_origins=list(http.cors_origins), allow_credentials=False,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Accept"],
            expose_headers=["Content-Type", "Content-Length", "Warning"], max_age=600))
    return Starlette(routes=routes, middleware=middleware)
