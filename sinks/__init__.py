"""Sinks of the meterflow job: Postgres usage windows and the billing forwarder."""
