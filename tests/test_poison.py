"""First contact, items 2-4 as they were seen: one value that jammed sync for good, dead letters
that left ghosts, and a dead-letter queue that lost what it is for. Each test replays what was
reported, on the embedded default, through the `lockstep` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from adapters.ledger.sqlite import SqliteLedger
from lockstep.settings import load_settings
from tests.support.raw_stores import documents, read_keyword, read_vector

LOCKSTEP = [sys.executable, "-m", "lockstep"]
CLI_TIMEOUT_S = 300
BIG_INT_LINE = b'{"op":"upsert","doc_id":"x","version":1,"text":"t","metadata":{"big":1180591620717411303424}}'


def _config(tmp_path: Path) -> Path:
    config = {
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl"), "name": "events"},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "embedder": {"kind": "hashing"},
    }
    path = tmp_path / "lockstep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lockstep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOCKSTEP, *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL, env={**os.environ},
    )  # fmt: skip


def _line(doc_id: str, version: int = 1, text: str = "a good document", **extra: Any) -> bytes:
    return json.dumps({"op": "upsert", "doc_id": doc_id, "version": version, "text": text, **extra}).encode()


def _write(tmp_path: Path, *lines: bytes) -> None:
    with (tmp_path / "events.jsonl").open("ab") as out:
        out.writelines(line + b"\n" for line in lines)


def _ledger(tmp_path: Path) -> SqliteLedger:
    return SqliteLedger(tmp_path / "ledger.db")


def _live_in_both(config: Path) -> tuple[set[str], set[str]]:
    settings = load_settings(config)
    return set(documents(read_keyword(settings))), set(documents(read_vector(settings)))


def test_one_integer_beyond_int64_no_longer_jams_sync(tmp_path: Path) -> None:
    """good-1, a metadata integer of 2^70, good-2: sync exits 1 (not 2, on every run), the bad
    event is a dead letter with its reason, both good documents are live in both indexes,
    nothing is pending, and reconcile runs (it failed with IntentConflict)."""
    config = _config(tmp_path)
    _write(tmp_path, _line("good-1"), BIG_INT_LINE, _line("good-2"))
    synced = _lockstep("sync", "-c", str(config))
    assert synced.returncode == 1, synced.stderr[-2000:]
    ledger = _ledger(tmp_path)
    [(_, letter)] = ledger.dead_letters(limit=10)
    counts = ledger.counts()
    ledger.close()
    assert "outside the 64-bit range" in letter.reason and letter.record_bytes() == BIG_INT_LINE
    assert counts["pending_intents"] == 0 and counts["live_docs"] == 2
    assert _live_in_both(config) == ({"good-1", "good-2"}, {"good-1", "good-2"})
    assert _lockstep("sync", "-c", str(config)).returncode == 0, "the next run has nothing left to do"
    reconciled = _lockstep("reconcile", "-c", str(config))
    assert reconciled.returncode == 0, reconciled.stderr[-2000:]


def test_a_dead_lettered_id_leaves_no_ghost_in_either_index(tmp_path: Path) -> None:
    """An upsert with doc_id "a\\u0000b" (Milvus refuses it) and one whose chunk IDs exceed the
    512-byte _id go to the DLQ before anything is written: neither index holds a chunk of
    them, and the audit is clean without a reconcile."""
    config = _config(tmp_path)
    _write(tmp_path, _line("a\u0000b"), _line("n" * 512), _line("fine"))
    assert _lockstep("sync", "-c", str(config)).returncode == 1
    ledger = _ledger(tmp_path)
    reasons = sorted(letter.reason for _, letter in ledger.dead_letters(limit=10))
    ledger.close()
    assert len(reasons) == 2 and "control character U+0000" in reasons[0] and "longer than 498 bytes" in reasons[1]
    assert _live_in_both(config) == ({"fine"}, {"fine"})
    audit = _lockstep("audit", "-c", str(config))
    assert audit.returncode == 0, audit.stdout[-2000:]


def test_the_dlq_keeps_whole_records_positions_and_every_reason(tmp_path: Path) -> None:
    """A 10 KB bad line is kept whole (it was cut at 4,096 characters), with its position; a
    replay keeps the first reason and adds its own; a line of invalid UTF-8 stays a dead letter
    on `replay --all` (it went live lossily decoded); `dlq drop 999` exits 1."""
    config = _config(tmp_path)
    long_bad = _line("long", version="1", text="x" * 10_000)  # type: ignore[arg-type]
    invalid = b'{"op":"upsert","doc_id":"bytes","version":1,"text":"bad \xff\xfe bytes"}'
    _write(tmp_path, _line("ok"), long_bad, invalid)
    assert _lockstep("sync", "-c", str(config)).returncode == 1
    listed = json.loads(_lockstep("dlq", "list", "-c", str(config), "--json").stdout)
    ends = {len(_line("ok")) + 1 + len(long_bad) + 1, len(_line("ok")) + len(long_bad) + len(invalid) + 3}
    assert {int(entry["position"]) for entry in listed} == ends
    shown = json.loads(_lockstep("dlq", "show", "-c", str(config), str(listed[0]["id"])).stdout)
    assert shown["payload"].encode() == long_bad and shown["reason"] == "version must be an integer, got str"

    replay = _lockstep("dlq", "replay", "-c", str(config), "--all")
    assert replay.returncode == 1 and json.loads(replay.stdout)["still_invalid"] == 2, replay.stdout
    ledger = _ledger(tmp_path)
    letters = {letter.doc_id: letter for _, letter in ledger.dead_letters(limit=10)}
    ledger.close()
    assert letters["long"].reason == "version must be an integer, got str"
    assert [a.reason for a in letters["long"].history] == ["replay: version must be an integer, got str"]
    assert letters[None].record_bytes() == invalid and letters[None].attempts == 2
    assert _live_in_both(config) == ({"ok"}, {"ok"}), "an undecodable line went live"
    dropped = _lockstep("dlq", "drop", "-c", str(config), "999")
    assert dropped.returncode == 1 and "no dead letter 999" in dropped.stderr
