"""Kafka, Avro and the billing providers' clients: what the jobs and tools read from and write to, outside Postgres."""
