"""Pruning: release payload bytes nobody needs any more, keep every row of metadata."""

from __future__ import annotations

from sqlalchemy import Connection, delete, exists, func, or_, select, text, update

from fedmask.storage.schema import Aggregate, Blob, MaskBase, PersonalizedModel, Round, Update

_MODEL_FILES = (
    PersonalizedModel.mask_sha256,
    PersonalizedModel.weights_sha256,
    PersonalizedModel.tflite_sha256,
)


def prune(connection: Connection, keep_last: int) -> int:
    """Free update payloads outside each task's newest ``keep_last`` rounds; return blobs freed.

    Open rounds always keep their payloads (a restarting aggregator needs them), as do aggregates,
    personalized models (every version) and the updates that hold a device's mask base (its last
    accepted masks, which its next update may be coded against). A blob no row refers to is deleted; a
    blob only old updates refer to keeps its row, and its digest and size, with ``data`` set to NULL.
    """
    if connection.dialect.name == "postgresql":
        # Writers wait while we decide what is unreferenced, so none can start referring to a blob we
        # are about to free. (SQLite already gives this transaction the only write lock.) Blobs first:
        # every writer touches blobs before the tables that refer to them, so the order cannot deadlock.
        connection.execute(
            text(
                "LOCK TABLE blobs, updates, aggregates, personalized_models, mask_bases"
                " IN SHARE ROW EXCLUSIVE MODE"
            )
        )
    newest_first = (
        select(
            Round.id,
            Round.state,
            func.row_number().over(partition_by=Round.task_pk, order_by=Round.round_no.desc()).label("rank"),
        )
    ).subquery()
    kept_rounds = select(newest_first.c.id).where(
        or_(newest_first.c.rank <= keep_last, newest_first.c.state == "open")
    )

    kept_elsewhere = [exists().where(Aggregate.payload_sha256 == Blob.sha256)]
    kept_elsewhere += [exists().where(MaskBase.payload_sha256 == Blob.sha256)]
    kept_elsewhere += [exists().where(column == Blob.sha256) for column in _MODEL_FILES]
    any_update = exists().where(Update.payload_sha256 == Blob.sha256)
    kept_update = exists().where(Update.payload_sha256 == Blob.sha256, Update.round_pk.in_(kept_rounds))

    orphans = connection.execute(delete(Blob).where(~any_update, *(~ref for ref in kept_elsewhere)))
    released = connection.execute(
        update(Blob)
        .where(Blob.data.is_not(None), ~kept_update, *(~ref for ref in kept_elsewhere))
        .values(data=None)
    )
    return orphans.rowcount + released.rowcount
