"""enrolment tokens keep the salt of their answer: a request sent again is answered again

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 19:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL: used before the upgrade, or by a node that sent no request id.
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("answer_salt", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrolment_tokens", schema=None) as batch_op:
        batch_op.drop_column("answer_salt")
