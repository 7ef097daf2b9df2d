"""The generation ledger: generations, their lineage, the current pointer, change notices.

Only this module moves the current pointer and wakes the watchers. Every way a
generation becomes current (generation 0, a merge, a candidate accepted by federated
evaluation, an added head, an operator's promote or rollback) goes through
:meth:`GenerationLedger.publish`, inside the caller's transaction; watchers wake once
that transaction has committed, so they never read a pointer that is not there yet.

A generation's lineage is its chain of parents and the updates merged into it (or
evaluated as it, while it is a candidate).

A generation merged from updates is published only on top of the generation it was
merged on: if the operator promoted or rolled back meanwhile (those do not wait for a
merge), the merge is dropped (:class:`CurrentMoved`) and a candidate is rejected, and
their updates wait for a merge on the new current generation (or are refused if it is
no longer in their lineage).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from federation_grpc.errors import FailedPrecondition, InvalidRequest, NotFound
from federation_grpc.hub.blobs import BlobStore
from federation_grpc.hub.domain import GenerationView
from federation_grpc.hub.merge_lock import merge_lock
from federation_grpc.hub.parameters import non_finite_tensors
from federation_grpc.hub.store import (
    GenerationRow,
    GenerationStatus,
    HubStateRow,
    HubStore,
    UpdateRow,
    UpdateStatus,
    as_utc,
    locked_update,
)
from federation_grpc.hub.tensorfile import read_tensors

LOGGER = logging.getLogger(__name__)

TENSOR_CACHE_SIZE = 4

# Generations never published: a candidate under federated evaluation, or one refused;
# their updates are not merged (a StrEnum, so the statuses of views match as strings).
UNPUBLISHED = frozenset({GenerationStatus.CANDIDATE, GenerationStatus.REJECTED})


class CurrentMoved(FailedPrecondition):
    """The generation a merge was made on is no longer the current one."""


@dataclass(frozen=True)
class NewGeneration:
    """A generation to store; it takes the next number (0 for the first)."""

    parent: int | None
    sha256: str
    size_bytes: int
    config_json: str
    strategy: str
    validation_score: float | None = None


def parse_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes (no code runs; no pickle). Raises InvalidRequest."""
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"not a valid safetensors payload: {exc}") from exc


class GenerationLedger:
    """The hub's generations in its store, their blobs, and who waits for a change."""

    def __init__(self, store: HubStore, blobs: BlobStore, data_dir: Path) -> None:
        self.store = store
        self.blobs = blobs
        self.data_dir = data_dir
        self._changed = threading.Condition()
        self._notices = 0
        self._cache_lock = threading.Lock()
        self._tensor_cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._configs: dict[int, str] = {}
        self._lineage: tuple[int, ...] = ()  # the last whole lineage asked for
        self._published: set[int] = set()

    def close(self) -> None:
        """Wake every watcher (the hub is stopping)."""
        self._notify()

    def merge_lock(self) -> AbstractContextManager[None]:
        """One publisher of new generations at a time, across replicas sharing the store."""
        return merge_lock(self.store.engine, self.data_dir)

    # --- writing ----------------------------------------------------------------------------

    def record(
        self,
        session: Session,
        new: NewGeneration,
        status: GenerationStatus,
        *,
        evaluated: Sequence[str] = (),
    ) -> int:
        """Store ``new`` under the next number with ``status``; the pointer stays.

        ``evaluated``: the updates a candidate was merged from; they wait (EVALUATING)
        for the nodes' verdict and are its lineage meanwhile.
        """
        latest = session.scalar(select(func.max(GenerationRow.number)))
        number = 0 if latest is None else latest + 1
        session.add(
            GenerationRow(
                number=number,
                parent=new.parent,
                sha256=new.sha256,
                size_bytes=new.size_bytes,
                config_json=new.config_json,
                strategy=new.strategy,
                status=status,
                validation_score=new.validation_score,
            )
        )
        session.flush()
        for update_id in evaluated:
            update = locked_update(session, update_id)
            update.status, update.candidate_generation = UpdateStatus.EVALUATING, number
        return number

    @staticmethod
    def parent_of(session: Session, number: int) -> int | None:
        """The parent of generation ``number`` (None for generation 0)."""
        row = session.get(GenerationRow, number)
        if row is None:
            raise NotFound(f"no generation {number}")
        return row.parent

    @staticmethod
    def evaluated_updates(session: Session, candidate: int) -> list[UpdateRow]:
        """The updates a candidate generation was merged from."""
        return list(
            session.scalars(select(UpdateRow).where(UpdateRow.candidate_generation == candidate))
        )

    def settle(
        self, session: Session, candidate: int, score: float | None, accepted: bool,
        notes: Sequence[str] = (),
    ) -> bool:
        """Record the nodes' verdict on a candidate, with the gate's ``notes``: published
        with the updates it was merged from, or REJECTED (its updates are the caller's to
        reject). Returns whether it was published: an accepted candidate whose parent is
        no longer current is REJECTED too, and its updates wait for a merge again."""
        row = session.get(GenerationRow, candidate)
        if row is None:
            raise NotFound(f"no generation {candidate}")
        row.validation_score = score
        row.notes = "; ".join(notes)[:4000]
        if accepted:
            updates = self.evaluated_updates(session, candidate)
            try:  # publish checks the parent before it writes anything
                self.publish(session, candidate, merged=[u.update_id for u in updates])
                return True
            except CurrentMoved as moved:
                self.abandon(session, candidate,
                             [*notes, f"accepted, but the current generation moved "
                                      f"meanwhile: {moved}"])
                return False
        row.status = GenerationStatus.REJECTED
        return False

    def abandon(self, session: Session, candidate: int, notes: Sequence[str]) -> None:
        """REJECT a candidate whose parent is no longer current, whatever the nodes
        would say: its updates wait for a merge again (on the new current generation,
        or refused there when it is not in their lineage)."""
        row = session.get(GenerationRow, candidate)
        if row is None:
            raise NotFound(f"no generation {candidate}")
        row.status = GenerationStatus.REJECTED
        row.notes = "; ".join(notes)[:4000]
        for update in self.evaluated_updates(session, candidate):
            update.status, update.candidate_generation = UpdateStatus.RECEIVED, None

    def drop_unused_blob(self, sha256: str) -> None:
        """Delete the blob ``sha256`` unless a generation names it (a merge that was
        dropped adopted it; a merge identical to a stored generation shares its blob)."""
        with self.store.session() as session:
            if session.scalar(select(GenerationRow.number).where(
                    GenerationRow.sha256 == sha256).limit(1)) is None:
                self.blobs.path(sha256).unlink(missing_ok=True)

    @staticmethod
    def current_in(session: Session) -> int | None:
        """The current generation's number, read (and locked) in ``session``."""
        state = session.get(HubStateRow, 1, with_for_update=True)
        assert state is not None, "the hub store has no state row"
        return state.current_generation

    def publish(
        self,
        session: Session,
        generation: NewGeneration | int,
        *,
        merged: Sequence[str] = (),
    ) -> int:
        """Make a generation current, in the caller's transaction; return its number.

        A :class:`NewGeneration` is stored first; a number names a stored one, which
        becomes ACTIVE. The updates ``merged`` are marked merged into it (its lineage);
        with any, its parent must still be current, else :class:`CurrentMoved` (the
        caller's transaction then rolls back). Watchers wake when the transaction
        commits (not at all if it rolls back).
        """
        state = session.get(HubStateRow, 1, with_for_update=True)
        assert state is not None, "the hub store has no state row"
        if isinstance(generation, NewGeneration):
            parent = generation.parent
        else:
            stored = session.get(GenerationRow, generation)
            if stored is None:
                raise NotFound(f"no generation {generation}")
            parent = stored.parent
        if merged and parent != state.current_generation:
            raise CurrentMoved(f"generation {parent} was merged on but generation "
                               f"{state.current_generation} is current now")
        if isinstance(generation, NewGeneration):
            number = self.record(session, generation, GenerationStatus.ACTIVE)
        else:
            number = generation
            row = session.get(GenerationRow, number)
            assert row is not None
            row.status = GenerationStatus.ACTIVE
        for update_id in merged:
            update = locked_update(session, update_id)
            update.status, update.merged_into = UpdateStatus.MERGED, number
        state.current_generation = number
        state.version += 1
        event.listen(session, "after_commit", lambda _: self._notify(), once=True)
        return number

    def init(self, weights: bytes | Path, config_json: str) -> GenerationView:
        """Store generation 0 (safetensors weights, or a file of them, + JSON config).
        Only once. A file is read as a memory map and copied in blocks, so a model of
        gigabytes is taken in without holding it in memory."""
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"model config is not JSON: {exc}") from exc
        if not isinstance(config, dict) or "architecture" not in config:
            raise InvalidRequest("model config must be a JSON object with an 'architecture'")
        tensors = read_tensors(weights) if isinstance(weights, Path) else parse_tensors(weights)
        if not tensors:
            raise InvalidRequest("model weights hold no tensors")
        bad = non_finite_tensors(tensors)
        if bad:
            raise InvalidRequest(f"model weights hold non-finite values in {bad[:5]}")
        if isinstance(weights, Path):
            sha, size = self.blobs.put_file(weights)
        else:
            sha, size = self.blobs.put(weights), len(weights)
        with self.store.session() as session:
            if session.scalar(select(func.count()).select_from(GenerationRow)):
                raise FailedPrecondition("the hub already has generations; use promote/rollback")
            number = self.publish(
                session, NewGeneration(None, sha, size, config_json, "init")
            )
        LOGGER.info("generation 0 stored (%d tensors, %d bytes)", len(tensors), size)
        return self.generation(number)

    def promote(self, number: int) -> GenerationView:
        with self.store.session() as session:
            row = session.get(GenerationRow, number)
            if row is None:
                raise NotFound(f"no generation {number}")
            if row.status == GenerationStatus.REJECTED:
                raise FailedPrecondition(f"generation {number} was rejected by the gate")
            if row.status == GenerationStatus.CANDIDATE:
                raise FailedPrecondition(f"generation {number} is a candidate under "
                                         "federated evaluation; the nodes' verdict decides")
            self.publish(session, number)
        LOGGER.warning("generation %d promoted by the operator", number)
        return self.generation(number)

    def rollback(self, to_generation: int = -1) -> GenerationView:
        with self.store.session() as session:
            number = self.current_in(session)  # locked: a merge publishing waits
            if number is None:
                raise FailedPrecondition("the hub has no model yet")
            current = session.get(GenerationRow, number)
            assert current is not None
            target = current.parent if to_generation < 0 else to_generation
            if target is None:
                raise FailedPrecondition(f"generation {current.number} has no parent")
            row = session.get(GenerationRow, target)
            if row is None:
                raise NotFound(f"no generation {target}")
            if row.status in UNPUBLISHED:
                raise FailedPrecondition(f"generation {target} is {row.status}")
            if target != current.number:
                current.status = GenerationStatus.ROLLED_BACK
            self.publish(session, target)
        LOGGER.warning("rolled back to generation %d", target)
        return self.generation(target)

    # --- change notices ---------------------------------------------------------------------

    def _notify(self) -> None:
        with self._changed:
            self._notices += 1
            self._changed.notify_all()

    def wait_for_notice(self, seen: int, timeout: float) -> int:
        """Wait until a change notice after the ``seen``-th (or ``timeout``); the count of
        notices so far (0 or more; pass -1 to return at once)."""
        with self._changed:
            if self._notices == seen:
                self._changed.wait(timeout)
            return self._notices

    def wait_for_change(self, known_version: int, timeout: float) -> int:
        """Wait until the current generation may have changed; return the state version.

        Changes made in this process wake waiters at once; changes made elsewhere (the
        CLI, another hub process) are seen by polling at ``timeout``.
        """
        version = self.state_version()
        if version != known_version:
            return version
        with self._changed:
            self._changed.wait(timeout)
        return self.state_version()

    # --- reading ----------------------------------------------------------------------------

    def current_number(self) -> int | None:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            return state.current_generation if state else None

    def state_version(self) -> int:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            return state.version if state else 0

    def published_numbers(self, limit: int = 256) -> tuple[int, ...]:
        """The newest ``limit`` generations ever published (not candidates, not refused),
        oldest first: what a watcher that fell behind has missed."""
        with self.store.session() as session:
            numbers = session.scalars(
                select(GenerationRow.number)
                .where(GenerationRow.status.not_in(UNPUBLISHED))
                .order_by(GenerationRow.number.desc()).limit(limit))
            return tuple(sorted(numbers))

    def is_published(self, number: int) -> bool:
        """Whether generation ``number`` was ever published (ACTIVE or ROLLED_BACK), i.e. a
        base a node may train from. Once published a generation stays so (a candidate is
        published or refused, never the reverse), so a yes is remembered: a burst of
        uploads on one base asks the store once, on any replica."""
        with self._cache_lock:
            if number in self._published:
                return True
        with self.store.session() as session:
            status = session.scalar(
                select(GenerationRow.status).where(GenerationRow.number == number))
        if status is None or status in UNPUBLISHED:
            return False
        with self._cache_lock:
            self._published.add(number)
        return True

    def current_generation(self) -> GenerationView | None:
        number = self.current_number()
        return None if number is None else self.generation(number)

    def require_current(self) -> GenerationView:
        current = self.current_generation()
        if current is None:
            raise FailedPrecondition("the hub has no model yet (tessera hub init-model)")
        return current

    def next_number(self) -> int:
        with self.store.session() as session:
            return (session.scalar(select(func.max(GenerationRow.number))) or 0) + 1

    def candidate_number(self) -> int | None:
        """The candidate generation under federated evaluation, if any."""
        with self.store.session() as session:
            return session.scalar(
                select(GenerationRow.number).where(
                    GenerationRow.status == GenerationStatus.CANDIDATE
                )
            )

    def generation(self, number: int) -> GenerationView:
        return self._views([number])[0]

    def list_generations(self) -> list[GenerationView]:
        with self.store.session() as session:
            numbers = list(
                session.scalars(select(GenerationRow.number).order_by(GenerationRow.number))
            )
        return self._views(numbers)

    def _views(self, numbers: Sequence[int]) -> list[GenerationView]:
        with self.store.session() as session:
            state = session.get(HubStateRow, 1)
            current = state.current_generation if state else None
            return [self._view(session, number, current) for number in numbers]

    @staticmethod
    def _view(session: Session, number: int, current: int | None) -> GenerationView:
        row = session.get(GenerationRow, number)
        if row is None:
            raise NotFound(f"no generation {number}")
        lineage = session.execute(
            select(UpdateRow.update_id, UpdateRow.node_id)
            .where((UpdateRow.merged_into == number) | (UpdateRow.candidate_generation == number))
            .order_by(UpdateRow.received_at)
        ).all()
        return GenerationView(
            number=row.number,
            parent=-1 if row.parent is None else row.parent,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            config_json=row.config_json,
            created_at=as_utc(row.created_at),
            strategy=row.strategy,
            status=row.status,
            current=row.number == current,
            validation_score=row.validation_score,
            update_ids=tuple(u for u, _ in lineage),
            node_ids=tuple(sorted({n for _, n in lineage})),
            notes=row.notes or "",
        )

    def lineage(self, number: int) -> list[int]:
        """``number`` and its ancestors, newest first. A generation's parent never
        changes, so the last whole lineage (ending at a root) is remembered: the
        aggregator asks for the current generation's at every received update."""
        with self._cache_lock:
            if self._lineage and self._lineage[0] == number:
                return list(self._lineage)
        with self.store.session() as session:
            parents = dict(
                session.execute(select(GenerationRow.number, GenerationRow.parent)).all()
            )
        chain: list[int] = []
        seen: set[int] = set()
        cursor: int | None = number
        while cursor is not None and cursor in parents and cursor not in seen:
            chain.append(cursor)
            seen.add(cursor)
            cursor = parents[cursor]
        if cursor is None and chain:
            with self._cache_lock:
                self._lineage = tuple(chain)
        return chain

    def generation_config(self, number: int) -> str:
        """The JSON config of a generation (fixed once the generation is stored)."""
        with self._cache_lock:
            if number in self._configs:
                return self._configs[number]
        with self.store.session() as session:
            config_json = session.scalar(
                select(GenerationRow.config_json).where(GenerationRow.number == number)
            )
        if config_json is None:
            raise NotFound(f"no generation {number}")
        with self._cache_lock:
            self._configs[number] = config_json
        return config_json

    def generation_tensors(self, number: int) -> dict[str, np.ndarray]:
        """A generation's tensors, the last few kept in memory."""
        with self._cache_lock:
            if number in self._tensor_cache:
                self._tensor_cache.move_to_end(number)
                return self._tensor_cache[number]
        view = self.generation(number)
        tensors = read_tensors(self.blobs.path(view.sha256))
        with self._cache_lock:
            self._tensor_cache[number] = tensors
            while len(self._tensor_cache) > TENSOR_CACHE_SIZE:
                self._tensor_cache.popitem(last=False)
        return tensors

    def blob_of(self, number: int) -> tuple[Path, GenerationView]:
        view = self.generation(number)
        return self.blobs.path(view.sha256), view

