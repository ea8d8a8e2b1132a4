"""The Postgres source: a table of the documents, streamed from a logical replication slot.

The slot is created and its snapshot (one seed row) checkpointed by a ``lockstep sync`` first,
so that the rows inserted afterwards come through logical replication, not a snapshot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from bench.sources.servers import Streams
from bench.streaming.service import Installation
from bench.streaming.workload import make_docs
from lockstep.corpus import Doc

# The seed row that the priming `lockstep sync` snapshots, so the measured run streams.
PG_SEED_DOC_ID = "seed/000000"
# The priming `lockstep sync` and the slot's first snapshot take seconds; bound them anyway.
SYNC_TIMEOUT_S = 300.0
LOCKSTEP = [sys.executable, "-m", "lockstep", "--log-level", "warning"]


def pg_source(streams: Streams, name: str) -> dict[str, Any]:
    return {
        "kind": "postgres_logical", "name": name, "dsn": streams.postgres.uri, "tables": [name],
        "slot": name, "publication": name, "text_column": "body", "metadata_column": "meta",
    }  # fmt: skip


def create_table(dsn: str, table: str) -> None:
    """A source table keyed by the document id, with the REPLICA IDENTITY FULL the source requires."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        name = sql.Identifier(table)
        conn.execute(sql.SQL("CREATE TABLE {} (id text PRIMARY KEY, body text, meta jsonb)").format(name))
        conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(name))


def insert_docs(dsn: str, table: str, docs: Sequence[Doc], rows_per_txn: int) -> None:
    """COPY the documents in, ``rows_per_txn`` per transaction."""
    copy = sql.SQL("COPY {} (id, body, meta) FROM STDIN").format(sql.Identifier(table))
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, len(docs), rows_per_txn):
            with conn.transaction(), conn.cursor().copy(copy) as out:
                for d in docs[start : start + rows_per_txn]:
                    out.write_row((d.doc_id, d.text, json.dumps(d.metadata)))


def prime_slot(inst: Installation, dsn: str, table: str, seed: Doc) -> None:
    """Create the slot and checkpoint its snapshot (of one seed row) with `lockstep sync`, so
    that the rows inserted afterwards come through logical replication, not a snapshot."""
    insert_docs(dsn, table, [seed], 1)
    done = subprocess.run(
        [*LOCKSTEP, "sync", "-c", str(inst.config)], capture_output=True, text=True, timeout=SYNC_TIMEOUT_S,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"priming `lockstep sync` exited with {done.returncode}: {done.stderr[-2000:]}")


def seed_doc(docs: Sequence[Doc], seed: int) -> Doc:
    """A document like the others but outside the measured set (generated past its end)."""
    extra = make_docs(len(docs) + 1, seed)[-1]
    return Doc(PG_SEED_DOC_ID, extra.version, extra.paragraphs, extra.metadata)
