"""Tenants' API keys in Postgres, stored as their SHA-256 (meterflow/serve/ingest.py hash_api_key)."""

from __future__ import annotations

from datetime import datetime

from meterflow.config import JobConfig
from sinks.postgres import connect
from sinks.postgres_schema import check_identifier


def api_keys_ddl(table: str) -> str:
    t = check_identifier(table)
    return f"""CREATE TABLE IF NOT EXISTS {t} (
    key_hash   text        PRIMARY KEY,
    tenant_id  text        NOT NULL,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
)"""


def create_key(cfg: JobConfig, key_hash: str, tenant_id: str, name: str) -> None:
    table = cfg.serve.api_keys_table
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(api_keys_ddl(table))
        conn.execute(
            f"INSERT INTO {check_identifier(table)} (key_hash, tenant_id, name) VALUES (%s, %s, %s)",
            (key_hash, tenant_id, name),
        )


def revoke_keys(cfg: JobConfig, tenant_id: str, name: str) -> int:
    """Revoke a tenant's keys of that name; how many."""
    t = check_identifier(cfg.serve.api_keys_table)
    with connect(cfg.postgres) as conn, conn.transaction():
        conn.execute(api_keys_ddl(cfg.serve.api_keys_table))
        return conn.execute(
            f"UPDATE {t} SET revoked_at = now() WHERE tenant_id = %s AND name = %s AND revoked_at IS NULL",
            (tenant_id, name),
        ).rowcount


def list_keys(cfg: JobConfig) -> list[tuple[str, str, datetime, datetime | None]]:
    """(tenant, name, created, revoked) of every key; never the key or its hash."""
    t = check_identifier(cfg.serve.api_keys_table)
    with connect(cfg.postgres) as conn:
        conn.execute(api_keys_ddl(cfg.serve.api_keys_table))
        return conn.execute(f"SELECT tenant_id, name, created_at, revoked_at FROM {t} ORDER BY 1, 3").fetchall()


def tenant_of(cfg: JobConfig, key_hash: str) -> str | None:
    """The tenant of a key that is not revoked, or None."""
    t = check_identifier(cfg.serve.api_keys_table)
    with connect(cfg.postgres) as conn:
        conn.execute(api_keys_ddl(cfg.serve.api_keys_table))
        row = conn.execute(
            f"SELECT tenant_id FROM {t} WHERE key_hash = %s AND revoked_at IS NULL", (key_hash,)
        ).fetchone()
    return row[0] if row else None
