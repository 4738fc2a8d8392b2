"""The schema registry helpers without a registry: wire framing at its limits, URLs, errors, and when the stack runs one."""

from __future__ import annotations

import pytest

import meterflow.local.registry as registry_module
from connectors.schema_registry import (
    MAX_SCHEMA_ID,
    error_of,
    frame,
    schema_by_id_url,
    schema_text,
    set_compatibility,
    subject_versions_url,
    unframe,
    value_subject,
)
from meterflow.config import JobConfig
from meterflow.errors import StackError
from meterflow.local.registry import CCOMPAT_PATH, SchemaRegistry, local_registry_port


@pytest.mark.parametrize("schema_id", [0, 1, 256, MAX_SCHEMA_ID])
def test_frame_round_trips_every_id_up_to_the_largest(schema_id):
    message = frame(schema_id, b"\x02ab")
    assert message[0] == 0
    assert int.from_bytes(message[1:5], "big") == schema_id
    assert unframe(message) == (schema_id, b"\x02ab")


@pytest.mark.parametrize("schema_id", [-1, MAX_SCHEMA_ID + 1])
def test_frame_refuses_an_id_outside_the_signed_32_bit_range(schema_id):
    with pytest.raises(ValueError, match="outside"):
        frame(schema_id, b"")


def test_unframe_needs_the_whole_five_byte_header_and_magic_zero():
    assert unframe(b"\x00\x00\x00\x00\x07") == (7, b"")  # exactly the header: an empty body
    assert unframe(b"\x00\x00\x00\x07") is None  # one byte short
    assert unframe(b"\x01\x00\x00\x00\x07x") is None  # not the registry's magic byte
    assert unframe(b"") is None


def test_subject_and_urls():
    assert value_subject("usage-events") == "usage-events-value"
    base = f"http://127.0.0.1:8085{CCOMPAT_PATH}/"
    assert (
        subject_versions_url(base, "a/b-value") == f"http://127.0.0.1:8085{CCOMPAT_PATH}/subjects/a%2Fb-value/versions"
    )
    assert schema_by_id_url(base, 42) == f"http://127.0.0.1:8085{CCOMPAT_PATH}/schemas/ids/42"


def test_schema_text_dumps_a_parsed_schema_and_keeps_text():
    assert schema_text({"type": "string"}) == '{"type":"string"}'
    assert schema_text('{"type": "string"}') == '{"type": "string"}'


def test_error_of_reads_the_confluent_error_body_or_keeps_the_text():
    err = error_of(409, b'{"error_code": 409, "message": "incompatible"}')
    assert (err.status, err.error_code, err.message) == (409, 409, "incompatible")
    err = error_of(502, b"<html>bad gateway</html>")
    assert (err.status, err.error_code, err.message) == (502, None, "<html>bad gateway</html>")


def test_set_compatibility_refuses_an_unknown_level_before_any_request():
    with pytest.raises(ValueError, match="unknown compatibility level"):
        set_compatibility("http://127.0.0.1:1", "s-value", "SIDEWAYS")


@pytest.mark.parametrize(
    ("url", "port"),
    [
        (None, None),
        ("", None),
        (f"http://127.0.0.1:8085{CCOMPAT_PATH}", 8085),
        (f"http://localhost:8085{CCOMPAT_PATH}", 8085),
        (f"http://127.0.0.1{CCOMPAT_PATH}", 80),
        (f"http://registry.internal:8081{CCOMPAT_PATH}", None),
        (f"http://10.0.0.5:8081{CCOMPAT_PATH}", None),
        (f"https://127.0.0.1:8085{CCOMPAT_PATH}", None),
    ],
)
def test_the_stack_runs_a_registry_only_for_a_loopback_http_url(url, port):
    assert local_registry_port(url) == port
    assert SchemaRegistry(JobConfig(kafka={"schema_registry_url": url})).wanted is (port is not None)


def test_up_names_the_path_the_local_registry_serves(tmp_path):
    cfg = JobConfig(kafka={"schema_registry_url": "http://127.0.0.1:8085/"}, stack={"state_dir": str(tmp_path)})
    with pytest.raises(StackError, match="must end in /apis/ccompat/v7"):
        SchemaRegistry(cfg).up()


def test_up_refuses_a_registry_elsewhere(tmp_path):
    cfg = JobConfig(
        kafka={"schema_registry_url": f"http://registry.internal:8081{CCOMPAT_PATH}"},
        stack={"state_dir": str(tmp_path)},
    )
    with pytest.raises(StackError, match="not an http URL on 127.0.0.1/localhost"):
        SchemaRegistry(cfg).up()


def test_command_binds_loopback_and_keeps_its_files_in_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_module, "REGISTRY_HOME", tmp_path / "home")
    cfg = JobConfig(
        kafka={"schema_registry_url": f"http://localhost:18085{CCOMPAT_PATH}"},
        stack={"state_dir": str(tmp_path / "state")},
    )
    with pytest.raises(StackError, match="run scripts/setup.sh"):
        SchemaRegistry(cfg).command()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "apicurio-registry-app-3.0.9-runner.jar").touch()
    args = SchemaRegistry(cfg).command()
    assert "-Dquarkus.http.host=127.0.0.1" in args and "-Dquarkus.http.port=18085" in args
    state = tmp_path / "state" / "schema-registry"
    assert f"-Dapicurio.datasource.url=jdbc:h2:file:{state / 'data' / 'registry'}" in args
    assert f"-Djava.io.tmpdir={state / 'tmp'}" in args
    assert args[-2:] == ["-jar", str(tmp_path / "home" / "apicurio-registry-app-3.0.9-runner.jar")]


@pytest.mark.parametrize(("url", "listed"), [(None, False), (f"http://127.0.0.1:18085{CCOMPAT_PATH}", True)])
def test_stack_status_lists_the_registry_only_when_the_config_uses_a_local_one(tmp_path, url, listed):
    from meterflow.local.stack import LocalStack

    cfg = JobConfig(kafka={"schema_registry_url": url}, stack={"state_dir": str(tmp_path)})
    rows = {s.name: s for s in LocalStack(cfg).status()}
    assert ("schema-registry" in rows) is listed
    if listed:
        assert rows["schema-registry"].address == f"http://127.0.0.1:18085{CCOMPAT_PATH}"
        assert not rows["schema-registry"].running
