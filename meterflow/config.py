"""One typed configuration for every command and the job, loaded from one YAML file.

Precedence, lowest first: defaults in the models below < the YAML file < environment variables.

* Any key can be overridden as ``METERFLOW_<SECTION>__<KEY>``, e.g.
  ``METERFLOW_KAFKA__BOOTSTRAP_SERVERS=broker:9092``.
* Secrets are never read from the YAML file: ``METERFLOW_POSTGRES_PASSWORD``,
  ``METERFLOW_STRIPE_API_KEY`` and each declared destination's ``METERFLOW_DESTINATION_<NAME>_API_KEY``
  come from the environment, from a file named by
  ``<VARIABLE>_FILE`` (the whole file is the value, e.g. a Docker or Kubernetes secret mount), or
  from the secrets file (``secrets_file``, dotenv ``KEY=VALUE`` lines), in that order.

This is the only module that reads the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, ValidationError, model_validator

from meterflow.alerts_config import AlertsConfig
from meterflow.config_values import Duration, ExactDecimal, format_duration, parse_port_range
from meterflow.destinations import STRIPE, Destination, declare
from meterflow.errors import ConfigError
from meterflow.input_contract import MAX_GROUP_BY, MAX_ID_BYTES
from meterflow.serve_config import ServeConfig

ENV_PREFIX = "METERFLOW_"
CONFIG_PATH_ENV = "METERFLOW_CONFIG"
SECRET_ENV_KEYS = {
    "METERFLOW_POSTGRES_PASSWORD": ("postgres", "password"),
    "METERFLOW_STRIPE_API_KEY": ("stripe", "api_key"),
}
SECRET_FILE_SUFFIX = "_FILE"  # noqa: S105 - a suffix of variable names, not a secret
# A declared destination's API key: METERFLOW_DESTINATION_<NAME>_API_KEY (billing.destinations).
DESTINATION_KEY = re.compile(r"METERFLOW_DESTINATION_([A-Z][A-Z0-9_]{0,31})_API_KEY")
DESTINATION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
ANY_DESTINATION_KEY = re.compile(r"METERFLOW_DESTINATION_.*_API_KEY", re.IGNORECASE)
DEFAULT_CONFIG_FILE = "meterflow.yaml"
# Names that reach SQL (database, role): plain Postgres identifiers, never quoted input.
PG_IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
# Table names: written unquoted into the generated DDL and queries (sinks/postgres_schema.py
# check_identifier), so lower case only: Postgres folds an unquoted name to lower case.
PG_TABLE_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"


class _Section(BaseModel):
    # Errors never quote the input: a section can hold a secret (a password, an API key).
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class KafkaConfig(_Section):
    """Where usage events come from and where late and bad events go."""

    bootstrap_servers: str = "127.0.0.1:9092"
    usage_events_topic: str = "usage-events"
    late_events_topic: str = "usage-events-late"
    dead_letter_topic: str = "usage-events-dead-letter"
    closed_windows_topic: str = Field(
        "usage-windows-closed",
        description="Each closed window once (Avro avro/closed_window.avsc): the integration point for billing and other consumers.",
    )
    partitions: int = Field(3, ge=1, description="Partitions of the topics the project creates.")
    consumer_group: str = "meterflow"
    transaction_timeout: Duration = Field(
        timedelta(hours=24),
        description=(
            "Kafka transaction timeout of the jobs' exactly-once outputs. The job may be down or unable to commit for"
            " transaction_timeout - flink.checkpoint_timeout without losing a commit; at most the brokers' transaction.max.timeout.ms"
            " (meterflow submit checks)."
        ),
    )
    max_message_bytes: int = Field(
        1_048_576,
        ge=65_536,
        le=64 * 1_048_576,
        description=(
            "The largest usage-events message: the input topic's max.message.bytes as the project creates it. The dead-letter"
            " topic and its writer take this plus DEAD_LETTER_HEADROOM_BYTES, so every record the input accepts fits as a dead letter."
        ),
    )
    schema_registry_url: str | None = Field(
        None,
        description="A Confluent-compatible schema registry: messages in its wire format (magic 0, schema id) are decoded with the writer schema it holds.",
    )


class PostgresConfig(_Section):
    """The database that holds windowed usage."""

    host: str = "127.0.0.1"
    port: int = Field(5433, ge=1, le=65535)
    database: str = Field("meterflow", pattern=PG_IDENTIFIER_PATTERN)
    user: str = Field("meterflow", pattern=PG_IDENTIFIER_PATTERN)
    password: SecretStr | None = None
    usage_table: str = Field("usage_windows", pattern=PG_TABLE_PATTERN)

    def jdbc_url(self) -> str:
        """JDBC URL for Flink's JDBC connector.

        Timeouts make a dead or restarting server fail the sink quickly (Flink then restarts from
        the last checkpoint) instead of blocking a task that must be cancelled.
        """
        return f"jdbc:postgresql://{self.host}:{self.port}/{self.database}?connectTimeout=10&socketTimeout=120&tcpKeepAlive=true"

    def conninfo(self) -> str:
        """libpq connection string for psycopg (password passed separately, never logged)."""
        return f"host={self.host} port={self.port} dbname={self.database} user={self.user}"


class FlinkConfig(_Section):
    """How the job runs on the Flink cluster."""

    rest_host: str = "127.0.0.1"
    rest_port: int = Field(8081, ge=1, le=65535)
    parallelism: int = Field(1, ge=1)
    task_slots: int = Field(
        4,
        ge=1,
        description="Slots of the local stack's TaskManager: the usage job's parallelism plus the billing job's.",
    )
    checkpoint_interval: Duration = timedelta(seconds=5)
    checkpoint_timeout: Duration = Field(
        timedelta(minutes=10), description="A checkpoint that takes longer fails (execution.checkpointing.timeout)."
    )
    checkpoint_dir: str = ".stack/flink/checkpoints"
    job_name: str = "meterflow-usage"
    state_backend: Literal["hashmap", "rocksdb"] = Field(
        "rocksdb",
        description=(
            "Where the usage job keeps its state: in RocksDB on local disk with incremental checkpoints (rocksdb, ~50 B per dedup id),"
            " or on the JVM heap (hashmap, ~320 B per id, every checkpoint writes all of it), only for a horizon of a few million ids"
            " (docs/operations.md, Sizing the dedup state)."
        ),
    )
    usage_graph: Literal["sql", "two_stage"] = Field(
        "sql",
        description=(
            "How the usage job counts: sql (the dedup and the window aggregate as Flink SQL, a window closer after them),"
            " or two_stage (two keyed JVM stages: dedup, lateness and partial windows keyed by event id, then partials merged per window)."
            " Their state differs: a savepoint of one graph does not restore into the other (docs/operations.md, The two-stage graph)."
        ),
    )


class EventTimeConfig(_Section):
    """Event time, windows and lateness: the knobs ops tune (see docs/operations.md)."""

    window_size: Duration = timedelta(minutes=1)
    watermark_delay: Duration = timedelta(seconds=5)
    source_idle_timeout: Duration = timedelta(seconds=10)
    source_catch_up_timeout: Duration = timedelta(seconds=60)
    allowed_lateness: Duration = timedelta(0)
    early_fire_interval: Duration = timedelta(0)
    dedup_horizon: Duration = timedelta(days=7)
    max_event_age: Duration = timedelta(days=35)
    max_event_ahead: Duration = timedelta(minutes=5)

    @model_validator(mode="after")
    def _check(self) -> EventTimeConfig:
        second = timedelta(seconds=1)
        if self.window_size < second or self.window_size % second:
            msg = f"event_time.window_size must be a whole number of seconds >= 1s, got {format_duration(self.window_size)}"
            raise ValueError(msg)
        if timedelta(days=1) % self.window_size:
            msg = "event_time.window_size must divide one day evenly, so windows align to UTC midnight"
            raise ValueError(msg)
        for name in (
            "watermark_delay",
            "allowed_lateness",
            "source_idle_timeout",
            "source_catch_up_timeout",
            "early_fire_interval",
            "max_event_ahead",
        ):
            if getattr(self, name) < timedelta(0):
                msg = f"event_time.{name} must not be negative"
                raise ValueError(msg)
        if self.source_catch_up_timeout < self.source_idle_timeout:
            msg = (
                f"event_time.source_catch_up_timeout ({format_duration(self.source_catch_up_timeout)}) must be at least"
                f" event_time.source_idle_timeout ({format_duration(self.source_idle_timeout)})"
            )
            raise ValueError(msg)
        if self.dedup_horizon < self.window_size + self.allowed_lateness:
            msg = "event_time.dedup_horizon must cover at least window_size + allowed_lateness"
            raise ValueError(msg)
        return self


Aggregation = Literal["SUM", "COUNT", "MAX", "LATEST", "UNIQUE_COUNT"]
# decimal: the exact quantity; exact: whole numbers only (a fraction is a dead letter); the others round.
BillingRounding = Literal["carry", "decimal", "exact", "half_up", "ceil", "floor"]
_DIMENSION_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


class MeterConfig(_Section):
    """A meter the job accepts; events naming any other meter go to the dead-letter topic.

    Aggregations per window: SUM of quantity, COUNT of events, MAX quantity, LATEST quantity (of
    the event with the greatest event_time; ties broken by event_id), UNIQUE_COUNT of the values of
    ``unique_dimension``. ``group_by`` dimensions split a customer's window into one row per
    combination of their values.
    """

    name: str = Field(min_length=1, max_length=MAX_ID_BYTES["meter"], pattern=_DIMENSION_NAME)
    aggregation: Aggregation = "SUM"
    allow_negative: bool = Field(False, description="Accept negative quantities (credits, corrections).")
    group_by: tuple[str, ...] = Field(
        (), max_length=MAX_GROUP_BY, description="Dimensions that split a window into rows (at most MAX_GROUP_BY)."
    )
    unique_dimension: str | None = Field(None, pattern=_DIMENSION_NAME)
    billing_event_name: str | None = Field(
        None, min_length=1, max_length=100, description="The provider's meter event name; defaults to the meter name."
    )
    billing_rounding: BillingRounding = Field(
        "carry",
        description="How a window's quantity becomes the provider's value: carry (whole units, the fraction carried within the month), decimal, exact, half_up, ceil, floor (see README, Billing).",
    )

    @property
    def event_name(self) -> str:
        """The meter event name at the billing provider."""
        return self.billing_event_name or self.name

    @model_validator(mode="after")
    def _check(self) -> MeterConfig:
        if (self.aggregation == "UNIQUE_COUNT") != (self.unique_dimension is not None):
            msg = f"meter {self.name}: unique_dimension is required for UNIQUE_COUNT and only for it"
            raise ValueError(msg)
        bad = [d for d in self.group_by if not re.fullmatch(_DIMENSION_NAME, d)]
        if bad or len(set(self.group_by)) != len(self.group_by):
            msg = f"meter {self.name}: group_by must list distinct dimension names, got {list(self.group_by)}"
            raise ValueError(msg)
        return self


class InputConfig(_Section):
    """Limits on what producers send beyond the fixed input contract (meterflow/input_contract.py)."""

    max_dimension_combinations: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description=(
            "Distinct group-by combinations per (tenant, customer, meter, window); an event that would open one more is a"
            " dead letter (raise it, then `meterflow dead-letters replay`)."
        ),
    )
    max_unique_values: int = Field(
        100_000,
        ge=1,
        le=1_000_000,
        description=(
            "Distinct values of a UNIQUE_COUNT meter's unique dimension per (tenant, customer, meter, window); an event"
            " with one more is a dead letter (raise it, then `meterflow dead-letters replay`)."
        ),
    )


class StackConfig(_Section):
    """The local stack started by ``meterflow stack up``."""

    state_dir: str = ".stack"
    kafka_controller_port: int = Field(9093, ge=1, le=65535)
    flink_rpc_port: int = Field(6123, ge=1, le=65535)
    stripe_mock_port: int = Field(12111, ge=1, le=65535)
    prometheus_port: int = Field(9090, ge=1, le=65535, description="Port of the local Prometheus on 127.0.0.1.")
    flink_metrics_ports: Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) else v)] = Field(
        "9249-9252",
        description="Ports the JobManager and TaskManagers try, in order, for their Prometheus endpoint (Flink syntax: 9249-9252 or 9249,9260).",
    )
    prometheus_scrape_interval: Duration = timedelta(seconds=5)
    high_availability: Literal["zookeeper", "none"] = Field(
        "zookeeper",
        description="zookeeper: the stack runs ZooKeeper and a new JobManager recovers every running job from its last checkpoint; none: a lost JobManager loses its jobs (resubmit them).",
    )
    taskmanager_restart_delay: Duration = Field(
        timedelta(seconds=5),
        description="How long the local stack's supervisor lets the JobManager go without a TaskManager before it starts a replacement.",
    )
    zookeeper_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of the local ZooKeeper on 127.0.0.1; unset: a free port chosen at its first start and kept in <state_dir>/zookeeper/port.",
    )

    @model_validator(mode="after")
    def _check(self) -> StackConfig:
        ports = parse_port_range(self.flink_metrics_ports)
        if self.prometheus_port in ports:
            msg = f"stack.prometheus_port {self.prometheus_port} lies in stack.flink_metrics_ports {self.flink_metrics_ports}"
            raise ValueError(msg)
        if self.prometheus_scrape_interval < timedelta(seconds=1):
            msg = "stack.prometheus_scrape_interval must be at least 1s"
            raise ValueError(msg)
        return self


class StripeConfig(_Section):
    """The billing provider (Stripe meter events)."""

    api_base: str | None = None
    api_key: SecretStr | None = None
    meter_events_api: Literal["v1", "v2_stream"] = Field(
        "v1",
        description="v1: one POST /v1/billing/meter_events per delivery (validated at once; 1,000 calls/s live). v2_stream: POST /v2/billing/meter_event_stream, up to stream_batch_size deliveries per request under a meter event session (validated after acceptance; errors come back as error reports).",
    )
    meter_events_base: str | None = Field(
        None,
        description="Base address of the v2 meter event stream; default Stripe's (https://meter-events.stripe.com).",
    )
    stream_batch_size: int = Field(
        100, ge=1, le=100, description="Deliveries per v2 stream request (Stripe takes at most 100)."
    )
    stream_linger: Duration = Field(
        timedelta(milliseconds=20),
        description="How long a v2 stream request waits for more deliveries before it goes out with fewer than stream_batch_size.",
    )

    @model_validator(mode="after")
    def _check(self) -> StripeConfig:
        if self.stream_linger < timedelta(0) or self.stream_linger > timedelta(seconds=1):
            msg = f"stripe.stream_linger must be between 0s and 1s, got {format_duration(self.stream_linger)}"
            raise ValueError(msg)
        return self


def _declared_destinations(value: Any) -> Any:
    """Each entry through its preset (a declared Destination stays as it is)."""
    if not isinstance(value, dict):
        return value
    declared = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not DESTINATION_NAME.fullmatch(name) or name == STRIPE:
            msg = f"destination name {name!r}: lower case letters, digits and _, at most 32, not {STRIPE!r}"
            raise ValueError(msg)
        declared[name] = entry if isinstance(entry, Destination) else declare(name, entry or {})
    return declared


class BillingConfig(_Section):
    """Forwarding closed windows to the billing provider (see README, Billing)."""

    enabled: bool = False
    provider: Literal["stripe"] = "stripe"
    calls_per_second: float = Field(
        1000,
        gt=0,
        description="Client-side rate limit of provider requests for the whole billing job; each subtask gets calls_per_second / parallelism (on the v2 stream a request carries up to stripe.stream_batch_size deliveries).",
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Deliveries in flight per billing subtask, each in one delivery slot of the worker (the async operator holds up to four times as many, in batches gathered in the JVM); default 64 on v1 (a call each) and 1024 on the v2 stream (deliveries in flight together share requests).",
    )
    max_held_per_key: int = Field(
        2,
        ge=1,
        le=1024,
        description="Of a billing subtask's max_in_flight slots, how many deliveries that take turns hold at once (one calling, the rest waiting their turn): those of one (tenant, customer, meter) on v1, those of one window on the v2 stream. More give their slot back and wait inside the worker, so one customer's burst never takes the in-flight slots of the others.",
    )
    parallelism: int | None = Field(None, ge=1, description="Subtasks of the billing job; default flink.parallelism.")
    consumer_group: str | None = Field(
        None,
        min_length=1,
        description="Consumer group of the billing job on the closed-windows topic; default <kafka.consumer_group>-billing.",
    )
    provider_dedup_window: Duration = Field(
        timedelta(hours=24),
        description="How long the provider deduplicates identifiers; older deliveries are checked at the provider before a resend.",
    )
    retry_lease: Duration = Field(
        timedelta(minutes=2),
        description="A delivery handed to an attempt is not handed out again by the retry scan for this long.",
    )
    max_attempts: int = Field(20, ge=1, le=1000)
    initial_backoff: Duration = timedelta(milliseconds=500)
    max_backoff: Duration = timedelta(seconds=30)
    request_timeout: Duration = timedelta(seconds=10)
    identifier_prefix: str = Field("mf", pattern=r"^[A-Za-z0-9_]{1,16}$")
    ledger_table: str = Field("billing_deliveries", pattern=PG_TABLE_PATTERN)
    customers_table: str = Field("billing_customers", pattern=PG_TABLE_PATTERN)
    carry_table: str = Field(
        "billing_carry",
        pattern=PG_TABLE_PATTERN,
        description="Running totals per (customer, meter, billing period) of the meters billed with billing_rounding: carry.",
    )
    cycles_table: str = Field(
        "billing_cycles",
        pattern=PG_TABLE_PATTERN,
        description="Customers' billing anchors and timezones (meterflow cycles set): the usage API's periods, alerts' and the carry's.",
    )
    max_window_age: Duration = timedelta(days=35)
    max_window_ahead: Duration = timedelta(minutes=5)
    destinations: Annotated[dict[str, Destination], BeforeValidator(_declared_destinations)] = Field(
        default_factory=dict,
        description=(
            "Destinations beside Stripe, by name (lower case, digits, _): each a preset (metronome, chargebee) with its keys"
            " overridden, or preset: http with its own request and limits (meterflow/destinations.py; README, Destinations)."
            " The API key of destination NAME comes from METERFLOW_DESTINATION_<NAME>_API_KEY."
        ),
    )
    destination_api_keys: dict[str, SecretStr] = Field(
        default_factory=dict, description="Set from the environment or the secrets file only, never in the config file."
    )

    def destination_names(self) -> tuple[str, ...]:
        """Every destination the billing job delivers to: Stripe, then the declared ones (billing/routing.py)."""
        return (STRIPE, *sorted(self.destinations))

    def destination_api_key(self, name: str) -> str:
        """The API key of declared destination ``name``, or ConfigError saying where to set it."""
        key = self.destination_api_keys.get(name)
        if key is None:
            msg = f"billing destination {name} has no API key: set METERFLOW_DESTINATION_{name.upper()}_API_KEY (or ..._API_KEY_FILE) or put it in the secrets file"
            raise ConfigError(msg)
        return key.get_secret_value()

    @model_validator(mode="after")
    def _check(self) -> BillingConfig:
        if self.initial_backoff <= timedelta(0) or self.max_backoff < self.initial_backoff:
            msg = "billing: initial_backoff must be positive and at most max_backoff"
            raise ValueError(msg)
        if self.request_timeout <= timedelta(0):
            msg = "billing.request_timeout must be positive"
            raise ValueError(msg)
        if self.retry_lease <= self.request_timeout:
            msg = "billing.retry_lease must be longer than billing.request_timeout, so a call in flight is never handed out twice"
            raise ValueError(msg)
        return self


class CorrectionsConfig(_Section):
    """Corrections from late events (README, "Late events and corrections")."""

    approval_threshold: ExactDecimal | None = Field(
        None,
        ge=0,
        description="Hold a correction for approval when |delta| is above this; none: apply every correction automatically.",
    )
    tenant_approval_thresholds: dict[str, ExactDecimal] = Field(
        default_factory=dict, description="Per-tenant thresholds, overriding approval_threshold."
    )
    table: str = Field("usage_corrections", pattern=PG_TABLE_PATTERN)
    events_table: str = Field(
        "usage_correction_events",
        pattern=PG_TABLE_PATTERN,
        description="One row per late event corrected or reported, keyed by (tenant_id, event_id).",
    )
    batch_size: int = Field(
        500, ge=1, le=100_000, description="Late events per Postgres transaction of `corrections apply`."
    )
    offsets_table: str = Field(
        "usage_correction_offsets",
        pattern=PG_TABLE_PATTERN,
        description="Where `corrections apply --follow` keeps its place in the late topic, per partition.",
    )
    final_row_wait: Duration = Field(
        timedelta(minutes=2),
        description="A MAX or LATEST window without a row waits this long after its late events were routed late, for a final row not written yet, before it is corrected as a window with no counted event.",
    )
    follow_interval: Duration = Field(
        timedelta(minutes=1),
        description="Pause between the runs of `corrections apply --follow` (the deployment's corrections follower).",
    )
    metrics_port: int = Field(
        9260, ge=0, le=65535, description="Where `corrections apply --follow` serves its Prometheus metrics (0: none)."
    )

    @model_validator(mode="after")
    def _check(self) -> CorrectionsConfig:
        negative = [t for t, v in self.tenant_approval_thresholds.items() if v < 0]
        if negative:
            msg = f"corrections.tenant_approval_thresholds must not be negative: {negative}"
            raise ValueError(msg)
        return self


class JobConfig(_Section):
    """The whole configuration of meterflow."""

    kafka: KafkaConfig = KafkaConfig()
    postgres: PostgresConfig = PostgresConfig()
    flink: FlinkConfig = FlinkConfig()
    event_time: EventTimeConfig = EventTimeConfig()
    input: InputConfig = InputConfig()
    stack: StackConfig = StackConfig()
    stripe: StripeConfig = StripeConfig()
    billing: BillingConfig = BillingConfig()
    corrections: CorrectionsConfig = CorrectionsConfig()
    serve: ServeConfig = ServeConfig()
    alerts: AlertsConfig = AlertsConfig()
    meters: tuple[MeterConfig, ...] = (MeterConfig(name="api_calls"), MeterConfig(name="tokens"))
    secrets_file: str = ".stack/secrets.env"
    base_dir: str = Field(".", description="Directory relative paths resolve against (the config file's).")

    @model_validator(mode="after")
    def _transactions_outlive_checkpoints(self) -> JobConfig:
        # A checkpoint's transactions are committed when it completes: Kafka must not abort them first.
        if self.kafka.transaction_timeout <= self.flink.checkpoint_timeout:
            msg = (
                f"kafka.transaction_timeout ({format_duration(self.kafka.transaction_timeout)}) must exceed flink.checkpoint_timeout"
                f" ({format_duration(self.flink.checkpoint_timeout)}); the difference is the longest outage the job survives"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _held_within_in_flight(self) -> JobConfig:
        if self.billing.max_held_per_key > self.billing_max_in_flight:
            msg = (
                f"billing.max_held_per_key ({self.billing.max_held_per_key}) must be at most billing.max_in_flight"
                f" ({self.billing_max_in_flight}): a key can hold no more slots than there are"
            )
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _unique_meters(self) -> JobConfig:
        names = [m.name for m in self.meters]
        if not names or len(set(names)) != len(names):
            msg = f"meters must name at least one meter, each once: {names}"
            raise ValueError(msg)
        return self

    def meter(self, name: str) -> MeterConfig | None:
        """The configured meter of that name, or None."""
        return next((m for m in self.meters if m.name == name), None)

    def path(self, relative: str) -> Path:
        """Resolve a configured path against the config file's directory."""
        p = Path(relative)
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def state_dir(self) -> Path:
        """The one directory where the local stack keeps state and logs."""
        return self.path(self.stack.state_dir)

    @property
    def billing_job_name(self) -> str:
        """The billing job's name on the cluster: the usage job's name with ``-billing``."""
        return f"{self.flink.job_name}-billing"

    @property
    def billing_consumer_group(self) -> str:
        """The billing job's consumer group on the closed-windows topic."""
        return self.billing.consumer_group or f"{self.kafka.consumer_group}-billing"

    @property
    def billing_max_in_flight(self) -> int:
        """Deliveries in flight per billing subtask: more on the v2 stream, where they share requests
        and slots cost no connection each (docs/benchmarks.md, the v2 stream's figures)."""
        if self.billing.max_in_flight is not None:
            return self.billing.max_in_flight
        return 1024 if self.stripe.meter_events_api == "v2_stream" else 64

    @property
    def billing_parallelism(self) -> int:
        """Subtasks of the billing job."""
        return self.billing.parallelism or self.flink.parallelism

    def checkpoint_uri(self) -> str:
        """Checkpoint directory as a URI Flink accepts."""
        d = self.flink.checkpoint_dir
        # Not Path.as_uri(): Flink does not decode a percent-encoded path, so "a b" would become a directory "a%20b".
        return d if "://" in d else f"file://{self.path(d)}"

    def job_state_uri(self, job_name: str) -> str:
        """Where the job named ``job_name`` keeps its checkpoints and savepoints (meterflow/retained_state.py)."""
        return f"{self.checkpoint_uri().rstrip('/')}/{job_name}"


def read_secrets_file(path: Path) -> dict[str, str]:
    """Read dotenv-style ``KEY=VALUE`` lines; a missing file is an empty mapping."""
    if not path.exists():
        return {}
    secrets: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            msg = f"{path}:{number}: expected KEY=VALUE"
            raise ConfigError(msg)
        secrets[key.strip()] = value.strip().strip("'\"")
    return secrets


def secret_file_values(environ: Mapping[str, str]) -> dict[str, str]:
    """Secrets named by ``<VARIABLE>_FILE`` (e.g. ``METERFLOW_POSTGRES_PASSWORD_FILE=/run/secrets/pg``).

    The file's whole content, without its trailing newline, is the value (the shape of Docker and
    Kubernetes secret mounts). A variable set directly wins over its ``_FILE``; a named file that
    does not exist is an error, never a silent fallback.
    """
    values: dict[str, str] = {}
    destination_keys = {
        k.removesuffix(SECRET_FILE_SUFFIX)
        for k in environ
        if DESTINATION_KEY.fullmatch(k.removesuffix(SECRET_FILE_SUFFIX))
    }
    for key in sorted(SECRET_ENV_KEYS.keys() | destination_keys):
        file_name = environ.get(key + SECRET_FILE_SUFFIX)
        if not file_name or environ.get(key):
            continue
        try:
            values[key] = Path(file_name).read_text().rstrip("\r\n")
        except OSError as e:
            msg = f"{key}{SECRET_FILE_SUFFIX} names {file_name}, which cannot be read: {e.strerror}"
            raise ConfigError(msg) from e
    return values


def _apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    secret_files = {key + SECRET_FILE_SUFFIX for key in SECRET_ENV_KEYS}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key in SECRET_ENV_KEYS or key in secret_files or key == CONFIG_PATH_ENV:
            continue
        if DESTINATION_KEY.fullmatch(key.removesuffix(SECRET_FILE_SUFFIX)):
            continue
        if ANY_DESTINATION_KEY.fullmatch(key.removesuffix(SECRET_FILE_SUFFIX)):
            msg = f"{key}: a destination's key variable is METERFLOW_DESTINATION_<NAME>_API_KEY, its name upper case"
            raise ConfigError(msg)
        parts = key[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                msg = f"environment override {key} does not name a config key"
                raise ConfigError(msg)
        node[parts[-1]] = value


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> JobConfig:
    """Load the configuration: YAML file, then env overrides, then secrets.

    Args:
        path: the YAML file; defaults to ``$METERFLOW_CONFIG`` or ``./meterflow.yaml``.
            A missing default file means "all defaults"; a missing explicit file is an error.
        environ: the environment to read (``os.environ`` when omitted; tests pass a dict).
    """
    environ = os.environ if environ is None else environ
    explicit = path is not None or CONFIG_PATH_ENV in environ
    config_path = Path(path or environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_FILE).resolve()
    data: dict[str, Any] = {}
    if config_path.exists():
        try:
            loaded = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            msg = f"{config_path}: not valid YAML: {e}"
            raise ConfigError(msg) from e
        if not isinstance(loaded, dict):
            msg = f"{config_path}: top level must be a mapping"
            raise ConfigError(msg)
        data = loaded
    elif explicit:
        msg = f"config file not found: {config_path}"
        raise ConfigError(msg)
    for section in ("postgres", "stripe"):
        secret_key = "password" if section == "postgres" else "api_key"
        if secret_key in (data.get(section) or {}):
            msg = f"{config_path}: {section}.{secret_key} must not be in the config file; use the environment or the secrets file"
            raise ConfigError(msg)
    if "destination_api_keys" in (data.get("billing") or {}):
        msg = f"{config_path}: billing.destination_api_keys must not be in the config file; use METERFLOW_DESTINATION_<NAME>_API_KEY in the environment or the secrets file"
        raise ConfigError(msg)
    data.setdefault("base_dir", str(config_path.parent))
    _apply_env_overrides(data, environ)
    return _with_secrets(data, environ, str(config_path))


def _with_secrets(data: dict[str, Any], environ: Mapping[str, str], source: str) -> JobConfig:
    """Validate the config after adding the secrets from the environment or the secrets file."""
    data = dict(data)
    secrets_path = Path(data.get("secrets_file", JobConfig.model_fields["secrets_file"].default))
    if not secrets_path.is_absolute():
        secrets_path = Path(data.get("base_dir", ".")) / secrets_path
    secrets = {
        **read_secrets_file(secrets_path),
        **secret_file_values(environ),
        **{k: v for k, v in environ.items() if (k in SECRET_ENV_KEYS or DESTINATION_KEY.fullmatch(k)) and v},
    }
    for env_key, (section, key) in SECRET_ENV_KEYS.items():
        if secrets.get(env_key):
            data[section] = {**(data.get(section) or {}), key: secrets[env_key]}
    destination_keys = {
        match.group(1).lower(): value
        for env_key, value in secrets.items()
        if value and (match := DESTINATION_KEY.fullmatch(env_key))
    }
    if destination_keys:
        data["billing"] = {**(data.get("billing") or {}), "destination_api_keys": destination_keys}
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        msg = f"invalid configuration ({source}):\n{e}"
        raise ConfigError(msg) from e


def config_without_secrets(cfg: JobConfig) -> dict[str, Any]:
    """The config as plain data with the secrets left out: safe to ship inside a job graph."""
    return cfg.model_dump(
        exclude={"postgres": {"password"}, "stripe": {"api_key"}, "billing": {"destination_api_keys"}}
    )


def config_on_worker(data: dict[str, Any], environ: Mapping[str, str] | None = None) -> JobConfig:
    """Rebuild a config shipped with ``config_without_secrets``; secrets come from the worker's environment or secrets file."""
    return _with_secrets(data, os.environ if environ is None else environ, "job graph")
