"""Mask bases: each device's last accepted mask per body entry (delta-coded masks, issue 12).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mask_bases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("entry", sa.String(length=256), nullable=False),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("num_bits", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=16), nullable=False),
        sa.Column("bits", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["device_pk"], ["devices.id"], name=op.f("fk_mask_bases_device_pk_devices")),
        sa.ForeignKeyConstraint(["task_pk"], ["tasks.id"], name=op.f("fk_mask_bases_task_pk_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mask_bases")),
        sa.UniqueConstraint(
            "task_pk", "device_pk", "entry", name=op.f("uq_mask_bases_task_pk_device_pk_entry")
        ),
    )
    op.create_index(op.f("ix_mask_bases_device_pk"), "mask_bases", ["device_pk"])


def downgrade() -> None:
    op.drop_index(op.f("ix_mask_bases_device_pk"), table_name="mask_bases")
    op.drop_table("mask_bases")
