from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayoutAxis(_message.Message):
    __slots__ = ("name", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class LayoutSpec(_message.Message):
    __slots__ = ("axes", "coords")
    AXES_FIELD_NUMBER: _ClassVar[int]
    COORDS_FIELD_NUMBER: _ClassVar[int]
    axes: _containers.RepeatedCompositeFieldContainer[LayoutAxis]
    coords: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, axes: _Optional[_Iterable[_Union[LayoutAxis, _Mapping]]] = ..., coords: _Optional[_Iterable[int]] = ...) -> None: ...

class Region(_message.Message):
    __slots__ = ("offsets", "sizes")
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    offsets: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, offsets: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class MemberId(_message.Message):
    __slots__ = ("job", "rank", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    generation: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("job", "rank", "node", "agent_address", "layout", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    rank: int
    node: str
    agent_address: str
    layout: LayoutSpec
    generation: int
    def __init__(self, job: _Optional[str] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., agent_address: _Optional[str] = ..., layout: _Optional[_Union[LayoutSpec, _Mapping]] = ..., generation: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("generation", "heartbeat_interval_ms", "heartbeat_timeout_ms")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    def __init__(self, generation: _Optional[int] = ..., heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: MemberId
    def __init__(self, member: _Optional[_Union[MemberId, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("generation",)
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    generation: int
    def __init__(self, generation: _Optional[int] = ...) -> None: ...

class HeldRegion(_message.Message):
    __slots__ = ("tensor", "region", "crc32c", "nbytes")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    region: Region
    crc32c: int
    nbytes: int
    def __init__(self, tensor: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., crc32c: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ReportSnapshotRequest(_message.Message):
    __slots__ = ("member", "step", "layout", "regions", "parity_held", "parity_group", "complete")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    PARITY_HELD_FIELD_NUMBER: _ClassVar[int]
    PARITY_GROUP_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    member: MemberId
    step: int
    layout: LayoutSpec
    regions: _containers.RepeatedCompositeFieldContainer[HeldRegion]
    parity_held: bool
    parity_group: str
    complete: bool
    def __init__(self, member: _Optional[_Union[MemberId, _Mapping]] = ..., step: _Optional[int] = ..., layout: _Optional[_Union[LayoutSpec, _Mapping]] = ..., regions: _Optional[_Iterable[_Union[HeldRegion, _Mapping]]] = ..., parity_held: _Optional[bool] = ..., parity_group: _Optional[str] = ..., complete: _Optional[bool] = ...) -> None: ...

class ReportSnapshotResponse(_message.Message):
    __slots__ = ("latest_recoverable_step", "has_recoverable")
    LATEST_RECOVERABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    HAS_RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    latest_recoverable_step: int
    has_recoverable: bool
    def __init__(self, latest_recoverable_step: _Optional[int] = ..., has_recoverable: _Optional[bool] = ...) -> None: ...

class ReportCommittedRequest(_message.Message):
    __slots__ = ("member", "step", "manifest_key")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    member: MemberId
    step: int
    manifest_key: str
    def __init__(self, member: _Optional[_Union[MemberId, _Mapping]] = ..., step: _Optional[int] = ..., manifest_key: _Optional[str] = ...) -> None: ...

class ReportCommittedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchMembershipRequest(_message.Message):
    __slots__ = ("job", "after_sequence")
    JOB_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job: str
    after_sequence: int
    def __init__(self, job: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class MembershipEvent(_message.Message):
    __slots__ = ("sequence", "kind", "job", "rank", "node", "generation", "time_unix_ms")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[MembershipEvent.Kind]
        JOINED: _ClassVar[MembershipEvent.Kind]
        LEFT: _ClassVar[MembershipEvent.Kind]
        FAILED: _ClassVar[MembershipEvent.Kind]
        FENCED: _ClassVar[MembershipEvent.Kind]
        GENERATION_CHANGED: _ClassVar[MembershipEvent.Kind]
    KIND_UNSPECIFIED: MembershipEvent.Kind
    JOINED: MembershipEvent.Kind
    LEFT: MembershipEvent.Kind
    FAILED: MembershipEvent.Kind
    FENCED: MembershipEvent.Kind
    GENERATION_CHANGED: MembershipEvent.Kind
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: MembershipEvent.Kind
    job: str
    rank: int
    node: str
    generation: int
    time_unix_ms: int
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[MembershipEvent.Kind, str]] = ..., job: _Optional[str] = ..., rank: _Optional[int] = ..., node: _Optional[str] = ..., generation: _Optional[int] = ..., time_unix_ms: _Optional[int] = ...) -> None: ...

class GetRestorePlanRequest(_message.Message):
    __slots__ = ("job", "target_layout", "failed_ranks", "allow_approximate", "for_rank", "targets")
    JOB_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FAILED_RANKS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    FOR_RANK_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    job: str
    target_layout: LayoutSpec
    failed_ranks: _containers.RepeatedScalarFieldContainer[int]
    allow_approximate: bool
    for_rank: int
    targets: _containers.RepeatedCompositeFieldContainer[RankTarget]
    def __init__(self, job: _Optional[str] = ..., target_layout: _Optional[_Union[LayoutSpec, _Mapping]] = ..., failed_ranks: _Optional[_Iterable[int]] = ..., allow_approximate: _Optional[bool] = ..., for_rank: _Optional[int] = ..., targets: _Optional[_Iterable[_Union[RankTarget, _Mapping]]] = ...) -> None: ...

class RankTarget(_message.Message):
    __slots__ = ("rank", "regions")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    regions: _containers.RepeatedCompositeFieldContainer[TargetRegion]
    def __init__(self, rank: _Optional[int] = ..., regions: _Optional[_Iterable[_Union[TargetRegion, _Mapping]]] = ...) -> None: ...

class TargetRegion(_message.Message):
    __slots__ = ("tensor", "region")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    region: Region
    def __init__(self, tensor: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class PlanSource(_message.Message):
    __slots__ = ("kind", "ranks", "agent_address", "manifest_key", "parity_group")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PlanSource.Kind]
        OWN_MEMORY: _ClassVar[PlanSource.Kind]
        PEER_REPLICA: _ClassVar[PlanSource.Kind]
        PARITY_DECODE: _ClassVar[PlanSource.Kind]
        STORAGE: _ClassVar[PlanSource.Kind]
        NEIGHBOUR_REBUILD: _ClassVar[PlanSource.Kind]
    KIND_UNSPECIFIED: PlanSource.Kind
    OWN_MEMORY: PlanSource.Kind
    PEER_REPLICA: PlanSource.Kind
    PARITY_DECODE: PlanSource.Kind
    STORAGE: PlanSource.Kind
    NEIGHBOUR_REBUILD: PlanSource.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    PARITY_GROUP_FIELD_NUMBER: _ClassVar[int]
    kind: PlanSource.Kind
    ranks: _containers.RepeatedScalarFieldContainer[int]
    agent_address: str
    manifest_key: str
    parity_group: str
    def __init__(self, kind: _Optional[_Union[PlanSource.Kind, str]] = ..., ranks: _Optional[_Iterable[int]] = ..., agent_address: _Optional[str] = ..., manifest_key: _Optional[str] = ..., parity_group: _Optional[str] = ...) -> None: ...

class PlanItem(_message.Message):
    __slots__ = ("tensor", "region", "source", "approximate")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    tensor: str
    region: Region
    source: PlanSource
    approximate: bool
    def __init__(self, tensor: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., source: _Optional[_Union[PlanSource, _Mapping]] = ..., approximate: _Optional[bool] = ...) -> None: ...

class RankPlan(_message.Message):
    __slots__ = ("rank", "items")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    items: _containers.RepeatedCompositeFieldContainer[PlanItem]
    def __init__(self, rank: _Optional[int] = ..., items: _Optional[_Iterable[_Union[PlanItem, _Mapping]]] = ...) -> None: ...

class GetRestorePlanResponse(_message.Message):
    __slots__ = ("step", "ranks", "approximate", "explanation")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    APPROXIMATE_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    step: int
    ranks: _containers.RepeatedCompositeFieldContainer[RankPlan]
    approximate: bool
    explanation: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, step: _Optional[int] = ..., ranks: _Optional[_Iterable[_Union[RankPlan, _Mapping]]] = ..., approximate: _Optional[bool] = ..., explanation: _Optional[_Iterable[str]] = ...) -> None: ...

class GetLatestStepsRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class GetLatestStepsResponse(_message.Message):
    __slots__ = ("has_recoverable", "latest_recoverable_step", "has_committed", "latest_committed_step", "latest_committed_manifest_key")
    HAS_RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    LATEST_RECOVERABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    HAS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    LATEST_COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LATEST_COMMITTED_MANIFEST_KEY_FIELD_NUMBER: _ClassVar[int]
    has_recoverable: bool
    latest_recoverable_step: int
    has_committed: bool
    latest_committed_step: int
    latest_committed_manifest_key: str
    def __init__(self, has_recoverable: _Optional[bool] = ..., latest_recoverable_step: _Optional[int] = ..., has_committed: _Optional[bool] = ..., latest_committed_step: _Optional[int] = ..., latest_committed_manifest_key: _Optional[str] = ...) -> None: ...
