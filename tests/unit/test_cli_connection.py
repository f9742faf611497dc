"""Broker URLs for the coordinator and listen settings of the embedded broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.broker import BrokerConfigError, broker_config, parse_listen
from coordinator.mqtt import BrokerSettings, BrokerUrlError, parse_broker_url


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://127.0.0.1:1883", "127.0.0.1", 1883, False),
        ("mqtt://broker.local", "broker.local", 1883, False),
        ("mqtts://broker.local", "broker.local", 8883, True),
        ("mqtts://[::1]:9000", "::1", 9000, True),
    ],
)
def test_broker_urls_parse(url: str, host: str, port: int, tls: bool) -> None:
    """Test that mqtt:// and mqtts:// URLs give host, port (default per scheme)
    and TLS."""
    address = parse_broker_url(url)
    assert (address.host, address.port, address.tls) == (host, port, tls)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("127.0.0.1:1883", "no mqtt or mqtts scheme"),
        ("http://broker:1883", "no mqtt or mqtts scheme"),
        ("mqtt://", "names no host"),
        ("mqtt://broker:99999", "invalid port"),
        ("mqtt://broker/topic", "path or query"),
    ],
)
def test_bad_broker_urls_are_refused(url: str, reason: str) -> None:
    """Test that unusable broker URLs are refused with the expected form."""
    with pytest.raises(BrokerUrlError, match=reason) as error:
        parse_broker_url(url)
    assert "mqtt://HOST[:PORT]" in str(error.value)


def test_credentials_from_url_yield_to_flags() -> None:
    """Test that URL credentials are used unless flags give others, and never
    appear in the printable URL."""
    from_url = BrokerSettings.from_url("mqtt://ops:p%40ss@broker:1883")
    from_flags = BrokerSettings.from_url("mqtt://ops:p%40ss@broker:1883", "me", "pw")

    assert (from_url.username, from_url.password) == ("ops", "p@ss")
    assert (from_flags.username, from_flags.password) == ("me", "pw")
    assert from_url.address.url == "mqtt://broker:1883"


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:1883", "127.0.0.1", 1883),
        ("[::1]:1884", "::1", 1884),
        (":1885", "127.0.0.1", 1885),
        ("0.0.0.0:1886", "0.0.0.0", 1886),
    ],
)
def test_listen_addresses_parse(text: str, host: str, port: int) -> None:
    """Test that --listen takes HOST:PORT, [IPv6]:PORT and :PORT (loopback)."""
    listen = parse_listen(text)
    assert (listen.host, listen.port) == (host, port)


@pytest.mark.parametrize("text", ["1883", "host:", "host:0", "host:70000", "h:x"])
def test_bad_listen_addresses_are_refused(text: str) -> None:
    """Test that a --listen without a valid port is refused with examples."""
    with pytest.raises(BrokerConfigError, match=r"e\.g\. 127\.0\.0\.1:1883"):
        parse_listen(text)


def test_loopback_broker_is_anonymous_by_default() -> None:
    """Test that a loopback listener allows anonymous clients without a
    password file."""
    config = broker_config(parse_listen("127.0.0.1:1883"))
    plugins = config["plugins"]
    assert plugins == {
        "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
    }
    assert config["listeners"]["default"]["bind"] == "127.0.0.1:1883"


def test_network_broker_needs_passwords_or_consent() -> None:
    """Test that an open broker on a network address is refused unless anonymous
    access is asked for explicitly."""
    listen = parse_listen("0.0.0.0:1883")

    with pytest.raises(BrokerConfigError, match="--password-file FILE"):
        broker_config(listen)
    assert broker_config(listen, allow_anonymous=True)["plugins"]


def test_password_file_turns_anonymous_off(tmp_path: Path) -> None:
    """Test that a password file replaces anonymous access with file auth."""
    passwords = tmp_path / "passwords"
    passwords.write_text("ops:$argon2id$...\n")

    plugins = broker_config(parse_listen("0.0.0.0:1883"), password_file=passwords)[
        "plugins"
    ]

    assert list(plugins) == ["amqtt.plugins.authentication.FileAuthPlugin"]
    assert plugins["amqtt.plugins.authentication.FileAuthPlugin"] == {
        "password_file": str(passwords)
    }


def test_missing_password_file_is_refused(tmp_path: Path) -> None:
    """Test that a password file that does not exist is refused by name."""
    with pytest.raises(BrokerConfigError, match="does not exist"):
        broker_config(parse_listen(":1883"), password_file=tmp_path / "nope")
