"""A call run on a thread, so a test can watch it wait (on a lock, a paused server) and finish."""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundCall:
    """Runs ``fn`` in a daemon thread; ``result`` or ``error`` hold its outcome once it ends."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:
            self.error = exc

    def finished_within(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return not self._thread.is_alive()
