"""The ``alerts`` section of the config: threshold alerts, evaluated and delivered by ``meterflow serve``
(README, "Threshold alerts")."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from meterflow.config_values import Duration

_TABLE = r"^[a-z_][a-z0-9_]{0,62}$"


class AlertsConfig(BaseModel):
    """Threshold alerts: how often they are evaluated, and how their webhooks are retried."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    enabled: bool = Field(
        True, description="Evaluate the tenants' rules and deliver their webhooks in meterflow serve."
    )
    interval: Duration = Field(timedelta(seconds=2), description="How often rules are evaluated and webhooks sent.")
    lookback: Duration = Field(
        timedelta(minutes=10), description="On start, usage changed this long ago or later is evaluated again."
    )
    request_timeout: Duration = Field(timedelta(seconds=10), description="How long one webhook request may take.")
    retry_base: Duration = Field(
        timedelta(seconds=2), description="The wait after a webhook's first failed attempt; doubled after each."
    )
    retry_cap: Duration = Field(timedelta(hours=1), description="The longest wait between two attempts.")
    max_attempts: int = Field(8, ge=1, le=100, description="Attempts before a webhook is dead (then `alerts replay`).")
    rules_table: str = Field("alert_rules", pattern=_TABLE)
    endpoints_table: str = Field(
        "alert_endpoints", pattern=_TABLE, description="Each tenant's webhook URL and signing secret."
    )
    crossings_table: str = Field(
        "alert_crossings", pattern=_TABLE, description="The delivery ledger: one row per rule, customer and period."
    )
