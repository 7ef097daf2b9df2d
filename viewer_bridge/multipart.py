"""multipart/related bodies (PS3.18 8.6): parsing STOW-RS requests, writing WADO-RS answers.

Parsing uses python-multipart's streaming parser, fed as the body arrives
(:class:`RelatedParser`): each part goes to its own spool file (in memory up to
``SPOOL_IN_MEMORY`` bytes, then on disk), so a large body is never held in memory at
once. The whole body is parsed before any part is used, so a broken body stores
nothing.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header

from viewer_bridge.errors import BridgeError

LOGGER = logging.getLogger(__name__)

CRLF = b"\r\n"
SPOOL_IN_MEMORY = 1 << 20  # a part larger than this is spooled to disk


class MultipartError(BridgeError, ValueError):
    """The body is not a well-formed multipart message; the message says why."""


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    spool: IO[bytes] | None = None  # the part's bytes, when parsed by RelatedParser

    @property
    def data(self) -> bytes:
        """The part's bytes (read from its spool file on each call)."""
        if self.spool is not None:
            self.spool.seek(0)
            return self.spool.read()
        return b"".join(self.chunks)

    @property
    def content_type(self) -> str | None:
        value = self.headers.get("content-type")
        return media_type(value)[0] if value else None

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


def media_type(header: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"'`` -> ``('multipart/related', {...})``.

    Type and parameter names are lower-cased; parameter values keep their case.
    """
    ctype, params = parse_options_header(header)
    return (ctype.decode("latin-1").strip().lower(),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in params.items()})


class RelatedParser:
    """A multipart/related body parsed as it arrives, each part spooled.

    ``spool_dir``: where parts over ``SPOOL_IN_MEMORY`` bytes go (the system's temporary
    directory when ``None``). :meth:`close` releases every part's spool.
    """

    def __init__(self, boundary: str, *, max_parts: int = 10_000,
                 spool_dir: Path | None = None) -> None:
        if not boundary or len(boundary) > 70:
            raise MultipartError(
                "the multipart boundary is missing or longer than 70 characters")
        self.parts: list[Part] = []
        self._max_parts = max_parts
        self._spool_dir = spool_dir
        self._field: list[bytes] = []
        self._value: list[bytes] = []
        self._finished = False
        self._parser = MultipartParser(boundary, {  # type: ignore[arg-type]
            "on_part_begin": self._begin, "on_part_data": self._data,
            "on_header_field": self._header_field, "on_header_value": self._header_value,
            "on_header_end": self._header_end, "on_end": self._end,
        })

    def _begin(self) -> None:
        if len(self.parts) >= self._max_parts:
            raise MultipartError(f"more than {self._max_parts} parts")
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by Part.close)
            max_size=SPOOL_IN_MEMORY,
            dir=str(self._spool_dir) if self._spool_dir is not None else None)
        self.parts.append(Part(spool=spool))  # type: ignore[arg-type]

    def _data(self, data: bytes, start: int, end: int) -> None:
        spool = self.parts[-1].spool
        assert spool is not None
        spool.write(memoryview(data)[start:end])

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.append(data[start:end])

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.append(data[start:end])

    def _header_end(self) -> None:
        name = b"".join(self._field).decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = b"".join(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _end(self) -> None:
        self._finished = True

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes of the body.

        Raises
        ------
        MultipartError
            A malformed delimiter or header, or more parts than allowed.
        """
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MultipartError(f"malformed multipart body: {exc}") from None

    def finish(self) -> list[Part]:
        """The parts, once the whole body was fed.

        Raises
        ------
        MultipartError
            No parts, or a body that ends before the closing delimiter.
        """
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise MultipartError(f"malformed multipart body: {exc}") from None
        if not self._finished:
            raise MultipartError("the multipart body ends before its closing boundary")
        if not self.parts:
            raise MultipartError("the multipart body has no parts")
        return self.parts

    def close(self) -> None:
        for part in self.parts:
            part.close()


def parse_related(body: bytes, boundary: str, *, max_parts: int = 10_000) -> list[Part]:
    """Split a whole multipart body into its parts (see :class:`RelatedParser`).

    Raises
    ------
    MultipartError
        No parts, a malformed delimiter or header, a body that ends before the closing
        delimiter, or more than ``max_parts`` parts.
    """
    parser = RelatedParser(boundary, max_parts=max_parts)
    try:
        parser.feed(body)
        return parser.finish()
    except MultipartError:
        parser.close()
        raise


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
