"""The ``serve`` section of the config: the HTTP service (``meterflow serve``; README, "HTTP ingest")."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from meterflow.config_values import Duration

# As meterflow/config.py's table names: lower case, unquoted in the generated SQL.
_TABLE = r"^[a-z_][a-z0-9_]{0,62}$"


class ServeConfig(BaseModel):
    """The HTTP service: where it listens and what it takes."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="The address it listens on (loopback unless put behind a proxy).")
    port: int = Field(8088, ge=1, le=65535)
    max_batch: int = Field(1000, ge=1, le=1000, description="Events per POST /v1/events request.")
    max_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="The largest request body taken (413 past it)."
    )
    max_requests_in_flight: int = Field(
        64, ge=1, le=10_000, description="Ingest requests handled at once; one more is answered 429 with Retry-After."
    )
    kafka_ack_timeout: Duration = Field(
        timedelta(seconds=10), description="How long a request waits for Kafka's acknowledgement before a 503."
    )
    api_keys_table: str = Field("api_keys", pattern=_TABLE, description="Tenants' API keys, hashed.")
    usage_pool_size: int = Field(
        10, ge=1, le=200, description="Postgres connections the usage API reads over (a request holds one)."
    )
    usage_page_refresh: Duration = Field(
        timedelta(seconds=15), description="How often the usage page reads the API again."
    )
    key_cache_ttl: Duration = Field(
        timedelta(seconds=30),
        description="How long a key looked up stays known to the service (a revoke takes effect within it).",
    )
