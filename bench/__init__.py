"""lockstep's benchmarks; run one with ``python -m bench.<name>``, results in docs/benchmarks.md."""
