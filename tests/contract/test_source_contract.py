"""ChangeSource contract: the same suite for every source adapter, each fed through its own medium.

Every adapter in ``adapters/sources/`` is driven by a driver (``tests/support/source_drivers.py``)
that appends JSONL lines, writes and deletes files, writes rows of a real Postgres table, produces
Debezium envelopes to a real Kafka-protocol broker, writes rows behind a real logical replication
slot, or POSTs to the webhook intake over real HTTP. Each test reads as ``sync`` does: apply what
came out to a version-gated ledger, then commit the last position.

Where adapters legitimately differ, the difference is asserted, not skipped: "snapshot" sources (a
folder, a table read by watermark) diff the current state against the ledger, so changes made
between two reads come as their net effect, and a folder's position is the ledger itself (its
records carry none; what was applied is what is not delivered again).
"""

from __future__ import annotations

import gc
import importlib
import inspect
import json
import pkgutil
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType

import psutil
import pytest

import adapters.sources.folder
import adapters.sources.jsonl
import adapters.sources.kafka
import adapters.sources.pg_logical
import adapters.sources.sql_table
import adapters.sources.webhook
from adapters.sources.folder import FolderSource
from adapters.sources.jsonl import JsonlSource
from adapters.sources.kafka import KafkaDebeziumSource
from adapters.sources.pg_logical import PgLogicalSource
from adapters.sources.sql_table import SqlTableSource
from adapters.sources.webhook import WebhookSource
from chaos.servers import EmbeddedPostgres
from coordinator.events import ChangeEvent
from coordinator.ports import BadRecord, ChangeSource, FollowingSource, SourceRecord
from tests.support.postgres_servers import start_postgres_or_fail
from tests.support.source_drivers import (
    ContractLedger,
    FolderDriver,
    JsonlDriver,
    KafkaDriver,
    PgLogicalDriver,
    SourceDriver,
    SqlTableDriver,
    WebhookDriver,
    Written,
)

# Which adapter class each driver opens: the completeness test holds this against the modules.
ADAPTERS: dict[str, type] = {
    "jsonl": JsonlSource,
    "folder": FolderSource,
    "sql_table": SqlTableSource,
    "kafka": KafkaDebeziumSource,
    "pg_logical": PgLogicalSource,
    "webhook": WebhookSource,
}
SOURCE_MODULES = (
    adapters.sources.jsonl,
    adapters.sources.folder,
    adapters.sources.sql_table,
    adapters.sources.kafka,
    adapters.sources.pg_logical,
    adapters.sources.webhook,
)


@pytest.fixture(scope="module")
def logical_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL with wal_level=logical for the logical replication and the SQL table drivers."""
    base = Path(tempfile.mkdtemp(prefix="lockstep-pgcontract-"))
    server = EmbeddedPostgres(base / "pgdata", logical_replication=True)
    try:
        start_postgres_or_fail(server)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ledger() -> ContractLedger:
    return ContractLedger()


def _build(kind: str, request: pytest.FixtureRequest, tmp_path: Path, ledger: ContractLedger) -> SourceDriver:
    """The driver of ``kind``; servers are requested lazily, so a run of one kind starts only its own."""
    if kind == "jsonl":
        return JsonlDriver(tmp_path, ledger)
    if kind == "folder":
        return FolderDriver(tmp_path, ledger)
    if kind == "sql_table":
        return SqlTableDriver(request.getfixturevalue("logical_postgres"), ledger)
    if kind == "kafka":
        return KafkaDriver(request.getfixturevalue("kafka_broker"), ledger)
    if kind == "pg_logical":
        return PgLogicalDriver(request.getfixturevalue("logical_postgres"), ledger)
    if kind == "webhook":
        return WebhookDriver(tmp_path, ledger)
    raise AssertionError(f"no driver for {kind}")


@pytest.fixture(params=sorted(ADAPTERS))
def driver(request: pytest.FixtureRequest, tmp_path: Path, ledger: ContractLedger) -> Iterator[SourceDriver]:
    made = _build(request.param, request, tmp_path, ledger)
    yield made
    made.close()


def settle(source: ChangeSource, ledger: ContractLedger) -> list[SourceRecord]:
    """One read as ``sync`` does it: apply every event, then commit the last position."""
    records = list(source.read())
    ledger.apply_all(records)
    last = next((r.position for r in reversed(records) if r.position is not None), None)
    if last is not None:
        source.commit(last)
    return records


def assert_delivers(record: SourceRecord, written: Written) -> ChangeEvent:
    """``record`` is the event ``written`` must become: op, doc_id, text and metadata."""
    assert isinstance(record, ChangeEvent), record
    assert (record.op, record.doc_id) == (written.op, written.doc_id)
    if written.text is not None:
        assert (record.text, dict(record.metadata)) == (written.text, dict(written.metadata))
    return record


# --- 1. upsert, update, delete --------------------------------------------------------------------


def test_an_upsert_an_update_and_a_delete_come_out_with_versions_that_order_them(
    driver: SourceDriver, ledger: ContractLedger
) -> None:
    """Created, changed and deleted, each read before the next: one event each, with the right
    op, doc_id, text and metadata, and strictly increasing versions."""
    source = driver.open()
    try:
        assert settle(source, ledger) == [], "an empty medium yields nothing"
        got: list[ChangeEvent] = []
        writes: list[Callable[[], Written]] = [
            partial(driver.upsert, 1, "the first text", "v1"),
            partial(driver.upsert, 1, "the second text", "v2"),
            partial(driver.delete, 1),
        ]
        for write in writes:
            written = write()
            records = settle(source, ledger)
            assert len(records) == 1, records
            got.append(assert_delivers(records[0], written))
    finally:
        source.close()
    versions = [event.version for event in got]
    assert versions == sorted(set(versions)), f"versions do not order the changes: {versions}"
    if driver.positioned:
        assert all(event.position is not None for event in got)
    else:
        assert all(event.position is None for event in got), "a snapshot source's position is the ledger"


def test_changes_between_two_reads_come_as_a_log_or_as_their_net_effect(
    driver: SourceDriver, ledger: ContractLedger
) -> None:
    """Several changes before one read: a log source delivers each, in order, every document's
    versions increasing; a snapshot source delivers each document's net change once (a document
    created and deleted in between is at most a delete)."""
    source = driver.open()
    try:
        assert settle(source, ledger) == []
        writes = [
            driver.upsert(1, "a, first", "a1"),
            driver.upsert(2, "b, first", "b1"),
            driver.upsert(1, "a, second", "a2"),
            driver.delete(2),
        ]
        records = settle(source, ledger)
    finally:
        source.close()
    if driver.semantics == "log":
        assert len(records) == len(writes), records
        events = [assert_delivers(r, w) for r, w in zip(records, writes, strict=True)]
        for doc_id in {w.doc_id for w in writes}:
            versions = [e.version for e in events if e.doc_id == doc_id]
            assert versions == sorted(set(versions)), f"{doc_id}: {versions}"
        return
    by_doc = {w.doc_id: [r for r in records if isinstance(r, ChangeEvent) and r.doc_id == w.doc_id] for w in writes}
    assert len(records) == sum(len(v) for v in by_doc.values()), records
    [net] = by_doc[writes[0].doc_id]
    assert_delivers(net, writes[2])
    assert len(by_doc[writes[1].doc_id]) <= 1 and all(r.text is None for r in by_doc[writes[1].doc_id])


# --- 2. commit and resume -------------------------------------------------------------------------


def test_a_new_instance_resumes_after_the_committed_position(driver: SourceDriver, ledger: ContractLedger) -> None:
    """Three changes read, the first two applied and committed, then a restart: the new source
    delivers the third again (read but never committed: at-least-once) and a later change, and
    nothing before the committed position."""
    first = driver.open()
    try:
        assert settle(first, ledger) == []
        written = [driver.upsert(key, f"text {key}", f"t{key}") for key in (1, 2, 3)]
        records = list(first.read())
        events = [assert_delivers(record, change) for record, change in zip(records, written, strict=True)]
        ledger.apply_all(records[:2])
        if driver.positioned:
            assert records[1].position is not None
            first.commit(records[1].position)
    finally:
        first.close()
    later = driver.upsert(4, "text 4", "t4")
    second = driver.open()
    try:
        again = list(second.read())
    finally:
        second.close()
    assert len(again) == 2, again
    redelivered = assert_delivers(again[0], written[2])
    assert redelivered.version == events[2].version, "a redelivered change keeps its version"
    assert_delivers(again[1], later)


# --- 3. bad records -------------------------------------------------------------------------------


def test_a_record_that_cannot_be_an_event_is_a_bad_record_and_the_next_still_comes(
    driver: SourceDriver, ledger: ContractLedger
) -> None:
    """A bad record comes out as a BadRecord with its reason and its exact payload, in its place,
    and the change written after it comes out in the same read."""
    source = driver.open()
    try:
        assert settle(source, ledger) == []
        bad = driver.write_bad(1, "bad-marker-7f3a")
        after = driver.upsert(2, "written after the bad one", "ok")
        records = settle(source, ledger)
    finally:
        source.close()
    assert len(records) == 2, records
    letter, event = records
    assert isinstance(letter, BadRecord), letter
    assert bad.reason in letter.reason
    if bad.payload is not None:
        assert letter.payload == bad.payload
    else:
        spelled = json.loads(letter.payload)
        assert isinstance(spelled, dict) and all(part in letter.payload for part in bad.holds), letter.payload
    assert_delivers(event, after)
    if driver.positioned:
        assert letter.position is not None, "a bad record must be committable, or it would block the source"


# --- 4. close -------------------------------------------------------------------------------------


def _held() -> tuple[int, int]:
    """(open file descriptors, live threads) of this process."""
    gc.collect()
    return psutil.Process().num_fds(), threading.active_count()


def test_close_releases_what_reading_took_and_is_safe_twice(driver: SourceDriver, ledger: ContractLedger) -> None:
    """After a read, close() gives back every connection, file and thread the source took (no more
    descriptors or threads than before it was opened), and a second close() is harmless."""
    driver.upsert(1, "something to read", "t")
    warm = driver.open()  # the first use of a client library may open lasting process-wide handles
    list(warm.read())
    warm.close()
    before = _held()
    source = driver.open()
    records = list(source.read())
    assert len(records) == 1 and isinstance(records[0], ChangeEvent), records
    source.close()
    source.close()
    fds, threads = _held()
    assert fds <= before[0], f"{fds - before[0]} file descriptors still open after close()"
    assert threads <= before[1], f"{threads - before[1]} threads still running after close()"


# --- 5. name --------------------------------------------------------------------------------------


def test_the_name_is_stable_across_instances_with_the_same_config(driver: SourceDriver) -> None:
    """Two sources opened with the same configuration carry the same non-empty name (the key of
    their checkpoint), without being given one."""
    a, b = driver.open(), driver.open()
    try:
        assert isinstance(a.name, str) and a.name
        assert a.name == b.name
    finally:
        a.close()
        b.close()


# --- coverage of the suite ------------------------------------------------------------------------


def _with_submodules(modules: Sequence[ModuleType]) -> Iterator[ModuleType]:
    """``modules`` and, for a package, every module inside it (a source split into modules)."""
    for module in modules:
        yield module
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{module.__name__}."):
            yield importlib.import_module(info.name)


def _source_classes(modules: Sequence[ModuleType]) -> set[type]:
    """Classes defined in ``modules`` (or a module of theirs) that have the ChangeSource methods."""
    found: set[type] = set()
    for module in _with_submodules(modules):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and all(
                callable(getattr(cls, m, None)) for m in ("read", "commit", "close")
            ):
                found.add(cls)
    return found


def test_every_source_adapter_has_a_driver() -> None:
    """Every class in adapters/sources/ that reads, commits and closes is driven by this suite."""
    folder = Path(adapters.sources.jsonl.__file__).parent
    modules = sorted([p.stem for p in folder.glob("*.py")] + [p.parent.name for p in folder.glob("*/__init__.py")])
    covered = {m.__name__.rpartition(".")[2] for m in SOURCE_MODULES}
    helpers = {"__init__", "base", "debezium", "pgoutput", "settings"}  # decoders, settings, shared helpers
    assert set(modules) - helpers == covered
    assert _source_classes(SOURCE_MODULES) == set(ADAPTERS.values())


def test_the_streaming_sources_are_found_by_type_as_following_sources() -> None:
    """``lockstep run`` follows the sources that are FollowingSources (by type, not by probing
    attributes) and polls the snapshot sources; each ``follow`` takes ``stop`` positionally."""
    following = {name for name, cls in ADAPTERS.items() if issubclass(cls, FollowingSource)}
    assert following == {"jsonl", "kafka", "pg_logical", "webhook"}
    for name in following:
        inspect.signature(ADAPTERS[name].follow).bind(object(), lambda: True)
