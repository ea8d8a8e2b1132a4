"""The service's reader at a stop (pure logic: a source stands in for a real one's follow loop;
no Ray, no store)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from structlog.testing import capture_logs

from coordinator.errors import SourceError
from coordinator.ports import SourceRecord
from lockstep.service import Service
from lockstep.settings import Settings

# How long the stand-in source takes to notice a stop (as a consumer's poll does).
NOTICE_S = 0.3


class _Following:
    """A following source that reads nothing until told to stop, then raises like a consumer
    closed under its reader (``fail_after_stop``), or returns after NOTICE_S."""

    def __init__(self, *, fail_after_stop: bool) -> None:
        self.fail_after_stop = fail_after_stop
        self.returned = threading.Event()

    def follow(self, stop: Callable[[], bool]) -> Iterator[SourceRecord]:
        try:
            while not stop():
                threading.Event().wait(0.01)
            threading.Event().wait(NOTICE_S)
            if self.fail_after_stop:
                raise SourceError("the Kafka consumer stopped: unknown error")
            yield from ()
        finally:
            self.returned.set()


def _service(tmp_path: Path) -> Service:
    settings = Settings.model_validate({
        "source": {"kind": "jsonl", "path": str(tmp_path / "events.jsonl")},
        "keyword": {"kind": "tantivy", "path": str(tmp_path / "tantivy")},
        "vector": {"uri": str(tmp_path / "milvus.db")},
        "ledger": {"path": str(tmp_path / "ledger.db")},
        "run": {"shards": 1, "http_port": 0},
    })
    return Service(settings, log_level="warning")


def _start_reader(service: Service, source: _Following) -> None:
    records: queue.Queue[SourceRecord | None] = queue.Queue(maxsize=10)
    service._reader = threading.Thread(target=service._read, args=(source, records), daemon=True)
    service._reader.start()


def test_a_source_failing_after_the_stop_was_asked_for_does_not_fail_the_service(tmp_path: Path) -> None:
    """A consumer that ends under its reader once the stop began is logged, not made fatal: a
    graceful stop exits 0."""
    service = _service(tmp_path)
    source = _Following(fail_after_stop=True)
    with capture_logs() as logs:
        _start_reader(service, source)
        service._stop_reader()
    assert source.returned.is_set()
    assert service.state.fatal == []
    assert any(e["event"] == "the source failed while stopping" for e in logs)


def test_a_source_failing_while_serving_stops_the_service_as_failed(tmp_path: Path) -> None:
    """The same failure before any stop is fatal: /readyz and the exit status say so."""
    service = _service(tmp_path)
    service._source_failed(SourceError("the replication slot is gone"))
    assert service.state.fatal == ["source: SourceError: the replication slot is gone"]


def test_the_source_is_closed_only_once_its_reader_has_returned(tmp_path: Path) -> None:
    """Stopping the reader waits for it to leave the source (within READER_STOP_S)."""
    service = _service(tmp_path)
    source = _Following(fail_after_stop=False)
    _start_reader(service, source)
    service._stop_reader()
    assert source.returned.is_set(), "the reader was still inside the source"
    assert service._reader is not None and not service._reader.is_alive()
