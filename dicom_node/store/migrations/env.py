"""Alembic environment of the node index (``tessera node migrate``)."""

from __future__ import annotations

import logging

from alembic import context
from sqlalchemy import create_engine

from dicom_node.store.models import Base

LOGGER = logging.getLogger(__name__)


def run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:  # the alembic CLI with sqlalchemy.url set
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        return
    # render_as_batch: SQLite alters tables by copying them.
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
