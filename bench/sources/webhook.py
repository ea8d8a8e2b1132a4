"""The webhook source: the events as request bodies, POSTed to the running service or stored
straight through its intake (to read them alone)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from adapters.sources.webhook import WebhookSource
from bench.sources.scrape import Scrape
from coordinator.ports import ChangeSource
from lockstep.corpus import Doc
from lockstep.ops_http import post_events


def event_dict(doc: Doc) -> dict[str, Any]:
    """The upsert creating ``doc`` in the JSONL event schema (the webhook's body schema too)."""
    return {
        "op": "upsert",
        "doc_id": doc.doc_id,
        "version": doc.version,
        "text": doc.text,
        "metadata": doc.metadata,
    }


def inbox_filler(docs: Sequence[Doc], batch_events: int) -> Callable[[ChangeSource], None]:
    """Stores the events through the webhook's intake in requests of ``batch_events`` (the
    bodies are serialized here, before the intake is timed)."""
    bodies = [
        "".join(json.dumps(event_dict(d)) + "\n" for d in docs[i : i + batch_events]).encode()
        for i in range(0, len(docs), batch_events)
    ]

    def fill(source: ChangeSource) -> None:
        assert isinstance(source, WebhookSource), source
        intake = source.intake()
        stored = sum(intake.accept(body, "application/x-ndjson").accepted for body in bodies)
        assert stored == len(docs), f"the inbox stored {stored} of {len(docs)} events"

    return fill


class Poster(threading.Thread):
    """POSTs every event once, as fast as one client can, and remembers when it started and ended."""

    def __init__(self, url: str, token: str, docs: Sequence[Doc], batch_events: int) -> None:
        super().__init__(name="poster", daemon=True)
        self.url, self.token, self.docs, self.batch_events = url, token, docs, batch_events
        self.started_at = self.ended_at = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            summary = post_events(
                self.url, self.token, map(event_dict, self.docs), batch_events=self.batch_events
            )
            if summary.accepted != len(self.docs):
                raise RuntimeError(
                    f"the webhook accepted {summary.accepted} of {len(self.docs)} events: {summary}"
                )
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self.ended_at = time.monotonic()

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"posting the events failed: {self.error}") from self.error

    def describe(self, seen: Scrape, service_started: float) -> str:
        """How fast the events went in, and how many the service had applied when they were in."""
        post_s = self.ended_at - self.started_at
        applied_then = max((v for t, v in seen.applied if t <= self.ended_at - service_started), default=0.0)
        return (f"POSTed once the service was ready: {len(self.docs) / post_s:.0f} events/s "
                f"({self.batch_events} per request, {post_s:.1f} s), {applied_then:.0f} applied by then")  # fmt: skip
