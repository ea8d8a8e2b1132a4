"""Debezium envelope decoding, per-table mapping, versions and truncates, without a broker.

The fixtures in ``tests/fixtures/debezium`` are Debezium's documented example events for the
Postgres and MySQL connectors (each file names its documentation section).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from adapters.sources.debezium import (
    ENVELOPE_BYTES_MAX,
    UNAVAILABLE_PLACEHOLDER,
    Change,
    DebeziumDecoder,
    KafkaSourceSettings,
    Skipped,
    TableMappingSettings,
    Template,
    Truncate,
    TruncateTracker,
    binlog_base,
)
from adapters.sources.kafka import KafkaDebeziumSource
from coordinator.errors import SourceError
from coordinator.events import ChangeEvent, Op
from coordinator.limits import RECORD_BYTES_MAX
from coordinator.model import record_bytes
from coordinator.ports import BadRecord
from lockstep.settings import load_settings
from tests.support.kafka_servers import GatedDocs, debezium_key, debezium_value

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "debezium"
CUSTOMERS = TableMappingSettings(
    doc_id="customers:{id}", text_columns=("first_name", "last_name"), metadata_columns=("email",)
)
DECODER = DebeziumDecoder({"public.customers": CUSTOMERS, "inventory.customers": CUSTOMERS})


def _fixture(name: str) -> tuple[bytes | None, bytes | None]:
    body = json.loads((FIXTURES / f"{name}.json").read_text())
    return _encode(body["key"]), _encode(body["value"])


def _decode(name: str, decoder: DebeziumDecoder = DECODER) -> Any:
    key, value = _fixture(name)
    return decoder.decode(key, value, position="p")


def _change(decoded: Any) -> ChangeEvent:
    assert isinstance(decoded, Change), decoded
    return decoded.event


# --- the documented events ------------------------------------------------------------------------


def test_documented_postgres_create_with_schema_wrapper_is_an_upsert_at_the_lsn() -> None:
    """The documented Postgres create (schema wrapper on key and value) upserts customers:1 at source.lsn."""
    event = _change(_decode("postgres_create"))
    assert event.op is Op.UPSERT and event.doc_id == "customers:1"
    assert event.version == 2 * 24023128 + 1
    assert event.text == "Anne\n\nKretchmar"
    assert dict(event.metadata) == {"email": "annek@noanswer.org"}
    assert event.position == "p"


def test_documented_postgres_update_without_schema_and_delete_from_the_key_columns() -> None:
    """The schemaless update upserts the new name; the delete (before holds only the key) deletes."""
    update = _change(_decode("postgres_update"))
    assert update.op is Op.UPSERT and update.text == "Anne Marie\n\nKretchmar"
    delete = _change(_decode("postgres_delete"))
    assert delete.op is Op.DELETE and delete.doc_id == "customers:1"
    assert delete.version == 2 * 46523128 and delete.version > update.version


def test_documented_tombstones_are_recognised_and_not_data() -> None:
    """A tombstone (key, null value) after a delete is Skipped, for both connectors."""
    assert _decode("postgres_tombstone") == Skipped("tombstone")
    assert _decode("mysql_tombstone") == Skipped("tombstone")


def test_documented_truncates_name_their_table_and_version() -> None:
    """A truncate (null key) becomes a Truncate of its table at its commit order."""
    assert _decode("postgres_truncate") == Truncate("public.customers", 2 * 46523128)
    mysql = _decode("mysql_truncate")
    assert isinstance(mysql, Truncate) and mysql.table == "inventory.customers"


def test_documented_mysql_events_are_versioned_by_binlog_coordinates() -> None:
    """MySQL create < update < delete by (file, pos, row); never by ts_ms (the create's is 0)."""
    create, update, delete = (_change(_decode(f"mysql_{op}")) for op in ("create", "update", "delete"))
    assert create.doc_id == update.doc_id == delete.doc_id == "customers:1004"
    assert create.version < update.version < delete.version
    assert update.text == "Anne Marie\n\nKretchmar" and delete.op is Op.DELETE
    assert create.version == 2 * binlog_base({"file": "mysql-bin.000003", "pos": 154, "row": 0}) + 1


def test_binlog_coordinates_order_across_files_rows_and_reject_overflow() -> None:
    """A later binlog file wins over a bigger position; coordinates beyond the encoding are refused."""
    assert binlog_base({"file": "mysql-bin.000004", "pos": 4, "row": 0}) > binlog_base(
        {"file": "mysql-bin.000003", "pos": 2**31, "row": 9}
    )
    assert binlog_base({"file": "b.000001", "pos": 10, "row": 2}) > binlog_base({"file": "b.000001", "pos": 10, "row": 1})
    value = debezium_value("c", table="public.customers", lsn=1, after={"id": 1, "first_name": "a", "last_name": "b", "email": "c"})
    value["source"] |= {"connector": "mysql", "file": "mysql-bin.999999", "pos": 4, "row": 0}
    bad = DECODER.decode(None, json.dumps(value).encode(), "p")
    assert isinstance(bad, BadRecord) and "exceed the version encoding" in bad.reason


# --- versions ----------------------------------------------------------------------------------


def _row(id_: int, first: str = "Ada") -> dict[str, Any]:
    return {"id": id_, "first_name": first, "last_name": "Lovelace", "email": f"{id_}@x.org"}


def _encode(value: dict[str, Any] | None) -> bytes | None:
    return None if value is None else json.dumps(value).encode()


def test_version_is_the_lsn_never_ts_ms() -> None:
    """Of two updates, the one with the higher LSN wins although its ts_ms is older."""
    older = debezium_value("u", table="public.customers", lsn=100, after=_row(1, "Old"), ts_ms=9_000)
    newer = debezium_value("u", table="public.customers", lsn=200, after=_row(1, "New"), ts_ms=1_000)
    a, b = (_change(DECODER.decode(None, _encode(v))) for v in (older, newer))
    assert b.version > a.version


def test_a_key_change_that_keeps_the_doc_id_ends_with_the_create() -> None:
    """A primary-key change is delete(old) + create(new) at one LSN; when both map to the same
    document, the create ranks above the delete, so the row stays."""
    mapping = TableMappingSettings(doc_id="c:{email}", text_columns=("first_name",))
    decoder = DebeziumDecoder({"public.customers": mapping})
    gone = debezium_value("d", table="public.customers", lsn=500, before=_row(1))
    born = debezium_value("c", table="public.customers", lsn=500, after=_row(2) | {"email": "1@x.org"})
    delete, create = (_change(decoder.decode(None, _encode(v))) for v in (gone, born))
    assert delete.doc_id == create.doc_id == "c:1@x.org"
    assert create.version > delete.version


def test_version_field_reads_a_configured_path_and_reports_its_absence() -> None:
    """With version_field, any connector is versioned by that payload field (number or digits)."""
    decoder = DebeziumDecoder({"public.customers": CUSTOMERS}, version_field="source.commit_seq")
    value = debezium_value("c", table="public.customers", lsn=1, after=_row(1))
    value["source"] |= {"connector": "sqlserver", "commit_seq": "12345"}
    assert _change(decoder.decode(None, _encode(value))).version == 2 * 12345 + 1
    del value["source"]["commit_seq"]
    bad = decoder.decode(None, _encode(value), "p")
    assert isinstance(bad, BadRecord) and "version field 'source.commit_seq' missing" in bad.reason


def test_unknown_connector_without_version_field_is_a_bad_record() -> None:
    """Without a known commit order the record is dead-lettered, not versioned by a clock."""
    value = debezium_value("c", table="public.customers", lsn=1, after=_row(1))
    value["source"]["connector"] = "oracle"
    bad = DECODER.decode(None, _encode(value), "p")
    assert isinstance(bad, BadRecord) and "set version_field" in bad.reason and bad.position == "p"


# --- mapping -----------------------------------------------------------------------------------


def test_text_template_metadata_and_values_that_are_not_strings() -> None:
    """A text template joins columns; numbers and JSON columns render as JSON, null as empty."""
    mapping = TableMappingSettings(
        doc_id="orders:{id}", text_template="{title} ({qty})\n{tags}{note}", metadata_columns=("qty", "tags")
    )
    decoder = DebeziumDecoder({"shop.orders": mapping})
    row = {"id": 7, "title": "Lamp", "qty": 3, "tags": ["a", "b"], "note": None}
    event = _change(decoder.decode(_encode(debezium_key({"id": 7}, with_schema=True)), _encode(debezium_value("r", table="shop.orders", lsn=9, after=row))))
    assert event.doc_id == "orders:7" and event.text == 'Lamp (3)\n["a","b"]'
    assert dict(event.metadata) == {"qty": 3, "tags": ["a", "b"]}


def test_a_delete_without_before_image_is_mapped_from_the_key() -> None:
    """REPLICA IDENTITY NOTHING: the delete has no before; the key's columns give the doc_id."""
    value = debezium_value("d", table="public.customers", lsn=77, before=None)
    event = _change(DECODER.decode(_encode(debezium_key({"id": 5}, with_schema=True)), _encode(value)))
    assert event.op is Op.DELETE and event.doc_id == "customers:5"


def test_plain_table_names_match_when_no_qualified_mapping_exists() -> None:
    """A mapping keyed by the bare table name serves every schema's table of that name."""
    decoder = DebeziumDecoder({"customers": CUSTOMERS})
    event = _change(decoder.decode(None, _encode(debezium_value("c", table="tenant7.customers", lsn=3, after=_row(3)))))
    assert event.doc_id == "customers:3"


def test_logical_decoding_messages_are_skipped() -> None:
    """op m (pg_logical_emit_message) carries no row change."""
    value = {"op": "m", "source": {"connector": "postgresql", "lsn": 5}, "message": {"prefix": "x", "content": "eA=="}}
    assert DECODER.decode(None, _encode(value)) == Skipped("logical decoding message")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "value is not valid JSON"),
        (b"\xff\xfe{}", "value is not valid UTF-8"),
        (b"[1, 2]", "value is not a JSON object"),
        (b'{"schema": {}, "payload": "x"}', "value payload is not a JSON object"),
        (b'{"ddl": "ALTER TABLE t ADD c int", "databaseName": "inventory"}', "not a Debezium change event"),
        (b"[" * 100_000 + b"]" * 100_000, "value is not valid JSON"),
        (_encode(debezium_value("x", table="public.customers", lsn=1, after=_row(1))), "unknown op 'x'"),
        (_encode(debezium_value("c", table="public.unmapped", lsn=1, after=_row(1))), "no mapping for table public.unmapped"),
        (_encode(debezium_value("c", table="public.customers", lsn=1, after=_row(1) | {"id": None})), "doc_id column 'id' is null"),
        (_encode(debezium_value("c", table="public.customers", lsn=1, after={"id": 1})), "column 'first_name' missing"),
        (_encode(debezium_value("c", table="public.customers", lsn=1, after=None)), "op 'c' without an after image"),
        (_encode(debezium_value("c", table="public.customers", lsn=-4, after=_row(1))), "source.lsn is negative"),
        (_encode(debezium_value("u", table="public.customers", lsn=4, after=_row(1, UNAVAILABLE_PLACEHOLDER))), "unchanged TOAST value"),
        (_encode(debezium_value("c", table="public.customers", lsn=4, after=_row(1) | {"id": "a:chunk-1"})), "reserved for chunk IDs"),
    ],
)
def test_bad_input_becomes_a_bad_record_with_its_reason(value: bytes | None, reason: str) -> None:
    """Whatever cannot become an event is a BadRecord carrying its reason and its position."""
    bad = DECODER.decode(None, value, "pos-1")
    assert isinstance(bad, BadRecord), bad
    assert reason in bad.reason and bad.position == "pos-1"
    assert value is not None and record_bytes(bad.payload, bad.encoding) == value and not bad.truncated


def test_an_oversize_value_is_refused_unparsed_and_its_payload_is_clipped() -> None:
    """A value beyond ENVELOPE_BYTES_MAX is a BadRecord without being parsed; the letter keeps
    the start of it (RECORD_BYTES_MAX, longer than any valid event) and says it was cut."""
    value = b"{" + b" " * ENVELOPE_BYTES_MAX + b"}"
    bad = DECODER.decode(None, value, "p")
    assert isinstance(bad, BadRecord) and "larger than" in bad.reason
    assert bad.truncated and record_bytes(bad.payload, bad.encoding) == value[:RECORD_BYTES_MAX]


# --- templates and settings --------------------------------------------------------------------


def test_template_patterns_match_exactly_what_the_template_renders() -> None:
    """A table owns the doc_ids its template can produce and nothing else."""
    template = Template.parse("orders:{id}/{line}")
    pattern = template.pattern()
    assert template.render({"id": "7", "line": "2"}) == "orders:7/2"
    assert pattern.fullmatch("orders:7/2") and pattern.fullmatch("orders:a/b/c")
    assert not pattern.fullmatch("orders:7") and not pattern.fullmatch("order:7/2") and not pattern.fullmatch("orders:/2")


@pytest.mark.parametrize(
    ("tables", "error"),
    [
        ({"a": {"doc_id": "{id}", "text_columns": ["t"]}, "b": {"doc_id": "b:{id}", "text_columns": ["t"]}}, "literal prefix"),
        ({"a": {"doc_id": "x:{id}", "text_columns": ["t"]}, "b": {"doc_id": "x:y{id}", "text_columns": ["t"]}}, "overlap"),
        ({"a": {"doc_id": "a:{id}", "text_columns": ["t"], "text_template": "{t}"}}, "exactly one of"),
        ({"a": {"doc_id": "a:{id.attr}", "text_columns": ["t"]}}, "plain column names"),
        ({"a": {"doc_id": "fixed", "text_columns": ["t"]}}, "uses no column"),
    ],
)
def test_settings_refuse_mappings_that_cannot_work(tables: dict[str, Any], error: str) -> None:
    """Overlapping doc_id prefixes, two text sources, attribute access or no column are refused."""
    with pytest.raises(ValidationError, match=error):
        KafkaSourceSettings(bootstrap_servers=("k:9092",), topics=("t",), tables=tables)


def test_settings_load_from_yaml_with_the_sasl_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """source.kind kafka loads from YAML; the SASL password comes from the environment and stays secret."""
    config = tmp_path / "lockstep.yaml"
    config.write_text(
        "source:\n  kind: kafka\n  bootstrap_servers: [broker:9093]\n  topics: [pg.public.customers]\n"
        "  security_protocol: SASL_SSL\n  sasl_mechanism: SCRAM-SHA-512\n  sasl_username: lockstep\n"
        "  tables:\n    public.customers: {doc_id: 'customers:{id}', text_columns: [first_name, last_name]}\n"
    )
    monkeypatch.setenv("LOCKSTEP_SOURCE__SASL_PASSWORD", "pa55-never-printed")
    loaded = load_settings(config).source
    assert isinstance(loaded, KafkaSourceSettings)
    assert loaded.sasl_password is not None and loaded.sasl_password.get_secret_value() == "pa55-never-printed"
    assert "pa55-never-printed" not in repr(loaded) and "pa55-never-printed" not in str(loaded.model_dump())
    with pytest.raises(ValidationError, match="needs sasl_username and sasl_password"):
        KafkaSourceSettings(
            bootstrap_servers=("k:9092",), topics=("t",), tables={"t": CUSTOMERS}, security_protocol="SASL_PLAINTEXT"
        )
    with pytest.raises(ValidationError, match="must not carry credentials"):
        KafkaSourceSettings(bootstrap_servers=("u:p@k:9092",), topics=("t",), tables={"t": CUSTOMERS})


# --- truncates ---------------------------------------------------------------------------------


def _tracker(docs: GatedDocs) -> TruncateTracker:
    orders = TableMappingSettings(doc_id="orders:{id}", text_columns=("t",))
    notes = TableMappingSettings(doc_id="notes:{id}", text_columns=("t",))
    decoder = DebeziumDecoder({"public.orders": orders, "public.notes": notes})
    return TruncateTracker("kafka", decoder.tables, docs, docs)


def _up(doc_id: str, version: int) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, doc_id, version, "text")


def test_a_truncate_deletes_committed_and_in_flight_documents_of_its_table_only() -> None:
    """Committed documents below the truncate, and those read but not committed, are deleted;
    other tables and rows re-created after the truncate are not."""
    docs = GatedDocs()
    for event in (_up("orders:1", 10), _up("orders:2", 30), _up("notes:1", 10), _up("orders:9", 90)):
        docs.apply(event)
    tracker = _tracker(docs)
    tracker.observe(Change("public.orders", _up("orders:3", 20)), seq=5)
    tracker.observe(Change("public.notes", _up("notes:2", 20)), seq=6)
    deletes = tracker.truncate(Truncate("public.orders", 50), position="p")
    assert [(e.op, e.doc_id, e.version, e.position) for e in deletes] == [
        (Op.DELETE, "orders:1", 50, "p"), (Op.DELETE, "orders:2", 50, "p"), (Op.DELETE, "orders:3", 50, "p")
    ]
    tracker.settle(committed_seq=6)
    assert tracker.inflight_docs == 0


def test_rows_older_than_a_truncate_arriving_later_become_deletes_even_after_a_restart() -> None:
    """The truncate's floor is persisted: an older row read later (another partition, a redelivery
    after a restart) is a delete; a newer row is an upsert."""
    docs = GatedDocs()
    _tracker(docs).truncate(Truncate("public.orders", 50), position=None)
    restarted = _tracker(docs)
    late = restarted.gate(Change("public.orders", _up("orders:4", 41)))
    assert (late.op, late.doc_id, late.version) == (Op.DELETE, "orders:4", 41)
    assert restarted.gate(Change("public.orders", _up("orders:4", 51))).op is Op.UPSERT
    assert restarted.gate(Change("public.notes", _up("notes:4", 41))).op is Op.UPSERT


# --- any delivery order converges ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), changes=st.integers(1, 60))
def test_any_delivery_order_with_duplicates_ends_at_each_rows_newest_state(seed: int, changes: int) -> None:
    """Row changes of a few keys, shuffled and duplicated, decode and apply behind the version
    gate to exactly the newest state of every row (tombstones never count as data)."""
    rng = random.Random(seed)
    records: list[tuple[bytes | None, bytes | None]] = []
    newest: dict[str, str | None] = {}
    for lsn in range(1, changes + 1):
        row_id = rng.randrange(4)
        key = _encode(debezium_key({"id": row_id}, with_schema=rng.random() < 0.5))
        if rng.random() < 0.3:
            records += [(key, _encode(debezium_value("d", table="public.customers", lsn=lsn, before={"id": row_id}))), (key, None)]
            newest[f"customers:{row_id}"] = None
        else:
            row = _row(row_id, f"v{lsn}")
            records.append((key, _encode(debezium_value("u", table="public.customers", lsn=lsn, after=row, with_schema=rng.random() < 0.5))))
            newest[f"customers:{row_id}"] = f"v{lsn}\n\nLovelace"
    deliveries = records + rng.choices(records, k=len(records) // 2)
    rng.shuffle(deliveries)
    docs = GatedDocs()
    for key, value in deliveries:
        decoded = DECODER.decode(key, value)
        if not isinstance(decoded, Skipped):
            docs.apply(_change(decoded))
    assert docs.live() == {d: t for d, t in newest.items() if t is not None}


def test_commit_refuses_positions_that_are_malformed_or_never_handed_out() -> None:
    """commit() accepts only positions this source handed out; it connects to nothing to say so."""
    settings = KafkaSourceSettings(bootstrap_servers=("127.0.0.1:1",), topics=("t",), tables={"public.customers": CUSTOMERS})
    docs = GatedDocs()
    source = KafkaDebeziumSource(settings, docs, docs)
    for position in ("12", "{}", '{"seq": -1}', '{"seq": true}', "not json"):
        with pytest.raises(SourceError, match="not a Kafka source position"):
            source.commit(position)
    with pytest.raises(SourceError, match="never handed out"):
        source.commit('{"seq": 0, "topic": "t", "partition": 0, "offset": 0}')
    source.close()
