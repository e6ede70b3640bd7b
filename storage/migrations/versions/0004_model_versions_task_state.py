"""Model registry and task status (issue 13).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

- ``personalized_models`` keeps every version of a device's model for a task: ``version`` (1, 2, ...)
  replaces the unique (task, device) by (task, device, version); existing rows become version 1.
  ``num_test`` (test samples behind the accuracy) and ``density`` (kept share of the masked weights)
  are columns, filled from the stored metrics where the agent reported them.
- ``tasks`` records its ``schedule`` and where the aggregator got with it: ``state`` (running,
  finalizing, done, failed), ``outcome`` (why it failed) and ``state_at``. NULL for older tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TASK_STATES = "state IN ('running', 'finalizing', 'done', 'failed')"


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("schedule", JSON_DOCUMENT, nullable=True))
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("outcome", sa.Text(), nullable=True))
        batch.add_column(sa.Column("state_at", UTC_DATETIME, nullable=True))
        batch.create_check_constraint(op.f("ck_tasks_state"), TASK_STATES)
    with op.batch_alter_table("personalized_models") as batch:
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("num_test", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("density", sa.Double(), nullable=True))
    with op.batch_alter_table("personalized_models") as batch:
        batch.alter_column("version", existing_type=sa.Integer(), server_default=None)
        batch.drop_constraint(op.f("uq_personalized_models_task_pk_device_pk"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_personalized_models_task_pk_device_pk_version"), ["task_pk", "device_pk", "version"]
        )
        batch.create_check_constraint(op.f("ck_personalized_models_version_positive"), "version >= 1")
    _fill_from_metrics()


def _fill_from_metrics() -> None:
    """``num_test`` and ``density`` of models stored before they were columns, from their metrics."""
    connection = op.get_bind()
    models = sa.table(
        "personalized_models",
        sa.column("id", sa.Integer()),
        sa.column("metrics", JSON_DOCUMENT),
        sa.column("num_test", sa.Integer()),
        sa.column("density", sa.Double()),
    )
    for pk, metrics in connection.execute(sa.select(models.c.id, models.c.metrics)).all():
        metrics = metrics or {}
        values = {}
        if isinstance(metrics.get("num_test"), int | float):
            values["num_test"] = int(metrics["num_test"])
        if isinstance(metrics.get("density"), int | float):
            values["density"] = float(metrics["density"])
        if values:
            connection.execute(sa.update(models).where(models.c.id == pk).values(**values))


def downgrade() -> None:
    # Keeps each device's newest version per task: the old schema holds one model per (task, device).
    op.execute(
        "DELETE FROM personalized_models WHERE version < (SELECT MAX(p.version) FROM personalized_models p "
        "WHERE p.task_pk = personalized_models.task_pk AND p.device_pk = personalized_models.device_pk)"
    )
    with op.batch_alter_table("personalized_models") as batch:
        batch.drop_constraint(op.f("ck_personalized_models_version_positive"), type_="check")
        batch.drop_constraint(op.f("uq_personalized_models_task_pk_device_pk_version"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_personalized_models_task_pk_device_pk"), ["task_pk", "device_pk"]
        )
        batch.drop_column("density")
        batch.drop_column("num_test")
        batch.drop_column("version")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("ck_tasks_state"), type_="check")
        batch.drop_column("state_at")
        batch.drop_column("outcome")
        batch.drop_column("state")
        batch.drop_column("schedule")
