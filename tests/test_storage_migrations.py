"""Alembic migrations: an empty database upgraded to head is exactly what the models describe."""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import main as alembic_main
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from fedmask.storage import StorageError, Store, migrate
from fedmask.storage.schema import Base

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def schema_diffs(store: Store) -> list:
    with store.engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def table_names(store: Store) -> set[str]:
    with store.engine.connect() as connection:
        return set(inspect(connection).get_table_names())


def test_empty_database_upgraded_to_head_matches_the_models(db_url: str) -> None:
    with Store(db_url) as store:
        assert table_names(store) == set()
        store.upgrade()
        assert table_names(store) == set(Base.metadata.tables) | {migrate.VERSION_TABLE}
        assert schema_diffs(store) == []
        store.check_schema()


def test_upgrade_is_idempotent_and_downgrade_reverses_it(db_url: str) -> None:
    with Store(db_url) as store:
        store.upgrade()
        store.upgrade()
        assert schema_diffs(store) == []
        migrate.downgrade(store.engine, "base")
        assert table_names(store) == {migrate.VERSION_TABLE}
        with pytest.raises(StorageError, match="fedmask db upgrade"):
            store.check_schema()
        store.upgrade()
        assert schema_diffs(store) == []


def test_processes_starting_together_migrate_once(db_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            with Store(db_url) as store:
                store.upgrade()
        except BaseException as exc:  # collected and asserted on below
            errors.append(exc)

    workers = [threading.Thread(target=start) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    with Store(db_url) as store:
        assert schema_diffs(store) == []


def test_check_schema_names_an_unmigrated_database(db_url: str) -> None:
    with Store(db_url) as store, pytest.raises(StorageError, match=r"no fedmask schema.*fedmask db upgrade"):
        store.check_schema()


def test_migrations_ship_inside_the_package_with_one_head() -> None:
    packaged = resources.files("fedmask.storage.migrations")
    assert packaged.joinpath("env.py").is_file()
    assert packaged.joinpath("script.py.mako").is_file()
    assert Path(str(packaged)).resolve() == migrate.MIGRATIONS_DIR
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert script.get_heads() == [migrate.head_revision()]
    # Every revision file is importable Python in the versions package (so a wheel carries it).
    assert all(
        rev.path.startswith(str(migrate.MIGRATIONS_DIR / "versions")) for rev in script.walk_revisions()
    )


def test_alembic_command_line_works_from_the_source_tree(sqlite_url: str) -> None:
    """The developer path: `alembic -c storage/alembic.ini check` passes at head, and fails on a drift."""
    with Store(sqlite_url) as store:
        store.upgrade()
        check = ["-c", str(PROJECT_ROOT / "storage" / "alembic.ini"), "-x", f"db={sqlite_url}", "check"]
        alembic_main(argv=check)  # returns normally: nothing left to autogenerate
        with store.engine.begin() as connection:
            connection.execute(text("DROP INDEX ix_updates_device_pk"))
        with pytest.raises(SystemExit):  # alembic exits non-zero on "New upgrade operations detected"
            alembic_main(argv=check)
