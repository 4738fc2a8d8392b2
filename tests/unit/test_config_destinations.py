"""billing.destinations in the config: declared through presets, their API keys from the environment only."""

from __future__ import annotations

from datetime import timedelta

import pytest

from meterflow.config import config_on_worker, config_without_secrets, load_config
from meterflow.errors import ConfigError

DESTINATIONS = """
billing:
  destinations:
    metronome: {}
    chargebee:
      api_base: https://acme.ingest.chargebee.com/api/v2
    chargebee_eu:
      preset: chargebee
      api_base: https://acme-eu.ingest.chargebee.com/api/v2
      limits:
        requests_per_second: 0.1
"""


def test_destinations_are_declared_through_their_presets(write_config):
    cfg = load_config(write_config(DESTINATIONS), environ={})
    destinations = cfg.billing.destinations
    assert sorted(destinations) == ["chargebee", "chargebee_eu", "metronome"]
    assert destinations["metronome"].api_base == "https://api.metronome.com"
    assert destinations["chargebee_eu"].preset == "chargebee"
    assert destinations["chargebee_eu"].limits.requests_per_second == 0.1
    assert destinations["chargebee_eu"].limits.max_age == timedelta(hours=12)


def test_a_destinations_key_comes_from_the_environment_a_file_or_the_secrets_file(write_config, tmp_path):
    (tmp_path / "secrets.env").write_text("METERFLOW_DESTINATION_CHARGEBEE_API_KEY=cb-from-file\n")
    (tmp_path / "mkey").write_text("m-from-mount\n")
    path = write_config("secrets_file: secrets.env\n" + DESTINATIONS)
    cfg = load_config(path, environ={"METERFLOW_DESTINATION_METRONOME_API_KEY_FILE": str(tmp_path / "mkey")})
    assert cfg.billing.destination_api_key("metronome") == "m-from-mount"
    assert cfg.billing.destination_api_key("chargebee") == "cb-from-file"
    with pytest.raises(ConfigError, match="METERFLOW_DESTINATION_CHARGEBEE_EU_API_KEY"):
        cfg.billing.destination_api_key("chargebee_eu")
    env = {"METERFLOW_DESTINATION_CHARGEBEE_API_KEY": "cb-from-env"}
    assert load_config(path, environ=env).billing.destination_api_key("chargebee") == "cb-from-env"


def test_a_destinations_key_never_leaves_with_the_config(write_config):
    env = {"METERFLOW_DESTINATION_METRONOME_API_KEY": "m-secret-value"}
    cfg = load_config(write_config(DESTINATIONS), environ=env)
    assert "m-secret-value" not in repr(cfg)
    shipped = config_without_secrets(cfg)
    assert "m-secret-value" not in str(shipped)
    on_worker = config_on_worker(shipped, environ=env)
    assert on_worker.billing.destinations == cfg.billing.destinations  # declared again from the dump: the same
    assert on_worker.billing.destination_api_key("metronome") == "m-secret-value"


def test_a_key_in_the_config_file_is_refused(write_config):
    with pytest.raises(ConfigError, match="must not be in the config file"):
        load_config(write_config("billing:\n  destination_api_keys:\n    metronome: x\n"), environ={})


@pytest.mark.parametrize(
    ("yaml_text", "says"),
    [
        ("billing:\n  destinations:\n    stripe: {}\n", "not 'stripe'"),
        ("billing:\n  destinations:\n    Metronome: {}\n", "lower case"),
        ("billing:\n  destinations:\n    m" + "x" * 32 + ": {preset: metronome}\n", "at most 32"),
        ("billing:\n  destinations:\n    chargebee: {}\n", "api_base"),
        ("billing:\n  destinations:\n    recurly: {}\n", "preset 'recurly' is not one of"),
        ("billing:\n  destinations:\n    metronome: {api_base: 'ftp://x'}\n", "api_base"),
        ("billing:\n  destinations:\n    metronome: {limits: {max_batch: 0}}\n", "max_batch"),
    ],
)
def test_a_destination_that_cannot_work_is_refused_at_load(write_config, yaml_text, says):
    with pytest.raises(ConfigError, match=says):
        load_config(write_config(yaml_text), environ={})


def test_an_error_never_quotes_a_key(write_config):
    env = {"METERFLOW_DESTINATION_METRONOME_API_KEY": "sk_secret_value"}
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(DESTINATIONS + "  request_timeout: 0s\n"), environ=env)
    assert "sk_secret_value" not in str(refused.value)
    with pytest.raises(ConfigError, match="upper case") as refused:
        load_config(write_config(DESTINATIONS), environ={"METERFLOW_DESTINATION_metronome_API_KEY": "sk_secret_value"})
    assert "sk_secret_value" not in str(refused.value)
