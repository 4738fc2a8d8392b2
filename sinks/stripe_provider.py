"""Stripe meter events through the official SDK: the Provider of sinks/billing.py for Stripe.

The SDK's own retries are off: retry, backoff and dead-lettering are the forwarder's policy, which
counts attempts in the ledger. The identifier doubles as the Idempotency-Key, so a resend of the
same window replays Stripe's first answer instead of creating a second event.
"""

from __future__ import annotations

import stripe

from meterflow.config import JobConfig
from meterflow.errors import ConfigError, ProviderError
from sinks.billing import MeterEvent
from sinks.retry import RETRYABLE_STATUS


def _retry_after(headers: object) -> float | None:
    """Seconds from a Retry-After header (any mapping of headers), or None."""
    if not hasattr(headers, "items"):
        return None
    value = next((v for k, v in headers.items() if str(k).lower() == "retry-after"), None)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class StripeMeterEvents:
    """``POST /v1/billing/meter_events`` with the official ``stripe`` SDK."""

    name = "stripe"

    def __init__(self, cfg: JobConfig, client: stripe.StripeClient | None = None) -> None:
        if client is None:
            if cfg.stripe.api_key is None:
                msg = "billing is enabled but there is no Stripe API key: set METERFLOW_STRIPE_API_KEY or put it in the secrets file"
                raise ConfigError(msg)
            timeout = cfg.billing.request_timeout.total_seconds()
            client = stripe.StripeClient(
                cfg.stripe.api_key.get_secret_value(),
                base_addresses={"api": cfg.stripe.api_base} if cfg.stripe.api_base else None,
                max_network_retries=0,
                http_client=stripe.RequestsClient(timeout=timeout),
            )
        self.client = client

    def send(self, event: MeterEvent) -> str:
        params = {
            "event_name": event.event_name,
            "identifier": event.identifier,
            "timestamp": event.timestamp,
            "payload": {"stripe_customer_id": event.provider_customer_id, "value": event.value},
        }
        try:
            created = self.client.v1.billing.meter_events.create(params, options={"idempotency_key": event.identifier})
        except stripe.APIConnectionError as e:  # timeouts and dropped connections: the event may or may not have arrived
            raise ProviderError(f"connection failed: {e.user_message or e}", status=None, retryable=True) from e
        except stripe.StripeError as e:
            status = e.http_status
            retryable = status is None or status in RETRYABLE_STATUS
            raise ProviderError(e.user_message or str(e), status=status, retryable=retryable, retry_after=_retry_after(e.headers)) from e
        response = created.last_response
        return (response.request_id if response is not None else None) or created.identifier
