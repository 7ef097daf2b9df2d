"""DICOMweb routes: QIDO-RS searches, WADO-RS retrieval and STOW-RS, under ``/dicomweb``."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from dicom_node.store.instances import Peer
from viewer_bridge.frames import NoSuchFrame, parse_frame_list, read_frames
from viewer_bridge.headers import HeaderCache
from viewer_bridge.index import BadUid, BridgeIndex, InstanceRef, valid_uid
from viewer_bridge.metadata import PIXEL_DATA, instance_metadata
from viewer_bridge.multipart import (
    MultipartError,
    RelatedParser,
    new_boundary,
    related_content_type,
    write_related,
)
from viewer_bridge.negotiation import (
    DICOM,
    NotAcceptable,
    choose_frame_media,
    choose_instance_syntax,
)
from viewer_bridge.qido import QidoService, QueryError, parse_query
from viewer_bridge.responses import dicom_json, error
from viewer_bridge.stow import StowService
from viewer_bridge.stow_request import early_refusal, parse_body, stow_target

LOGGER = logging.getLogger(__name__)

PREFIX = "/dicomweb"


class DicomWebRoutes:
    """The route handlers, bound to the node's index, files and store."""

    def __init__(self, index: BridgeIndex, headers: HeaderCache, stow: StowService,
                 max_stow_bytes: int, spool_dir: Path | None = None) -> None:
        """``spool_dir``: where STOW-RS parts over 1 MiB wait while the body arrives."""
        self.index = index
        self.headers = headers
        self.qido = QidoService(index, headers)
        self.stow = stow
        self.max_stow_bytes = max_stow_bytes
        self.spool_dir = spool_dir

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def base(request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX

    @staticmethod
    def _uids(request: Request) -> dict[str, str]:
        names = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID",
                 "sop": "SOPInstanceUID"}
        return {k: valid_uid(v, names[k]) for k, v in request.path_params.items() if k in names}

    def _refs(self, request: Request) -> list[InstanceRef]:
        uids = self._uids(request)
        return self.index.instances(uids.get("study"), uids.get("series"), uids.get("sop"))

    def guarded(self, handler: Callable[[Request], Response]) -> Callable[[Request], Any]:
        """Map request errors to 4xx answers with a reason; runs ``handler`` in a thread."""
        def run(request: Request) -> Response:
            try:
                return handler(request)
            except BadUid as exc:
                return error(400, str(exc))
            except QueryError as exc:
                return error(400, str(exc))
            except NotAcceptable as exc:
                return error(406, str(exc))
            except NoSuchFrame as exc:
                return error(404, str(exc))

        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(run, request)
        return endpoint

    # ------------------------------------------------------------------ QIDO-RS

    def search_studies(self, request: Request) -> Response:
        return dicom_json(self.qido.studies(parse_query(request.query_params.multi_items())))

    def search_series(self, request: Request) -> Response:
        uids = self._uids(request)
        query = parse_query(request.query_params.multi_items())
        return dicom_json(self.qido.series(query, uids.get("study")))

    def search_instances(self, request: Request) -> Response:
        uids = self._uids(request)
        query = parse_query(request.query_params.multi_items())
        return dicom_json(self.qido.instances(query, uids.get("study"), uids.get("series")))

    # ------------------------------------------------------------------ WADO-RS

    def metadata(self, request: Request) -> Response:
        refs = self._refs(request)
        if not refs:
            return error(404, "no such study, series or instance")
        base = self.base(request)
        return dicom_json([instance_metadata(self.headers.get(r.path), r, base) for r in refs])

    def retrieve(self, request: Request) -> Response:
        refs = self._refs(request)
        if not refs:
            return error(404, "no such study, series or instance")
        accept = request.headers.get("accept")
        syntaxes = {r.sop_instance_uid: choose_instance_syntax(accept, r.transfer_syntax_uid)
                    for r in refs}
        single = len({*syntaxes.values()}) == 1
        ts = next(iter(syntaxes.values())) if single else None
        boundary = new_boundary()

        def parts() -> Iterator[tuple[bytes, str]]:
            for ref in refs:
                want = syntaxes[ref.sop_instance_uid]
                yield _instance_bytes(ref, want), f"{DICOM}; transfer-syntax={want}"

        return StreamingResponse(write_related(parts(), boundary),
                                 media_type=related_content_type(boundary, DICOM, ts))

    def frames(self, request: Request) -> Response:
        refs = self._refs(request)
        if len(refs) != 1:
            return error(404, "no such instance")
        try:
            numbers = parse_frame_list(request.path_params["frames"])
        except ValueError as exc:
            return error(400, f"bad frame list: {exc}")
        ref = refs[0]
        part_type, ts = choose_frame_media(request.headers.get("accept"),
                                           ref.transfer_syntax_uid)
        data = read_frames(ref.path, numbers, ts)
        boundary = new_boundary()
        ctype = f"{part_type}; transfer-syntax={ts}"
        body = b"".join(write_related(((f, ctype) for f in data), boundary))
        return Response(body, media_type=related_content_type(boundary, part_type, ts))

    def bulkdata(self, request: Request) -> Response:
        refs = self._refs(request)
        if len(refs) != 1:
            return error(404, "no such instance")
        tag = request.path_params["tag"].upper()
        if tag != PIXEL_DATA:
            return error(404, f"no bulk data for {tag[:16]!r}; only {PIXEL_DATA} is bulk")
        ref = refs[0]
        part_type, ts = choose_frame_media(request.headers.get("accept"),
                                           ref.transfer_syntax_uid)
        header = self.headers.get(ref.path)
        count = int(header.get("NumberOfFrames", 1) or 1)
        data = read_frames(ref.path, list(range(1, count + 1)), ts)
        boundary = new_boundary()
        ctype = f"{part_type}; transfer-syntax={ts}"
        body = b"".join(write_related(((f, ctype) for f in data), boundary))
        return Response(body, media_type=related_content_type(boundary, part_type, ts))

    # ------------------------------------------------------------------ STOW-RS

    async def store(self, request: Request) -> Response:
        """STOW-RS: check the request, parse the body as it arrives, store the parts."""
        target = stow_target(request)
        if isinstance(target, Response):
            return target
        refused = await early_refusal(request, self.stow.store.space_refusal(),
                                      self.max_stow_bytes)
        if refused is not None:
            return refused
        try:
            parser = RelatedParser(target.boundary, spool_dir=self.spool_dir)
        except MultipartError as exc:
            return error(400, str(exc))
        try:
            bad = await parse_body(request, parser, self.max_stow_bytes)
            if bad is not None:
                return bad
            try:
                parts = parser.finish()
            except MultipartError as exc:
                return error(400, str(exc))
            peer = Peer(ae_title=None,
                        address=request.client.host if request.client else None)
            result = await run_in_threadpool(self.stow.store_parts, parts, target.study_uid,
                                             peer)
        finally:
            parser.close()
        warnings = "; ".join(reason for *_, reason in result.failed)
        headers = {"Warning": f'299 tessera "{_header_text(warnings)}"'} if warnings else None
        return dicom_json(result.to_json(self.base(request), target.study_uid),
                          status=result.http_status, headers=headers)

    # ------------------------------------------------------------------ routes

    def routes(self) -> list[Route]:
        g = self.guarded
        st = "/studies/{study}"
        se = st + "/series/{series}"
        sop = se + "/instances/{sop}"
        return [
            Route("/studies", g(self.search_studies), methods=["GET"]),
            Route("/studies", self.store, methods=["POST"]),
            Route("/series", g(self.search_series), methods=["GET"]),
            Route("/instances", g(self.search_instances), methods=["GET"]),
            Route(st, g(self.retrieve), methods=["GET"]),
            Route(st, self.store, methods=["POST"]),
            Route(st + "/metadata", g(self.metadata), methods=["GET"]),
            Route(st + "/series", g(self.search_series), methods=["GET"]),
            Route(st + "/instances", g(self.search_instances), methods=["GET"]),
            Route(se, g(self.retrieve), methods=["GET"]),
            Route(se + "/metadata", g(self.metadata), methods=["GET"]),
            Route(se + "/instances", g(self.search_instances), methods=["GET"]),
            Route(sop, g(self.retrieve), methods=["GET"]),
            Route(sop + "/metadata", g(self.metadata), methods=["GET"]),
            Route(sop + "/frames/{frames}", g(self.frames), methods=["GET"]),
            Route(sop + "/bulkdata/{tag}", g(self.bulkdata), methods=["GET"]),
        ]


def _header_text(text: str) -> str:
    """Reasons as one latin-1 header value without quotes or control characters."""
    clean = "".join(c if 32 <= ord(c) < 127 and c != '"' else " " for c in text)
    return clean[:1000]


def _instance_bytes(ref: InstanceRef, transfer_syntax: str) -> bytes:
    """The stored file, or the instance re-encoded in explicit VR little endian."""
    data = ref.path.read_bytes()
    if transfer_syntax == ref.transfer_syntax_uid:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
