"""The blue-green rebuild: build generation N+1 next to the live one, validate it, swap aliases.

1. *Register* generation N+1 as ``building`` in the registry. From then on every live write
   (``lockstep run`` and ``lockstep sync``) goes through the two-phase path of both generations.
2. *Backfill* N+1 from generation N: the ledger's committed version of every document (and
   every tombstone, so no late event can resurrect a deleted document in N+1), with the text put
   back together from N's keyword index (the chunker is lossless) and checked against the
   ledger's source hash. The resume point is saved after every batch: a restarted rebuild goes
   on from there, and what N+1 already holds is skipped by its own version gate.
3. *Validate*: a full audit of N+1 against the source (when the source can list its current
   state) or against generation N; findings are repaired through N+1's engine and audited again.
   The swap happens only on a clean audit. The configured query set runs against both
   generations and the overlap of their results is reported.
4. *Swap*: one ``_aliases`` request and one ``alter_alias``, then the registry; N becomes a
   standby that stays in step until ``lockstep gc`` drops it after the retention period.

The use case works over ports only (``GenerationRegistry``, ``GenerationStores``); the app
layer (``lockstep.rebuild``) builds those from settings. Its modules:

- ``operations.py``: ``Rebuild`` (run, swap, rollback, abort, gc) and its ``RebuildOptions``;
- ``backfill.py``: the backfill, its resume points, and the tombstones caught up after it;
- ``writers.py``: waiting for the live writers to switch to a generation, or away from one;
- ``validate.py``: the audit-and-repair rounds before a swap;
- ``snapshot.py``: generation N's documents as events and as a listable reference;
- ``queries.py``: the query set compared on both generations;
- ``report.py``: what a run reports.
"""
