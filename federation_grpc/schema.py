"""Schema set-up with Alembic, shared by the node and the hub (each has its own scripts).

``ensure_schema`` is what a starting process calls: an empty database gets
``create_all`` plus an Alembic stamp of the head revision (fast, the embedded
default); a stamped database behind the head is upgraded. ``migrate`` is what an
operator runs (``tessera node migrate`` / ``tessera hub migrate``): it runs the
revision scripts themselves. On PostgreSQL both hold an advisory lock, so workers or
hub replicas starting together do not race on DDL.
"""

from __future__ import annotations

import logging
import zlib
from functools import lru_cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect

LOGGER = logging.getLogger(__name__)


def alembic_config(script_location: str, connection: Connection | None = None) -> Config:
    """An in-memory Alembic config (no alembic.ini); ``script_location`` as
    ``package:folder``."""
    cfg = Config()
    cfg.set_main_option("script_location", script_location)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=8)
def _scripts(script_location: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(script_location))


def head_revision(script_location: str) -> str:
    head = _scripts(script_location).get_current_head()
    assert head is not None, f"no revisions under {script_location}"
    return head


def _lock(conn: Connection, script_location: str) -> None:
    if conn.dialect.name == "postgresql":
        key = zlib.crc32(script_location.encode()) & 0x7FFFFFFF
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")


def current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def ensure_schema(engine: Engine, metadata: MetaData, script_location: str) -> None:
    """Create the schema on an empty database (stamped at head) or upgrade a stamped one.

    A database made before migrations existed (tables, no ``alembic_version``) gets the
    missing tables and a stamp of the head revision.
    """
    with engine.begin() as conn:
        _lock(conn, script_location)
        current = current_revision(conn)
        if current is None:
            metadata.create_all(conn)
            MigrationContext.configure(conn).stamp(_scripts(script_location), "head")
            return
        if current != head_revision(script_location):
            LOGGER.info("upgrading schema %s from revision %s", script_location, current)
            command.upgrade(alembic_config(script_location, conn), "head")
        # Tables dropped behind Alembic's back (a test's drop_all) come back; a no-op
        # (one catalogue query per table) otherwise.
        metadata.create_all(conn)


def migrate(
    engine: Engine, script_location: str, revision: str = "head"
) -> tuple[str | None, str | None]:
    """Run the revision scripts up to ``revision``; returns (before, after).

    A database whose tables predate migrations (no ``alembic_version``) is first stamped
    at the base revision, the schema ``create_all`` made before Alembic was added.
    """
    with engine.begin() as conn:
        _lock(conn, script_location)
        before = current_revision(conn)
        if before is None and inspect(conn).get_table_names():
            base = _scripts(script_location).get_base()
            assert base is not None, f"no revisions under {script_location}"
            LOGGER.warning("unversioned schema with tables; stamping base revision %s", base)
            MigrationContext.configure(conn).stamp(_scripts(script_location), base)
        command.upgrade(alembic_config(script_location, conn), revision)
        after = current_revision(conn)
    return before, after
