from federation_grpc._proto import federation_pb2 as _federation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateEnrolmentTokenRequest(_message.Message):
    __slots__ = ("ttl_seconds", "note")
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ttl_seconds: int
    note: str
    def __init__(self, ttl_seconds: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class CreateEnrolmentTokenResponse(_message.Message):
    __slots__ = ("enrolment_token", "expires_at")
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    enrolment_token: str
    expires_at: str
    def __init__(self, enrolment_token: _Optional[str] = ..., expires_at: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "display_name", "enrolled_at", "revoked", "last_seen", "updates")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    display_name: str
    enrolled_at: str
    revoked: bool
    last_seen: str
    updates: int
    def __init__(self, node_id: _Optional[str] = ..., display_name: _Optional[str] = ..., enrolled_at: _Optional[str] = ..., revoked: _Optional[bool] = ..., last_seen: _Optional[str] = ..., updates: _Optional[int] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class RevokeNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class RevokeNodeResponse(_message.Message):
    __slots__ = ("node",)
    NODE_FIELD_NUMBER: _ClassVar[int]
    node: NodeInfo
    def __init__(self, node: _Optional[_Union[NodeInfo, _Mapping]] = ...) -> None: ...

class ListGenerationsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListGenerationsResponse(_message.Message):
    __slots__ = ("generations",)
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[_federation_pb2.GenerationInfo]
    def __init__(self, generations: _Optional[_Iterable[_Union[_federation_pb2.GenerationInfo, _Mapping]]] = ...) -> None: ...

class PromoteGenerationRequest(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class RollbackGenerationRequest(_message.Message):
    __slots__ = ("to_generation",)
    TO_GENERATION_FIELD_NUMBER: _ClassVar[int]
    to_generation: int
    def __init__(self, to_generation: _Optional[int] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("update_id", "node_id", "stage", "reasons", "created_at", "candidate_generation")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    node_id: str
    stage: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    created_at: str
    candidate_generation: int
    def __init__(self, update_id: _Optional[str] = ..., node_id: _Optional[str] = ..., stage: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., created_at: _Optional[str] = ..., candidate_generation: _Optional[int] = ...) -> None: ...

class ListRejectionsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListRejectionsResponse(_message.Message):
    __slots__ = ("rejections",)
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    rejections: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, rejections: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...
