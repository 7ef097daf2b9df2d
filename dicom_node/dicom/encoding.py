"""Structural check of an encoded dataset before anything trusts it.

pydicom reads truncated data without complaint (a short read becomes a short
value), so received bytes are first walked element by element: every declared
length must fit in what is left, undefined-length sequences and encapsulated
pixel data must be closed by their delimiters, and no single value may exceed the
configured limit.
"""

from __future__ import annotations

import struct

from dicom_node.errors import InvalidDatasetError

UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UR", b"UT", b"UN",
             b"SV", b"UV"}
_MAX_DEPTH = 32


class EncodingError(InvalidDatasetError):
    """The encoded dataset is truncated, inconsistent or exceeds a limit."""


def _label(tag: int) -> str:
    return f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    def __init__(self, data: bytes, little: bool, max_value: int,
                 wanted: frozenset[int] = frozenset()) -> None:
        self.data = data
        self.wanted = wanted
        self.found: dict[int, bytes] = {}
        self.end = len(data)
        self.little = little
        self.max_value = max_value
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<I" if little else ">I")
        self.tag_pair = struct.Struct("<HH" if little else ">HH")
        # group, element, VR, 16-bit length (explicit VR); group, element, 32-bit length
        self.explicit_header = struct.Struct("<HH2sH" if little else ">HH2sH")
        self.implicit_header = struct.Struct("<HHI" if little else ">HHI")

    def _need(self, pos: int, n: int, what: str) -> None:
        if pos + n > self.end:
            raise EncodingError(
                f"truncated dataset: {what} at byte {pos} needs {n} bytes, "
                f"{self.end - pos} remain"
            )

    def _tag(self, pos: int) -> int:
        self._need(pos, 4, "element tag")
        group, elem = self.tag_pair.unpack_from(self.data, pos)
        return (group << 16) | elem

    def dataset(self, pos: int, end: int, implicit: bool, depth: int, in_item: bool) -> int:
        """Walk elements from ``pos``; returns the position after the dataset.

        The hot loop of every received instance (a CT slice has ~260 elements): an
        element whose header lies wholly inside the data is read with one unpack and no
        method calls; the last few bytes go through :meth:`_tag`/:meth:`_header`, which
        name what a truncated header lacks. Both paths accept and refuse the same bytes.
        """
        if depth > _MAX_DEPTH:
            raise EncodingError(f"sequences nested deeper than {_MAX_DEPTH}")
        data, limit, max_value = self.data, self.end, self.max_value
        wanted = self.wanted if depth == 0 else frozenset()
        explicit_header = self.explicit_header.unpack_from
        implicit_header = self.implicit_header.unpack_from
        u32 = self.u32.unpack_from
        while pos < end:
            if pos + 12 > limit:  # near the end: the careful path
                tag = self._tag(pos)
                if tag == _ITEM_DELIM:
                    return self._item_delimiter(pos, in_item)
                pos, vr, length = self._header(pos, tag, implicit)
            else:
                group, elem, vr, length = explicit_header(data, pos)
                tag = (group << 16) | elem
                if tag == _ITEM_DELIM:
                    return self._item_delimiter(pos, in_item)
                if implicit or group == 0xFFFE:
                    length = implicit_header(data, pos)[2]
                    vr = b""
                    pos += 8
                elif vr in _LONG_VRS:
                    length = u32(data, pos + 8)[0]
                    pos += 12
                elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
                    pos += 8
                else:
                    raise EncodingError(f"invalid VR {vr!r} at byte {pos + 4}")
            if length == UNDEFINED:
                if implicit or vr in (b"SQ", b"UN"):
                    # An undefined-length UN is an implicit VR little endian sequence.
                    pos = self.sequence(pos, implicit or vr == b"UN", depth + 1)
                elif tag == 0x7FE00010:
                    pos = self.fragments(pos)
                else:
                    raise EncodingError(
                        f"{_label(tag)} has undefined length but VR {vr.decode()}")
                continue
            if length > max_value:
                raise EncodingError(f"{_label(tag)} declares {length} bytes, over the "
                                    f"limit of {max_value}")
            if pos + length > limit:  # the label is made only for the error
                self._need(pos, length, f"value of {_label(tag)}")
            if tag in wanted:
                self.found[tag] = data[pos : pos + length]
            pos += length
        if in_item:
            raise EncodingError("truncated dataset: item not closed by its delimiter")
        return pos

    def _item_delimiter(self, pos: int, in_item: bool) -> int:
        if not in_item:
            raise EncodingError(f"item delimiter outside an item at byte {pos}")
        self._need(pos, 8, "item delimiter")
        return pos + 8

    def _header(self, pos: int, tag: int, implicit: bool) -> tuple[int, bytes, int]:
        if implicit or (tag >> 16) == 0xFFFE:
            self._need(pos, 8, "element header")
            return pos + 8, b"", self.u32.unpack_from(self.data, pos + 4)[0]
        self._need(pos, 8, "element header")
        vr = self.data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            self._need(pos, 12, "element header")
            return pos + 12, vr, self.u32.unpack_from(self.data, pos + 8)[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise EncodingError(f"invalid VR {vr!r} at byte {pos + 4}")
        return pos + 8, vr, self.u16.unpack_from(self.data, pos + 6)[0]

    def sequence(self, pos: int, implicit: bool, depth: int) -> int:
        while True:
            tag = self._tag(pos)
            self._need(pos, 8, "item header")
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM:
                raise EncodingError(f"expected a sequence item at byte {pos - 8}")
            if length == UNDEFINED:
                pos = self.dataset(pos, self.end, implicit, depth, in_item=True)
            else:
                self._need(pos, length, "sequence item")
                self.dataset(pos, pos + length, implicit, depth, in_item=False)
                pos += length

    def fragments(self, pos: int) -> int:
        while True:
            tag = self._tag(pos)
            self._need(pos, 8, "fragment header")
            length = self.u32.unpack_from(self.data, pos + 4)[0]
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM or length == UNDEFINED:
                raise EncodingError(f"malformed encapsulated pixel data at byte {pos - 8}")
            if length > self.max_value:
                raise EncodingError(f"pixel data fragment of {length} bytes is over the limit")
            self._need(pos, length, "pixel data fragment")
            pos += length


def check_encoding(
    data: bytes,
    offset: int,
    *,
    implicit: bool,
    little: bool,
    max_value: int,
    wanted: frozenset[int] = frozenset(),
) -> dict[int, bytes]:
    """Walk ``data[offset:]`` as one dataset; raise :class:`EncodingError` if malformed.

    Returns the raw values of the top-level elements whose tags are in ``wanted``.
    """
    walker = _Walker(data, little, max_value, wanted)
    walker.dataset(offset, len(data), implicit, 0, in_item=False)
    return walker.found
