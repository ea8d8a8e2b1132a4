"""Hypothesis stateful test: random document histories through `sync` against a plain-dict model.

After every step both real indexes (Tantivy + a milvus-lite file by default; OpenSearch + the
real Milvus server in the second parametrization) must hold exactly the model's live chunks with
the right text and hash, nothing of a deleted document, and the model must have been called
exactly once per distinct chunk text that was never embedded before.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from adapters.keyword.settings import KeywordSettings
from adapters.vector.settings import VectorSettings
from coordinator.chunking import ChunkingSettings, chunk_id, chunk_text, content_hash
from coordinator.events import ChangeEvent, Op, event_to_dict
from coordinator.sync import run_sync
from lockstep.bootstrap import build_source
from lockstep.runtime import Runtime, runtime
from lockstep.settings import (
    ChunkingConfig,
    EmbedderSettings,
    JsonlSourceSettings,
    LedgerSettings,
    Settings,
)

CHUNKING = ChunkingConfig(max_chars=60)
DOC_IDS = [f"kb/{name}" for name in ("alpha", "beta", "gamma", "delta", "epsilon")]
WORDS = ["refund", "invoice", "password", "parcel", "token", "audit", "label", "courier", "VAT"]

paragraph = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)
paragraphs = st.lists(paragraph, min_size=1, max_size=5)
metadata = st.fixed_dictionaries({"lang": st.sampled_from(["en", "fr"]), "tier": st.integers(0, 2)})


class SyncMachine(RuleBasedStateMachine):
    """Rules append events to a JSONL file and run `sync`; invariants compare stores with a dict."""

    stores: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="lockstep-stateful-"))
        self.live: dict[str, tuple[int, str, dict[str, Any]]] = {}
        self.deleted: dict[str, int] = {}
        self.history: list[ChangeEvent] = []
        self.embedded_hashes: set[str] = set()
        self.rt: Runtime | None = None
        self._ctx: Any = None

    @initialize()
    def start(self) -> None:
        self.settings = _settings(self.dir, self.stores)
        self._ctx = runtime(self.settings)
        self.rt = self._ctx.__enter__()

    def teardown(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------

    def _version(self, doc_id: str) -> int:
        known = self.live.get(doc_id, (self.deleted.get(doc_id, 0),))[0]
        return max(known, self.deleted.get(doc_id, 0)) + 1

    def _sync(self, *events: ChangeEvent) -> dict[str, int]:
        assert self.rt is not None
        path = Path(self.settings.source.path)  # type: ignore[union-attr]
        with path.open("a", encoding="utf-8") as out:
            out.writelines(json.dumps(event_to_dict(e)) + "\n" for e in events)
        before = self.rt.engine.stats.as_dict()
        run_sync(build_source(self.settings, self.rt.ledger), self.rt.engine, batch_events=50)
        self.history.extend(events)
        return {k: v - before[k] for k, v in self.rt.engine.stats.as_dict().items()}

    def _upsert(self, doc_id: str, text: str, meta: dict[str, Any]) -> None:
        version = self._version(doc_id)
        self._sync(ChangeEvent(Op.UPSERT, doc_id, version, text, meta))
        self.live[doc_id] = (version, text, meta)
        self.deleted.pop(doc_id, None)
        self.embedded_hashes |= {content_hash(t) for t in chunk_text(text, CHUNKING.to_domain())}

    # --- rules -------------------------------------------------------------------------------

    @rule(doc_id=st.sampled_from(DOC_IDS), paras=paragraphs, meta=metadata)
    def upsert(self, doc_id: str, paras: list[str], meta: dict[str, Any]) -> None:
        self._upsert(doc_id, "\n\n".join(paras), meta)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), new=paragraph)
    def edit_one_paragraph(self, data: st.DataObject, new: str) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.live)))
        _, text, meta = self.live[doc_id]
        paras = text.split("\n\n")
        paras[data.draw(st.integers(0, len(paras) - 1))] = new
        self._upsert(doc_id, "\n\n".join(paras), meta)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.live)))
        _, text, meta = self.live[doc_id]
        self._upsert(doc_id, text.split("\n\n")[0], meta)

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), meta=metadata)
    def change_metadata_only(self, data: st.DataObject, meta: dict[str, Any]) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.live)))
        calls_before = self.rt.engine.stats.embed_calls if self.rt else 0
        self._upsert(doc_id, self.live[doc_id][1], meta)
        assert self.rt is not None and self.rt.engine.stats.embed_calls == calls_before, (
            "metadata-only embedded"
        )

    @rule(doc_id=st.sampled_from(DOC_IDS))
    def delete(self, doc_id: str) -> None:
        version = self._version(doc_id)
        self._sync(ChangeEvent(Op.DELETE, doc_id, version))
        self.live.pop(doc_id, None)
        self.deleted[doc_id] = version

    @precondition(lambda self: bool(self.history))
    @rule(data=st.data())
    def replay_old_event(self, data: st.DataObject) -> None:
        """A duplicate or an older event (a consumer restart, a late delivery) changes nothing."""
        event = data.draw(st.sampled_from(self.history))
        delta = self._sync(event)
        assert delta["stale_events"] == 1 and delta["applied_events"] == 0

    @precondition(lambda self: bool(self.deleted))
    @rule(data=st.data(), paras=paragraphs)
    def late_older_upsert_after_delete(self, data: st.DataObject, paras: list[str]) -> None:
        doc_id = data.draw(st.sampled_from(sorted(self.deleted)))
        older = data.draw(st.integers(0, self.deleted[doc_id]))
        delta = self._sync(ChangeEvent(Op.UPSERT, doc_id, older, "\n\n".join(paras), {}))
        if older < self.deleted[doc_id]:
            assert delta["stale_events"] == 1, "a late older upsert after a delete must be stale"
        else:
            # The delete's very version with a text: the source reused a version (dead-lettered).
            assert delta["conflict_events"] == 1 and delta["dead_letters"] == 1
            self.history.pop()  # refused, never applied: not an event a replay may repeat
        assert delta["applied_events"] == 0

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def both_indexes_equal_the_model(self) -> None:
        if self.rt is None:
            return
        expected = {
            chunk_id(doc_id, i): text
            for doc_id, (_, body, _) in self.live.items()
            for i, text in enumerate(chunk_text(body, CHUNKING.to_domain()))
        }
        for side, index in (("keyword", self.rt.keyword), ("vector", self.rt.vector)):
            held = {c.chunk_id: c for c in index.scan(with_text=True)}
            assert held.keys() == expected.keys(), f"{side}: chunk ids differ from the model"
            for cid, chunk in held.items():
                assert chunk.text == expected[cid], f"{side}: {cid} has stale text"
                assert chunk.content_hash == content_hash(expected[cid]), f"{side}: {cid} has a stale hash"
                assert chunk.doc_id not in self.deleted, f"{side}: {cid} belongs to a deleted document"

    @invariant()
    def embed_calls_are_exactly_the_new_texts(self) -> None:
        if self.rt is not None:
            assert self.rt.engine.stats.embed_calls == len(self.embedded_hashes)


def _settings(data_dir: Path, stores: dict[str, Any]) -> Settings:
    suffix = uuid.uuid4().hex[:8]
    keyword = stores.get("keyword") or KeywordSettings(kind="tantivy", path=str(data_dir / "tantivy"))
    if keyword.kind != "tantivy":
        keyword = keyword.model_copy(update={"index": f"stateful-{suffix}"})
    vector_uri = stores.get("vector_uri") or str(data_dir / "milvus.db")
    return Settings(
        source=JsonlSourceSettings(path=str(data_dir / "events.jsonl"), name="stateful"),
        keyword=keyword,
        vector=VectorSettings(uri=vector_uri, collection=f"stateful_{suffix}"),
        ledger=LedgerSettings(path=str(data_dir / "ledger.db")),
        embedder=EmbedderSettings(kind="hashing"),
        chunking=CHUNKING,
    )


def test_sync_agrees_with_a_dict_model_on_embedded_stores() -> None:
    """Random histories through sync leave Tantivy and a milvus-lite file equal to the model."""
    _run({}, max_examples=12, steps=12)


def test_sync_agrees_with_a_dict_model_on_real_servers(opensearch_api_url: str, real_milvus: Any) -> None:
    """Random histories through sync leave OpenSearch and the real Milvus server equal to the model."""
    stores = {
        "keyword": KeywordSettings(kind="opensearch", url=opensearch_api_url),
        "vector_uri": real_milvus.uri,
    }
    _run(stores, max_examples=4, steps=10)


def _run(stores: dict[str, Any], *, max_examples: int, steps: int) -> None:
    machine = type("Machine", (SyncMachine,), {"stores": stores})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )


@pytest.fixture(autouse=True)
def _chunking_is_small() -> None:
    assert ChunkingSettings(60) == CHUNKING.to_domain(), "the model and the config must chunk alike"
