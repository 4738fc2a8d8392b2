"""meterflow: billing-grade usage metering on Apache Flink."""

__version__ = "0.1.0"
