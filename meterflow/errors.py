"""The one exception hierarchy of meterflow: every failure the project raises is a MeterflowError."""


class MeterflowError(Exception):
    """Base class of every error meterflow raises on purpose."""


class ConfigError(MeterflowError):
    """The configuration file or an environment override is missing, malformed or inconsistent."""


class SchemaError(MeterflowError):
    """An Avro schema uses a construct the job cannot map to exact Flink types."""


class StackError(MeterflowError):
    """A part of the local stack (Kafka, Postgres, Flink) could not be installed, started or reached."""


class PortInUseError(StackError):
    """A port the local stack needs is taken by another process."""


class JobSubmissionError(MeterflowError):
    """The Flink job could not be submitted or did not reach RUNNING."""


class ProduceError(MeterflowError):
    """Events could not be read from their input or written to Kafka."""


class SinkError(MeterflowError):
    """A sink could not write its batch; the batch was rolled back."""
