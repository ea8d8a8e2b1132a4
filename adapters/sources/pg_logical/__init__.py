"""Postgres logical replication as a change source (pgoutput, read through the SQL interface)."""

from adapters.sources.pg_logical.source import PgLogicalSource

__all__ = ["PgLogicalSource"]
