"""Browser-facing pages: /login (sets the token cookie), OHIF's viewer at / with a
single-page-app fallback to index.html."""

from __future__ import annotations

import html
import logging
from pathlib import Path
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from dicom_node.dicom.peer_text import escaped
from viewer_bridge.auth import COOKIE, TokenCheck

LOGGER = logging.getLogger(__name__)

_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>Tessera sign-in</title>
<style>body{{font-family:sans-serif;margin:3em}}input{{width:32em}}</style></head><body>
<h1>Tessera node</h1><p>{message}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>Access token <input type="password" name="token" autofocus></label>
<button type="submit">Sign in</button></form></body></html>"""


def safe_next(value: str | None) -> str:
    """Only same-site relative paths: never ``//host`` or a scheme."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def login_routes(tokens: TokenCheck, secure_cookie: bool):
    async def login_form(request: Request) -> Response:
        nxt = safe_next(request.query_params.get("next"))
        return HTMLResponse(_LOGIN.format(message="Sign in with a token from "
                                          "<code>tessera node token</code>.",
                                          next=html.escape(nxt)))

    async def login(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token") or "")
        nxt = safe_next(str(form.get("next") or "/"))
        if not tokens.valid(token):
            LOGGER.warning("failed sign-in from %s",
                           escaped(request.client.host if request.client else "?"))
            return HTMLResponse(_LOGIN.format(message="That token is not valid.",
                                              next=html.escape(nxt)), status_code=401)
        response = RedirectResponse(nxt, status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                            secure=secure_cookie, path="/")
        return response

    return login_form, login


class SinglePageApp(StaticFiles):
    """OHIF's dist/: files as they are; any other path gets index.html (client routing).

    A browser without the token cookie is sent to /login first, so OHIF never starts
    without a way to reach the DICOMweb data source.
    """

    def __init__(self, directory: Path, tokens: TokenCheck) -> None:
        super().__init__(directory=directory, html=True, check_dir=True)
        self.tokens = tokens

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            response = await super().get_response(path, scope)
            is_index = path in ("", ".", "index.html")
        except HTTPException as exc:
            if exc.status_code != 404:
                raise
            response = await super().get_response("index.html", scope)
            is_index = True
        if is_index:
            request = Request(scope)
            if not self.tokens.valid(request.cookies.get(COOKIE)):
                target = request.url.path + (f"?{request.url.query}" if request.url.query
                                             else "")
                return RedirectResponse(f"/login?next={quote(target, safe='')}",
                                        status_code=303)
            response.headers["Cache-Control"] = "no-cache"
        return response
