"""Sinks of the meterflow jobs: Postgres usage windows, the closed-window layout, and billing delivery to the provider."""
