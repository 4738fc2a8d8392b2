"""The local stack's Postgres: a cluster in the state directory, run as the postgres OS user."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.base import ComponentStatus, port_open, require_free, wait_until
from meterflow.security import pg_identifier, pg_string_literal

POSTGRES_OS_USER = "postgres"


def postgres_bin_dir() -> Path:
    """Directory of Debian's PostgreSQL server binaries (newest installed major version)."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not candidates:
        msg = "PostgreSQL server not installed: run scripts/setup.sh (apt-get install postgresql)"
        raise StackError(msg)
    return candidates[-1].parent


def _ensure_traversable(path: Path, user: str) -> None:
    """Let ``user`` reach ``path``: grant o+x on ancestors that lack it (e.g. a 0700 temp dir)."""
    for parent in [*reversed(path.parents)]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
            print(f"granted search (o+x) on {parent} so the {user} user can reach {path}", file=sys.stderr)


class PostgresServer:
    """A Postgres cluster in the state directory, run as the postgres OS user."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.dir = cfg.state_dir / "postgres"
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"

    def as_postgres(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a server binary as the postgres OS user (directly when this process is not root)."""
        if os.geteuid() == 0:
            args = ["runuser", "-u", POSTGRES_OS_USER, "--", *args]
        return subprocess.run(args, check=False, capture_output=True, text=True, **kw)

    def running(self) -> bool:
        """pg_ctl reports the server running and its port answers."""
        if not (self.data / "PG_VERSION").exists():
            return False
        ok = self.as_postgres([str(postgres_bin_dir() / "pg_ctl"), "status", "-D", str(self.data)]).returncode == 0
        return ok and port_open(self.cfg.postgres.host, self.cfg.postgres.port)

    def up(self) -> None:
        """initdb once, start, create the role and database with the generated password."""
        bindir = postgres_bin_dir()
        pg = self.cfg.postgres
        if self.running():
            self.ensure_role_and_db()
            return
        require_free(pg.host, pg.port, "Postgres", "postgres.port")
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _ensure_traversable(self.dir, POSTGRES_OS_USER)
            ids = pwd.getpwnam(POSTGRES_OS_USER)
            os.chown(self.dir, ids.pw_uid, ids.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            r = self.as_postgres(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                ]
            )
            if r.returncode:
                msg = f"initdb failed: {r.stderr.strip()}"
                raise StackError(msg)
        opts = f"-p {pg.port} -k {self.dir} -c listen_addresses={pg.host} -c fsync=on -c max_connections=100"
        r = self.as_postgres(
            [str(bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", opts]
        )
        if r.returncode:
            msg = f"Postgres did not start: {r.stderr.strip() or r.stdout.strip()}; see {self.log}"
            raise StackError(msg)
        wait_until(lambda: port_open(pg.host, pg.port), "Postgres", 60, self.log)
        self.ensure_role_and_db()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the local socket; return stdout.

        The statement goes through standard input, never the command line, which any local user
        can read in the process list (it may carry the role's password).
        """
        bindir = postgres_bin_dir()
        r = self.as_postgres(
            [
                str(bindir.parent / "bin" / "psql") if (bindir / "psql").exists() else "psql",
                "-h",
                str(self.dir),
                "-p",
                str(self.cfg.postgres.port),
                "-d",
                pg_identifier(database).strip('"'),
                "-v",
                "ON_ERROR_STOP=1",
                "-qAt",
                "-f",
                "-",
            ],
            input=sql,
        )
        if r.returncode:
            msg = f"psql failed: {r.stderr.strip()}"
            raise StackError(msg)
        return r.stdout

    def ensure_role_and_db(self) -> None:
        """Create the configured role and database, or set the role's password to the configured one."""
        pg = self.cfg.postgres
        if pg.password is None:
            msg = "no Postgres password configured: set METERFLOW_POSTGRES_PASSWORD or let `stack up` generate the secrets file"
            raise StackError(msg)
        user, database = pg_identifier(pg.user), pg_identifier(pg.database)
        password = pg_string_literal(pg.password.get_secret_value())
        if not self.psql(f"SELECT 1 FROM pg_roles WHERE rolname = {pg_string_literal(pg.user)}").strip():
            self.psql(f"CREATE ROLE {user} LOGIN PASSWORD {password}")
        else:
            self.psql(f"ALTER ROLE {user} LOGIN PASSWORD {password}")
        if not self.psql(f"SELECT 1 FROM pg_database WHERE datname = {pg_string_literal(pg.database)}").strip():
            self.psql(f"CREATE DATABASE {database} OWNER {user}")

    def down(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` rolls back open transactions; ``immediate`` is a crash)."""
        if not (self.data / "PG_VERSION").exists():
            return
        self.as_postgres([str(postgres_bin_dir() / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w"])

    def status(self) -> ComponentStatus:
        """Running state and address."""
        pg = self.cfg.postgres
        return ComponentStatus("postgres", self.running(), f"{pg.host}:{pg.port}/{pg.database}", str(self.data))
