"""The AliasedIndex contract, one check that the keyword and the vector suites run on each of
their adapters (every keyword backend, every form of Milvus), with the real stores they start."""

from __future__ import annotations

import pytest

from coordinator.errors import PermanentStoreError
from coordinator.ports import AliasedIndex


def check_aliased_index(first: AliasedIndex, second: AliasedIndex, alias: str) -> None:
    """``first`` and ``second``: adapters on two existing indexes of one store; ``alias``: an
    unused alias name, spelled as that store spells one.

    An alias is absent until pointed; pointing names a physical index by ``physical_name`` and
    is idempotent; every adapter on the store sees where it points; it moves to exactly the new
    target; and an index's own name is refused as an alias."""
    assert isinstance(first, AliasedIndex) and isinstance(second, AliasedIndex)
    assert first.physical_name != second.physical_name
    assert first.alias_target(alias) is None
    first.point_alias(alias, first.physical_name)
    first.point_alias(alias, first.physical_name)
    assert first.alias_target(alias) == first.physical_name
    assert second.alias_target(alias) == first.physical_name
    second.point_alias(alias, second.physical_name)
    assert first.alias_target(alias) == second.physical_name
    with pytest.raises(PermanentStoreError, match="not an alias"):
        first.alias_target(second.physical_name)
