"""metric records keyed by the node: a retried report is not kept twice

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 19:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: a record kept before the upgrade, or sent without a key (all such are kept).
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("record_key", sa.String(length=64), nullable=True))
        batch_op.create_unique_constraint("uq_metrics_node_key", ["node_id", "record_key"])


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_constraint("uq_metrics_node_key", type_="unique")
        batch_op.drop_column("record_key")
