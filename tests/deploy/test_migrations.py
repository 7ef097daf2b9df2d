"""``migrate`` on an empty database gives the schema ``create_all`` gives, on SQLite
and PostgreSQL, for the node and the hub; ``create_schema`` stamps the head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, inspect
from sqlalchemy.engine import Engine

from dicom_node.store.db import MIGRATIONS as NODE_MIGRATIONS
from dicom_node.store.db import Database
from dicom_node.store.models import Base as NodeBase
from federation_grpc.hub.store import MIGRATIONS as HUB_MIGRATIONS
from federation_grpc.hub.store import Base as HubBase
from federation_grpc.schema import current_revision, head_revision, migrate


def schema_of(engine: Engine) -> dict[str, Any]:
    insp = inspect(engine)
    tables: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        tables[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"])
                        for c in insp.get_columns(table)],
            "pk": sorted(insp.get_pk_constraint(table)["constrained_columns"]),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in insp.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"])
                             for u in insp.get_unique_constraints(table)),
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"])
                          for f in insp.get_foreign_keys(table)),
        }
    return tables


@pytest.fixture(params=["sqlite", "postgres"])
def two_urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    make: Callable[[], str] = request.getfixturevalue("pg_database")
    return make(), make()


@pytest.mark.parametrize("metadata,location", [(NodeBase.metadata, NODE_MIGRATIONS),
                                               (HubBase.metadata, HUB_MIGRATIONS)],
                         ids=["node", "hub"])
def test_migrate_equals_create_all(two_urls: tuple[str, str], metadata: MetaData,
                                   location: str) -> None:
    by_create, by_migrate = (create_engine(u) for u in two_urls)
    try:
        metadata.create_all(by_create)
        before, after = migrate(by_migrate, location)
        assert (before, after) == (None, head_revision(location))
        expected = schema_of(by_create)
        assert expected and schema_of(by_migrate) == expected
        assert migrate(by_migrate, location) == (after, after), "migrate twice: no-op"
    finally:
        by_create.dispose()
        by_migrate.dispose()


def test_create_schema_stamps_head_and_migrate_accepts_it(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        db.create_schema()
        with db.engine.connect() as conn:
            assert current_revision(conn) == head_revision(NODE_MIGRATIONS)
        assert db.migrate() == (head_revision(NODE_MIGRATIONS),) * 2
    finally:
        db.dispose()


def test_migrate_adopts_a_database_made_before_migrations(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        NodeBase.metadata.create_all(engine)  # what create_schema did before Alembic
        before, after = migrate(engine, NODE_MIGRATIONS)
        assert before is None and after == head_revision(NODE_MIGRATIONS)
    finally:
        engine.dispose()
