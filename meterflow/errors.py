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


class BillingError(MeterflowError):
    """A closed window could not be delivered to the billing provider."""


class DeliveryRejected(BillingError):  # noqa: N818 - a refusal by rule, raised and handled as data
    """A window must not go to the provider at all (no customer mapping, too old, bad value)."""


class ProviderError(BillingError):
    """The provider did not accept a call; ``retryable`` says whether the same call may succeed later."""

    def __init__(self, message: str, *, status: int | None, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class ReconciliationError(MeterflowError):
    """Final windows and the delivery ledger disagree."""


class CorrectionError(MeterflowError):
    """A late event cannot become a correction, or an operator's action does not apply to a correction."""
