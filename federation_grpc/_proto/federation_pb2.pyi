from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_STATE_UNSPECIFIED: _ClassVar[UpdateState]
    UPDATE_STATE_PARTIAL: _ClassVar[UpdateState]
    UPDATE_STATE_RECEIVED: _ClassVar[UpdateState]
    UPDATE_STATE_MERGED: _ClassVar[UpdateState]
    UPDATE_STATE_REJECTED: _ClassVar[UpdateState]
    UPDATE_STATE_UNKNOWN: _ClassVar[UpdateState]
UPDATE_STATE_UNSPECIFIED: UpdateState
UPDATE_STATE_PARTIAL: UpdateState
UPDATE_STATE_RECEIVED: UpdateState
UPDATE_STATE_MERGED: UpdateState
UPDATE_STATE_REJECTED: UpdateState
UPDATE_STATE_UNKNOWN: UpdateState

class EnrolRequest(_message.Message):
    __slots__ = ("enrolment_token", "display_name", "request_id")
    ENROLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    enrolment_token: str
    display_name: str
    request_id: str
    def __init__(self, enrolment_token: _Optional[str] = ..., display_name: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class EnrolResponse(_message.Message):
    __slots__ = ("node_id", "node_token")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_token: str
    def __init__(self, node_id: _Optional[str] = ..., node_token: _Optional[str] = ...) -> None: ...

class GenerationInfo(_message.Message):
    __slots__ = ("number", "parent", "sha256", "size_bytes", "config_json", "created_at", "update_ids", "node_ids", "strategy", "status", "current", "validation_score", "notes")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_SCORE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    number: int
    parent: int
    sha256: str
    size_bytes: int
    config_json: str
    created_at: str
    update_ids: _containers.RepeatedScalarFieldContainer[str]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    status: str
    current: bool
    validation_score: float
    notes: str
    def __init__(self, number: _Optional[int] = ..., parent: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., config_json: _Optional[str] = ..., created_at: _Optional[str] = ..., update_ids: _Optional[_Iterable[str]] = ..., node_ids: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ..., status: _Optional[str] = ..., current: _Optional[bool] = ..., validation_score: _Optional[float] = ..., notes: _Optional[str] = ...) -> None: ...

class WatchGenerationsRequest(_message.Message):
    __slots__ = ("known_generation",)
    KNOWN_GENERATION_FIELD_NUMBER: _ClassVar[int]
    known_generation: int
    def __init__(self, known_generation: _Optional[int] = ...) -> None: ...

class GenerationEvent(_message.Message):
    __slots__ = ("generation", "keepalive", "superseded")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KEEPALIVE_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    generation: GenerationInfo
    keepalive: bool
    superseded: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, generation: _Optional[_Union[GenerationInfo, _Mapping]] = ..., keepalive: _Optional[bool] = ..., superseded: _Optional[_Iterable[int]] = ...) -> None: ...

class DownloadGenerationRequest(_message.Message):
    __slots__ = ("generation", "offset", "chunk_size")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    generation: int
    offset: int
    chunk_size: int
    def __init__(self, generation: _Optional[int] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("update_id", "base_generation", "num_samples", "trained_groups", "local_metrics", "total_size", "sha256", "offset")
    class LocalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAINED_GROUPS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    base_generation: int
    num_samples: int
    trained_groups: _containers.RepeatedScalarFieldContainer[str]
    local_metrics: _containers.ScalarMap[str, float]
    total_size: int
    sha256: str
    offset: int
    def __init__(self, update_id: _Optional[str] = ..., base_generation: _Optional[int] = ..., num_samples: _Optional[int] = ..., trained_groups: _Optional[_Iterable[str]] = ..., local_metrics: _Optional[_Mapping[str, float]] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("update_id", "state", "received_bytes", "merged_into", "reason")
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MERGED_INTO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    state: UpdateState
    received_bytes: int
    merged_into: int
    reason: str
    def __init__(self, update_id: _Optional[str] = ..., state: _Optional[_Union[UpdateState, str]] = ..., received_bytes: _Optional[int] = ..., merged_into: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GetUploadStatusRequest(_message.Message):
    __slots__ = ("update_id",)
    UPDATE_ID_FIELD_NUMBER: _ClassVar[int]
    update_id: str
    def __init__(self, update_id: _Optional[str] = ...) -> None: ...

class MetricRecord(_message.Message):
    __slots__ = ("kind", "generation", "values", "key")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    kind: str
    generation: int
    values: _containers.ScalarMap[str, float]
    key: str
    def __init__(self, kind: _Optional[str] = ..., generation: _Optional[int] = ..., values: _Optional[_Mapping[str, float]] = ..., key: _Optional[str] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[MetricRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[MetricRecord, _Mapping]]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class EvaluationTask(_message.Message):
    __slots__ = ("task_id", "candidate_generation", "reference_generation", "deadline")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    candidate_generation: int
    reference_generation: int
    deadline: str
    def __init__(self, task_id: _Optional[str] = ..., candidate_generation: _Optional[int] = ..., reference_generation: _Optional[int] = ..., deadline: _Optional[str] = ...) -> None: ...

class FetchEvaluationTasksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchEvaluationTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[EvaluationTask]
    def __init__(self, tasks: _Optional[_Iterable[_Union[EvaluationTask, _Mapping]]] = ...) -> None: ...

class SubmitEvaluationResultRequest(_message.Message):
    __slots__ = ("task_id", "candidate_score", "reference_score", "num_cases")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_SCORE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SCORE_FIELD_NUMBER: _ClassVar[int]
    NUM_CASES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    candidate_score: float
    reference_score: float
    num_cases: int
    def __init__(self, task_id: _Optional[str] = ..., candidate_score: _Optional[float] = ..., reference_score: _Optional[float] = ..., num_cases: _Optional[int] = ...) -> None: ...

class SubmitEvaluationResultResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...
