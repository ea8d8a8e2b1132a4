"""lockstep's domain: events, chunks, plans, the two-phase apply and the ports it needs.

Nothing in this package imports a store client, a Kafka client or Ray.
"""
