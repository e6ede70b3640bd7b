"""Mask bases by reference: a base may point at the stored update it came in instead of copying it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

``mask_bases.bits`` becomes nullable and ``mask_bases.payload_sha256`` (a blob: an update payload in
full coding) is new; exactly one of them is set. The aggregator's ingest path writes the reference, so
each accepted mask is written once (in its update's payload), not twice. Existing rows keep their bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BITS_OR_PAYLOAD = "(bits IS NULL) <> (payload_sha256 IS NULL)"


def upgrade() -> None:
    with op.batch_alter_table("mask_bases") as batch:
        batch.alter_column("bits", existing_type=sa.LargeBinary(), nullable=True)
        batch.add_column(sa.Column("payload_sha256", sa.String(length=64), nullable=True))
        batch.create_foreign_key(
            op.f("fk_mask_bases_payload_sha256_blobs"), "blobs", ["payload_sha256"], ["sha256"]
        )
        batch.create_index(op.f("ix_mask_bases_payload_sha256"), ["payload_sha256"])
        batch.create_check_constraint(op.f("ck_mask_bases_bits_or_payload"), BITS_OR_PAYLOAD)


def downgrade() -> None:
    # Bases held by reference are not copied back (their bits are inside msgpack payloads): they are
    # dropped, and a device whose base is gone has its next update refused (missing_base) and resends
    # it in full.
    op.execute("DELETE FROM mask_bases WHERE bits IS NULL")
    with op.batch_alter_table("mask_bases") as batch:
        batch.drop_constraint(op.f("ck_mask_bases_bits_or_payload"), type_="check")
        batch.drop_index(op.f("ix_mask_bases_payload_sha256"))
        batch.drop_constraint(op.f("fk_mask_bases_payload_sha256_blobs"), type_="foreignkey")
        batch.drop_column("payload_sha256")
        batch.alter_column("bits", existing_type=sa.LargeBinary(), nullable=False)
