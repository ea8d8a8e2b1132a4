"""lockstep: a keyword index and a vector index kept in step with their source, and searched
consistently through both (``lockstep.api``).

The names below are loaded on first use, so that ``import lockstep`` (and every command line
run) stays light::

    from lockstep import Lockstep, ConsistencyToken
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.consistency import ConsistencyToken
    from coordinator.errors import ConsistencyTimeout, InvalidSearch, SearchError, SearchUnavailable
    from coordinator.search import DocHit, Hit, LegReport, Mode, SearchResult
    from lockstep.api import Lockstep, WriteReceipt

_EXPORTS = {
    "Lockstep": "lockstep.api",
    "WriteReceipt": "lockstep.api",
    "ConsistencyToken": "coordinator.consistency",
    "Mode": "coordinator.search",
    "SearchResult": "coordinator.search",
    "Hit": "coordinator.search",
    "DocHit": "coordinator.search",
    "LegReport": "coordinator.search",
    "SearchError": "coordinator.errors",
    "InvalidSearch": "coordinator.errors",
    "SearchUnavailable": "coordinator.errors",
    "ConsistencyTimeout": "coordinator.errors",
}

__all__ = [
    "ConsistencyTimeout",
    "ConsistencyToken",
    "DocHit",
    "Hit",
    "InvalidSearch",
    "LegReport",
    "Lockstep",
    "Mode",
    "SearchError",
    "SearchResult",
    "SearchUnavailable",
    "WriteReceipt",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lockstep' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
