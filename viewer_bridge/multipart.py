"""multipart/related bodies (PS3.18 8.6): parsing STOW-RS requests, writing WADO-RS answers.

Parsing uses python-multipart's streaming parser; the whole body is parsed before any
part is used, so a broken body stores nothing.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from viewer_bridge.errors import BridgeError

LOGGER = logging.getLogger(__name__)

CRLF = b"\r\n"


class MultipartError(BridgeError, ValueError):
    """The body is not a well-formed multipart message; the message says why."""


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("content-type")
        return media_type(value)[0] if value else None


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"'`` -> ``('multipart/related', {...})``.

    Type and parameter names are lower-cased; parameter values keep their case.
    """
    ctype, params = parse_options_header(header)
    return (ctype.decode("latin-1").strip().lower(),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()})


def parse_related(body: bytes, boundary: str, *, max_parts: int = 10_000) -> list[Part]:
    """Split a multipart body into its parts.

    Raises
    ------
    MultipartError
        No parts, a malformed delimiter or header, a body that ends before the closing
        delimiter, or more than ``max_parts`` parts.
    """
    if not boundary or len(boundary) > 70:
        raise MultipartError("the multipart boundary is missing or longer than 70 characters")
    parts: list[Part] = []
    header_field: list[bytes] = []
    header_value: list[bytes] = []
    finished = False

    def on_part_begin() -> None:
        if len(parts) >= max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        parts.append(Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].chunks.append(data[start:end])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.append(data[start:end])

    def on_header_end() -> None:
        name = b"".join(header_field).decode("latin-1").strip().lower()
        parts[-1].headers[name] = b"".join(header_value).decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    def on_end() -> None:
        nonlocal finished
        finished = True

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_part_data": on_part_data,
        "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_end": on_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise MultipartError(f"malformed multipart body: {exc}") from None
    if not finished:
        raise MultipartError("the multipart body ends before its closing boundary")
    if not parts:
        raise MultipartError("the multipart body has no parts")
    return parts


def new_boundary() -> str:
    return f"tessera-{secrets.token_hex(12)}"


def related_content_type(boundary: str, part_type: str, transfer_syntax: str | None = None
                         ) -> str:
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def write_related(parts: Iterable[tuple[bytes, str]], boundary: str,
                  location: str | None = None) -> Iterator[bytes]:
    """Yield a multipart/related body part by part: ``(payload, content_type)`` pairs."""
    delimiter = b"--" + boundary.encode("ascii")
    for payload, content_type in parts:
        head = delimiter + CRLF + b"Content-Type: " + content_type.encode("latin-1") + CRLF
        if location:
            head += b"Content-Location: " + location.encode("latin-1") + CRLF
        yield head + CRLF
        yield payload
        yield CRLF
    yield delimiter + b"--" + CRLF
