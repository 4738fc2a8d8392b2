"""A real schema registry for tests: Apicurio Registry (third_party/registry) on a free loopback port.

``schema_registry`` is session-scoped: one registry serves every test of the session and is stopped,
its state removed, at the end. Its ``url`` is the Confluent-compatible API, the value for
``kafka.schema_registry_url``. tests/conftest.py registers this module as a plugin, so a test asks
for the fixture by name.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from meterflow.config import JobConfig
from meterflow.local.base import free_ports
from meterflow.local.registry import CCOMPAT_PATH, SchemaRegistry


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory) -> Iterator[SchemaRegistry]:
    """Start the registry once per session; stop it and delete its state afterwards (MF_TEST_KEEP_STATE=1 keeps it)."""
    root = tmp_path_factory.mktemp("schema-registry")
    port = free_ports(1)[0]
    cfg = JobConfig(
        kafka={"schema_registry_url": f"http://127.0.0.1:{port}{CCOMPAT_PATH}"},
        stack={"state_dir": str(root / "state")},
    )
    registry = SchemaRegistry(cfg)
    try:
        registry.up()
        yield registry
    finally:
        registry.down()
        if not os.environ.get("MF_TEST_KEEP_STATE"):
            shutil.rmtree(root / "state", ignore_errors=True)
