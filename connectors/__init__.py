"""Kafka and Avro connector builders for the meterflow job."""
