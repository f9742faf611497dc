"""Agent settings: flags win over `CHAOS_AGENT_*` environment over a file.

The file (YAML or JSON, named by `--config` or `CHAOS_AGENT_CONFIG`) uses the
field names below; nested models such as the policy are nested maps there
(`policy: {max_duration_s: 600}`) and `__`-joined names in the environment
(`CHAOS_AGENT_POLICY__MAX_DURATION_S=600`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from chaos_agent.logs import LogFormat
from chaos_agent.policy import Policy
from chaos_agent.wire import Name

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
# 9464 is the port OpenTelemetry's Prometheus exporter uses by convention;
# it is free on nodes that already run node_exporter (9100).
DEFAULT_METRICS_LISTEN = "0.0.0.0:9464"


class SettingsError(ValueError):
    """Settings that cannot work: the text names the setting and the fix."""


class BrokerAddress(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    tls: bool = False


def parse_broker_url(url: str) -> BrokerAddress:
    """`mqtt://host:port` (port 1883) or `mqtts://host:port` (TLS, port 8883)
    -> host, port and whether to speak TLS."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts"):
        msg = (
            f"broker URL {url!r} has scheme {parts.scheme!r}: use mqtts://HOST:PORT "
            "(TLS) or mqtt://HOST:PORT (plain, for a trusted network only)"
        )
        raise SettingsError(msg)
    if not parts.hostname:
        msg = f"broker URL {url!r} names no host: use mqtts://HOST:PORT"
        raise SettingsError(msg)
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT)
    except ValueError:
        msg = f"broker URL {url!r} has a port that is not a number from 1 to 65535"
        raise SettingsError(msg) from None
    return BrokerAddress(host=parts.hostname, port=port, tls=tls)


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); `[::1]:9464` for IPv6."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        msg = f"listen address {value!r} must be HOST:PORT, e.g. 127.0.0.1:9464"
        raise SettingsError(msg)
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_label(value: str) -> tuple[str, str]:
    """`key=value` -> (key, value)."""
    key, sep, label = value.partition("=")
    if not sep or not key:
        msg = f"label {value!r} must be KEY=VALUE, e.g. zone=edge-1"
        raise SettingsError(msg)
    return key, label


class AgentSettings(BaseSettings):
    """Everything `chaos-agent run` needs; see the module docstring for sources."""

    model_config = SettingsConfigDict(
        env_prefix="CHAOS_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    broker: str = Field(
        default=f"mqtt://127.0.0.1:{DEFAULT_MQTT_PORT}",
        description="MQTT broker URL, mqtts://HOST:PORT or mqtt://HOST:PORT",
    )
    username: str | None = None
    password: SecretStr | None = None
    # TLS (mqtts:// only): the CA that signed the broker's certificate (the
    # system store when unset), and this agent's client certificate and key
    # for mutual TLS (the broker then takes the certificate's CN as the
    # agent's identity).
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    node: Name
    site: Name = "default"
    labels: dict[str, str] = {}
    state_dir: Path = Path("/var/lib/aftershock")
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    telemetry_interval_s: float = Field(default=5.0, gt=0, le=3600)
    keepalive_s: int = Field(default=15, ge=5, le=3600)
    # Reconnect backoff: first wait and cap, in seconds.
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # How long shutdown may spend reverting before it gives up (and leaves the
    # rest to the journal and the next start).
    shutdown_timeout_s: float = Field(default=60.0, gt=0)
    cgroup_root: str = "aftershock"
    policy: Policy = Policy()
    # Public keys (.pub, PEM) whose signatures this agent accepts: commands,
    # lease renewals and resumes must carry a valid signature by one of them.
    # The agent refuses to start without one unless insecure_allow_unsigned.
    trust: Annotated[list[Path], NoDecode] = []
    # Laptop demos only: with no trusted key, act on unsigned commands.
    insecure_allow_unsigned: bool = False
    # A command issued further ahead than this by the agent's clock is
    # refused: NTP-synchronized clocks never disagree that much.
    max_clock_skew_s: float = Field(default=30.0, ge=0, le=300)
    log_level: str = "info"
    log_format: LogFormat = "auto"
    config: Path | None = Field(default=None, description="YAML or JSON settings file")

    @field_validator("trust", mode="before")
    @classmethod
    def _trust_list(cls, value: Any) -> Any:
        # CHAOS_AGENT_TRUST=a.pub,b.pub as well as a list in the file.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value:
            parse_listen(value)
        return value or None

    @model_validator(mode="after")
    def _tls_files(self) -> AgentSettings:
        given = [name for name in ("ca", "cert", "key") if getattr(self, name)]
        if given and not self.broker_address.tls:
            msg = (
                f"{', '.join(given)} given but the broker URL {self.broker!r} is "
                "plain MQTT: use mqtts://HOST:PORT"
            )
            raise SettingsError(msg)
        if (self.cert is None) != (self.key is None):
            msg = "mutual TLS needs both cert and key (client certificate and key)"
            raise SettingsError(msg)
        return self

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    def check_trust(self) -> None:
        """Refuse to run an agent that would act on anyone's word.

        Raises SettingsError unless a trusted key is given or unsigned
        operation was asked for explicitly.
        """
        if self.trust or self.insecure_allow_unsigned:
            return
        msg = (
            "no trusted coordinator key: pass --trust FILE or, for a laptop demo "
            "only, --insecure-allow-unsigned (environment: CHAOS_AGENT_TRUST, "
            "CHAOS_AGENT_INSECURE_ALLOW_UNSIGNED)"
        )
        raise SettingsError(msg)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win; the file comes last so flags and environment
        # override it.
        return (init_settings, env_settings, ConfigFileSource(settings_cls))


class ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the file named by `config` in the flags or the environment."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ returns the whole file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if not path:
            return {}
        return read_config_file(Path(path))


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or JSON settings file (JSON is valid YAML)."""
    # Imported here: most agents take their settings from flags and the
    # environment, and PyYAML would cost every one of them ~1 MB of RSS.
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        msg = f"cannot read settings file {path}: {exc.strerror}"
        raise SettingsError(msg) from None
    except yaml.YAMLError as exc:
        msg = f"settings file {path} is not valid YAML or JSON: {exc}"
        raise SettingsError(msg) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        msg = f"settings file {path} must hold a map of settings, not a {kind}"
        raise SettingsError(msg)
    return data
