"""The rules of shard leases, shared by every ledger: who gets a shard, at which epoch.

A ledger stores one lease row per shard (owner, epoch, expiry) and applies ``claimed_epoch`` to it
inside the claim's transaction; the epoch it returns goes into the ``Fence`` every write carries.
"""

from __future__ import annotations

from coordinator.errors import FencedError


def claimed_epoch(shard: int, owner: str, current: tuple[str, int, float] | None, now: float) -> int:
    """The epoch a claim of ``shard`` by ``owner`` gets, given the lease row (owner, epoch, expires).

    Owners are spelled ``replica#incarnation``. A claim renews (same epoch) when the same owner
    holds a live lease; takes over with a higher epoch, fencing every earlier holder, when the
    lease expired or was held by an earlier incarnation of the same replica (a restart need not
    wait for its own dead lease); and raises FencedError while another replica's lease is live.
    Two live processes must therefore never share a replica name.
    """
    if current is None:
        return 1
    holder, epoch, expires_at = current
    if holder == owner and expires_at > now:
        return epoch
    if expires_at > now and replica_of(holder) != replica_of(owner):
        raise FencedError(
            f"shard {shard} is owned by {holder} (epoch {epoch}) for {expires_at - now:.1f} s more"
        )
    return epoch + 1


def replica_of(owner: str) -> str:
    """The replica an owner name belongs to, whatever its incarnation."""
    return owner.split("#", 1)[0]
