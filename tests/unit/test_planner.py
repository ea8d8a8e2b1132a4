"""The planner: upsert / delete / skip / metadata-only / stale decisions."""

from __future__ import annotations

from coordinator.chunking import ChunkingSettings
from coordinator.events import ChangeEvent, Op
from coordinator.model import DocState
from coordinator.planner import Plan, PlanKind, plan

SMALL = ChunkingSettings(max_chars=12)
TEXT = "alpha one\n\nbeta two\n\ngamma three"  # three chunks at max_chars=12


def _up(version: int, text: str = TEXT, **metadata: object) -> ChangeEvent:
    return ChangeEvent(Op.UPSERT, "doc", version, text, metadata)


def _delete(version: int) -> ChangeEvent:
    return ChangeEvent(Op.DELETE, "doc", version)


def _committed(p: Plan) -> DocState:
    assert p.after is not None
    return p.after


def test_new_document_embeds_every_chunk() -> None:
    """A document the ledger has never seen is embedded and written chunk by chunk."""
    p = plan(_up(1), None, SMALL)
    assert p.kind is PlanKind.APPLY
    assert [c.chunk_id for c in p.embed] == ["doc:chunk-0", "doc:chunk-1", "doc:chunk-2"]
    assert not p.rewrite and not p.deletes and not p.skips


def test_unchanged_chunks_are_skipped() -> None:
    """Editing one paragraph re-embeds only that chunk; the others are skipped."""
    state = _committed(plan(_up(1), None, SMALL))
    p = plan(_up(2, TEXT.replace("beta", "BETA")), state, SMALL)
    assert [c.chunk_id for c in p.embed] == ["doc:chunk-1"]
    assert p.skips == ("doc:chunk-0", "doc:chunk-2")
    after = _committed(p)
    assert [c.version for c in after.chunks] == [1, 2, 1]


def test_shrinking_deletes_leftover_chunks() -> None:
    """When the chunk count shrinks, the chunk IDs beyond it are deleted at the new version."""
    state = _committed(plan(_up(1), None, SMALL))
    p = plan(_up(2, "alpha one\n\n"), state, SMALL)
    assert [(d.chunk_id, d.version) for d in p.deletes] == [("doc:chunk-1", 2), ("doc:chunk-2", 2)]
    assert p.skips == ("doc:chunk-0",)


def test_metadata_only_change_rewrites_without_embedding() -> None:
    """A metadata change rewrites every chunk with the new metadata and embeds nothing."""
    state = _committed(plan(_up(1, lang="en"), None, SMALL))
    p = plan(_up(2, lang="fr"), state, SMALL)
    assert not p.embed
    assert len(p.rewrite) == 3 and all(c.metadata == {"lang": "fr"} for c in p.rewrite)


def test_delete_removes_every_chunk_and_leaves_a_tombstone() -> None:
    """A delete plans every live chunk's removal and a tombstone at its version."""
    state = _committed(plan(_up(1), None, SMALL))
    p = plan(_delete(5), state, SMALL)
    assert len(p.deletes) == 3 and all(d.version == 5 for d in p.deletes)
    assert _committed(p).deleted and _committed(p).version == 5


def test_stale_and_duplicate_events_change_nothing() -> None:
    """An event at or below the committed version is stale, duplicates included."""
    state = _committed(plan(_up(3), None, SMALL))
    assert plan(_up(3), state, SMALL).kind is PlanKind.STALE
    assert plan(_up(2, "other"), state, SMALL).kind is PlanKind.STALE


def test_late_older_upsert_after_delete_is_stale() -> None:
    """The ledger's tombstone rejects an older upsert however late it comes."""
    tomb = _committed(plan(_delete(9), _committed(plan(_up(1), None, SMALL)), SMALL))
    assert plan(_up(8), tomb, SMALL).kind is PlanKind.STALE


def test_delete_before_create_keeps_the_tombstone_gate() -> None:
    """A delete for an unknown document records a tombstone that blocks its older create."""
    tomb = _committed(plan(_delete(4), None, SMALL))
    assert plan(_up(3), tomb, SMALL).kind is PlanKind.STALE
    assert plan(_up(5), tomb, SMALL).kind is PlanKind.APPLY


def test_recreate_after_delete_embeds_again_from_scratch() -> None:
    """A newer upsert after a delete writes every chunk again (the cache avoids model calls)."""
    tomb = _committed(plan(_delete(2), _committed(plan(_up(1), None, SMALL)), SMALL))
    p = plan(_up(3), tomb, SMALL)
    assert len(p.embed) == 3 and not p.deletes
