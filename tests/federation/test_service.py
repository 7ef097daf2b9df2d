"""The hub service in-process: enrolment, uploads, merging, lineage, rollback."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save
from sqlalchemy import event

from federation_grpc.errors import (
    FailedPrecondition,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
)
from federation_grpc.hub import aggregator as aggregator_module
from federation_grpc.hub.domain import UploadState, UploadStatus
from federation_grpc.hub.service import HubService
from federation_grpc.hub.store import UpdateRow
from federation_grpc.hub.strategies import make_strategy
from federation_grpc.hub.uploads import UploadSession

from .conftest import (
    ALL_GROUPS,
    MODEL_CONFIG,
    enrol,
    header_for,
    hub_config,
    make_update,
    small_model,
    upload,
)


def test_enrolment_token_is_one_time_and_node_token_stored_hashed(service: HubService) -> None:
    token, _ = service.create_enrolment_token()
    enrolment = service.enrol(token, "Hospital A")
    assert service.authenticate(enrolment.node_token) == enrolment.node_id
    with pytest.raises(PermissionDenied):
        service.enrol(token, "again")
    with pytest.raises(Unauthenticated):
        service.authenticate("not-a-token")
    raw = b"".join(p.read_bytes() for p in service.config.data_dir.glob("hub.db*"))
    assert enrolment.node_token.encode() not in raw
    service.revoke_node(enrolment.node_id)
    with pytest.raises(PermissionDenied):
        service.authenticate(enrolment.node_token)


def test_an_enrolment_sent_again_is_answered_again_and_only_that_one(
    service: HubService,
) -> None:
    """The answer to an enrolment was lost (a retried call, a node killed before it saved
    its credentials): the same request id gets the same answer, in any order and any
    number of times. Anyone else with the token is still refused."""
    token, _ = service.create_enrolment_token()
    request = "request-1-0123456789abcdef"
    first = service.enrol(token, "Hospital A", "a" * 64, request)
    again = service.enrol(token, "Hospital A", "a" * 64, request)
    assert again == first
    assert service.authenticate(first.node_token, "a" * 64) == first.node_id
    assert [n.node_id for n in service.list_nodes()] == [first.node_id]
    raw = b"".join(p.read_bytes() for p in service.config.data_dir.glob("hub.db*"))
    assert first.node_token.encode() not in raw and request.encode() not in raw
    for other, cert in ((request + "x", "a" * 64), ("", "a" * 64), (request, "b" * 64),
                        (request, "")):
        with pytest.raises(PermissionDenied, match="already used"):
            service.enrol(token, "Hospital A", cert, other)
    for bad in ("short", "x" * 129, "tab\tin-the-request-id"):
        with pytest.raises(InvalidRequest, match="request_id"):
            service.enrol(token, "Hospital A", "a" * 64, bad)
    service.revoke_node(first.node_id)
    with pytest.raises(PermissionDenied, match="revoked"):
        service.enrol(token, "Hospital A", "a" * 64, request)
    # A token used without a request id is one-time, whatever is sent after it.
    plain, _ = service.create_enrolment_token()
    service.enrol(plain, "Hospital B")
    with pytest.raises(PermissionDenied, match="already used"):
        service.enrol(plain, "Hospital B", "", "")


def test_of_enrolments_at_once_with_one_token_one_enrols_and_its_copies_get_its_answer(
    service: HubService,
) -> None:
    """SQLite takes no row lock: the token is claimed by one conditional statement, so
    two strangers never both enrol with it, and copies of one request share one answer."""
    import threading

    token, _ = service.create_enrolment_token()
    requests = ["the-same-request-id-0001"] * 4 + [f"a-stranger-request-{i:04d}" for i in range(4)]
    start = threading.Barrier(len(requests))
    answers: list[object] = []

    def enrol_now(request: str) -> None:
        start.wait()
        try:
            answers.append((request, service.enrol(token, "site", "", request)))
        except PermissionDenied:
            answers.append((request, None))

    threads = [threading.Thread(target=enrol_now, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    enrolled = {answer for _, answer in answers if answer is not None}  # type: ignore[misc]
    assert len(enrolled) == 1 and len(service.list_nodes()) == 1
    [winner] = {request for request, answer in answers if answer is not None}
    assert sum(answer is not None for _, answer in answers) == requests.count(winner)


def test_an_enrolment_is_not_answered_again_once_its_token_expired(
    service: HubService,
) -> None:
    from federation_grpc.hub.store import EnrolmentTokenRow
    from federation_grpc.hub.store import utcnow as hub_now

    token, _ = service.create_enrolment_token()
    service.enrol(token, "Hospital A", "", "request-1-0123456789")
    with service.store.session() as session:
        for row in session.query(EnrolmentTokenRow):
            row.expires_at = hub_now() - timedelta(seconds=1)
    with pytest.raises(PermissionDenied, match="expired"):
        service.enrol(token, "Hospital A", "", "request-1-0123456789")


def test_update_merges_into_a_new_generation_with_lineage(service: HubService) -> None:
    node = enrol(service)
    payload, header = make_update(small_model())
    status = upload(service, node, payload, header)
    assert status.state == UploadState.RECEIVED
    assert service.aggregator.process_pending() == [1]
    generation = service.generation(1)
    assert generation.current and generation.parent == 0
    assert generation.update_ids == (header.update_id,) and generation.node_ids == (node,)
    merged = load(service.blobs.get(generation.sha256))
    assert not np.array_equal(merged["encoder.conv1.weight"], small_model()["encoder.conv1.weight"])
    np.testing.assert_array_equal(
        merged["heads.spleen.out.weight"], small_model()["heads.spleen.out.weight"]
    )
    again = upload(service, node, payload, header)
    assert again.state == UploadState.MERGED and again.merged_into == 1
    assert service.aggregator.process_pending() == []
    assert service.ledger.lineage(1) == [1, 0]
    upload(service, node, *make_update(service.generation_tensors(1), seed=2))
    assert service.aggregator.process_pending() == [2]
    assert service.ledger.lineage(2) == [2, 1, 0]
    assert service.ledger.lineage(1) == [1, 0]
    assert service.ledger.lineage(7) == []


def test_rollback_moves_current_and_refuses_updates_from_the_abandoned_line(
    service: HubService,
) -> None:
    node = enrol(service)
    payload, header = make_update(small_model())
    upload(service, node, payload, header)
    service.aggregator.process_pending()
    tensors_1 = service.generation_tensors(1)
    service.rollback()
    assert service.current_number() == 0
    assert service.generation(1).status == "ROLLED_BACK"
    stale_payload, stale_header = make_update(tensors_1)
    stale_header = type(stale_header)(**{**stale_header.__dict__, "base_generation": 1})
    upload(service, node, stale_payload, stale_header)
    assert service.aggregator.process_pending() == []
    assert "not in the lineage" in service.list_rejections()[0].reasons[0]
    service.promote(1)
    assert service.current_number() == 1
    with pytest.raises(FailedPrecondition):
        service.init_model(save(small_model()), MODEL_CONFIG)


def test_a_node_starting_over_is_told_where_to_resume_and_nothing_held_is_lost(
    service: HubService,
) -> None:
    """A node that crashed mid-upload sends its update from byte 0 again without asking
    first: the hub answers the header with what it holds, and keeps those bytes."""
    node = enrol(service)
    payload, header = make_update(small_model())
    half = len(payload) // 2
    first = service.uploads.begin(node, header)
    assert isinstance(first, UploadSession)
    first.write(payload[:half])
    assert first.finish() == UploadStatus(header.update_id, UploadState.PARTIAL, half)
    again = service.uploads.begin(node, header)  # offset 0
    assert again == UploadStatus(header.update_id, UploadState.PARTIAL, half)
    assert service.uploads.staging.size(header.update_id) == half
    with pytest.raises(FailedPrecondition, match=f"hub holds {half} bytes"):
        service.uploads.begin(node, replace(header, offset=half + 1))  # past what is held
    rest = service.uploads.begin(node, replace(header, offset=half))
    assert isinstance(rest, UploadSession)
    rest.write(payload[half:])
    assert rest.finish().state == UploadState.RECEIVED
    _, unknown = make_update(small_model())
    with pytest.raises(FailedPrecondition, match="unknown; start at offset 0"):
        service.uploads.begin(node, replace(unknown, offset=5))


def test_an_update_resent_after_the_limits_were_tightened_keeps_its_outcome(
    tmp_path: Path,
) -> None:
    """A node whose "sent" mark was lost sends a received update again. The operator has
    tightened ``[limits]`` since: the hub answers what it holds, refuses nothing and
    records no rejection. A new update over the limits is still refused."""
    config = hub_config(tmp_path)
    first = HubService(config)
    first.init_model(save(small_model()), MODEL_CONFIG)
    node = enrol(first)
    payload, _ = make_update(small_model())
    header = replace(header_for(payload, ALL_GROUPS), num_samples=40)
    assert upload(first, node, payload, header).state == UploadState.RECEIVED
    first.close()

    tightened = replace(config, limits=replace(
        config.limits, max_num_samples=10, max_update_bytes=len(payload) - 1))
    hub = HubService(tightened)
    try:
        again = upload(hub, node, payload, header)
        assert again == UploadStatus(header.update_id, UploadState.RECEIVED, len(payload))
        assert hub.list_rejections() == []
        fresh = replace(header, update_id=str(uuid.uuid4()))
        with pytest.raises(InvalidRequest, match="exceeds the limit"):
            upload(hub, node, payload, fresh)
        with pytest.raises(InvalidRequest, match=r"num_samples 40 is outside 1\.\.10"):
            upload(hub, node, payload, replace(fresh, total_size=len(payload) - 1))
        [refused] = hub.list_rejections()
        assert refused.update_id == fresh.update_id
        assert hub.uploads.status(node, fresh.update_id).state == UploadState.UNKNOWN
    finally:
        hub.close()
    # The samples' bound alone (the size within the limit): the refusal's own path.
    samples_only = HubService(replace(config, limits=replace(config.limits,
                                                             max_num_samples=10)))
    try:
        again = upload(samples_only, node, payload, header)
        assert again == UploadStatus(header.update_id, UploadState.RECEIVED, len(payload))
        assert len(samples_only.list_rejections()) == 1  # the fresh one's, from before
    finally:
        samples_only.close()


def test_an_update_on_a_generation_never_published_is_refused_until_it_is(
    service: HubService,
) -> None:
    """The base check remembers published generations (a burst of uploads on one base asks
    the store once): a candidate is no base until published, a refused one never is."""
    from federation_grpc.hub.store import GenerationRow, GenerationStatus

    node = enrol(service)
    sha = service.generation(0).sha256
    with service.store.session() as session:
        for number, status in ((1, GenerationStatus.CANDIDATE), (2, GenerationStatus.REJECTED)):
            session.add(GenerationRow(number=number, parent=0, sha256=sha, size_bytes=1,
                                      config_json=MODEL_CONFIG, status=status))
    payload, header = make_update(small_model())
    for base in (1, 2, 7):
        on_it = replace(header, base_generation=base)
        with pytest.raises(InvalidRequest, match=f"base_generation {base} is not a generation"):
            upload(service, node, payload, on_it)
    with service.store.session() as session:
        service.ledger.publish(session, 1)
    assert upload(service, node, payload, replace(header, base_generation=1)).state == (
        UploadState.RECEIVED)
    with pytest.raises(InvalidRequest, match="base_generation 2 is not a generation"):
        upload(service, node, payload,
               replace(header, base_generation=2, update_id=str(uuid.uuid4())))


def test_of_two_first_calls_over_different_certificates_one_binds_the_other_is_refused(
    service: HubService,
) -> None:
    """A node enrolled without a certificate is bound by its first call; two first calls at
    once (a stolen token racing its owner) cannot both be let in."""
    import threading

    outcomes: dict[tuple[int, str], str] = {}
    tokens = []
    for i in range(8):
        token, _ = service.create_enrolment_token()
        tokens.append(service.enrol(token, f"site {i}").node_token)
    start = threading.Barrier(2 * len(tokens))

    def call(i: int, cert: str) -> None:
        start.wait()
        try:
            service.authenticate(tokens[i], cert)
            outcomes[(i, cert)] = "in"
        except PermissionDenied:
            outcomes[(i, cert)] = "refused"

    threads = [threading.Thread(target=call, args=(i, cert))
               for i in range(len(tokens)) for cert in ("a" * 64, "b" * 64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    bound = {n.display_name: n.cert_sha256 for n in service.list_nodes()}
    for i in range(len(tokens)):
        let_in = [cert for cert in ("a" * 64, "b" * 64) if outcomes[(i, cert)] == "in"]
        assert len(let_in) == 1, (i, outcomes)
        assert bound[f"site {i}"] == let_in[0]


def test_a_wake_below_the_buffer_counts_the_waiting_updates_without_loading_them(
    tmp_path: Path,
) -> None:
    """The hub wakes its aggregator at every received update. Below FedBuff's buffer a
    wake counts what waits; loading every waiting row at each wake made a burst of N
    uploads into a buffer cost N * N / 2 row loads."""
    config = hub_config(tmp_path)
    svc = HubService(replace(config, aggregation=replace(
        config.aggregation, strategy="fedbuff", buffer_size=4)))
    loaded: list[str] = []

    def count_load(row: UpdateRow, _context: object) -> None:
        loaded.append(row.update_id)

    event.listen(UpdateRow, "load", count_load)
    try:
        svc.init_model(save(small_model()), MODEL_CONFIG)
        node = enrol(svc)
        for seed in range(3):
            upload(svc, node, *make_update(small_model(), seed=seed))
            loaded.clear()
            assert svc.aggregator.process_pending() == []
            assert loaded == []
        upload(svc, node, *make_update(small_model(), seed=3))
        assert svc.aggregator.process_pending() == [1]
        assert len(svc.generation(1).update_ids) == 4
    finally:
        event.remove(UpdateRow, "load", count_load)
        svc.close()


def test_an_update_off_the_lineage_is_refused_at_the_next_wake_below_the_buffer(
    tmp_path: Path,
) -> None:
    """Counting instead of loading must not leave an update on a rolled-back base
    waiting for a buffer that it will never join."""
    config = hub_config(tmp_path)
    svc = HubService(replace(config, aggregation=replace(
        config.aggregation, strategy="fedbuff", buffer_size=1)))
    try:
        svc.init_model(save(small_model()), MODEL_CONFIG)
        node = enrol(svc)
        upload(svc, node, *make_update(small_model()))
        assert svc.aggregator.process_pending() == [1]
        svc.rollback()
        svc.aggregator.strategy = make_strategy("fedbuff", buffer_size=4)
        payload, header = make_update(svc.generation_tensors(1))
        upload(svc, node, payload, replace(header, base_generation=1))
        assert svc.aggregator.process_pending() == []
        assert svc.uploads.status(node, header.update_id).state == UploadState.REJECTED
        assert "not in the lineage" in svc.list_rejections()[0].reasons[0]
    finally:
        svc.close()


def test_the_updates_of_a_burst_are_taken_by_one_pass_of_the_aggregator(
    service: HubService, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every received update wakes the aggregator; those within its settling time are
    taken together (a pass costs a few queries even when there is nothing to merge)."""
    passes: list[int] = []
    real = service.aggregator.process_pending

    def counted() -> list[int]:
        passes.append(1)
        return real()

    def after(count: int) -> None:
        deadline = time.monotonic() + 30
        while len(passes) < count:
            assert time.monotonic() < deadline, f"{count} pass(es) expected, {len(passes)}"
            time.sleep(0.05)

    monkeypatch.setattr(service.aggregator, "process_pending", counted)
    monkeypatch.setattr(aggregator_module, "_TICK_S", 600.0)  # no pass but the woken
    service.aggregator.settle_s = 2.0
    service.aggregator.start()
    try:
        after(1)  # the pass at start (what a restart left RECEIVED)
        passes.clear()
        for _ in range(20):  # a burst over about 0.2 s, well inside the settling time
            service.aggregator.wake()
            time.sleep(0.01)
        after(1)
        time.sleep(0.5)
        assert len(passes) == 1
    finally:
        service.aggregator.stop()


def test_an_update_another_replica_took_first_is_not_taken_again(service: HubService) -> None:
    """Replicas share the database. A stream that completes an update another replica
    already received (it started from byte 0 after the other had moved the staged file
    into the blob store) reports that state, leaves the row as it is, and removes its
    own staged copy."""
    node = enrol(service)
    payload, header = make_update(small_model())
    opened = service.uploads.begin(node, header)
    assert isinstance(opened, UploadSession)
    opened.write(payload)
    with service.store.session() as session:  # the other replica's stream, and a merge
        row = session.get(UpdateRow, header.update_id)
        assert row is not None
        row.status, row.merged_into = "merged", 0
    status = opened.finish()
    assert status.state == UploadState.MERGED and status.merged_into == 0
    with service.store.session() as session:
        assert session.get(UpdateRow, header.update_id).status == "merged"  # type: ignore[union-attr]
    assert not service.uploads.staging.path(header.update_id).exists(), "an orphan .part"


def test_two_replicas_never_write_one_update_at_once(tmp_path: Path) -> None:
    """Replicas share the data folder. A node whose stream to one replica broke resumes
    at another before the first has noticed: the second stream waits its turn (ABORTED,
    retried by the node) instead of writing the same staged file."""
    from federation_grpc.hub.blobs import StagingBusy

    config = hub_config(tmp_path)
    first = HubService(config)
    first.init_model(save(small_model()), MODEL_CONFIG)
    second = HubService(config)
    try:
        node = enrol(first)
        payload, header = make_update(small_model())
        half = len(payload) // 2
        stream = first.uploads.begin(node, header)
        assert isinstance(stream, UploadSession)
        stream.write(payload[:half])
        resumed = replace(header, offset=half)
        with pytest.raises(StagingBusy, match="being uploaded already"):
            second.uploads.begin(node, resumed)
        with pytest.raises(StagingBusy):  # and in the same process
            first.uploads.begin(node, resumed)
        assert first.uploads.staging.size(header.update_id) == half, "nothing truncated"
        stream.close()  # the first replica notices the broken stream
        rest = second.uploads.begin(node, resumed)
        assert isinstance(rest, UploadSession)
        rest.write(payload[half:])
        assert rest.finish().state == UploadState.RECEIVED
        assert upload(first, node, payload, header).state == UploadState.RECEIVED
    finally:
        second.close()
        first.close()


def test_a_staged_file_that_moved_on_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is on the file, not its name: a stream that waited while the file was
    renamed into the blob store (or removed) is told to ask again, and a resume never
    makes up an empty file to write at an offset."""
    import fcntl

    from federation_grpc.hub.blobs import StagingArea, StagingBusy

    staging = StagingArea(tmp_path / "staging")
    first = staging.open_at("u1", 0)
    os.write(first, b"0123456789")
    staging.close("u1", first)
    os.rename(staging.path("u1"), tmp_path / "adopted")  # the update was taken
    with pytest.raises(StagingBusy):
        staging.open_at("u1", 10)
    assert not staging.path("u1").exists(), "an empty file made up to resume into"

    second = staging.open_at("u2", 0)
    os.write(second, b"0123456789")
    staging.close("u2", second)
    real_flock = fcntl.flock

    def renamed_while_waiting(fd: int, operation: int) -> None:
        os.rename(staging.path("u2"), tmp_path / "adopted-2")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", renamed_while_waiting)
    with pytest.raises(StagingBusy):
        staging.open_at("u2", 5)
    monkeypatch.setattr(fcntl, "flock", real_flock)
    assert (tmp_path / "adopted-2").read_bytes() == b"0123456789", "not truncated"


def test_one_process_never_opens_a_staged_file_twice_even_without_flock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where flock is emulated with POSIX locks (NFS), a process's own descriptors do not
    exclude each other: the staging area keeps its own streams apart as well."""
    import fcntl

    from federation_grpc.hub.blobs import StagingArea, StagingBusy

    monkeypatch.setattr(fcntl, "flock", lambda fd, operation: None)
    staging = StagingArea(tmp_path / "staging")
    first = staging.open_at("u1", 0)
    with pytest.raises(StagingBusy):
        staging.open_at("u1", 0)
    staging.close("u1", first)
    staging.close("u1", staging.open_at("u1", 0))  # free again once closed
    with pytest.raises(StagingBusy):
        staging.open_at("u2", 4)  # no file to resume: nothing held after the refusal
    staging.close("u2", staging.open_at("u2", 0))
