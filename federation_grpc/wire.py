"""Upload chunks on the wire without protobuf copies.

An ``UploadUpdateRequest`` carrying a chunk is, in protobuf's wire format, one tag byte
(field 2, length-delimited), the chunk's length as a varint, then the chunk's bytes.
Parsing it with protobuf copies the chunk out of the received message, and building it
copies the chunk in (and serialising copies it again). Both ends use this module
instead, for the chunk messages only:

* the hub's deserializer (:func:`parse_upload_request`) returns a chunk as a
  ``memoryview`` over the received message (no copy), and any other message, the
  header above all, as a parsed ``UploadUpdateRequest``;
* the node's serializer (:func:`serialize_upload_request`) writes a chunk's prefix and
  bytes into the message in one copy.

The bytes on the wire are exactly what protobuf writes and reads, so either end may
still be a plain protobuf implementation (a message that is not exactly one chunk
field, e.g. with unknown fields, goes through protobuf as before).
"""

from __future__ import annotations

from federation_grpc._proto import federation_pb2 as pb

_CHUNK_TAG = (2 << 3) | 2  # field 2 (chunk), wire type 2 (length-delimited)
UPLOAD_METHOD = "/tessera.federation.v1.Federation/UploadUpdate"

UploadPart = pb.UploadUpdateRequest | memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def parse_upload_request(data: bytes) -> UploadPart:
    """A chunk message as a view of its bytes; any other message parsed by protobuf."""
    if data[:1] == bytes((_CHUNK_TAG,)):
        length, shift, position = 0, 0, 1
        while position < len(data) and position <= 10:
            byte = data[position]
            length |= (byte & 0x7F) << shift
            position += 1
            if not byte & 0x80:
                if position + length == len(data):
                    return memoryview(data)[position:]
                break
            shift += 7
    return pb.UploadUpdateRequest.FromString(data)


def serialize_upload_request(part: UploadPart | bytes) -> bytes:
    """A chunk (bytes or a view) as a chunk message in one copy; a message as protobuf."""
    if isinstance(part, pb.UploadUpdateRequest):
        return part.SerializeToString()
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(part)), part))


def chunk_of(part: UploadPart) -> memoryview | None:
    """The chunk a message carries, or None when it carries something else."""
    if isinstance(part, memoryview):
        return part
    if part.WhichOneof("part") == "chunk":
        return memoryview(part.chunk)
    return None
