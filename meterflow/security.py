"""What the local stack may expose, and the names and values it puts into SQL: plain checks, no I/O.

* Every process ``meterflow stack up`` starts listens on a loopback address only;
  :func:`exposed_listeners` names those a config would bind elsewhere.
* The usage job's Postgres sink (jvm/ ``UsageWindowSink``) is built with
  :class:`WindowSinkTarget`: the variable and secrets file the TaskManager reads the password
  from, so the job graph never holds it.
* ``psql`` runs statements built from configured names (database, role, table) and the
  generated password: :func:`pg_identifier` admits only plain identifiers and quotes them,
  :func:`pg_string_literal` quotes a value as a standard SQL string.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from meterflow.config import PG_IDENTIFIER_PATTERN, SECRET_ENV_KEYS, JobConfig

# Postgres' unquoted identifier shape, limited to ASCII and 63 bytes (NAMEDATALEN - 1).
PG_IDENTIFIER = re.compile(PG_IDENTIFIER_PATTERN)
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface (127.0.0.0/8, ::1 or localhost)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def local_listeners(cfg: JobConfig) -> dict[str, str]:
    """The address each listener of the local stack binds, by the config key that sets it."""
    kafka_host = cfg.kafka.bootstrap_servers.split(",")[0].rpartition(":")[0] or "127.0.0.1"
    return {
        "kafka.bootstrap_servers": kafka_host,
        "postgres.host": cfg.postgres.host,
        "flink.rest_host": cfg.flink.rest_host,
        "serve.host": cfg.serve.host,
    }


def exposed_listeners(cfg: JobConfig) -> dict[str, str]:
    """The listeners of :func:`local_listeners` that would bind an address other than loopback."""
    return {key: host for key, host in local_listeners(cfg).items() if not is_loopback(host)}


def pg_identifier(name: str) -> str:
    """``name`` as a double-quoted Postgres identifier; ValueError unless it is a plain identifier.

    Plain means letters, digits and ``_``, not starting with a digit, at most 63 characters: no
    quote, space, dot or semicolon can reach the statement.
    """
    if not isinstance(name, str) or not PG_IDENTIFIER.match(name):
        msg = f"invalid Postgres identifier {name!r}: use letters, digits and _ (not first), at most 63 characters"
        raise ValueError(msg)
    return f'"{name}"'


def pg_string_literal(value: str) -> str:
    """``value`` as a standard SQL string literal (quotes doubled); ValueError for a NUL byte."""
    if "\x00" in value:
        msg = "a Postgres string cannot contain a NUL byte"
        raise ValueError(msg)
    return "'" + value.replace("'", "''") + "'"


POSTGRES_PASSWORD_VARIABLE = next(key for key, field in SECRET_ENV_KEYS.items() if field == ("postgres", "password"))


@dataclass(frozen=True)
class WindowSinkTarget:
    """Where jvm/ UsageWindowSink writes, and where its TaskManager reads the password (not the password)."""

    url: str
    table: str
    user: str
    password_variable: str
    secrets_file: str


def window_sink_target_of(cfg: JobConfig) -> WindowSinkTarget:
    """The usage table's sink target: JDBC URL, table, role, and the password's sources on the TaskManager.

    The TaskManager resolves the password as meterflow/config.py does: the environment variable,
    then ``<variable>_FILE``, then the secrets file (an absolute path, as the client resolved it).
    """
    pg = cfg.postgres
    return WindowSinkTarget(
        pg.jdbc_url(), pg.usage_table, pg.user, POSTGRES_PASSWORD_VARIABLE, str(cfg.path(cfg.secrets_file))
    )
