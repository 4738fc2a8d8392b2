"""Postgres: the usage windows, the billing ledger, corrections and reprocess results, and the SQL each runs."""
