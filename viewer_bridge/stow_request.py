"""Reading a STOW-RS request before anything is stored.

The target study and the multipart boundary from the URL and content type, the
refusals that come before the body is read (low disk space, a declared length over the
limit), and the body parsed as it arrives: each part spooled (to disk past 1 MiB), so
memory stays bounded by the largest part, not the body.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from viewer_bridge.index import BadUid, valid_uid
from viewer_bridge.multipart import MultipartError, RelatedParser, media_type
from viewer_bridge.negotiation import DICOM
from viewer_bridge.responses import error

# A client that is still sending when the 413 goes out sees a reset instead of the
# answer; read (and drop) this much more so ordinary clients get the reason.
_DRAIN_BYTES = 64 * 1024 * 1024
_FEED_BYTES = 1 << 20  # body bytes handed to the parser at once (off the event loop)


class StowTarget(NamedTuple):
    """The study the instances must belong to (``None``: any) and the part boundary."""

    study_uid: str | None
    boundary: str


def stow_target(request: Request) -> StowTarget | Response:
    """The request's target, or the 400/415 answer when its URL or content type is bad."""
    study_uid = request.path_params.get("study")
    if study_uid is not None:
        try:
            study_uid = valid_uid(study_uid, "StudyInstanceUID")
        except BadUid as exc:
            return error(400, str(exc))
    mtype, params = media_type(request.headers.get("content-type", ""))
    part_type = params.get("type", DICOM).lower()
    if mtype != "multipart/related" or part_type != DICOM:
        return error(415, f"STOW-RS takes multipart/related; type=\"{DICOM}\", "
                     f"not {request.headers.get('content-type', 'no content type')!r}")
    boundary = params.get("boundary", "")
    if not boundary:
        return error(400, "the multipart/related content type has no boundary")
    return StowTarget(study_uid, boundary)


async def early_refusal(request: Request, low_space: str | None, limit: int) -> Response | None:
    """The 503 (``low_space``: why the store refuses) or 413 (declared length over
    ``limit``) answer, after draining some of the body; ``None`` to go on reading."""
    if low_space is not None:
        await _drain(request, _DRAIN_BYTES)
        return error(503, f"the node is not accepting instances now: {low_space}",
                     headers={"Retry-After": "300"})
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, limit + _DRAIN_BYTES)
        return _too_big(limit)
    return None


async def parse_body(request: Request, parser: RelatedParser, limit: int) -> Response | None:
    """Feed the body to ``parser`` as it arrives; the 413 (over ``limit``) or 400 (bad
    multipart) answer, or ``None`` when the whole body went in."""
    size = 0
    pending: list[bytes] = []
    pending_size = 0
    broken: MultipartError | None = None
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + _DRAIN_BYTES:
            return _too_big(limit)
        if size > limit or broken is not None:
            continue  # keep reading (and dropping) so the client gets the answer
        pending.append(chunk)
        pending_size += len(chunk)
        if pending_size >= _FEED_BYTES:
            broken = await _feed(parser, pending)
            pending, pending_size = [], 0
    if size > limit:
        return _too_big(limit)
    broken = broken or await _feed(parser, pending)
    if broken is not None:
        return error(400, str(broken))
    return None


def _too_big(limit: int) -> Response:
    return error(413, f"the request body exceeds the limit of {limit} bytes")


async def _feed(parser: RelatedParser, chunks: list[bytes]) -> MultipartError | None:
    """Feed ``chunks`` to ``parser`` off the event loop; the error when the body is bad."""
    if not chunks:
        return None
    try:
        await run_in_threadpool(parser.feed, b"".join(chunks))
    except MultipartError as exc:
        return exc
    return None


async def _drain(request: Request, budget: int) -> None:
    """Read and discard up to ``budget`` bytes of a body that will not be stored."""
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > budget:
                return
    except Exception:  # the client gave up first: nothing to answer then
        return
