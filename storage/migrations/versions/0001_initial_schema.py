"""Initial schema.

Fleets, tasks, devices, rounds, updates, rejections, aggregates, personalized models and
content-addressed blobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

A migration is frozen history: it spells its column types out instead of importing them from
``fedmask.storage.schema``, which will move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# What fedmask.storage.types maps to in the database at this revision.
UTC_DATETIME = sa.DateTime(timezone=True)
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SHA256_HEX = sa.String(length=64)


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", SHA256_HEX, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.create_table(
        "fleets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fleets")),
        sa.UniqueConstraint("name", name=op.f("uq_fleets_name")),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("fleet_pk", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("capabilities", JSON_DOCUMENT, nullable=True),
        sa.Column("presence", sa.String(length=32), nullable=True),
        sa.Column("presence_at", UTC_DATETIME, nullable=True),
        sa.Column("first_seen_at", UTC_DATETIME, nullable=False),
        sa.Column("last_seen_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["fleet_pk"], ["fleets.id"], name=op.f("fk_devices_fleet_pk_fleets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
        sa.UniqueConstraint("fleet_pk", "device_id", name=op.f("uq_devices_fleet_pk_device_id")),
    )
    op.create_table(
        "rejections",
        sa.Column("id", ROW_ID, nullable=False),
        sa.Column("fleet_pk", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=True),
        sa.Column("round_no", sa.Integer(), nullable=True),
        sa.Column("device_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("topic", sa.String(length=512), nullable=True),
        sa.Column("payload_size", sa.BigInteger(), nullable=True),
        sa.Column("received_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["fleet_pk"], ["fleets.id"], name=op.f("fk_rejections_fleet_pk_fleets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejections")),
    )
    op.create_index(op.f("ix_rejections_fleet_pk"), "rejections", ["fleet_pk"])
    op.create_index(op.f("ix_rejections_task_id_round_no"), "rejections", ["task_id", "round_no"])
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(length=128), nullable=False),
        sa.Column("fleet_pk", sa.Integer(), nullable=False),
        sa.Column("spec", JSON_DOCUMENT, nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("weights_digest", sa.String(length=128), nullable=False),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("arch", sa.String(length=128), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["fleet_pk"], ["fleets.id"], name=op.f("fk_tasks_fleet_pk_fleets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("task_id", name=op.f("uq_tasks_task_id")),
    )
    op.create_index(op.f("ix_tasks_fleet_pk"), "tasks", ["fleet_pk"])
    op.create_table(
        "personalized_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("mask_sha256", SHA256_HEX, nullable=False),
        sa.Column("weights_sha256", SHA256_HEX, nullable=False),
        sa.Column("tflite_sha256", SHA256_HEX, nullable=False),
        sa.Column("accuracy", sa.Double(), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("peak_rss_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics", JSON_DOCUMENT, nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["device_pk"], ["devices.id"], name=op.f("fk_personalized_models_device_pk_devices")
        ),
        sa.ForeignKeyConstraint(
            ["mask_sha256"], ["blobs.sha256"], name=op.f("fk_personalized_models_mask_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(["task_pk"], ["tasks.id"], name=op.f("fk_personalized_models_task_pk_tasks")),
        sa.ForeignKeyConstraint(
            ["tflite_sha256"], ["blobs.sha256"], name=op.f("fk_personalized_models_tflite_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(
            ["weights_sha256"], ["blobs.sha256"], name=op.f("fk_personalized_models_weights_sha256_blobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_personalized_models")),
        sa.UniqueConstraint("task_pk", "device_pk", name=op.f("uq_personalized_models_task_pk_device_pk")),
    )
    for column in ("device_pk", "mask_sha256", "tflite_sha256", "weights_sha256"):
        op.create_index(op.f(f"ix_personalized_models_{column}"), "personalized_models", [column])
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("round_no", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("quorum", sa.Integer(), nullable=False),
        sa.Column("deadline", UTC_DATETIME, nullable=False),
        sa.Column("opened_at", UTC_DATETIME, nullable=False),
        sa.Column("closed_at", UTC_DATETIME, nullable=True),
        sa.Column("closed_by", sa.String(length=16), nullable=True),
        sa.CheckConstraint(
            "(state = 'open' AND closed_at IS NULL AND closed_by IS NULL)"
            " OR (state = 'closed' AND closed_at IS NOT NULL AND closed_by IS NOT NULL)",
            name=op.f("ck_rounds_closed_consistent"),
        ),
        sa.CheckConstraint("closed_by IN ('quorum', 'deadline')", name=op.f("ck_rounds_closed_by")),
        sa.CheckConstraint("state IN ('open', 'closed')", name=op.f("ck_rounds_state")),
        sa.CheckConstraint("quorum >= 1", name=op.f("ck_rounds_quorum_positive")),
        sa.ForeignKeyConstraint(["task_pk"], ["tasks.id"], name=op.f("fk_rounds_task_pk_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("task_pk", "round_no", name=op.f("uq_rounds_task_pk_round_no")),
    )
    op.create_table(
        "aggregates",
        sa.Column("round_pk", sa.Integer(), nullable=False),
        sa.Column("payload_sha256", SHA256_HEX, nullable=False),
        sa.Column("payload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_updates", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["payload_sha256"], ["blobs.sha256"], name=op.f("fk_aggregates_payload_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(["round_pk"], ["rounds.id"], name=op.f("fk_aggregates_round_pk_rounds")),
        sa.PrimaryKeyConstraint("round_pk", name=op.f("pk_aggregates")),
    )
    op.create_index(op.f("ix_aggregates_payload_sha256"), "aggregates", ["payload_sha256"])
    op.create_table(
        "updates",
        sa.Column("id", ROW_ID, nullable=False),
        sa.Column("round_pk", sa.Integer(), nullable=False),
        sa.Column("device_pk", sa.Integer(), nullable=False),
        sa.Column("base_round", sa.Integer(), nullable=False),
        sa.Column("staleness", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Double(), nullable=False),
        sa.Column("num_samples", sa.Integer(), nullable=False),
        sa.Column("payload_sha256", SHA256_HEX, nullable=False),
        sa.Column("payload_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics", JSON_DOCUMENT, nullable=False),
        sa.Column("received_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(["device_pk"], ["devices.id"], name=op.f("fk_updates_device_pk_devices")),
        sa.ForeignKeyConstraint(
            ["payload_sha256"], ["blobs.sha256"], name=op.f("fk_updates_payload_sha256_blobs")
        ),
        sa.ForeignKeyConstraint(["round_pk"], ["rounds.id"], name=op.f("fk_updates_round_pk_rounds")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_updates")),
        sa.UniqueConstraint("round_pk", "device_pk", name=op.f("uq_updates_round_pk_device_pk")),
    )
    op.create_index(op.f("ix_updates_device_pk"), "updates", ["device_pk"])
    op.create_index(op.f("ix_updates_payload_sha256"), "updates", ["payload_sha256"])


def downgrade() -> None:
    # Dropping a table drops its indexes; children first so foreign keys never dangle.
    for table in (
        "updates",
        "aggregates",
        "rounds",
        "personalized_models",
        "tasks",
        "rejections",
        "devices",
        "fleets",
        "blobs",
    ):
        op.drop_table(table)
