"""End-to-end benchmark of meterflow against a plain Python consumer, a naive PyFlink job and a read-only ceiling."""
