"""Settings of the single-module sources: a JSON Lines file, a folder of files, a SQL table.

This module imports no database driver (the SQL table's URL is a plain ``SecretStr`` here), so
lockstep's settings can nest these without importing SQLAlchemy. The sources that are packages
keep theirs beside them (``pg_logical/settings.py``, ``webhook/settings.py``), and the Kafka
source's are in ``debezium.py`` with the decoder that reads them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, SecretStr


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JsonlSourceSettings(_Frozen):
    kind: Literal["jsonl"] = "jsonl"
    path: str
    name: str = "jsonl"


class FolderSourceSettings(_Frozen):
    kind: Literal["folder"] = "folder"
    path: str
    name: str = "folder"
    patterns: tuple[str, ...] = ("*.md", "*.txt")


class SqlSourceSettings(_Frozen):
    kind: Literal["sql"] = "sql"
    # A SQLAlchemy URL; it may carry a password, so it is a secret.
    url: SecretStr
    table: str
    name: str = "sql"
    id_column: str = "id"
    text_column: str = "text"
    metadata_column: str | None = None
    metadata_columns: tuple[str, ...] = ()
    updated_at_column: str = "updated_at"
    deleted_at_column: str | None = None
    version_column: str | None = None
