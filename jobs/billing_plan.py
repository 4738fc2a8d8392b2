"""Pure SQL of the billing job: the closed-windows source and the retry scan's clock.

The billing job reads the usage job's closed-windows topic (avro/closed_window.avsc) with its own
consumer group, read_committed, so it sees each closed window once its transaction committed.
"""

from __future__ import annotations

from connectors.avro_types import derive_columns, load_schema
from jobs.plan import CLOSED_WINDOW_SCHEMA, sql_epoch_ms
from jobs.sql import sql_with
from meterflow.config import JobConfig
from meterflow.window_row import WINDOW_ROW, bridge_names

CLOSED_WINDOWS_SOURCE_TABLE = "closed_windows_source"
RETRY_TICKS_TABLE = "billing_retry_ticks"
RETRIES_VIEW = "billing_retries"
# Columns of a billing input row: the partitioning key first, then the window; the retry scan's
# rows name the delivery to retry in the last one.
BILLING_INPUT_COLUMNS = ("billing_key", *bridge_names(WINDOW_ROW), "retry_identifier")


# A batch of rows for the delivery operator waits at most this long for more rows.
DELIVERY_BATCH_DELAY_MS = 20
MAX_DELIVERY_BATCH_ROWS = 64


def delivery_batch_rows(max_in_flight: int) -> int:
    """Rows per element handed to the delivery operator: a sixteenth of the calls in flight, at most
    64, so a subtask keeps at least 16 batches in flight (a batch's slot frees when its last row is done)."""
    return max(1, min(MAX_DELIVERY_BATCH_ROWS, max_in_flight // 16))


def delivery_batches_in_flight(max_in_flight: int) -> int:
    """Batches holding ``billing.max_in_flight`` rows, rounded up."""
    rows = delivery_batch_rows(max_in_flight)
    return -(-max_in_flight // rows)


def delivery_batch_capacity(max_in_flight: int) -> int:
    """The delivery operator's capacity in batches: four times what holds ``billing.max_in_flight`` rows.

    A batch keeps its slot until its last row is done, so a batch waiting for one slow row (a
    customer's turn on v1) would otherwise hold a whole batch of slots. The rows themselves take
    one of ``billing.max_in_flight`` delivery slots each inside the worker (billing_operator.py),
    so what one customer holds stays ``billing.max_held_per_key`` rows.
    """
    return 4 * delivery_batches_in_flight(max_in_flight)


def billing_key(tenant_id: str, customer_id: str, meter: str) -> str:
    """The partitioning key of a (tenant, customer, meter): the same as :func:`billing_key_expr` computes in SQL."""
    return f"{tenant_id}\x1f{customer_id}\x1f{meter}"


def billing_key_expr() -> str:
    """SQL for the partitioning key: one customer's meter always lands on one subtask.

    Joined with the unit separator; a key that collides after joining only shares a subtask, the
    deliverer still serialises by the exact (tenant, customer, meter).
    """
    return "CONCAT(`tenant_id`, CHR(31), `customer_id`, CHR(31), `meter`)"


def closed_windows_source_ddl(cfg: JobConfig) -> str:
    """Kafka source of closed windows: Avro per avro/closed_window.avsc, read_committed, offsets in checkpoints."""
    cols = ",\n  ".join(c.ddl() for c in derive_columns(load_schema(CLOSED_WINDOW_SCHEMA)))
    options = {
        "connector": "kafka",
        "topic": cfg.kafka.closed_windows_topic,
        "properties.bootstrap.servers": cfg.kafka.bootstrap_servers,
        "properties.group.id": cfg.billing_consumer_group,
        # Resume from the group's offsets (committed on checkpoint); a new group reads the topic from the start.
        "scan.startup.mode": "group-offsets",
        "properties.auto.offset.reset": "earliest",
        # The usage job writes in transactions: only committed windows are final.
        "properties.isolation.level": "read_committed",
        "scan.topic-partition-discovery.interval": "60 s",
        "format": "avro",
    }
    return f"CREATE TABLE `{CLOSED_WINDOWS_SOURCE_TABLE}` (\n  {cols}\n) {sql_with(options)}"


def closed_windows_query() -> str:
    """Closed windows as billing input rows: times as epoch ms, the quantity as an exact decimal string.

    The Python bridge has no exact DECIMAL(38, 9), so the value crosses as text and becomes a
    Python Decimal on the other side, never a float.
    """

    def ms(column: str) -> str:
        return f"CAST({sql_epoch_ms(f'`{column}`')} AS BIGINT)"

    return (
        f"SELECT {billing_key_expr()} AS `billing_key`, `tenant_id`, `customer_id`, `meter`, `dimensions_key`, "
        f"{ms('window_start')} AS `window_start_ms`, {ms('window_end')} AS `window_end_ms`, "
        "CAST(`quantity` AS STRING) AS `quantity`, `event_count`, `revision`, CAST(NULL AS STRING) AS `retry_identifier`\n"
        f"FROM `{CLOSED_WINDOWS_SOURCE_TABLE}`"
    )


def billing_input_query() -> str:
    """Closed windows and the retry scan's rows, as one stream for the keyed delivery step."""
    cols = ", ".join(f"`{c}`" for c in BILLING_INPUT_COLUMNS)
    return f"SELECT {cols} FROM ({closed_windows_query()})\nUNION ALL\nSELECT {cols} FROM `{RETRIES_VIEW}`"


def retry_ticks_ddl(parallelism: int) -> str:
    """About one row a second per subtask: the clock of the retry scan, which hands due deliveries from the ledger back to billing.

    Every subtask scans; the scan leases the rows it hands out and skips rows another scan holds
    (``FOR UPDATE SKIP LOCKED``), so scans never hand out the same delivery twice.
    """
    options = {"connector": "datagen", "rows-per-second": str(parallelism), "fields.tick.kind": "random"}
    return f"CREATE TABLE `{RETRY_TICKS_TABLE}` (\n  `tick` INT\n) {sql_with(options)}"
