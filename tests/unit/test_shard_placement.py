"""Where shard actors go (``run.shard_resources``) and who owns a lost shard's successor."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coordinator.leases import claimed_epoch
from lockstep.ray_runtime import shard_placement
from lockstep.settings import RunSettings


def test_shard_resources_take_custom_positive_amounts_only() -> None:
    """A custom resource with a positive amount is taken; Ray's own resources and amounts of
    zero or less are refused when the settings load, not when Ray refuses the actor."""
    assert RunSettings(shard_resources={"lockstep_shard": 1}).shard_resources == {"lockstep_shard": 1}
    for resources in ({"CPU": 1}, {"memory": 1e9}, {"lockstep_shard": 0}):
        with pytest.raises(ValidationError):
            RunSettings(shard_resources=resources)


def test_a_shard_with_resources_holds_them_and_no_cpu() -> None:
    """Named resources are what a shard actor holds (Ray would add a CPU for its whole life);
    without any, Ray's defaults place it."""
    assert shard_placement({"lockstep_shard": 0.5}) == {"num_cpus": 0, "resources": {"lockstep_shard": 0.5}}
    assert shard_placement({}) == {}


def test_a_successor_of_a_lost_shard_takes_the_lease_over_at_once_with_a_higher_epoch() -> None:
    """The successor's owner is a new incarnation of the same replica (``owner+n``): it need not
    wait for the lost actor's live lease, and its epoch fences that actor."""
    now = 100.0
    lease = ("replica-a#41-abc123", 3, now + 30.0)
    assert claimed_epoch(0, "replica-a#41-abc123+1", lease, now) == 4
