"""Set-up and teardown on the server: the checks, the tables, the publication and the slot.

Set-up (when the source is built): ``wal_level`` must be ``logical``, the database UTF-8, and
every table ``REPLICA IDENTITY FULL`` (an UPDATE that leaves a large, TOASTed text unchanged
sends no value for it; the full old row is where it is found). The publication is created (or
completed with missing tables) before the slot, because pgoutput resolves it as of each change's
LSN.

A lost slot (missing, or ``wal_status = 'lost'``) while a checkpoint exists is a SourceError
naming the recovery command, ``lockstep source resnapshot``, which builds the source with
``resnapshot=True``: it re-creates the slot and re-reads the tables.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import TupleRow

from adapters.sources.pg_logical.positions import position_lsn
from adapters.sources.pg_logical.rows import Columns, TableRef
from adapters.sources.pg_logical.settings import NAME_PATTERN
from adapters.sources.pgoutput import lsn_to_int
from coordinator.errors import ConfigError, SourceError

RECOVERY_COMMAND = "lockstep source resnapshot -c CONFIG"

log = structlog.get_logger(__name__)


def check_names(tables: Sequence[str], slot: str, publication: str, prefixed: bool) -> None:
    """ConfigError for tables, a slot or a publication this source cannot work with."""
    if not tables:
        raise ConfigError("a Postgres logical replication source needs at least one table")
    if len(tables) > 1 and not prefixed:
        raise ConfigError("several tables need table_prefix_ids, or their ids would collide")
    if any("/" in table for table in tables):
        raise ConfigError("table names must not contain '/', which separates them from ids in doc_ids")
    for what, value in (("slot", slot), ("publication", publication)):
        if not re.fullmatch(NAME_PATTERN, value):
            raise ConfigError(f"{what} name {value!r} must be a lower-case identifier")


def check_server(conn: psycopg.Connection[TupleRow]) -> None:
    settings: dict[str, str] = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'server_encoding')"
        ).fetchall()
    )
    if settings.get("wal_level") != "logical":
        raise ConfigError(f"wal_level is {settings.get('wal_level')!r}; logical replication needs 'logical'")
    if settings.get("server_encoding") != "UTF8":
        raise ConfigError(f"the database encoding is {settings.get('server_encoding')!r}; UTF8 is required")


def table_ref(conn: psycopg.Connection[TupleRow], label: str, prefixed: bool) -> TableRef:
    """The configured table ``label``; ConfigError if it is missing or not REPLICA IDENTITY FULL."""
    row = conn.execute(
        "SELECT n.nspname, c.relname, c.relreplident FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (label,),
    ).fetchone()
    if row is None:
        raise ConfigError(f"table {label!r} does not exist")
    schema, name, identity = row
    if identity != "f":
        raise ConfigError(
            f"table {label!r} needs REPLICA IDENTITY FULL (ALTER TABLE {label} REPLICA IDENTITY FULL): "
            "an UPDATE that leaves a TOASTed text unchanged sends its value only in the full old row"
        )
    return TableRef(label, str(schema), str(name), f"{label}/" if prefixed else "")


def column_types(conn: psycopg.Connection[TupleRow], table: TableRef, columns: Columns) -> dict[str, int]:
    """Type oid of each of the table's columns; ConfigError if a configured one is missing."""
    rows = conn.execute(
        "SELECT attname, atttypid::int FROM pg_attribute WHERE attrelid = %s::regclass "
        "AND attnum > 0 AND NOT attisdropped",
        (sql.Identifier(table.schema, table.name).as_string(conn),),
    ).fetchall()
    types = {str(n): int(t) for n, t in rows}
    missing = [c for c in columns.names if c not in types]
    if missing:
        raise ConfigError(f"table {table.label!r} has no column {missing[0]!r}")
    return types


def ensure_publication(
    conn: psycopg.Connection[TupleRow], publication: str, tables: Sequence[TableRef], *, source: str
) -> None:
    """Create the publication, or add the tables it lacks; ConfigError if it leaves out an operation."""
    pub = sql.Identifier(publication)
    flags = conn.execute(
        "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = %s",
        (publication,),
    ).fetchone()
    names = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in tables)
    if flags is None:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(pub, names))
        log.info("publication created", source=source, publication=publication)
        return
    if not flags[0]:
        raise ConfigError(f"publication {publication!r} must publish insert, update, delete and truncate")
    published = set(
        conn.execute(
            "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
            (publication,),
        ).fetchall()
    )
    for table in tables:
        if (table.schema, table.name) not in published:
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(pub, sql.Identifier(table.schema, table.name))
            )


def snapshot_due(conn: psycopg.Connection[TupleRow], slot: str, checkpoint: str | None, *, source: str) -> bool:
    """True when the source must start with a snapshot; SourceError when the slot is lost."""
    if checkpoint is None or position_lsn(checkpoint) is None:
        return True
    row = conn.execute(
        "SELECT plugin, slot_type, database = current_database(), wal_status "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        raise SourceError(lost_message(source, slot, checkpoint, "it does not exist"))
    plugin, kind, same_database, wal_status = row
    if (plugin, kind, same_database) != ("pgoutput", "logical", True):
        raise ConfigError(f"slot {slot!r} exists but is not a pgoutput slot of this database")
    if wal_status == "lost":
        raise SourceError(lost_message(source, slot, checkpoint, "the WAL it needs was removed"))
    return False


def create_slot(replication: psycopg.Connection[TupleRow], slot: str) -> tuple[int, str]:
    """Create the slot on a replication connection: its consistent point and exported snapshot."""
    command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT")
    row = replication.execute(command.format(sql.Identifier(slot))).fetchone()
    assert row is not None, "CREATE_REPLICATION_SLOT answers one row"
    return lsn_to_int(str(row[1])), str(row[2])


def drop_slot(conn: psycopg.Connection[TupleRow], slot: str) -> None:
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )


def is_lost_slot(exc: psycopg.Error) -> bool:
    """The slot was invalidated (55000 "can no longer access") or dropped (42704)."""
    message = str(exc)
    lost = isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState) and "replication slot" in message
    missing = isinstance(exc, psycopg.errors.UndefinedObject) and "replication slot" in message
    return lost or missing


def lost_message(source: str, slot: str, checkpoint: str | None, what: str) -> str:
    return (
        f"replication slot {slot!r} is lost ({what}) while {source!r} has a checkpoint at "
        f"{checkpoint}: the changes after it can no longer be read. Recover with "
        f"`{RECOVERY_COMMAND}`, which re-creates the slot, re-reads the tables and deletes "
        "documents they no longer hold."
    )
