"""Hand-framed upload chunks are byte for byte what protobuf writes and reads."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from federation_grpc import wire
from federation_grpc._proto import federation_pb2 as pb


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (4 << 20) + 3])
def test_chunk_messages_match_protobuf_both_ways(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    encoded = pb.UploadUpdateRequest(chunk=data).SerializeToString()
    assert wire.serialize_upload_request(memoryview(data)) == encoded
    parsed = wire.parse_upload_request(encoded)
    assert isinstance(parsed, memoryview)
    assert bytes(parsed) == data
    assert wire.chunk_of(parsed) == data


def test_other_messages_go_through_protobuf() -> None:
    header = pb.UploadUpdateRequest(header=pb.UpdateHeader(update_id="u", total_size=9))
    assert wire.serialize_upload_request(header) == header.SerializeToString()
    parsed = wire.parse_upload_request(header.SerializeToString())
    assert parsed == header
    assert wire.chunk_of(parsed) is None
    # A chunk followed by anything else (here a second chunk: protobuf keeps the last)
    # is not taken by the fast path.
    twice = (pb.UploadUpdateRequest(chunk=b"first").SerializeToString()
             + pb.UploadUpdateRequest(chunk=b"second").SerializeToString())
    parsed = wire.parse_upload_request(twice)
    assert isinstance(parsed, pb.UploadUpdateRequest)
    assert wire.chunk_of(parsed) == b"second"
    # A length running past the message is protobuf's to refuse.
    with pytest.raises(DecodeError):
        wire.parse_upload_request(bytes((0x12, 0x05)) + b"abc")
