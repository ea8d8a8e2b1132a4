"""Pure logic of first contact: the restore of a refused intent, conflicts in the planner, the
input limits, strict JSON and redaction."""

from __future__ import annotations

import json

import pytest

from coordinator.chunking import CHUNK_SEPARATOR, ChunkingSettings, chunk_text, content_hash
from coordinator.errors import InvalidEvent
from coordinator.events import ChangeEvent, Op, event_from_dict, loads_event_json, metadata_rejection
from coordinator.limits import CHUNK_ID_BYTES_MAX, CHUNK_SEPARATOR_BYTES, DOC_ID_BYTES_MAX, TEXT_BYTES_MAX
from coordinator.model import ChunkDelete, PayloadEncoding, StoredChunk, record_bytes, spell_record
from coordinator.planner import PlanKind, metadata_hash, plan
from coordinator.redact import REDACTED, Redactor, has_userinfo
from coordinator.restore import committed_copies, event_of, plan_restore

CHUNKING = ChunkingSettings(max_chars=20)


def _committed(doc_id: str, version: int, text: str, **meta: object) -> tuple[ChangeEvent, object]:
    event = ChangeEvent(Op.UPSERT, doc_id, version, text, meta)
    after = plan(event, None, CHUNKING).after
    return event, after


def _copies(event: ChangeEvent, settings: ChunkingSettings = CHUNKING) -> dict[str, StoredChunk]:
    assert event.text is not None
    return {
        f"{event.doc_id}{CHUNK_SEPARATOR}{i}": StoredChunk(
            f"{event.doc_id}{CHUNK_SEPARATOR}{i}", event.doc_id, i, content_hash(t), event.version, t, dict(event.metadata)
        )
        for i, t in enumerate(chunk_text(event.text, settings))
    }


def test_a_refused_edit_is_restored_to_the_committed_chunks_at_the_refused_version() -> None:
    """Chunks the refused edit rewrote are written back from copies of the committed text, at
    the refused version with overwrite_equal; chunks it added are deleted; the ledger state
    keeps the committed content at the refused version, with the refused event's hash."""
    old, state = _committed("d", 1, "first paragraph.\n\nsecond one here.", acl="a")
    new = ChangeEvent(Op.UPSERT, "d", 4, "first paragraph.\n\nchanged text now.\n\nand a third part.", {"acl": "a"})
    refused = plan(new, state, CHUNKING).to_intent()  # type: ignore[arg-type]
    restore, missing = plan_restore(refused, state, committed_copies(state, [_copies(old)]))  # type: ignore[arg-type]
    assert missing == [] and restore.restores and restore.version == 4
    assert [(c.chunk_id, c.text, c.version, c.overwrite_equal) for c in restore.upserts] == [
        ("d:chunk-1", "second one here.", 4, True)
    ]
    assert restore.deletes == (ChunkDelete("d:chunk-2", 4, overwrite_equal=True),)
    assert restore.after.version == 4 and restore.after.source_hash == refused.after.source_hash
    assert [c.content_hash for c in restore.after.chunks] == [c.content_hash for c in state.chunks]  # type: ignore[union-attr]


def test_a_refused_new_document_is_cleared_and_recorded_as_absent_at_its_version() -> None:
    """A document with no committed state is deleted from both sides at the refused version,
    and the ledger records it as deleted there, so older events stay stale."""
    event = ChangeEvent(Op.UPSERT, "n", 7, "a brand new document text", {})
    refused = plan(event, None, CHUNKING).to_intent()
    restore, missing = plan_restore(refused, None, {})
    assert missing == [] and restore.upserts == ()
    assert {d.chunk_id for d in restore.deletes} == {c.chunk_id for c in refused.upserts}
    assert restore.after.deleted and restore.after.version == 7


def test_copies_must_match_the_committed_text_and_metadata_and_missing_ones_are_named() -> None:
    """An index copy whose text or metadata is the refused version's is not a copy of the
    committed chunk; a chunk with no copy anywhere is reported, not invented."""
    old, state = _committed("m", 1, "same text", acl="a")
    changed = ChangeEvent(Op.UPSERT, "m", 2, "same text", {"acl": "b"})
    refused = plan(changed, state, CHUNKING).to_intent()  # type: ignore[arg-type]
    assert committed_copies(state, [_copies(changed)]) == {}  # type: ignore[arg-type]
    restore, missing = plan_restore(refused, state, {})  # type: ignore[arg-type]
    assert missing == ["m:chunk-0"] and restore.upserts == ()
    good = committed_copies(state, [_copies(changed), _copies(old)])  # type: ignore[arg-type]
    assert [c.metadata for c in good.values()] == [{"acl": "a"}]


def test_the_event_of_an_intent_is_rebuilt_only_when_the_intent_holds_all_of_it() -> None:
    """A delete, or an upsert writing every chunk of a text cut without overlap, gives its event
    back exactly; a partial upsert gives nothing."""
    event = ChangeEvent(Op.UPSERT, "e", 3, "one sentence here.\n\nanother one there.", {"k": [1]})
    assert event_of(plan(event, None, CHUNKING).to_intent(), CHUNKING) == event
    delete = ChangeEvent(Op.DELETE, "e", 4)
    assert event_of(plan(delete, None, CHUNKING).to_intent(), CHUNKING) == delete
    _, state = _committed("e", 1, "one sentence here.\n\nold second part.", k=[1])
    partial = plan(ChangeEvent(Op.UPSERT, "e", 2, event.text, {"k": [1]}), state, CHUNKING).to_intent()  # type: ignore[arg-type]
    assert event_of(partial, CHUNKING) is None


def test_one_version_one_content_in_the_planner() -> None:
    """At the ledger's version, the same content is a duplicate (stale), other text, other
    metadata or a delete at an upsert's version are conflicts; below it, anything is stale."""
    _, state = _committed("c", 5, "the text", acl="a")
    same = ChangeEvent(Op.UPSERT, "c", 5, "the text", {"acl": "a"})
    assert plan(same, state, CHUNKING).kind is PlanKind.STALE  # type: ignore[arg-type]
    for other in (
        ChangeEvent(Op.UPSERT, "c", 5, "other text", {"acl": "a"}),
        ChangeEvent(Op.UPSERT, "c", 5, "the text", {"acl": "b"}),
        ChangeEvent(Op.DELETE, "c", 5),
    ):
        assert plan(other, state, CHUNKING).kind is PlanKind.CONFLICT, other  # type: ignore[arg-type]
    assert plan(ChangeEvent(Op.UPSERT, "c", 4, "older", {}), state, CHUNKING).kind is PlanKind.STALE  # type: ignore[arg-type]
    tomb = plan(ChangeEvent(Op.DELETE, "c", 6), state, CHUNKING).after  # type: ignore[arg-type]
    assert plan(ChangeEvent(Op.DELETE, "c", 6), tomb, CHUNKING).kind is PlanKind.STALE


def test_the_doc_id_limit_leaves_room_for_every_chunk_id() -> None:
    """The separator's length is restated in limits.py; the longest doc_id with the largest
    chunk index of the largest text still fits the keyword index's _id."""
    assert len(CHUNK_SEPARATOR.encode()) == CHUNK_SEPARATOR_BYTES
    largest_index = str(TEXT_BYTES_MAX - 1)
    assert len(("d" * DOC_ID_BYTES_MAX + CHUNK_SEPARATOR + largest_index).encode()) <= CHUNK_ID_BYTES_MAX
    with pytest.raises(InvalidEvent, match="longer than 498 bytes"):
        ChangeEvent(Op.DELETE, "\u00e9" * 250, 1)


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ({"a": 2**63}, "metadata.a is the integer"),
        ({"a": [{"b": -(2**63) - 1}]}, "metadata.a[0].b is the integer"),
        ({"f": float("nan")}, "metadata.f is nan"),
        ({1: "x"}, "non-string key 1"),
        ({"s": {1, 2}}, "metadata.s is a set"),
        ([1], "metadata must be an object, got an array"),
        ({"k": "\ud800"}, "lone surrogate"),
    ],
)
def test_metadata_rejections_name_the_path_and_the_rule(metadata: object, reason: str) -> None:
    """Each refusal of metadata says where in it and which rule."""
    assert reason in metadata_rejection(metadata)


def test_metadata_at_the_limits_is_accepted() -> None:
    """int64 extremes, 32 levels of nesting and mixed JSON types pass."""
    nested: dict[str, object] = {"leaf": True}
    for _ in range(31):
        nested = {"n": nested}
    assert metadata_rejection({"max": 2**63 - 1, "min": -(2**63), "deep": nested["n"], "l": [None, 0.5]}) == ""


def test_duplicate_keys_are_found_at_any_depth_and_refused() -> None:
    """json.loads keeps the last of two equal keys silently; lockstep's loader remembers them."""
    with pytest.raises(InvalidEvent, match="key 'op' more than once"):
        event_from_dict(loads_event_json('{"op":"upsert","op":"delete","doc_id":"d","version":1}'))
    raw = loads_event_json('{"op":"upsert","doc_id":"d","version":1,"text":"t","metadata":{"x":{"y":1,"y":2}}}')
    with pytest.raises(InvalidEvent, match=r"metadata\.x names the key 'y' more than once"):
        event_from_dict(raw)
    assert json.loads('{"a":1,"a":2}') == loads_event_json('{"a":1,"a":2}')


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [(b"plain text \xe2\x82\xac", PayloadEncoding.TEXT), (b"bad \xff", PayloadEncoding.BASE64),
     (b"nul \x00 inside", PayloadEncoding.BASE64), ("lone \ud800", PayloadEncoding.BASE64)],
)
def test_records_are_spelled_exactly_and_read_back_byte_for_byte(raw: bytes | str, encoding: PayloadEncoding) -> None:
    """Clean UTF-8 stays text; anything else is base64 of its exact bytes; nothing is lossy."""
    payload, spelled, truncated = spell_record(raw, 1000)
    expected = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    assert spelled is encoding and not truncated and record_bytes(payload, spelled) == expected
    cut, _, truncated = spell_record(b"x" * 20, 8)
    assert truncated and cut == "x" * 8


def test_redaction_removes_registered_secrets_and_credential_shapes() -> None:
    """Configured secrets, Authorization values, bearer and basic tokens, api keys and URL
    credentials are removed; ordinary words about tokens are kept."""
    redact = Redactor()
    redact.register(["s3cret-value", None, "ab"])
    text = (
        'HTTP 401 {"headers":{"Authorization":"Bearer abc.def.ghi"}} s3cret-value '
        "http://user:pw@host/v1 api_key=zzz9 Basic dXNlcjpwYXNz ab sk-abcdefghijklmnopqrstu"
    )
    out = redact(text)
    for leaked in ("abc.def.ghi", "s3cret-value", "user:pw", "zzz9", "dXNlcjpwYXNz", "sk-abcdefghijklmnopqrstu"):
        assert leaked not in out, leaked
    assert out.count(REDACTED) == 6 and " ab " in out
    assert redact("the token was refused; rotate your password") == "the token was refused; rotate your password"
    assert has_userinfo("https://u:p@h") and has_userinfo("http://token@h") and not has_userinfo("http://h:9/x")
    assert metadata_hash({"a": 1}) == metadata_hash({"a": 1})
