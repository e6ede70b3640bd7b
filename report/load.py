"""Stored tasks as reports, read through a read-only engine."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine

from fedmask.report.model import TaskReport, from_history
from fedmask.storage.engine import read_transaction
from fedmask.storage.errors import StorageError


def load_reports(engine: Engine, task_ids: Sequence[str] | None = None) -> list[TaskReport]:
    """The named tasks (every stored task, oldest first, when none are named) as reports."""
    from fedmask.storage import reporting

    with read_transaction(engine) as connection:
        if not task_ids:
            task_ids = [t.task_id for t in reversed(reporting.list_tasks(connection))]
            if not task_ids:
                raise StorageError("the store holds no task yet; run a task (or `fedmask simulate --db`)")
        return [from_history(reporting.task_history(connection, task_id)) for task_id in task_ids]
