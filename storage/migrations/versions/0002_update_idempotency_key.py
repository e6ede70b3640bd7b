"""One update per (task, device, base round) across every round of the task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

An update trained from base round ``b`` can be stored in round ``b`` or, late, in any later round up to
the staleness bound. Keyed by (round, device) only, the same update republished while a later round was
open was stored a second time. ``updates.task_pk`` (copied from the round) carries the key across rounds.

A database that already holds such doubles cannot take the unique constraint: the upgrade stops and
names them, since which copy to keep is the operator's call (``fedmask round N`` shows them).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("task_pk", sa.Integer(), nullable=True))
    op.execute(
        "UPDATE updates SET task_pk = (SELECT rounds.task_pk FROM rounds WHERE rounds.id = updates.round_pk)"
    )
    doubles = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT task_pk, device_pk, base_round, COUNT(*) FROM updates "
                "GROUP BY task_pk, device_pk, base_round HAVING COUNT(*) > 1"
            )
        )
        .fetchall()
    )
    if doubles:
        shown = ", ".join(
            f"task_pk {t} device_pk {d} base_round {b} ({n} rows)" for t, d, b, n in doubles[:10]
        )
        raise RuntimeError(f"updates stored more than once; remove the extra rows first: {shown}")
    with op.batch_alter_table("updates") as batch:
        batch.alter_column("task_pk", existing_type=sa.Integer(), nullable=False)
        batch.create_foreign_key(op.f("fk_updates_task_pk_tasks"), "tasks", ["task_pk"], ["id"])
        batch.create_unique_constraint(
            op.f("uq_updates_task_pk_device_pk_base_round"), ["task_pk", "device_pk", "base_round"]
        )


def downgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.drop_constraint(op.f("uq_updates_task_pk_device_pk_base_round"), type_="unique")
        batch.drop_constraint(op.f("fk_updates_task_pk_tasks"), type_="foreignkey")
        batch.drop_column("task_pk")
