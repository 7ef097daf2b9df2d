"""federated evaluation "auto": nodes taking part, and the gate's notes on a generation

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 05:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: the node has not asked for an evaluation task since the upgrade.
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluator_seen", sa.DateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("notes", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("notes")
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("evaluator_seen")
