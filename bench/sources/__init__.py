"""Events/s from each change-stream source into both real stores, against the JSONL source in the same run.

    python -m bench.sources [--events 5000] [--rounds 2] [--shards 2] [--seed 7]

This package starts its own Tansu Kafka broker and embedded Postgres (``wal_level=logical``) for
the whole benchmark, and a fresh OpenSearch-API server and Milvus 2.3.5 server for every run;
it makes ``--events`` new documents of exactly ``CHUNKS_PER_DOC`` chunks (``bench.streaming``'s
workload: the same texts and metadata for every source), and for each source runs
``lockstep run -c CFG`` as a subprocess into a fresh index, collection and ledger:

- ``jsonl`` (the baseline): a file of all events, ``--exit-when-idle``.
- ``kafka``: one Debezium (Postgres connector) create per document in a topic of
  ``--kafka-partitions`` partitions, produced before the service starts; ``--exit-when-idle``.
- ``postgres``: logical replication (pgoutput). The slot is created and its snapshot (one seed
  row) checkpointed by a ``lockstep sync`` first, then the rows are inserted,
  ``--pg-rows-per-txn`` per transaction, so the measured run streams them from the slot;
  ``--exit-when-idle``.
- ``webhook``: the service runs in follow mode; once it is ready the events are POSTed
  (``lockstep.ops_http.post_events``, ``--post-batch-events`` per request) as fast as one client
  can, and the service is stopped (SIGTERM) once every event is applied.

The rate is ``bench.streaming``'s: ``/metrics`` (``lockstep_events_total{outcome="applied"}``)
polled, and the applied count between ``STEADY_FROM`` and ``STEADY_TO`` of the events, so Ray
start-up, the consumer group's join and the final drain are left out. Beside it, the CPU time
of the service's own process (where the source is read and decoded; the shards and index
writers are Ray workers) per event over the same window, which the other processes on a
shared machine disturb much less than a rate. Every source runs ``--rounds`` times, in
opposite orders in alternate rounds; its ratio is its mean rate over JSONL's, and the runs'
spread is printed as the noise. After each run both indexes are checked against the expected
documents with ``coordinator.invariants.check_index`` (I1-I4).

The modules, one concern each:

- ``cli.py``: the command line (``__main__.py`` runs it); ``phases.py``: the runs in order;
- ``servers.py``: the sources' servers and each run's fresh stores;
- ``kafka.py``, ``postgres.py``, ``webhook.py``: how each source gets the events;
- ``runs.py``: one measured run per source; ``scrape.py``: what a run showed while it ran;
  ``read_alone.py``: a source's ``read()`` drained with no service behind it;
- ``report.py``: the Markdown report and its block in docs/benchmarks.md.

The workload, the service process and the steady-window rate are ``bench.streaming``'s.
"""
