"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# Row ids: 64-bit on PostgreSQL; on SQLite only INTEGER PRIMARY KEY is an auto-incrementing rowid alias.
RowId = BigInteger().with_variant(Integer(), "sqlite")

# JSON documents (specs, capabilities, metrics): JSONB on PostgreSQL so operators can query them.
JSONDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware UTC (the only kind of datetime the store accepts)."""
    return dt.datetime.now(dt.timezone.utc)


def require_utc(value: dt.datetime, field: str) -> dt.datetime:
    """Return ``value`` converted to UTC; a naive datetime is refused because its zone is a guess."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{field}: expected a timezone-aware datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{field}: naive datetime {value.isoformat()}; expected a timezone-aware UTC datetime"
        )
    return value.astimezone(dt.timezone.utc)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on both engines.

    PostgreSQL stores ``timestamptz``; SQLite has no zone, so values are stored as naive UTC and the zone
    is attached again on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        value = require_utc(value, "datetime column")
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
