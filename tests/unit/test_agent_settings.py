"""Agent settings: precedence of flags, environment and file; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from chaos_agent.settings import (
    AgentSettings,
    SettingsError,
    parse_broker_url,
    parse_label,
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        "node: from-file\n"
        "site: file-site\n"
        "labels: {zone: a}\n"
        "policy:\n  max_duration_s: 100\n  max_lease_s: 50\n"
    )
    return path


def test_flags_win_over_environment_over_file(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that a flag beats the environment, which beats the file, field by
    field, nested policy fields included."""
    monkeypatch.setenv("CHAOS_AGENT_SITE", "env-site")
    monkeypatch.setenv("CHAOS_AGENT_NODE", "env-node")
    monkeypatch.setenv("CHAOS_AGENT_POLICY__MAX_DURATION_S", "60")

    settings = AgentSettings(config=config, node="flag-node")

    assert settings.node == "flag-node"
    assert settings.site == "env-site"
    assert settings.labels == {"zone": "a"}
    assert settings.policy.max_duration_s == 60
    assert settings.policy.max_lease_s == 50


def test_config_file_named_in_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Test that CHAOS_AGENT_CONFIG names the file as --config does."""
    monkeypatch.setenv("CHAOS_AGENT_CONFIG", str(config))

    assert AgentSettings().node == "from-file"


def test_json_config_file(tmp_path: Path) -> None:
    """Test that a JSON settings file is read like YAML."""
    path = tmp_path / "agent.json"
    path.write_text('{"node": "json-node", "telemetry_interval_s": 2}')

    settings = AgentSettings(config=path)

    assert (settings.node, settings.telemetry_interval_s) == ("json-node", 2)


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    """Test that a misspelt setting is an error, not silently ignored."""
    path = tmp_path / "agent.yaml"
    path.write_text("node: n\npolicy:\n  max_duraton_s: 5\n")

    with pytest.raises(ValidationError, match="max_duraton_s"):
        AgentSettings(config=path)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    """Test that a config file that does not exist names itself in the error."""
    with pytest.raises(SettingsError, match=r"nope\.yaml"):
        AgentSettings(config=tmp_path / "nope.yaml", node="n")


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [("mqtt://broker:1884", "broker", 1884), ("10.0.0.1", "10.0.0.1", 1883)],
)
def test_broker_url(url: str, host: str, port: int) -> None:
    """Test that broker URLs give host and port, 1883 by default."""
    address = parse_broker_url(url)

    assert (address.host, address.port) == (host, port)


def test_broker_url_with_other_scheme_is_refused() -> None:
    """Test that a non-MQTT URL is refused with the form to use."""
    with pytest.raises(SettingsError, match="mqtt://HOST:PORT"):
        parse_broker_url("http://broker:80")


def test_label_without_value_is_refused() -> None:
    """Test that a label flag must be KEY=VALUE."""
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        parse_label("zone")


def test_mqtts_url_means_tls_on_port_8883() -> None:
    """Test that mqtts:// turns TLS on with 8883 as the default port."""
    address = parse_broker_url("mqtts://broker")

    assert (address.host, address.port, address.tls) == ("broker", 8883, True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"broker": "mqtt://b:1883", "ca": "ca.crt"}, "mqtts://"),
        ({"broker": "mqtts://b", "cert": "agent.crt"}, "both cert and key"),
    ],
    ids=["tls-files-on-plain-mqtt", "cert-without-key"],
)
def test_inconsistent_tls_settings_are_refused(
    fields: dict[str, str], message: str
) -> None:
    """Test that TLS files with a plain URL, or a certificate without its key,
    are refused with the fix."""
    with pytest.raises(ValidationError, match=message):
        AgentSettings(node="n1", **fields)  # type: ignore[arg-type]


def test_trust_from_environment_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that CHAOS_AGENT_TRUST=a.pub,b.pub gives two trusted key files."""
    monkeypatch.setenv("CHAOS_AGENT_TRUST", "a.pub, b.pub")

    assert AgentSettings(node="n1").trust == [Path("a.pub"), Path("b.pub")]
