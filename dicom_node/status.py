"""What ``tessera node status`` reports: series, outbox, jobs, dead letters, refusals."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.pipeline.usage import learning_usage, render_learning
from dicom_node.prometheus import OUT_OF_DOMAIN_EVENT
from dicom_node.store.db import Database
from dicom_node.store.journal import journal_holder, journal_records
from dicom_node.store.models import (
    AuditEvent,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    UpdateOutboxItem,
)
from dicom_node.store.quarantine import Quarantine


def node_status(db: Database, *, recent: int = 20,
                quarantine: Quarantine | None = None,
                journals: Mapping[int, Path] | None = None,
                receivers: int = 1) -> dict[str, Any]:
    """``quarantine``: also report its entries, bytes, cap and dropped entries;
    ``journals``: the intake journal of each receiving process by number (0: the node's
    own), whose holder and records are reported against ``[dicom] receivers``."""
    with db.session() as s:
        series = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
        outbox = _outbox_counts(s)
        jobs = _job_counts(s)
        dead_jobs = _dead_jobs(s, recent)
        retrying = _retrying_jobs(s, recent)
        dead_items = _dead_outbox_items(s, recent)
        refused_series = _refused_series(s, recent)
        refusals = _recent_events(s, recent)
        out_of_domain = _out_of_domain(s, recent)
        refusal_counts = dict(s.execute(select(AuditEvent.kind, func.count())
                                        .group_by(AuditEvent.kind)).all())
        learning = learning_usage(s)
        federation = _federation(s)
        updates = dict(s.execute(select(UpdateOutboxItem.state, func.count())
                                 .group_by(UpdateOutboxItem.state)).all())
        undelivered = _undelivered_updates(s, recent)
    return {
        "series": series,
        "outbox": outbox,
        "jobs": jobs,
        "retrying": retrying,
        "dead_letters": {"jobs": dead_jobs, "outbox": dead_items},
        "refused_series": refused_series,
        "out_of_domain": out_of_domain,
        "events": {"counts": refusal_counts, "recent": refusals},
        "learning": learning,
        "update_outbox": {"counts": updates, "undelivered": undelivered},
        "federation": federation,
        **({"quarantine": quarantine.usage().to_json()} if quarantine is not None else {}),
        **({"intake_journals": journal_status(journals, receivers)}
           if journals is not None else {}),
    }


def journal_status(journals: Mapping[int, Path], receivers: int) -> list[dict[str, Any]]:
    """Each receiving process's intake journal: which process holds it (a running
    receiver, or the node's own process for number 0) and how many records it holds.
    A journal nobody holds keeps what its receiver acknowledged and did not checkpoint
    until it is replayed: by the receiver's next start, by the node's process when the
    receiver exits, or at the node's start for a number at or above ``receivers``."""
    return [
        {"receiver": number, "journal": path.name, "held_by": journal_holder(path),
         "records": journal_records(path), "retired": number >= receivers}
        for number, path in sorted(journals.items()) if path.is_dir()
    ]


def _outbox_counts(s: Session) -> dict[str, dict[str, int]]:
    """Outbox items per destination and state."""
    outbox: dict[str, dict[str, int]] = {}
    for dest, state, n in s.execute(
        select(OutboxItem.destination, OutboxItem.state, func.count())
        .group_by(OutboxItem.destination, OutboxItem.state)
    ).all():
        outbox.setdefault(dest, {})[state] = n
    return outbox


def _job_counts(s: Session) -> dict[str, dict[str, int]]:
    """Jobs per kind and state."""
    jobs: dict[str, dict[str, int]] = {}
    for kind, state, n in s.execute(
        select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
    ).all():
        jobs.setdefault(kind, {})[state] = n
    return jobs


def _dead_jobs(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest jobs that gave up."""
    return [
        {"job": j.id, "kind": j.kind, "key": j.key, "attempts": j.attempts,
         "reason": j.last_error, "at": j.finished_at.isoformat() if j.finished_at else None}
        for j in s.execute(select(Job).where(Job.state == JobState.DEAD)
                           .order_by(Job.id.desc()).limit(recent)).scalars()
    ]


def _retrying_jobs(s: Session, recent: int) -> list[dict[str, Any]]:
    """Pending or running jobs that failed before, soonest retry first."""
    return [
        {"job": j.id, "kind": j.kind, "key": j.key, "attempts": j.attempts,
         "max_attempts": j.max_attempts, "reason": j.last_error,
         "next_attempt": j.not_before.isoformat()}
        for j in s.execute(select(Job).where(
            Job.state.in_((JobState.PENDING, JobState.RUNNING)),
            Job.last_error.is_not(None))
                           .order_by(Job.not_before).limit(recent)).scalars()
    ]


def _dead_outbox_items(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest outbox items that gave up."""
    return [
        {"destination": o.destination, "sop_instance_uid": o.sop_instance_uid,
         "series_uid": o.series_uid, "attempts": o.attempts, "reason": o.last_error}
        for o in s.execute(select(OutboxItem).where(OutboxItem.state == OutboxState.DEAD)
                           .order_by(OutboxItem.id.desc()).limit(recent)).scalars()
    ]


def _refused_series(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest series with a reason for their state (refused or failed)."""
    return [
        {"series_uid": r.series_uid, "state": r.state, "reason": r.state_reason}
        for r in s.execute(select(Series).where(Series.state_reason.is_not(None))
                           .order_by(Series.id.desc()).limit(recent)).scalars()
    ]


def _recent_events(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest audit events (refusals and others)."""
    return [
        {"at": e.at.isoformat(), "kind": e.kind, "peer_ae": e.peer_ae,
         "peer_address": e.peer_address, "sop_instance_uid": e.sop_instance_uid,
         "status": f"0x{e.status:04X}" if e.status is not None else None,
         "reason": e.reason, "quarantine": e.quarantine_path}
        for e in s.execute(select(AuditEvent).order_by(AuditEvent.id.desc())
                           .limit(recent)).scalars()
    ]


def _out_of_domain(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest series a model was not made for."""
    return [
        {"at": e.at.isoformat(), "series_uid": e.series_uid, "reason": e.reason}
        for e in s.execute(select(AuditEvent).where(AuditEvent.kind == OUT_OF_DOMAIN_EVENT)
                           .order_by(AuditEvent.id.desc()).limit(recent)).scalars()
    ]


def _federation(s: Session) -> dict[str, Any]:
    """The latest of the hub's refusal and a (re-)enrolment says where federation stands."""
    hub_event = s.execute(select(AuditEvent).where(
        AuditEvent.kind.in_(("hub-refused", "hub-enrolled")))
        .order_by(AuditEvent.id.desc()).limit(1)).scalars().first()
    federation: dict[str, Any] = {"refused": None}
    if hub_event is not None and hub_event.kind == "hub-refused":
        federation["refused"] = {"at": hub_event.at.isoformat(), "hub": hub_event.peer_address,
                                 "reason": hub_event.reason}
    return federation


def _undelivered_updates(s: Session, recent: int) -> list[dict[str, Any]]:
    """The latest model updates not yet delivered to the hub."""
    return [
        {"update_id": u.update_id, "base_generation": u.base_generation,
         "attempts": u.attempts, "reason": u.last_error}
        for u in s.execute(select(UpdateOutboxItem).where(
            UpdateOutboxItem.state != OutboxState.SENT)
            .order_by(UpdateOutboxItem.id.desc()).limit(recent)).scalars()
    ]


def render_status(status: dict[str, Any]) -> str:
    """Plain-text rendering for the terminal."""
    lines = ["Series by state:"]
    lines += [f"  {k:<12} {v}" for k, v in sorted(status["series"].items())] or ["  (none)"]
    lines.append("Outbox by destination and state:")
    if not status["outbox"]:
        lines.append("  (empty)")
    for dest, states in sorted(status["outbox"].items()):
        lines.append(f"  {dest:<12} " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    lines.append("Jobs by kind and state:")
    if not status["jobs"]:
        lines.append("  (none)")
    for kind, states in sorted(status["jobs"].items()):
        lines.append(f"  {kind:<12} " + ", ".join(f"{k}={v}" for k, v in sorted(states.items())))
    if status["retrying"]:
        lines.append("Retrying:")
        for j in status["retrying"]:
            lines.append(f"  job {j['job']} {j['kind']} {j['key']} attempt "
                         f"{j['attempts']}/{j['max_attempts']}, next {j['next_attempt']}: "
                         f"{j['reason']}")
    if status.get("out_of_domain"):
        lines.append("Input a model was not made for (SEG marked 'OUT OF DOMAIN?'):")
        for e in status["out_of_domain"]:
            lines.append(f"  {e['at']} series {e['series_uid']}: {e['reason']}")
    dead = status["dead_letters"]
    lines.append(f"Dead letters: {len(dead['jobs'])} job(s), {len(dead['outbox'])} item(s)")
    for j in dead["jobs"]:
        lines.append(f"  job {j['job']} {j['kind']} {j['key']}: {j['reason']}")
    if status["refused_series"]:
        lines.append("Refused / failed series:")
        for r in status["refused_series"]:
            lines.append(f"  {r['series_uid']} [{r['state']}]: {r['reason']}")
    q = status.get("quarantine")
    if q is not None:
        lines.append(f"Quarantine: {q['entries']} entries, {q['bytes'] / 2**20:.1f} MiB "
                     f"(cap {q['max_entries']} entries, {q['max_bytes'] / 2**20:.0f} MiB); "
                     f"{q['dropped']} oldest dropped to stay within it")
    if status.get("intake_journals"):
        lines.append("Intake journals (receiving process: holder, records not checkpointed):")
        for j in status["intake_journals"]:
            note = ""
            if j["held_by"] is None:
                holder = "not held"
            elif j["held_by"]:
                holder = f"held by pid {j['held_by']}"
            else:  # a process in another pid namespace
                holder = "held (by a process not visible from here)"
            if j["held_by"] is None and j["records"]:
                note = (" (replayed at the node's next start: dicom.receivers no longer "
                        "runs it)" if j["retired"] else " (replayed when the node starts its "
                        "receiver)")
            lines.append(f"  {j['receiver']:<3} {j['journal']:<10} {holder}, "
                         f"{j['records']} record(s){note}")
    counts = status["events"]["counts"]
    lines.append("Refusals and events: " + (", ".join(f"{k}={v}" for k, v in
                                                     sorted(counts.items())) or "none"))
    for e in status["events"]["recent"]:
        who = f"{e['peer_ae'] or '?'}@{e['peer_address'] or '?'}"
        lines.append(f"  {e['at']} {e['kind']} {who} {e['status'] or ''} {e['reason']}")
    refused = (status.get("federation") or {}).get("refused")
    if refused:
        lines.append(f"Federation: REFUSED by hub {refused['hub']} since {refused['at']}: "
                     f"{refused['reason']}")
        lines.append("  no retries; updates stay in the outbox. Enrol again: new "
                     "[federation] enrolment_token, remove the credentials file, restart.")
    if "learning" in status:
        lines += render_learning(status["learning"])
    return "\n".join(lines)
